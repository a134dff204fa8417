"""Output and state error of checkpointing_ssu vs the float64 reference per state dtype (GPU).
usage: python scripts/error_table.py   (prints a markdown table)"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from specssm.ops import checkpointing_ssu
from specssm.reference import checkpointing_ssu_ref
from tests.helpers.compare import rel_rms
from tests.helpers.steps import make_step, to_device


def main():
    import copy

    from specssm.reference.storage import decode_state
    print(f"card: {torch.cuda.get_device_name(0)}; Super TP8 (H=16, P=64, N=128, G=1), T=6, W=16, batch 256, "
          "bf16 activations, one step, mixed pnat")
    print("| state | precision | out max abs | out rel RMS | written-state rel RMS |\n|---|---|---|---|---|")
    for sd in (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.float8_e4m3fn):
        for prec in ("fast", "exact"):
            cache, ins = make_step(batch=256, slots=260, T=6, act=torch.bfloat16, state_dtype=sd, seed=17,
                                   H=16, P=64, N=128, G=1)
            cr, ir = copy.deepcopy(cache), dict(ins, out=ins["out"].clone())
            checkpointing_ssu_ref(**ir, **cr.op_kwargs(0))
            c, i = to_device(cache, ins, "cuda")
            checkpointing_ssu(**i, **c.op_kwargs(0), precision=prec)
            out, ref = i["out"].cpu().double(), ir["out"].double()
            m = ~torch.isnan(ref)
            lc, lr = c.layers[0], cr.layers[0]
            S = decode_state(lc.state.cpu(), None if lc.state_scale is None else lc.state_scale.cpu())
            R = decode_state(lr.state, lr.state_scale)
            w = (lr.state != cache.layers[0].state).flatten(1).any(1)
            print(f"| {str(sd).replace('torch.', '')} | {prec} | {float((out[m] - ref[m]).abs().max()):.2e} | "
                  f"{rel_rms(out[m], ref[m]):.2e} | {rel_rms(S[w], R[w]):.2e} |")


if __name__ == "__main__":
    main()
