"""Random steps on the ring contract, one generator for every test, and an independent check of what
one step must do.

`make_case` draws a case: a filled cache (random checkpoint states, random ring contents, any ring_start
and pnat per slot; for all-states T states per slot and an index), fresh random inputs of one verify
step and NaN-poisoned outputs, everything drawn in float64 and then cast. `Case.check` derives what the
step must produce without the step's code: the true state of each row is the sequential recurrence run
over the row's history from its checkpoint, and the outputs are the sequential recurrence over the new
tokens from that state; it compares a finished step with that, element by element, including the
tensors the step must not touch.

The reference tests run cases as they are (float64 by default). `make_step` puts the same draw on an
SSMCache in the dtypes the ops take, for the op tests (tests/helpers/compare.py runs an op and the
float64 reference on copies of it); `to_device` copies cache and inputs to a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from specssm.cache import SSMCache
from specssm.reference import recurrence as rec
from specssm.reference.storage import decode_state, encode_state, is_quantized

PAD = -1


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical (NaN payloads included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (the simulator's measure)."""
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def softplus_dt(dt_raw, dt_bias):
    """dt as docs/design.md defines it, computed here on its own: softplus(v) = v for v > 20."""
    v = dt_raw.double() + dt_bias.double()
    return torch.where(v > 20.0, v, torch.log1p(torch.exp(torch.clamp(v, max=20.0))))


def storage_bound(h: torch.Tensor, dtype) -> torch.Tensor:
    """Per-element bound on |decode(encode(h)) - h| for a rounded-to-nearest store of h (..., P, N)."""
    h = h.double()
    tiny = 1e-300
    if dtype == torch.float64:
        return h.abs() * 0 + tiny
    if is_quantized(dtype):
        amax = h.abs().amax(-1, keepdim=True)
        if dtype in (torch.int8, torch.int16):
            qmax = 127.0 if dtype == torch.int8 else 32767.0
            return (amax / qmax) * (0.5 + 1e-6) + tiny
        # e4m3: 3 mantissa bits, spacing 2^-9 below the smallest normal (code units)
        scale = amax / 448.0
        return (h.abs() * 2.0 ** -4 + scale * 2.0 ** -10) * (1 + 1e-6) + tiny
    mant = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]
    sub = {torch.float32: 2.0 ** -149, torch.bfloat16: 2.0 ** -133, torch.float16: 2.0 ** -24}[dtype]
    return h.abs() * 2.0 ** -(mant + 1) * (1 + 1e-6) + sub + tiny


@dataclass
class Case:
    H: int
    P: int
    N: int
    G: int
    T: int                     # max tokens of a row (max_seqlen for varlen)
    W: int
    L: int
    rows: list                 # slot per row, PAD for padding rows
    lengths: list              # tokens per row
    varlen: bool
    state: torch.Tensor        # (slots, H, P, N); all-states: (slots, T, H, P, N)
    state_scale: torch.Tensor | None
    x_cache: torch.Tensor | None           # rings: None for all-states
    B_cache: torch.Tensor | None
    dt_cache: torch.Tensor | None
    ring_start: torch.Tensor
    pnat: torch.Tensor
    A: torch.Tensor            # tied views as the mamba convention passes them
    D: torch.Tensor
    dt_bias: torch.Tensor
    x: torch.Tensor
    dt: torch.Tensor           # raw dt, tied (..., H, P) view with stride(-1) == 0
    B: torch.Tensor
    C: torch.Tensor
    z: torch.Tensor | None
    out: torch.Tensor
    sbi: torch.Tensor
    cu_seqlens: torch.Tensor | None
    before: dict = field(default_factory=dict)
    strategy: str = "checkpointing"
    state_index: torch.Tensor | None = None    # all-states: the accepted state of each slot

    # ---- the call ---------------------------------------------------------------------------
    def cache_tensors(self) -> dict:
        if self.strategy == "all_states":
            return dict(states=self.state, state_index=self.state_index)
        d = dict(state=self.state, x_cache=self.x_cache, B_cache=self.B_cache, dt_cache=self.dt_cache,
                 ring_start=self.ring_start, prev_num_accepted_tokens=self.pnat)
        if self.state_scale is not None:
            d["state_scale"] = self.state_scale
        return d

    def kwargs(self) -> dict:
        kw = self.cache_tensors()
        kw.update(self.inputs())
        if self.strategy != "all_states":
            kw["window"] = self.W
        return kw

    def inputs(self) -> dict:
        """The step's inputs, without the cache tensors."""
        kw = dict(x=self.x, dt=self.dt, A=self.A, B=self.B, C=self.C, out=self.out, D=self.D, z=self.z,
                  dt_bias=self.dt_bias, dt_softplus=True, state_batch_indices=self.sbi, pad_slot_id=PAD)
        if self.varlen:
            kw.update(cu_seqlens=self.cu_seqlens, max_seqlen=self.T)
        return kw

    def on_cache(self):
        """This case on a one-layer SSMCache of its strategy (copies of its cache tensors): (cache, the
        step's inputs). The cache's pad_slot_id is PAD."""
        dt = self.dt_cache.dtype if self.dt_cache is not None else self.x.dtype
        cache = SSMCache(1, self.state.shape[0], self.H, self.P, self.N, self.G, self.T, self.W,
                         state_dtype=self.state.dtype, act_dtype=self.x.dtype, strategy=self.strategy,
                         pad_slot_id=PAD)
        lc = cache.layers[0]
        lc.state.copy_(self.state)
        if self.strategy == "all_states":
            cache.state_index.copy_(self.state_index)
            return cache, self.inputs()
        assert cache.L == self.L and cache.dt_dtype == dt, "on_cache: the cache's ring differs from the case's"
        for name in ("state_scale", "x_cache", "B_cache", "dt_cache"):
            if getattr(self, name) is not None:
                getattr(lc, name).copy_(getattr(self, name))
        cache.ring_start.copy_(self.ring_start)
        cache.pnat.copy_(self.pnat)
        return cache, self.inputs()

    def snapshot(self) -> dict:
        """Copies of every tensor a step may write (caches and outputs)."""
        d = {k: v.clone() for k, v in self.cache_tensors().items()}
        d["out"] = self.out.clone()
        return d

    def unchanged_since(self, snap: dict) -> list:
        """Names of the tensors that differ (bitwise) from `snap`."""
        now = dict(self.cache_tensors(), out=self.out)
        return [k for k, v in snap.items() if not same_bits(v, now[k])]

    # ---- the rows ---------------------------------------------------------------------------
    def tokens(self, b):
        """Index of row b's tokens in x/B/C/out/dt."""
        if not self.varlen:
            return (b, slice(0, self.lengths[b]))
        lo = int(self.cu_seqlens[b])
        return (slice(lo, lo + self.lengths[b]),)

    def live_rows(self):
        return [(b, s) for b, s in enumerate(self.rows) if s != PAD]

    def writes(self, b) -> bool:
        """docs/design.md, "The closed form": a row writes when pnat + its length > W."""
        s = self.rows[b]
        return int(self.before["prev_num_accepted_tokens"][s]) + self.lengths[b] > self.W

    def history_rows(self, s):
        K, rs = int(self.before["prev_num_accepted_tokens"][s]), int(self.before["ring_start"][s])
        return [(rs + k) % self.L for k in range(K)]

    def append_rows(self, b):
        s = self.rows[b]
        K, rs = int(self.before["prev_num_accepted_tokens"][s]), int(self.before["ring_start"][s])
        return [(rs + K + t) % self.L for t in range(self.lengths[b])]

    def true_state(self, s):
        """Checkpoint of slot s with its history run through token by token (float64)."""
        bf = self.before
        S = decode_state(bf["state"][s], None if self.state_scale is None else bf["state_scale"][s])
        hist = self.history_rows(s)
        xh = bf["x_cache"][s][:, hist].transpose(0, 1)
        Bh = bf["B_cache"][s][:, hist].transpose(0, 1)
        dth = bf["dt_cache"][s][:, hist].transpose(0, 1).double()
        _, h = rec.sequential(S, xh, dth, self.A_h, Bh, Bh)
        return h

    @property
    def A_h(self):
        return self.A[:, 0, 0]

    def expected_outputs(self, b):
        s, tok = self.rows[b], self.tokens(b)
        dtb = softplus_dt(self.dt[tok][..., 0], self.dt_bias[:, 0])
        y, _ = rec.sequential(self.true_state(s), self.x[tok], dtb, self.A_h, self.B[tok], self.C[tok],
                              self.D[:, 0], None if self.z is None else self.z[tok])
        return y

    # ---- the check --------------------------------------------------------------------------
    def check(self, out_tol=1e-12, state_tol=1e-12, rounding="rn"):
        """Assert the finished step did exactly what docs/design.md ("The closed form", "The cache
        contract") says, and nothing else.
        rounding "sr": a written state may be off by a whole rounding step instead of half of one."""
        assert self.strategy != "all_states", "check: covers the ring strategies (checkpointing, always-write)"
        bf, L = self.before, self.L
        touched = set()
        for b, s in self.live_rows():
            touched.add(s)
            tok, n = self.tokens(b), self.lengths[b]
            # outputs: every element written, equal to the recurrence from the true state
            yb = self.out[tok]
            assert not torch.isnan(yb).any(), f"row {b}: outputs not all written"
            if n:
                err = rel_err(yb, self.expected_outputs(b))
                assert err <= out_tol, f"row {b} slot {s}: output error {err:.3e} > {out_tol:.1e}"
            # state: written (the true state, rounded) iff the row flushes, else bit-identical
            if self.writes(b):
                h = self.true_state(s)
                got = decode_state(self.state[s], None if self.state_scale is None else self.state_scale[s])
                if self.state.dtype == torch.float64:
                    err = rel_err(got, h)
                    assert err <= state_tol, f"row {b} slot {s}: written state error {err:.3e}"
                else:
                    bound = storage_bound(h, self.state.dtype) * (2 if rounding == "sr" else 1)
                    excess = ((got - h).abs() - bound).max()
                    assert excess <= 1e-12 * float(h.abs().max()), \
                        f"row {b} slot {s}: written state off by more than rounding ({float(excess):.3e})"
            else:
                assert same_bits(self.state[s], bf["state"][s]), f"row {b} slot {s}: no-write row changed state"
                if self.state_scale is not None:
                    assert same_bits(self.state_scale[s], bf["state_scale"][s]), \
                        f"row {b} slot {s}: no-write row changed state_scale"
            # rings: the new tokens at (ring_start + pnat + t) % L, every other row untouched
            app = self.append_rows(b)
            keep = [r for r in range(L) if r not in app]
            for nm in ("x_cache", "B_cache", "dt_cache"):
                assert same_bits(getattr(self, nm)[s][:, keep], bf[nm][s][:, keep]), \
                    f"row {b} slot {s}: {nm} rows outside the appended ones changed"
            assert same_bits(self.x_cache[s][:, app], self.x[tok].transpose(0, 1).to(self.x_cache.dtype)), \
                f"row {b} slot {s}: x_cache appends wrong"
            assert same_bits(self.B_cache[s][:, app], self.B[tok].transpose(0, 1).to(self.B_cache.dtype)), \
                f"row {b} slot {s}: B_cache appends wrong"
            if n:
                want_dt = softplus_dt(self.dt[tok][..., 0], self.dt_bias[:, 0]).T
                err = rel_err(self.dt_cache[s][:, app], want_dt)
                dt_tol = 1e-7 if self.dt_cache.dtype == torch.float32 else 1e-14
                assert err <= dt_tol, f"row {b} slot {s}: dt_cache appends wrong ({err:.3e})"
        # padding rows: outputs untouched
        for b, s in enumerate(self.rows):
            if s == PAD:
                assert same_bits(self.out[self.tokens(b)], bf["out"][self.tokens(b)]), f"pad row {b} wrote outputs"
        # slots of no live row, and the per-slot counters of all: untouched
        others = [s for s in range(self.state.shape[0]) if s not in touched]
        for nm in ("state", "state_scale", "x_cache", "B_cache", "dt_cache"):
            if nm == "state_scale" and self.state_scale is None:
                continue
            assert same_bits(getattr(self, nm)[others], bf[nm][others]), f"{nm} of untouched slots changed"
        assert same_bits(self.ring_start, bf["ring_start"]), "the step changed ring_start"
        assert same_bits(self.pnat, bf["prev_num_accepted_tokens"]), "the step changed pnat"


def make_case(*, H=4, P=8, N=8, G=2, T=4, W=16, num_slots=6, rows=None, batch=None, pad_rows=(), pnat=None,
              ring_start=None, lengths=None, varlen=False, state_dtype=torch.float64, act_dtype=torch.float64,
              dt_dtype=None, param_dtype=torch.float64, use_z=True, strategy="checkpointing", seed=0,
              L=None) -> Case:
    """A filled cache and one step's inputs: the one random-step generator of the tests.

    rows: slot per row (PAD for padding), default `batch` (default all) slots in a random order with
    the rows `pad_rows` turned into padding.
    pnat / ring_start: per slot lists, default random within the contract (pnat <= max(W, T)).
    lengths: per-row token counts (varlen), default T for every row.
    dt_dtype: of the raw dt input (default act_dtype); param_dtype: of A, D, dt_bias.
    strategy: "checkpointing", "always_write" (W = 0) or "all_states" (T states per slot, no rings).
    """
    gen = torch.Generator().manual_seed(seed)
    if strategy == "always_write":
        W = 0
    L = max(W, T) + T if L is None else L
    if rows is None:
        rows = torch.randperm(num_slots, generator=gen)[:batch].tolist()
        for r in pad_rows:
            rows[r] = PAD
    batch = len(rows)
    lengths = [T] * batch if lengths is None else list(lengths)
    if pnat is None:
        pnat = torch.randint(0, max(W, T) + 1, (num_slots,), generator=gen).tolist()
    if ring_start is None:
        ring_start = torch.randint(0, L, (num_slots,), generator=gen).tolist()
    act = act_dtype

    def randn(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen)

    def uniform(lo, hi, *shape):
        return torch.empty(*shape, dtype=torch.float64).uniform_(lo, hi, generator=gen)

    rings = strategy != "all_states"
    if rings:
        h0 = randn(num_slots, H, P, N)
        state, state_scale = encode_state(h0, state_dtype)
        state, state_index = state.clone(), None
    else:
        state, state_scale = randn(num_slots, T, H, P, N).to(state_dtype), None
        state_index = torch.randint(0, T, (num_slots,), generator=gen, dtype=torch.int32)
    ring_dt = torch.float64 if act == torch.float64 else torch.float32      # as SSMCache keeps dt
    A = -torch.exp(uniform(-1.0, 1.0, H)).to(param_dtype)
    D = randn(H).to(param_dtype)
    dt_bias = uniform(-4.0, -1.0, H).to(param_dtype)
    if varlen:
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
        lead = (int(cu[-1]),)
    else:
        cu = None
        lead = (batch, T)
    dt_raw = randn(*lead, H)
    case = Case(
        H=H, P=P, N=N, G=G, T=T, W=W, L=L, rows=list(rows), lengths=lengths, varlen=varlen,
        state=state, state_scale=state_scale,
        x_cache=randn(num_slots, H, L, P).to(act) if rings else None,
        B_cache=randn(num_slots, G, L, N).to(act) if rings else None,
        dt_cache=uniform(0.01, 0.5, num_slots, H, L).to(ring_dt) if rings else None,
        ring_start=torch.tensor(ring_start, dtype=torch.int32), pnat=torch.tensor(pnat, dtype=torch.int32),
        A=A[:, None, None].expand(H, P, N), D=D[:, None].expand(H, P), dt_bias=dt_bias[:, None].expand(H, P),
        x=randn(*lead, H, P).to(act), dt=dt_raw.to(dt_dtype or act)[..., None].expand(*lead, H, P),
        B=randn(*lead, G, N).to(act), C=randn(*lead, G, N).to(act),
        z=randn(*lead, H, P).to(act) if use_z else None,
        out=torch.full((*lead, H, P), float("nan"), dtype=act),
        sbi=torch.tensor(rows, dtype=torch.int32), cu_seqlens=cu, strategy=strategy, state_index=state_index)
    case.before = case.snapshot()
    return case


def run_case(case: Case, op, **extra):
    """Snapshot, run `op` on the case, return its result (the check is separate)."""
    case.before = case.snapshot()
    return op(**dict(case.kwargs(), **extra))


# ---- on an SSMCache, for the ops -------------------------------------------------------------
def make_step(*, batch=3, H=4, P=16, N=16, G=2, T=4, W=16, slots=None, act=torch.bfloat16,
              state_dtype=torch.float32, pnat=None, pad_rows=(), strategy="checkpointing", seed=0,
              use_z=True, varlen_lens=None):
    """make_case's draw on a one-layer SSMCache, in the dtypes the ops take (fp32 raw dt and per-head
    parameters): `batch` rows on random slots of `slots` (default batch + 2), rows `pad_rows` padding,
    varlen rows of `varlen_lens` tokens. pnat: None (random in [0, max(W, T)]) or one value per row
    (padding rows skipped). Returns (cache, the step's inputs without the cache tensors)."""
    case = make_case(H=H, P=P, N=N, G=G, T=T, W=W, num_slots=slots or batch + 2, batch=batch, pad_rows=pad_rows,
                     lengths=varlen_lens, varlen=varlen_lens is not None, state_dtype=state_dtype, act_dtype=act,
                     dt_dtype=torch.float32, param_dtype=torch.float32, use_z=use_z, strategy=strategy, seed=seed)
    for r, k in enumerate(pnat or ()):
        if case.rows[r] != PAD:
            case.pnat[case.rows[r]] = k
    return case.on_cache()


def cache_to(cache, device):
    """A copy of the cache on `device` (its per-slot views rebuilt over the moved arrays)."""
    import copy
    c = copy.deepcopy(cache)
    if torch.device(device) == cache.device:
        return c
    for name in ("_ring_start", "_pnat", "_seeds", "_state_index"):
        setattr(c, name, getattr(c, name).to(device))
    S = c.num_slots
    c.ring_start, c.pnat, c.seeds, c.state_index = c._ring_start[:S], c._pnat[:S], c._seeds[:S], c._state_index[:S]
    c.faults = c.faults.to(device)
    for lc in c.layers:
        for f in ("state", "state_scale", "x_cache", "B_cache", "dt_cache"):
            if getattr(lc, f) is not None:
                setattr(lc, f, getattr(lc, f).to(device))
    c.device = torch.device(device)
    return c


def inputs_to(inputs, device):
    """Step inputs on `device`, the tied ones (dt over head_dim; A, D, dt_bias over all but the head)
    tied again there: `.to` materializes a stride-0 view, which the op rejects."""
    ins = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    ins["dt"] = inputs["dt"][..., 0].to(device)[..., None].expand(inputs["dt"].shape)
    for k in ("A", "D", "dt_bias"):
        v = inputs[k]
        idx = (slice(None),) + (0,) * (v.dim() - 1)
        ins[k] = v[idx].to(device).reshape((-1,) + (1,) * (v.dim() - 1)).expand(v.shape)
    return ins


def to_device(cache, inputs, device):
    return cache_to(cache, device), inputs_to(inputs, device)
