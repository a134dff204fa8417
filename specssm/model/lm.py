"""A tiny Mamba2 language model with seeded random weights (byte-level vocabulary).

    embedding -> [RMSNorm -> Mamba2Mixer -> + residual] x n_layers -> RMSNorm -> lm_head

The weights are drawn for the whole model from one seed, then each tensor-parallel rank keeps its
slices, so models with different tp sizes compute the same function. Embedding, norms and lm_head are
replicated on every rank; the mixers are sharded (see `Mamba2Mixer`).
"""
from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F

from specssm._checks import check_ring_values_host, check_slots_host, check_tensor
from specssm.cache import StepPlan
from specssm.cache import faults as flt
from specssm.model.cache import ModelCache
from specssm.model.config import Mamba2Config
from specssm.model.mixer import Mamba2Mixer, init_mixer_params, resolve_conv, resolve_ssu, rmsnorm


class TinyMamba2LM(torch.nn.Module):
    """Args:
        cfg: whole-model sizes. seed: the weights' seed.
        dtype: activations and weights (fp32, bf16, fp16, fp64).
        tp_rank, tp_size, tp_group: tensor parallelism (torch.distributed must be initialized when
            tp_size > 1).
        ssu: the SSM step op ("auto", "op", "reference" or a callable; see `resolve_ssu`), with
            `precision` ("exact" or "fast") and `validate` for the Triton op.
        conv: the conv update ("auto", "triton", "torch" or a callable; see `resolve_conv`).
        pdl: chain the Triton conv and step op with Programmatic Dependent Launch (sm_90+; ignored
            by the other ops and in the interpreter). Same results; off by default.

    A step op that takes a `plan` argument (the Triton op does) gets one `StepPlan` per verify step,
    built before the first layer and shared by all of them, as an engine would: otherwise every
    layer's op builds its own, between the conv and the step. The Triton op reads it only in its split
    launches (from the tuning table's split batch on); below that no plan is built.
    """

    def __init__(self, cfg: Mamba2Config, seed: int = 0, dtype=torch.float32, device="cpu", tp_rank: int = 0,
                 tp_size: int = 1, tp_group=None, ssu="auto", conv="auto", precision: str = "exact",
                 validate: bool = True, pdl: bool = False):
        super().__init__()
        cfg.check_tp(tp_size)
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.tp_rank, self.tp_size = tp_rank, tp_size
        gen = torch.Generator().manual_seed(seed)
        f64 = torch.float64

        def param(t):
            return torch.nn.Parameter(t.to(device=self.device, dtype=dtype).contiguous(), requires_grad=False)

        self.embedding = param(torch.randn(cfg.vocab_size, cfg.d_model, dtype=f64, generator=gen))
        self.layer_norms = torch.nn.ParameterList()
        self.mixers = torch.nn.ModuleList()
        for i in range(cfg.n_layers):
            self.layer_norms.append(param(torch.ones(cfg.d_model, dtype=f64)))
            self.mixers.append(Mamba2Mixer(cfg, init_mixer_params(cfg, gen), i, dtype, device, tp_rank, tp_size,
                                           tp_group))
        self.final_norm = param(torch.ones(cfg.d_model, dtype=f64))
        self.lm_head = param(torch.randn(cfg.vocab_size, cfg.d_model, dtype=f64, generator=gen)
                             / math.sqrt(cfg.d_model))
        self.set_ops(ssu, conv, precision, validate, pdl)

    def set_ops(self, ssu="auto", conv="auto", precision: str = "exact", validate: bool = True,
                pdl: bool = False) -> None:
        """Choose the SSM step op and the conv update used by `step`. validate: `step` checks the
        slots and their pnat / ring_start on the host first (a sync on a GPU; False in CUDA graphs)."""
        self.ssu, self.ssu_name = resolve_ssu(ssu, self.device, precision, validate, self.dtype, pdl)
        self._ssu_takes_plan = "plan" in inspect.signature(self.ssu).parameters
        self._plan = None
        self.conv, self.conv_name = resolve_conv(conv, self.device, self.dtype, pdl)
        self.precision, self.pdl, self.validate = precision, pdl, validate
        self._decode, self.compiled, self._graphs = self.decode_step, None, False

    def compile_step(self, backend: str = "inductor", mode: str | None = None, options: dict | None = None,
                     dynamic: bool = False) -> TinyMamba2LM:
        """Run `step`'s computation (`decode_step`: plan, every layer's conv1d, SSM step and gate,
        logits) through `torch.compile(fullgraph=True)`; the host checks of `step` stay eager, before it.
        Every kernel is a `torch.ops.specssm` custom op, so the step compiles as one graph.

        mode="reduce-overhead" (CUDA) also captures the compiled step in CUDA graphs: the caches, the
        plan and its scratch are then marked static inputs (their addresses are the graph's), and the
        ops' host checks must be off (`validate=False`: a check reads device memory, which a capture
        cannot). `dynamic=False` compiles once per (batch, T) shape. Returns the model. The ops chosen
        later by `set_ops` run eagerly again."""
        graphs = mode in ("reduce-overhead", "max-autotune") or bool((options or {}).get("triton.cudagraphs"))
        if graphs and self.validate:
            raise ValueError("validate: CUDA graphs (mode 'reduce-overhead') need the ops' host checks off; "
                             "build the model with validate=False or call set_ops(..., validate=False) first")
        kw = {"options": options} if options else {"mode": mode}
        self._decode = torch.compile(self.decode_step, backend=backend, fullgraph=True, dynamic=dynamic, **kw)
        self.compiled = f"torch.compile({backend}{f', mode={mode}' if mode else ''}, fullgraph)"
        self._graphs = graphs
        return self

    @property
    def local_cfg(self) -> Mamba2Config:
        return self.cfg.local(self.tp_size)

    def new_cache(self, num_slots: int, max_tokens: int, window: int = 16, state_dtype=torch.float32,
                  strategy: str = "checkpointing") -> ModelCache:
        """An empty decode cache of this rank's heads for `num_slots` requests and steps of up to
        `max_tokens` tokens."""
        return ModelCache(self.local_cfg, num_slots, max_tokens, window, state_dtype, self.dtype, self.device,
                          strategy)

    def _logits(self, h):
        return F.linear(rmsnorm(h, self.final_norm, self.cfg.norm_eps), self.lm_head).float()

    def _check_tokens(self, name, tokens, ndim):
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name}: expected an int32/int64 tensor of token ids, got "
                            f"{getattr(tokens, 'dtype', type(tokens).__name__)}")
        if tokens.dim() != ndim:
            raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size):
            raise ValueError(f"{name}: expected token ids in [0, {self.cfg.vocab_size}), got values in "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: ModelCache, slots: torch.Tensor) -> torch.Tensor:
        """One verify step: tokens `(batch, T)` -> logits `(batch, T, vocab)` float32 (garbage on
        padding rows, whose slot is cache.pad_slot_id). Appends to the caches; commit afterwards
        with `cache.commit(slots, accepted, T)`. Checks the tokens (and with `validate` the slots and
        their ring position) on the host, then runs `decode_step`, compiled after `compile_step`."""
        self._check_tokens("tokens", tokens, 2)
        if tokens.shape[1] > cache.max_tokens:
            raise ValueError(f"tokens: expected at most {cache.max_tokens} tokens per row (cache max_tokens), "
                             f"got {tokens.shape[1]}")
        if self.validate:
            self._check_slots(cache, slots, tokens.shape[0], tokens.shape[1])
        return self.step_unchecked(tokens, cache, slots)

    @torch.no_grad()
    def step_unchecked(self, tokens: torch.Tensor, cache: ModelCache, slots: torch.Tensor) -> torch.Tensor:
        """`step` without its host checks of the tokens and slots, so without a host sync: for a serving
        loop that trusts its inputs, and what `specssm bench --compiled` times. Prepares the plan buffers
        (and, for CUDA graphs, marks the static inputs), then runs `decode_step` (compiled after
        `compile_step`). The ops still run their own checks when the model was built with `validate`."""
        plan = self._step_plan(cache, slots.shape[0], tokens.shape[1])
        if self._graphs:
            # a CUDA-graph replay reads and writes these tensors where the capture found them
            for t in (*cache.tensors(), *(plan.tensors() if plan is not None else ())):
                torch._dynamo.mark_static_address(t, guard=False)
            torch.compiler.cudagraph_mark_step_begin()
        return self._decode(tokens, cache, slots, plan)

    def decode_step(self, tokens: torch.Tensor, cache: ModelCache, slots: torch.Tensor,
                    plan: StepPlan | None = None) -> torch.Tensor:
        """`step` after its host checks, what `compile_step` compiles: builds `plan` (when the step op
        reads one) from the committed pnat, then embedding, every layer (conv1d update, SSM step, gated
        norm) and the logits. No host sync and no Python object created, so one graph holds it all."""
        h = self.embedding[tokens.to(self.device)]
        ssu = self.ssu
        if plan is not None:
            ssm = cache.ssm
            plan.build(ssm.pnat, slots.to(self.device), cache.window, tokens.shape[1], cache.pad_slot_id,
                       validate=self.validate, ring_start=ssm.ring_start, ring_len=ssm.L,
                       max_pnat=max(ssm.W, ssm.T), faults=ssm.faults)
            ssu = functools.partial(ssu, plan=plan)
        conv_slots, ssm = None, cache.ssm
        if not self.validate and ssm.strategy != "all_states":
            # no host checks: a row the step sets aside (bad slot, pnat or ring_start, a shared slot) must
            # not advance its conv state either
            conv_slots = flt.set_aside(slots.to(self.device), ssm.pnat, ssm.ring_start, cache.pad_slot_id,
                                       max(ssm.W, ssm.T), ssm.L)
        for norm_w, mixer in zip(self.layer_norms, self.mixers):
            h = h + mixer.step(rmsnorm(h, norm_w, self.cfg.norm_eps), cache, slots, ssu, self.conv, conv_slots)
        return self._logits(h)

    @staticmethod
    def _check_slots(cache: ModelCache, slots: torch.Tensor, batch: int, T: int) -> None:
        """The step's slot ids and their ring position (pnat, ring_start), checked on the host before
        the first layer's conv writes anything (the step op checks them again per layer)."""
        ssm = cache.ssm
        check_tensor("slots", slots, shape=(batch,), dtypes=(torch.int32, torch.int64),
                     why="one slot per row of tokens")
        check_slots_host("slots", slots, ssm.num_slots, cache.pad_slot_id)
        check_ring_values_host(ssm.ring_start, ssm.pnat, slots, batch, cache.pad_slot_id, ssm.W, T, ssm.L,
                               names=("cache.ssm.ring_start", "cache.ssm.pnat"))

    @property
    def runs_triton_ops(self) -> bool:
        """Whether `step` runs the Triton step op and conv update (registered custom ops, so
        `compile_step` traces the step as one graph; the float64 reference and torch conv are not)."""
        from specssm.model.mixer import conv1d_update_torch
        return self._triton_op() is not None and self.conv is not conv1d_update_torch

    def _triton_op(self):
        """The step op when it is the Triton `checkpointing_ssu` (from `resolve_ssu`), else None."""
        try:
            from specssm.step.launch import checkpointing_ssu
        except ImportError:
            return None
        fn = self.ssu
        return fn if isinstance(fn, functools.partial) and fn.func is checkpointing_ssu else None

    def _reads_plan(self, batch: int, cache: ModelCache, T: int) -> bool:
        """Whether this step's op reads a plan. The Triton op from `resolve_ssu` does not below its split
        batch (one dynamic launch), so no plan is built there (a launch saved per step); any other
        callable that takes a plan gets one."""
        if not self._ssu_takes_plan:
            return False
        fn = self._triton_op()
        if fn is None:
            return True
        from specssm.step.launch import reads_plan
        cfg, ssm = self.local_cfg, cache.ssm
        return reads_plan(batch, self.device, cfg.head_dim, cfg.d_state, ssm.layers[0].state.dtype,
                          fn.keywords.get("launch", "auto"), T=T, W=ssm.W, H=ssm.H, G=ssm.G,
                          rounding=fn.keywords.get("rounding", "rn"))

    def _step_plan(self, cache: ModelCache, batch: int, T: int) -> StepPlan | None:
        """This step's plan buffers (built in `decode_step`), reused while the batch fits them, or None
        when the op reads no plan. Created here, outside `decode_step`, with the Triton op's split-step
        scratch, so that a compiled step finds them allocated (a trace must not create them)."""
        if not self._reads_plan(batch, cache, T):
            return None
        if self._plan is None or self._plan.max_batch < batch:
            self._plan = StepPlan(max(batch, 1), self.device)
        fn = self._triton_op()
        if fn is not None and fn.keywords.get("no_write_form", "rectangle") == "rectangle":
            self._plan.scratch(self.local_cfg.nheads, self.dtype)
        return self._plan

    def ssm_A(self) -> list:
        """Each layer's per-head A = -exp(A_log) of this rank, (H_local,): what `materialize` takes."""
        return [-torch.exp(m.A_log) for m in self.mixers]

    @torch.no_grad()
    def materialize(self, cache: ModelCache, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Fold each source slot's ring history into a fresh checkpoint of its destination (pnat 0), every
        layer, with this model's A: `specssm.step.materialize` when the step op is the Triton one, else
        the float64 reference `materialize_ref`. A destination other than its source also gets the
        source's conv context, so it continues where the source is. src == dst: an early flush."""
        if self._triton_op() is not None:
            from specssm.step.materialize import materialize as fold
        else:
            from specssm.reference import materialize_ref as fold
        fold(cache.ssm, src_slots, dst_slots, self.ssm_A(), validate=True)
        cache.copy_conv(src_slots, dst_slots)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor, cache: ModelCache, slot) -> torch.Tensor:
        """Run the prompt `(Lp,)` (Lp >= 1) of one request from a fresh slot; returns its logits
        `(Lp, vocab)` float32 and leaves the slot's caches in the contract's state."""
        self._check_tokens("prompt", prompt, 1)
        if prompt.numel() < 1:
            raise ValueError("prompt: expected at least one token, got an empty prompt")
        h = self.embedding[prompt.to(self.device)]
        for norm_w, mixer in zip(self.layer_norms, self.mixers):
            h = h + mixer.prefill(rmsnorm(h, norm_w, self.cfg.norm_eps), cache, slot)
        return self._logits(h)

    @torch.no_grad()
    def reference_forward(self, tokens: torch.Tensor, states=None):
        """Float64 token-by-token reference: tokens `(L,)` -> (logits `(L, vocab)` float64, states),
        states = one (conv window, SSM state) per layer; `states=None` starts fresh."""
        self._check_tokens("tokens", tokens, 1)
        eps = self.cfg.norm_eps
        h = self.embedding.double()[tokens.to(self.device)]
        states = [None] * self.cfg.n_layers if states is None else list(states)
        for i, (norm_w, mixer) in enumerate(zip(self.layer_norms, self.mixers)):
            out, states[i] = mixer.reference_forward(rmsnorm(h, norm_w.double(), eps), states[i])
            h = h + out
        logits = rmsnorm(h, self.final_norm.double(), eps) @ self.lm_head.double().T
        return logits, states
