"""Compare one step of a Triton op with the float64 reference on copies of the same cache."""
from __future__ import annotations

import copy

import torch

from specssm.reference.storage import decode_state, is_quantized
from tests.helpers.steps import to_device


def state_bits(t):
    """A state pool as comparable bits (fp8 tensors have no comparison ops)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


# relative RMS error bounds of outputs (and written states) by (activation dtype, state dtype, precision)
OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 6e-3, torch.float16: 1e-3}
# quantized states: the decoded state (codes times row scales), within a grid step of the reference's
STATE_TOL = {torch.float32: 1e-5, torch.bfloat16: 6e-3, torch.float16: 1e-3, torch.int8: 2e-2,
             torch.float8_e4m3fn: 6e-2}
FAST_TOL = 2e-3      # tf32 dots


def cache_bits(cache) -> dict:
    """Every tensor of an SSMCache that a step or a commit may write, as comparable copies."""
    d = {"ring_start": cache.ring_start.clone(), "pnat": cache.pnat.clone(), "seeds": cache.seeds.clone()}
    for i, lc in enumerate(cache.layers):
        for nm in ("state", "state_scale", "x_cache", "B_cache", "dt_cache"):
            t = getattr(lc, nm)
            if t is not None:
                d[f"{nm}[{i}]"] = state_bits(t).clone()
    return d


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


def run_and_compare(op, ref, cache, inputs, device="cpu", precision="exact", **op_kw):
    """Run `op` on a copy of the cache on `device` and `ref` on a CPU copy; assert they agree.

    Returns a dict of measured errors."""
    c_ref = copy.deepcopy(cache)
    in_ref = dict(inputs, out=inputs["out"].clone())
    ref(**in_ref, **c_ref.op_kwargs(0))
    c_op, in_op = to_device(cache, inputs, device)
    before = copy.deepcopy(c_op.layers[0])
    if precision:
        op(**in_op, **c_op.op_kwargs(0), precision=precision, **op_kw)
    else:
        op(**in_op, **c_op.op_kwargs(0), **op_kw)
    out, out_ref = in_op["out"].cpu(), in_ref["out"]
    act = inputs["x"].dtype
    fast = precision == "fast" and cache.state_dtype == torch.float32
    tol = max(OUT_TOL[act], FAST_TOL if fast else 0.0)
    # every output of a live row written, padding rows untouched (still NaN)
    assert torch.equal(torch.isnan(out), torch.isnan(out_ref)), "written/unwritten outputs differ from the reference"
    live = ~torch.isnan(out_ref)
    err = {"out_rel_rms": rel_rms(out[live], out_ref[live]),
           "out_max_abs": float((out[live].double() - out_ref[live].double()).abs().max()) if live.any() else 0.0}
    assert err["out_rel_rms"] <= tol, f"outputs: relative RMS error {err['out_rel_rms']:.3e} > {tol:.1e}"
    lc, lr, l0 = c_op.layers[0], c_ref.layers[0], before
    if cache.strategy == "all_states":
        sidx = [int(s) for s in inputs["state_batch_indices"] if int(s) != cache.pad_slot_id]
        st, sr = lc.state.cpu()[sidx], lr.state[sidx]
        if sidx:
            e = rel_rms(st, sr)
            assert e <= max(STATE_TOL[cache.state_dtype], 1e-5), f"states: relative RMS error {e:.3e}"
        return err
    state = lc.state.cpu()
    changed_ref = (state_bits(lr.state) != state_bits(cache.layers[0].state)).flatten(1).any(1)
    # no-write slots (and all untouched slots): state (and scales) bit-identical to before the call
    same = ~changed_ref
    assert torch.equal(state_bits(state)[same], state_bits(l0.state.cpu())[same]), \
        "a no-write or untouched slot's state changed"
    if is_quantized(state.dtype):
        scale = lc.state_scale.cpu()
        assert torch.equal(scale[same], l0.state_scale.cpu()[same]), "a no-write slot's scales changed"
        state, ref_state = decode_state(state, scale), decode_state(lr.state, lr.state_scale)
    else:
        ref_state = lr.state
    if changed_ref.any():
        e = rel_rms(state[changed_ref], ref_state[changed_ref])
        stol = max(STATE_TOL[cache.state_dtype], FAST_TOL if fast else 0.0)
        assert e <= stol, f"written states: relative RMS error {e:.3e} > {stol:.1e}"
        err["state_rel_rms"] = e
    # ring appends: x and B exact copies, dt equal to fp32 rounding
    assert torch.equal(lc.x_cache.cpu(), lr.x_cache), "x_cache differs from the reference"
    assert torch.equal(lc.B_cache.cpu(), lr.B_cache), "B_cache differs from the reference"
    e_dt = float((lc.dt_cache.cpu().double() - lr.dt_cache.double()).abs().max())
    assert e_dt <= 1e-5, f"dt_cache: max abs error {e_dt:.3e}"
    assert torch.equal(c_op.ring_start.cpu(), c_ref.ring_start) and torch.equal(c_op.pnat.cpu(), c_ref.pnat)
    return err
