"""The Mamba2 mixer at decode time, over the speculative caches.

One verify step of `T` tokens per row:

    in_proj -> [z, xBC, dt] -> conv1d update (xBC, rollback by offset) -> [x, B, C]
            -> SSM state update (checkpointing_ssu signature) -> y
            -> gated RMSNorm: norm(y * silu(z)), group-wise over ngroups groups -> out_proj

Parameters are held as a Mamba2 layer holds them (A_log, D, dt_bias per head, depthwise conv weight
and bias, in_proj, norm weight, out_proj), sliced to a tensor-parallel rank's heads and groups;
out_proj is row-parallel (an all-reduce over the tensor-parallel group).

Also here: the prefill path (a sequential scan that leaves the caches in the contract's state) and a
float64 token-by-token reference of the whole mixer.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from specssm._runtime import kernels_interpreted
from specssm.conv import conv_state_from_prefill
from specssm.conv.reference import conv1d_sequential_ref, conv1d_window_ref, conv_context_ref
from specssm.model.config import Mamba2Config
from specssm.reference import recurrence as rec

# activation dtypes of the Triton kernels (conv update and SSM step)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- parameters -------------------------------------------------------------------------------------
def init_mixer_params(cfg: Mamba2Config, gen: torch.Generator) -> dict:
    """Seeded random parameters of one whole (unsharded) layer, float64 on the CPU.

    Scales follow Mamba2's initialization: dt in [1e-3, 1e-1] (dt_bias = softplus^-1(dt)), A in
    [-16, -1], conv taps uniform in +-1/sqrt(d_conv), unit norm weights; D and out_proj are small.
    """
    f64 = torch.float64
    d, di, H = cfg.d_model, cfg.d_inner, cfg.nheads
    dt = torch.exp(torch.empty(H, dtype=f64).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
    bound = 1.0 / math.sqrt(cfg.d_conv)
    return dict(
        in_proj=torch.randn(cfg.d_in_proj, d, dtype=f64, generator=gen) / math.sqrt(d),
        conv_weight=torch.empty(cfg.conv_dim, cfg.d_conv, dtype=f64).uniform_(-bound, bound, generator=gen),
        conv_bias=torch.empty(cfg.conv_dim, dtype=f64).uniform_(-bound, bound, generator=gen),
        dt_bias=dt + torch.log(-torch.expm1(-dt)),
        A_log=torch.log(torch.empty(H, dtype=f64).uniform_(1.0, 16.0, generator=gen)),
        # a weak skip (Mamba2 starts at D = 1): y is then mostly C·h, so tokens depend on the
        # history the SSM state carries and not only on the last d_conv tokens through the conv
        D=torch.full((H,), 0.1, dtype=f64),
        norm_weight=torch.ones(di, dtype=f64),
        # small residual updates (~1/8 of the embedding's scale): the random LM then stays close to a
        # token-to-token map and soon repeats itself, so prompt lookup gets real acceptance, while the
        # SSM still decides most greedy tokens
        out_proj=torch.randn(d, di, dtype=f64, generator=gen) * (0.125 / math.sqrt(di)),
    )


def _rank_rows(total: int, rank: int, tp: int) -> slice:
    n = total // tp
    return slice(rank * n, (rank + 1) * n)


def shard_mixer_params(cfg: Mamba2Config, params: dict, rank: int, tp: int) -> dict:
    """The slices of one layer's parameters that tensor-parallel rank `rank` of `tp` holds.

    Rank r holds heads [r H/tp, (r+1) H/tp) and groups [r G/tp, (r+1) G/tp) (the groups of its heads,
    since head h reads group h // (H/G)): its rows of z, x, B, C, dt in in_proj, its channels of the
    conv (x, B, C), its norm channels and its columns of out_proj.
    """
    cfg.check_tp(tp)
    if not 0 <= rank < tp:
        raise ValueError(f"rank: expected 0 <= rank < {tp}, got {rank}")
    di, GN, H = cfg.d_inner, cfg.ngroups * cfg.d_state, cfg.nheads
    heads, inner, groups = _rank_rows(H, rank, tp), _rank_rows(di, rank, tp), _rank_rows(GN, rank, tp)

    def pieces(t, offsets_and_slices):
        return torch.cat([t[off + s.start: off + s.stop] for off, s in offsets_and_slices])

    in_rows = [(0, inner), (di, inner), (2 * di, groups), (2 * di + GN, groups), (2 * di + 2 * GN, heads)]
    conv_rows = [(0, inner), (di, groups), (di + GN, groups)]
    return dict(
        in_proj=pieces(params["in_proj"], in_rows),
        conv_weight=pieces(params["conv_weight"], conv_rows),
        conv_bias=pieces(params["conv_bias"], conv_rows),
        dt_bias=params["dt_bias"][heads], A_log=params["A_log"][heads], D=params["D"][heads],
        norm_weight=params["norm_weight"][inner],
        out_proj=params["out_proj"][:, inner],
    )


# ---- pluggable pieces: the SSM step op and the conv update ------------------------------------------

def _triton_usable(device) -> bool:
    # the interpreter as the kernels were built (TRITON_INTERPRET at their import), not as it is now
    return torch.device(device).type == "cuda" or kernels_interpreted()


def resolve_ssu(ssu="auto", device="cpu", precision="exact", validate=True, dtype=torch.float32, pdl=False):
    """The SSM step callable (checkpointing_ssu signature) and a name for it.

    ssu: a callable (used as is), "reference" (float64 reference, any device and dtype), "op" (the
    Triton `specssm.ops.checkpointing_ssu` with `precision` and `validate`; error if it is missing),
    or "auto" (the op where Triton runs, the op exists and takes `dtype` activations (not float64),
    else the reference). pdl: launch the Triton op with Programmatic Dependent Launch after the conv
    (see `specssm.conv.conv1d_update`); the reference and callables never get it.
    """
    if callable(ssu):
        return ssu, getattr(ssu, "__name__", type(ssu).__name__)
    if ssu not in ("auto", "op", "reference"):
        raise ValueError(f"ssu: expected a callable or one of 'auto', 'op', 'reference', got {ssu!r}")
    if precision not in ("fast", "exact"):
        raise ValueError(f"precision: expected 'fast' or 'exact', got {precision!r}")
    if ssu == "op" or (ssu == "auto" and _triton_usable(device) and dtype in TRITON_DTYPES):
        try:
            from specssm.ops import checkpointing_ssu
        except (ImportError, AttributeError) as e:
            if ssu == "op":
                raise ValueError(f"ssu: 'op' asked for specssm.ops.checkpointing_ssu, which is not "
                                 f"available ({e})") from e
        else:
            # pdl only when asked: the op's default, so pdl=False runs any version of the op
            fn = functools.partial(checkpointing_ssu, precision=precision, validate=validate,
                                   **({"pdl": True} if pdl else {}))
            return fn, f"checkpointing_ssu(precision={precision!r}{', pdl' if pdl else ''})"
    from specssm.reference import checkpointing_ssu_ref
    return checkpointing_ssu_ref, "checkpointing_ssu_ref (float64)"


def conv1d_update_torch(xBC, conv_state, conv_offset, weight, bias=None, activation="silu",
                        state_batch_indices=None, pad_slot_id=-1, out=None):
    """PyTorch version of `specssm.conv.conv1d_update` (same cache contract, in place), for any float
    dtype and device: float64 model runs and CPUs without the Triton interpreter. Built from the conv
    reference's pieces, so it computes in float64."""
    batch, T, _ = xBC.shape
    d_conv = weight.shape[-1]
    if out is None:
        out = torch.empty_like(xBC)
    slots = (torch.arange(batch, device=xBC.device) if state_batch_indices is None
             else state_batch_indices.long())
    live = slots != pad_slot_id
    if not bool(live.any()):
        return out
    s = slots[live]
    context = conv_context_ref(conv_state, conv_offset, s, d_conv)             # (n, d_conv - 1, C)
    out[live] = conv1d_window_ref(xBC[live], context, weight, bias, activation).to(out.dtype)
    conv_state[s, :d_conv - 1 + T] = torch.cat([context, xBC[live].to(conv_state.dtype)], dim=1)
    return out


def resolve_conv(conv="auto", device="cpu", dtype=torch.float32, pdl=False):
    """The conv update callable and its name: "triton" (`specssm.conv.conv1d_update`), "torch"
    (`conv1d_update_torch`) or "auto" (Triton where it runs and supports the dtype). pdl: the Triton
    conv lets the next kernel (the step op, launched with PDL) start early."""
    if callable(conv):
        return conv, getattr(conv, "__name__", type(conv).__name__)
    if conv not in ("auto", "triton", "torch"):
        raise ValueError(f"conv: expected a callable or one of 'auto', 'triton', 'torch', got {conv!r}")
    if conv == "triton" or (conv == "auto" and _triton_usable(device) and dtype in TRITON_DTYPES):
        from specssm.conv import conv1d_update
        if pdl:
            return functools.partial(conv1d_update, pdl=True), "conv1d_update (Triton, pdl)"
        return conv1d_update, "conv1d_update (Triton)"
    return conv1d_update_torch, "conv1d_update_torch"


# ---- norms ------------------------------------------------------------------------------------------
def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def rmsnorm(x, weight, eps):
    """RMSNorm over the last dim, computed in fp32 (fp64 for fp64 inputs)."""
    cd = _compute_dtype(x.dtype)
    v = x.to(cd)
    v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    return (v * weight.to(cd)).to(x.dtype)


def gated_rmsnorm(y, z, weight, ngroups, eps):
    """Mamba2's gated norm (norm after gate): RMSNorm of y * silu(z) over groups of
    d_inner / ngroups channels, times weight. Computed in fp32 (fp64 for fp64 inputs)."""
    cd = _compute_dtype(y.dtype)
    v = y.to(cd) * F.silu(z.to(cd))
    g = v.reshape(*v.shape[:-1], ngroups, v.shape[-1] // ngroups)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.reshape(v.shape) * weight.to(cd)).to(y.dtype)


# ---- the mixer --------------------------------------------------------------------------------------
class Mamba2Mixer(torch.nn.Module):
    """One Mamba2 mixer layer of one tensor-parallel rank.

    Args:
        cfg: whole-model sizes; the rank holds cfg.local(tp_size) heads and groups.
        params: the whole layer's parameters (from `init_mixer_params`), sliced here for the rank.
        layer_idx: which layer of the model caches this mixer uses.
        dtype: activation / weight dtype (fp32, bf16, fp16 or fp64); A_log, D, dt_bias stay fp32
            (fp64 for fp64 models) as in Mamba2.
        tp_rank, tp_size, tp_group: tensor-parallel position and the torch.distributed group of the
            out_proj all-reduce (None: the default group).
    """

    def __init__(self, cfg: Mamba2Config, params: dict, layer_idx: int = 0, dtype=torch.float32,
                 device="cpu", tp_rank: int = 0, tp_size: int = 1, tp_group=None):
        super().__init__()
        self.cfg, self.local_cfg = cfg, cfg.local(tp_size)
        self.layer_idx, self.tp_rank, self.tp_size, self.tp_group = layer_idx, tp_rank, tp_size, tp_group
        self.dtype, self.device = dtype, torch.device(device)
        p = shard_mixer_params(cfg, params, tp_rank, tp_size)
        pdt = torch.float64 if dtype == torch.float64 else torch.float32

        def param(t, dt):
            return torch.nn.Parameter(t.to(device=self.device, dtype=dt).contiguous(), requires_grad=False)

        self.in_proj = param(p["in_proj"], dtype)                # (d_in_proj_local, d_model)
        self.conv_weight = param(p["conv_weight"], dtype)        # (conv_dim_local, d_conv)
        self.conv_bias = param(p["conv_bias"], dtype)            # (conv_dim_local,)
        self.dt_bias = param(p["dt_bias"], pdt)                  # (H_local,)
        self.A_log = param(p["A_log"], pdt)                      # (H_local,)
        self.D = param(p["D"], pdt)                              # (H_local,)
        self.norm_weight = param(p["norm_weight"], dtype)        # (d_inner_local,)
        self.out_proj = param(p["out_proj"], dtype)              # (d_model, d_inner_local)

    # sizes of this rank
    @property
    def sizes(self):
        c = self.local_cfg
        return c.nheads, c.head_dim, c.d_state, c.ngroups, c.d_inner, c.conv_dim

    def _split_in_proj(self, zxbcdt):
        H, P, N, G, di, cd = self.sizes
        return torch.split(zxbcdt, [di, cd, H], dim=-1)

    def _split_xbc(self, xbc):
        H, P, N, G, di, cd = self.sizes
        x, B, C = torch.split(xbc, [di, G * N, G * N], dim=-1)
        lead = xbc.shape[:-1]
        return x.reshape(*lead, H, P), B.reshape(*lead, G, N), C.reshape(*lead, G, N)

    def _all_reduce(self, out):
        if self.tp_size > 1:
            import torch.distributed as dist
            dist.all_reduce(out, group=self.tp_group)
        return out

    def tied_params(self):
        """A, D, dt_bias as the mamba convention passes them to the step op: stride-0 expanded
        views (H, P, N), (H, P), (H, P) of per-head values."""
        H, P, N = self.sizes[:3]
        A = -torch.exp(self.A_log)
        return A[:, None, None].expand(H, P, N), self.D[:, None].expand(H, P), self.dt_bias[:, None].expand(H, P)

    @torch.no_grad()
    def step(self, hidden, cache, slots, ssu, conv, conv_slots=None):
        """One verify step: hidden `(batch, T, d_model)` -> `(batch, T, d_model)`.

        cache: a `ModelCache` (this layer's SSM cache and conv state); slots `(batch,)` int32 slot of
        each row, `cache.pad_slot_id` for padding rows (their outputs are zero before out_proj).
        ssu / conv: the resolved callables (see `resolve_ssu`, `resolve_conv`). conv_slots: the slots the
        conv update takes (default `slots`): `faults.set_aside(...)` of them when the step's values are
        not checked on the host, so that a row the step sets aside does not advance its conv state.
        Appends the T tokens to the caches; the caller commits after verification.
        """
        H, P, N, G, di, cd = self.sizes
        batch, T, _ = hidden.shape
        z, xbc, dt = self._split_in_proj(F.linear(hidden, self.in_proj))
        # Whatever the step op needs besides the conv's output is made first, so that no kernel sits
        # between the conv and the step (with PDL the step overlaps the conv's tail).
        y = torch.zeros(batch, T, H, P, dtype=hidden.dtype, device=hidden.device)
        A, D, dt_bias = self.tied_params()
        xbc = conv(xbc, cache.conv_states[self.layer_idx], cache.conv_offset, self.conv_weight, self.conv_bias,
                   activation="silu", state_batch_indices=slots if conv_slots is None else conv_slots,
                   pad_slot_id=cache.pad_slot_id,
                   out=torch.zeros(xbc.shape, dtype=xbc.dtype, device=xbc.device))
        x, B, C = self._split_xbc(xbc)
        ssu(**cache.ssm.op_kwargs(self.layer_idx), x=x, dt=dt[..., None].expand(batch, T, H, P), A=A,
            B=B, C=C, out=y, D=D, z=None, dt_bias=dt_bias, dt_softplus=True, state_batch_indices=slots,
            pad_slot_id=cache.pad_slot_id)
        g = gated_rmsnorm(y.reshape(batch, T, di), z, self.norm_weight, G, self.cfg.norm_eps)
        return self._all_reduce(F.linear(g, self.out_proj))

    @torch.no_grad()
    def prefill(self, hidden, cache, slot):
        """Run a prompt `hidden (Lp, d_model)` of one request (slot `slot`) from a fresh state; returns
        `(Lp, d_model)` and leaves the caches in the contract's state: SSM state written by
        `SSMCache.write_state` (pnat 0, ring_start 0), conv context = the last d_conv - 1 conv inputs
        of the prompt, conv_offset 0. The scan is sequential, in float64 on the activation values."""
        H, P, N, G, di, cd = self.sizes
        z, xbc_in, dt = self._split_in_proj(F.linear(hidden, self.in_proj))
        d_conv = self.cfg.d_conv
        zero_ctx = torch.zeros(1, d_conv - 1, cd, dtype=torch.float64, device=hidden.device)
        xbc = conv1d_window_ref(xbc_in[None], zero_ctx, self.conv_weight, self.conv_bias, "silu")[0]
        x, B, C = self._split_xbc(xbc.to(hidden.dtype))
        dt_p = rec.process_dt(dt, self.dt_bias, dt_softplus=True)
        h0 = torch.zeros(H, P, N, dtype=torch.float64, device=hidden.device)
        y, h = rec.sequential(h0, x, dt_p, -torch.exp(self.A_log.double()), B, C, self.D)
        slots = torch.as_tensor([int(slot)], dtype=torch.int32, device=hidden.device)
        cache.ssm.write_state(self.layer_idx, slots, h[None])
        conv_state_from_prefill(cache.conv_states[self.layer_idx], cache.conv_offset, slots, xbc_in[None], d_conv)
        g = gated_rmsnorm(y.to(hidden.dtype).reshape(-1, di), z, self.norm_weight, G, self.cfg.norm_eps)
        return self._all_reduce(F.linear(g, self.out_proj))

    @torch.no_grad()
    def reference_forward(self, hidden, state=None):
        """Float64 token-by-token reference: hidden `(L, d_model)` -> `(out (L, d_model) float64,
        state)`, state = (conv window (d_conv - 1, conv_dim), SSM state (H, P, N)) in float64;
        `state=None` starts fresh (zero window, zero state). Nothing is rounded to the model dtype."""
        H, P, N, G, di, cd = self.sizes
        f64 = torch.float64
        dev = hidden.device
        if state is None:
            state = (torch.zeros(self.cfg.d_conv - 1, cd, dtype=f64, device=dev),
                     torch.zeros(H, P, N, dtype=f64, device=dev))
        window, h = state
        z, xbc_in, dt = self._split_in_proj(hidden.double() @ self.in_proj.double().T)
        xbc, window = conv1d_sequential_ref(xbc_in[None], window[None], self.conv_weight.double(),
                                            self.conv_bias.double(), "silu")
        x, B, C = self._split_xbc(xbc[0])
        dt_p = rec.process_dt(dt, self.dt_bias, dt_softplus=True)
        y, h = rec.sequential(h, x, dt_p, -torch.exp(self.A_log.double()), B, C, self.D.double())
        g = gated_rmsnorm(y.reshape(-1, di), z, self.norm_weight.double(), G, self.cfg.norm_eps)
        out = self._all_reduce(g @ self.out_proj.double().T)
        return out, (window[0], h)
