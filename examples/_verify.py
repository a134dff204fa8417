"""The checking half of the examples, kept apart so that each example reads as plain use of the API.

`Mirror(cache)` keeps a CPU copy of an `SSMCache`. Before a step, `mirror.sync(cache)` copies the
cache into it; `mirror.step(layer, **inputs)` runs the float64 reference (`specssm.reference`) on that
copy; `mirror.compare(cache, layer, out)` then asserts that the Triton step did what the reference
did: outputs within a rounding tolerance, written states within the state dtype's rounding (one grid
step for int8 / fp8), every other state bit-identical, the ring appends equal.
"""
from __future__ import annotations

import torch

from specssm import SSMCache
from specssm.reference import checkpointing_ssu_ref
from specssm.reference.storage import decode_state, is_quantized

# relative RMS error of outputs by activation dtype, with tf32 dots (precision="fast") on a GPU; 16-bit
# activations: the step's coefficient matrix meets x in a 16-bit product (tests/helpers/compare.py: the same)
OUT_TOL = {torch.float32: 3e-3, torch.bfloat16: 6e-3, torch.float16: 3e-3}
STATE_TOL = {torch.float32: 3e-3, torch.bfloat16: 1e-2, torch.float16: 3e-3}
FIELDS = ("state", "state_scale", "x_cache", "B_cache", "dt_cache")


def compact(t):
    """A tied parameter (stride-0 trailing dims: the mamba convention's expanded views) as its compact
    form, which the reference takes too; a plain `.cpu()` would materialize the expanded copy."""
    while t.dim() > 1 and t.shape[-1] > 1 and t.stride(-1) == 0:
        t = t[..., 0]
    return t


def raw(t):
    """A state pool as comparable bits (fp8 tensors have no comparison ops)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def rel_rms(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt().clamp_min(1e-30))


class Mirror:
    """A CPU copy of `cache` (same sizes and dtypes) that runs the float64 reference step."""

    def __init__(self, cache: SSMCache):
        c = cache
        self.cache = SSMCache(c.num_layers, c.num_slots, c.H, c.P, c.N, c.G, c.T, c.W, state_dtype=c.state_dtype,
                              act_dtype=c.act_dtype, device="cpu", strategy=c.strategy, pad_slot_id=c.pad_slot_id)
        self.before = None
        self.checked = 0

    def sync(self, cache: SSMCache) -> None:
        """Copy every tensor of `cache` (any device) into the mirror."""
        m = self.cache
        for name in ("ring_start", "pnat", "seeds"):
            getattr(m, name).copy_(getattr(cache, name))
        for dst, src in zip(m.layers, cache.layers):
            for f in FIELDS:
                if getattr(dst, f) is not None:
                    getattr(dst, f).copy_(getattr(src, f))
        self.before = [{f: getattr(lc, f).clone() for f in FIELDS if getattr(lc, f) is not None} for lc in m.layers]

    def step(self, layer: int, **inputs) -> torch.Tensor:
        """The reference step of `layer` on the mirror; returns its outputs (on the CPU)."""
        kw = {k: (compact(v).cpu() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()
              if k not in ("plan", "validate", "launch", "precision", "pdl")}
        kw["out"] = torch.full(inputs["out"].shape, float("nan"), dtype=inputs["out"].dtype)
        if "rand_seed" in kw:
            kw["rand_seed"] = self.cache.seeds
        checkpointing_ssu_ref(**kw, **self.cache.op_kwargs(layer))
        return kw["out"]

    def compare(self, cache: SSMCache, layer: int, out: torch.Tensor, out_ref: torch.Tensor) -> dict:
        """Assert that `cache` (after the Triton step of `layer`) and `out` match the mirror's reference
        step. Returns the measured errors."""
        out = out.cpu()
        live = ~torch.isnan(out_ref)
        assert torch.equal(torch.isnan(out), ~live), "outputs written where the reference wrote none, or not"
        err = {"out": rel_rms(out[live], out_ref[live]) if live.any() else 0.0}
        assert err["out"] <= OUT_TOL[out.dtype], f"layer {layer}: output error {err['out']:.2e}"
        got, ref, before = cache.layers[layer], self.cache.layers[layer], self.before[layer]
        state = got.state.cpu()
        wrote = (raw(ref.state) != raw(before["state"])).flatten(1).any(1)
        assert torch.equal(raw(state)[~wrote], raw(before["state"])[~wrote]), "a no-write slot's state changed"
        if wrote.any():
            scale = None if got.state_scale is None else got.state_scale.cpu()[wrote]
            S = decode_state(state[wrote], scale)
            R = decode_state(ref.state[wrote], None if ref.state_scale is None else ref.state_scale[wrote])
            if is_quantized(state.dtype):
                # one code of the larger of the two scales (stochastic rounding with the same random bits
                # may still land on the other neighbour when fp32 and float64 straddle a grid point)
                step = torch.maximum(scale.double(), ref.state_scale[wrote].double())[..., None]
                worst = float(((S - R).abs() / step).max())
                assert worst <= 1.01, f"layer {layer}: written state {worst:.2f} codes from the reference"
                # ... but rarely: other random bits (a wrong seed or offset) move about a third of them
                moved = float((state[wrote] != ref.state[wrote]).double().mean())
                assert moved <= 0.01, f"layer {layer}: {moved:.1%} of the written codes differ from the reference's"
                err["state_codes"], err["codes_moved"] = worst, moved
            else:
                err["state"] = rel_rms(S, R)
                assert err["state"] <= STATE_TOL[state.dtype], f"layer {layer}: state error {err['state']:.2e}"
        assert torch.equal(got.x_cache.cpu(), ref.x_cache) and torch.equal(got.B_cache.cpu(), ref.B_cache), \
            "ring appends differ from the reference"
        assert float((got.dt_cache.cpu().double() - ref.dt_cache.double()).abs().max()) <= 1e-5
        self.checked += 1
        return err
