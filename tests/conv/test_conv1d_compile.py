"""Compile the conv1d kernel for sm_90 on the CPU box (no GPU needed): the interpreter accepts Python
that the real compiler may reject, so this catches GPU-only compile errors before the device run.

The compile runs in a subprocess without TRITON_INTERPRET: with the interpreter switched on, Triton's
code generator itself misbehaves, so it cannot run inside the interpreted test process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CONFIGS = [  # (activation dtype, T, d_conv, has_bias, has_slot_indices, pdl)
    ("bf16", 6, 4, True, True, False), ("fp16", 1, 2, False, False, False), ("fp32", 4, 3, True, True, False),
    ("bf16", 6, 4, True, True, True),
]

_COMPILE_SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from specssm.conv.conv1d import _conv1d_update_kernel as kernel

results = []
for act, T, d_conv, has_bias, has_idx, pdl in json.loads(sys.argv[1]):
    names = kernel.arg_names
    sig = dict(xbc_ptr="*" + act, state_ptr="*" + act, offset_ptr="*i32", weight_ptr="*fp32",
               bias_ptr="*fp32", out_ptr="*" + act, slot_idx_ptr="*i32", conv_dim="i32", pad_slot_id="i32",
               num_slots="i32", max_offset="i32")
    for n in ("stride_x_row", "stride_x_tok", "stride_s_slot", "stride_s_row", "stride_w_ch",
              "stride_o_row", "stride_o_tok"):
        sig[n] = "i32"
    # Unit channel strides become constants on a real launch (Triton specialises the value 1).
    const = dict(stride_x_ch=1, stride_s_ch=1, stride_w_tap=1, stride_o_ch=1, T=T, D_CONV=d_conv,
                 T_PAD=triton.next_power_of_2(T), CTX_PAD=triton.next_power_of_2(d_conv - 1),
                 HAS_BIAS=has_bias, HAS_SLOT_IDX=has_idx, SILU=True, BLOCK_C=128, PDL=pdl)
    sig.update({n: "constexpr" for n in const})
    # Pointers, conv_dim and row strides divisible by 16 (conv_dim = 1280), as Triton detects them.
    div16 = ("xbc_ptr", "state_ptr", "offset_ptr", "weight_ptr", "bias_ptr", "out_ptr", "slot_idx_ptr",
             "conv_dim", "stride_x_row", "stride_x_tok", "stride_s_slot", "stride_s_row", "stride_o_row",
             "stride_o_tok")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in div16}
    num_warps = max(1, min(8, triton.next_power_of_2(T) * 128 // 256))
    src = ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps)).asm["ptx"]
    results.append(dict(barrier="bar.sync" in ptx or "barrier.sync" in ptx, vector_loads="ld.global.v" in ptx,
                        launch_dependents="griddepcontrol.launch_dependents" in ptx))
print("RESULT " + json.dumps(results))
"""


def _have_ptxas():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(90).path is not None
    except Exception:  # noqa: BLE001 - no NVIDIA backend / toolchain in this install
        return False


@pytest.mark.skipif(not _have_ptxas(), reason="needs Triton's NVIDIA backend with ptxas")
def test_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(CONFIGS)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    for cfg, res in zip(CONFIGS, json.loads(line[len("RESULT "):])):
        assert res["barrier"], f"{cfg}: the barrier between loads and stores is missing"
        # 16-byte aligned contiguous channels must give vector loads (coalesced token rows).
        assert res["vector_loads"], f"{cfg}: no vectorised global loads"
        assert res["launch_dependents"] == cfg[-1], f"{cfg}: griddepcontrol.launch_dependents iff pdl"
