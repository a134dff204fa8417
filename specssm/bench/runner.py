"""The GPU side of `specssm bench`: build caches, capture steps in CUDA graphs, time them, count bytes.

One `Env` holds the caches and inputs of one (shape, state dtype, batch, strategy): `slot_sets` disjoint
sets of `batch` slots, so a graph of `slot_sets` steps, step i on set i, touches more than `cold_factor`
x L2 of state between two visits of a slot (state cold), while the new inputs (x, dt, B, C, z, out) are
shared by all steps (hot). Scenarios only change the per-slot `pnat` (and the plans built from it), so the
variants of one strategy reuse one Env. A peer (`--peer`) runs in the Env of our checkpointing strategy:
same caches, slot sets, pnat draw and inputs.

Nothing here runs at import time; torch.cuda is touched only by `GpuBench(...)`.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import platform
import sys

import numpy as np

from specssm.bench import floor as fl
from specssm.bench import mix, report, timing
from specssm.bench import peer as pr
from specssm.bench.cases import Case, cache_strategy
from specssm.bench.strategies import STRATEGIES
from specssm.bench.timing import StepMarkers, capture_graph, copy_bandwidth, time_graph, time_graph_events

SKIP_ERRORS = (TypeError, ValueError, NotImplementedError)


def torch_dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": torch.int8,
            "fp8": torch.float8_e4m3fn}[name]


class Skip(Exception):
    """A case that cannot run here (rejected by an op, missing op, not enough memory)."""


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def slot_set_count(touched_per_step: int, bytes_per_set: int, l2_bytes: int, cold_factor: float,
                   max_sets: int, budget_bytes: float) -> int:
    """How many disjoint slot sets (= steps in one graph) make the state cold.

    Between two visits of a slot the graph touches (sets - 1) other sets, so `sets` with
    sets * touched_per_step >= cold_factor * L2 (and at least 2) leaves nothing of a set in L2. Capped by
    `max_sets` and by the memory budget; raises Skip when not even one set fits.
    """
    sets = max(2, math.ceil(cold_factor * l2_bytes / max(1, touched_per_step)))
    sets = min(sets, max_sets)
    if sets * bytes_per_set > budget_bytes:
        sets = int(budget_bytes // bytes_per_set)
        if sets < 1:
            raise Skip(f"needs {bytes_per_set / 2**30:.1f} GiB for one slot set, "
                       f"{budget_bytes / 2**30:.1f} GiB allowed")
    return sets


def fill_state(state, state_scale=None) -> None:
    """Random contents for a state pool on its device, in chunks (fp8 tensors have no normal_): floats
    N(0, 0.1²); int8 codes of N(0, 40²), fp8 of N(0, 50²), clamped to the format; scales in [1e-3, 1e-2]."""
    import torch
    flat = state.view(state.shape[0], -1)
    chunk = max(1, (1 << 26) // flat.shape[1])
    for a in range(0, flat.shape[0], chunk):
        v = torch.randn(flat[a:a + chunk].shape, device=state.device)
        if state.dtype == torch.int8:
            v = v.mul_(40).round_().clamp_(-127, 127)
        elif state.dtype == torch.float8_e4m3fn:
            v = v.mul_(50).clamp_(-448, 448)
        else:
            v = v.mul_(0.1)
        flat[a:a + chunk].copy_(v)
    if state_scale is not None:
        state_scale.uniform_(1e-3, 1e-2)


def compiled_kernels() -> list[dict]:
    """Registers, spills, shared memory and warps of every variant of the step kernels compiled in this
    process (`specssm bench --kernels`)."""
    from specssm.step.coef import coef_kernel
    from specssm.step.fused import fused_kernel
    from specssm.step.mains import main_kernel
    out = []
    for kernel in (fused_kernel, coef_kernel, main_kernel):
        for caches in getattr(kernel, "device_caches", {}).values():
            for key, k in caches[0].items():
                out.append({"kernel": kernel.fn.__name__, "regs": k.n_regs, "spills": k.n_spills,
                            "shared": k.metadata.shared, "warps": k.metadata.num_warps, "key": str(key)})
    return out


# ---- environment ---------------------------------------------------------------------------------
class Env:
    def __init__(self, bench: GpuBench, case: Case):
        import torch

        from specssm.cache import SSMCache

        o = bench.opts
        self.bench, self.case, self.strategy = bench, case, cache_strategy(case.variant.strategy)
        self.st = st = STRATEGIES[self.strategy]
        sh, T, batch = case.shape, case.T, case.batch
        self.H, self.P, self.N, self.G, self.T, self.batch = sh.H, sh.P, sh.N, sh.G, T, batch
        self.W = case.W if st.window else 0
        dev = bench.device
        self.device = dev
        act = torch_dtype(o.act_dtype)
        L = max(self.W, T) + T
        per_slot = fl.state_bytes_per_slot(self.strategy, H=sh.H, P=sh.P, N=sh.N, G=sh.G, T=T, L=L,
                                           state_dtype=case.state_dtype, act_dtype=o.act_dtype)
        conv_dim = sh.H * sh.P + 2 * sh.G * sh.N
        if bench.conv_update is not None and o.conv:
            per_slot += (o.d_conv - 1 + T) * conv_dim * fl.dtype_bytes(o.act_dtype)
        touched = batch * fl.touched_bytes_per_row(self.strategy, H=sh.H, P=sh.P, N=sh.N, T=T,
                                                   state_dtype=case.state_dtype)
        if dev.type == "cuda":
            free, _ = torch.cuda.mem_get_info(dev)
        else:
            free = 2**34
        sets = slot_set_count(touched, per_slot * batch, bench.l2_bytes, o.cold_factor, o.max_sets,
                              o.mem_fraction * free)
        self.sets_n = sets
        self.cold_ratio = sets * touched / bench.l2_bytes
        slots = sets * batch
        try:
            self.cache = SSMCache(1, slots, sh.H, sh.P, sh.N, sh.G, max_tokens=T, window=case.W,
                                  state_dtype=torch_dtype(case.state_dtype), act_dtype=act, device=dev,
                                  strategy=self.strategy)
        except torch.cuda.OutOfMemoryError as e:
            raise Skip(f"out of memory allocating {slots} slots: {e}") from None
        except SKIP_ERRORS as e:
            raise Skip(f"SSMCache rejected it: {e}") from None
        gen = torch.Generator(device="cpu").manual_seed(o.seed)
        self._fill_state(gen)
        lc = self.cache.layers[0]
        if lc.x_cache is not None:
            lc.x_cache.normal_(0.0, 0.5)
            lc.B_cache.normal_(0.0, 0.5)
            lc.dt_cache.uniform_(0.001, 0.1)
            rs = torch.randint(0, self.cache.L, (slots,), generator=gen, dtype=torch.int32)
            self.cache.ring_start.copy_(rs.to(dev))
        # slot sets: a random permutation of the slots, cut into `sets` groups of `batch`
        self.perm = torch.randperm(slots, generator=gen).to(torch.int32)
        perm_dev = self.perm.to(dev)
        self.slot_sets = [perm_dev[i * batch:(i + 1) * batch] for i in range(sets)]
        # inputs of the step (hot: the same tensors for every step)
        HP = (batch, T, sh.H, sh.P)
        self.x = torch.randn(HP, device=dev).mul_(0.5).to(act)
        dt_raw = (torch.randn(batch, T, sh.H, device=dev) * 0.5 - 2.0).to(act)
        self.dt = dt_raw[..., None].expand(batch, T, sh.H, sh.P)
        self.A = (-torch.rand(sh.H, device=dev).add_(0.5).exp_())[:, None, None].expand(sh.H, sh.P, sh.N)
        self.D = torch.randn(sh.H, device=dev)[:, None].expand(sh.H, sh.P)
        self.dt_bias = (torch.rand(sh.H, device=dev) - 4.0)[:, None].expand(sh.H, sh.P)
        self.B = torch.randn(batch, T, sh.G, sh.N, device=dev).mul_(0.5).to(act)
        self.C = torch.randn(batch, T, sh.G, sh.N, device=dev).mul_(0.5).to(act)
        self.z = torch.randn(HP, device=dev).to(act) if o.z else None
        self.out = torch.empty(HP, dtype=act, device=dev)
        # conv1d of the second figure
        self.conv = None
        if bench.conv_update is not None and o.conv:
            self.conv = dict(
                conv_state=torch.randn(slots, o.d_conv - 1 + T, conv_dim, device=dev).to(act),
                conv_offset=torch.from_numpy(mix.sample_accepted(slots, bench.hist, T, o.seed + 7)).to(dev),
                weight=torch.randn(conv_dim, o.d_conv, device=dev).mul_(0.3).to(act),
                bias=torch.randn(conv_dim, device=dev).mul_(0.1).to(act),
                xBC=torch.randn(batch, T, conv_dim, device=dev).to(act),
                out=torch.empty(batch, T, conv_dim, dtype=act, device=dev))
        self.scenario = None
        self.plans = []
        self._peer_items, self._peer_items_scenario = [], None
        self.plan_us = {}
        self.pnat_host = None
        _sync(dev)

    def _fill_state(self, gen):
        lc = self.cache.layers[0]
        fill_state(lc.state, lc.state_scale)

    def set_scenario(self, scenario: str):
        """Per-slot pnat (or state index) for the scenario, the plans of every slot set, the bytes."""
        import torch

        from specssm.cache import StepPlan
        if scenario == self.scenario:
            return
        o, b = self.bench.opts, self.bench
        n, st = self.cache.num_slots, self.st
        if not st.ring:                              # the accepted state of the last step, by index
            acc = mix.sample_accepted(n, b.hist, self.T, o.seed + 1)
            self.cache.state_index.copy_(torch.from_numpy(acc - 1).to(self.device))
            self.pnat_host = np.zeros(n, dtype=np.int32)
        else:
            if st.window:
                pn = mix.sample_pnat(scenario, n, b.hist, self.T, self.W, o.seed + 1)
            else:                                    # W = 0: pnat = last step's acc
                pn = mix.sample_accepted(n, b.hist, self.T, o.seed + 1)
            self.cache.pnat.copy_(torch.from_numpy(pn).to(self.device))
            self.pnat_host = pn
            if st.plan:                              # always-write runs without a plan (every row writes)
                self.plans = [StepPlan(self.batch, self.device).build(self.cache.pnat, s, self.W, self.T)
                              for s in self.slot_sets]
        self.scenario = scenario
        _sync(self.device)
        perm = self.perm.numpy()
        self.bytes = []
        sh = self.case.shape
        for i in range(self.sets_n):
            ks = self.pnat_host[perm[i * self.batch:(i + 1) * self.batch]]
            self.bytes.append(fl.ssu_step_bytes(self.strategy, H=sh.H, P=sh.P, N=sh.N, G=sh.G, T=self.T,
                                                pnat=ks, state_dtype=self.case.state_dtype,
                                                act_dtype=o.act_dtype, window=self.W, has_z=o.z))
        self.conv_bytes = fl.conv_step_bytes(H=sh.H, P=sh.P, N=sh.N, G=sh.G, T=self.T, rows=self.batch,
                                             act_dtype=o.act_dtype, d_conv=o.d_conv)

    def peer_work_items(self) -> list:
        """The peer's (n_writes, replay_work_items) of every slot set in the current scenario, from our
        plans: built once per scenario, outside any timed graph, as a serving engine builds them once per
        step for all layers."""
        if self._peer_items_scenario != self.scenario:
            self._peer_items = [pr.replay_work_items(p, self.cache.pnat, self.cache.pad_slot_id) for p in self.plans]
            self._peer_items_scenario = self.scenario
            _sync(self.device)
        return self._peer_items

    # ---- one step ------------------------------------------------------------------------------
    def step_fn(self, case: Case, pdl: bool = False):
        """fn(i, validate) running the op of `case` on slot set i (pdl: checkpointing only)."""
        if case.variant.strategy in pr.PEERS:
            return self.peer_step_fn(case)
        from specssm import ops
        st = self.st
        name = st.op
        op = getattr(ops, name, None)
        if op is None:
            raise Skip(f"specssm.ops.{name} does not exist")
        o = self.bench.opts
        common = dict(x=self.x, dt=self.dt, A=self.A, B=self.B, C=self.C, out=self.out, D=self.D, z=self.z,
                      dt_bias=self.dt_bias, dt_softplus=True)
        kw = {**self.cache.op_kwargs(0), **common}
        if st.rounding:
            kw.update(rounding=case.rounding, precision=o.precision)
            if st.variants:                        # always-write has its own launch and no no-write rows
                kw.update(launch=case.variant.launch, no_write_form=case.variant.no_write_form)
                if pdl:
                    kw["pdl"] = True
            if case.rounding == "sr":
                kw["rand_seed"] = self.cache.seeds
        plans, sets = self.plans, self.slot_sets
        override = _override(case.variant.config)

        def fn(i, validate):
            with override():
                if plans:
                    op(**kw, state_batch_indices=sets[i], plan=plans[i], validate=validate)
                else:
                    op(**kw, state_batch_indices=sets[i], validate=validate)
        return fn

    def peer_step_fn(self, case: Case):
        """fn(i, validate) running the peer of `case` (same cache as our op: it mutates state and rings
        as our op does, values only)."""
        why = pr.unsupported_reason(self.T, self.W)
        if why:
            raise Skip(why)
        entry = getattr(self.bench, "peer_entry", None)
        if entry is None:
            raise Skip(getattr(self.bench, "peer_error", None) or f"{case.variant.strategy}: not loaded (no --peer)")
        return pr.step_fn(entry, self, case, self.peer_work_items())

    def checked_step_fn(self, case: Case):
        """step_fn after one eager, validated call on slot set 0: the op's own checks decide whether it
        runs this case (TypeError / ValueError / NotImplementedError -> Skip with the op's message). A peer
        signals what it does not support on this card by any exception (mostly assertions): a Skip too."""
        import torch
        step = self.step_fn(case)
        peer = case.variant.strategy in pr.PEERS
        try:
            step(0, True)
            _sync(self.device)
        except Exception as e:
            if isinstance(e, torch.cuda.OutOfMemoryError) or not (peer or isinstance(e, SKIP_ERRORS)):
                raise
            what = f"{type(e).__name__}: {e}" if peer else str(e)
            name = case.variant.strategy if peer else self.st.op
            raise Skip(f"{name} rejected it: {what.strip().splitlines()[0][:300]}") from None
        return step

    def conv_fn(self, pdl: bool = False):
        c, upd = self.conv, self.bench.conv_update
        sets = self.slot_sets
        kw = {"pdl": True} if pdl else {}

        def fn(i):
            upd(c["xBC"], c["conv_state"], c["conv_offset"], c["weight"], c["bias"], "silu",
                state_batch_indices=sets[i], out=c["out"], **kw)
        return fn

    def plan_fn(self):
        plans, sets, pnat, W, T = self.plans, self.slot_sets, self.cache.pnat, self.W, self.T

        def fn(i):
            plans[i].build(pnat, sets[i], W, T)
        return fn


def _override(config: str):
    """A context-manager factory applying a variant's tuning override (sorted JSON, "" for none) around
    each call of its op: inside CUDA-graph capture that is when the launch config is chosen."""
    if not config:
        return contextlib.nullcontext
    from specssm.step import tuning
    over = json.loads(config)
    return lambda: tuning.overridden(over)


# ---- the run ---------------------------------------------------------------------------------------
class GpuBench:
    def __init__(self, opts, hist: dict, progress=None):
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("specssm bench: expected a CUDA device, got none (use --dry-run or --render on a CPU)")
        self.opts, self.hist, self.progress = opts, hist, progress
        self.device = torch.device("cuda", torch.cuda.current_device())
        torch.manual_seed(opts.seed)
        props = torch.cuda.get_device_properties(self.device)
        self.card = props.name
        self.l2_bytes = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
        self.markers = StepMarkers(self.device)
        self.peer_spec, self.peer_entry, self.peer_error = getattr(opts, "peer_spec", None), None, None
        if self.peer_spec is not None:
            try:
                self.peer_entry = pr.load_entry(self.peer_spec)
            except Exception as e:  # noqa: BLE001 - a peer that does not import only skips its cases
                self.peer_error = f"importing {self.peer_spec.label()} failed: {type(e).__name__}: {e}"[:300]
                print(f"specssm bench: {self.peer_error}; its cases are skipped", file=sys.stderr)
        self.conv_update = None
        if opts.conv:
            try:
                from specssm.conv import conv1d_update
                self.conv_update = conv1d_update
            except ImportError as e:
                print(f"specssm bench: conv1d figure off ({e})", file=sys.stderr)
        free, _ = torch.cuda.mem_get_info(self.device)
        nbytes = int(min(max(16 * self.l2_bytes, 512 * 2**20), free // 4))
        self.copy = copy_bandwidth(self.device, nbytes)
        self.meta = self._meta()

    def _meta(self) -> dict:
        import torch
        import triton
        o = self.opts
        return {"card": self.card, "card_slug": report.card_slug(self.card), "l2_bytes": self.l2_bytes,
                "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
                "python": platform.python_version(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "copy_bw_GBps": self.copy["copy_bw_GBps"], "copy_bytes": self.copy["copy_bytes"],
                "T": o.T, "W": o.W, "act_dtype": o.act_dtype, "z": o.z, "d_conv": o.d_conv, "pdl": o.pdl,
                "cold_factor": o.cold_factor, "histogram": {str(k): v for k, v in self.hist.items()},
                "timer": getattr(o, "timer", "cupti"),
                "peer": self.peer_spec.label() if self.peer_spec else None,
                "command": "specssm bench " + " ".join(o.argv)}

    def wants_conv(self, case: Case) -> bool:
        """The conv figure runs for the baselines and the default checkpointing variant (auto launch,
        rectangle, RN) unless --conv-all asks for every variant; never for a peer (its span is its own
        kernels only)."""
        if case.variant.strategy in pr.PEERS:
            return False
        if self.opts.conv_all:
            return True
        v = case.variant
        return case.rounding == "rn" and (not STRATEGIES[v.strategy].variants
                                          or (v.launch == "auto" and v.no_write_form == "rectangle"))

    def run(self, cases, deadline=None, on_group_done=None) -> tuple[list[dict], int]:
        """Measure the cases in order; start no new case after `deadline` (time.monotonic()).

        Returns (rows, number of cases not started). `on_group_done(rows)` is called whenever the
        cache group (shape, dtype, batch, strategy) changes, so partial results can be saved.
        """
        import time

        import torch
        rows, env, env_key, env_err = [], None, None, None
        for n, case in enumerate(cases):
            if deadline is not None and time.monotonic() > deadline:
                return rows, len(cases) - n
            key = (case.shape, case.state_dtype, case.batch, cache_strategy(case.variant.strategy))
            if key != env_key:
                if env_key is not None and on_group_done is not None:
                    on_group_done(rows)
                env = None
                torch.cuda.empty_cache()
                env_key, env_err = key, None
                try:
                    env = Env(self, case)
                except Skip as e:
                    env_err = str(e)
                except torch.cuda.OutOfMemoryError as e:
                    env_err = f"out of memory: {str(e).splitlines()[0]}"
                    torch.cuda.empty_cache()
            row = self.base_row(case)
            if env is None:
                row.update(status="skipped", reason=env_err)
            else:
                try:
                    row.update(self.measure(env, case))
                    row["status"], row["reason"] = "ok", ""
                except Skip as e:
                    row.update(status="skipped", reason=str(e))
                except torch.cuda.OutOfMemoryError as e:
                    row.update(status="skipped", reason=f"out of memory: {str(e).splitlines()[0]}")
                    torch.cuda.empty_cache()
                except Exception as e:             # one broken case must not end a long run
                    if self.opts.strict:
                        raise
                    row.update(status="error", reason=f"{type(e).__name__}: {e}".splitlines()[0][:300])
            rows.append(row)
            if self.progress:
                self.progress.update(case, row)
        env = None
        if on_group_done is not None:
            on_group_done(rows)
        return rows, 0

    def uses_pdl(self, case: Case) -> bool:
        """--pdl chains conv1d and the step only where the step op can wait for it (checkpointing)."""
        st = STRATEGIES.get(case.variant.strategy)
        return self.opts.pdl and st is not None and st.variants

    def base_row(self, case: Case) -> dict:
        return {"card": self.card, "torch": self.meta["torch"], "triton": self.meta["triton"],
                "date": self.meta["date"], **case.key(), "act_dtype": self.opts.act_dtype, "z": self.opts.z,
                "pdl": self.uses_pdl(case), "timer": getattr(self.opts, "timer", "cupti"),
                "copy_bw_GBps": round(self.copy["copy_bw_GBps"], 1)}

    def _graph_stats(self, env: Env, one_step, max_steps=None, keep=None):
        """Capture [begin, one_step(i), end] for the slot sets (all, or the first max_steps), replay,
        return the span stats (of the activities whose names contain one of `keep`, if given) and the
        unfiltered steps."""
        m, S = self.markers, env.sets_n if max_steps is None else min(env.sets_n, max_steps)
        if getattr(self.opts, "timer", "cupti") == "events":
            if keep is not None:
                raise Skip("the events timer cannot single out a peer's kernels (use --timer cupti)")

            def steps():
                for i in range(S):
                    one_step(i)
            graph = capture_graph(steps)          # warm-up: every slot set once, as below
            try:
                return time_graph_events(graph, S, min_samples=self.opts.min_samples), []
            finally:
                del graph

        def body():
            for i in range(S):
                m.begin()
                one_step(i)
                m.end()
        # the warm-up runs every slot set once: each set's plan allocates its split-step scratch at its
        # first split step, which must happen outside the capture
        graph = capture_graph(body)
        try:
            st, steps = time_graph(graph, S, min_samples=self.opts.min_samples, keep=keep)
        finally:
            del graph
        return st, steps

    def measure(self, env: Env, case: Case) -> dict:
        env.set_scenario(case.scenario)
        step = env.checked_step_fn(case)
        res = {"slot_sets": env.sets_n, "cold_x_L2": round(env.cold_ratio, 2)}
        peer = case.variant.strategy in pr.PEERS
        keep = pr.TIMED_KERNELS[case.variant.strategy] if peer else None
        st, steps = self._graph_stats(env, lambda i: step(i, False), keep=keep)
        res.update(st.as_dict())
        if peer:
            # what the span kept, and the span with its wrapper's torch ops, so a run shows the filter at work
            res["timed_kernels"] = sorted({e.name for s in timing.keep_named(steps, keep) for e in s})
            res["all_ops_median_us"] = timing.stats(steps).median_us
        nbytes = float(np.mean([b.total for b in env.bytes]))
        bw = self.copy["copy_bw_bytes_per_s"]
        res["write_frac"] = float(np.mean([b.writes / max(1, b.rows) for b in env.bytes]))
        res["mean_pnat"] = float(np.mean(env.pnat_host)) if env.st.ring else float("nan")
        res["bytes_per_step"] = nbytes
        res["floor_us"] = fl.floor_us(nbytes, bw)
        res["pct_floor"] = 100.0 * res["floor_us"] / st.median_us
        if env.plans and not peer:
            if env.scenario not in env.plan_us:
                # the plan reads only pnat and slot ids (tiny, L2-resident in serving too): few sets do
                env.plan_us[env.scenario] = self._graph_stats(env, env.plan_fn(), max_steps=32)[0].median_us
            res["plan_us"] = env.plan_us[env.scenario]
        if env.conv is not None and self.wants_conv(case):
            pdl = self.uses_pdl(case)
            conv, cstep = env.conv_fn(pdl), env.step_fn(case, pdl) if pdl else step
            cst, _ = self._graph_stats(env, lambda i: (conv(i), cstep(i, False)))
            res.update(conv_median_us=cst.median_us, conv_p10_us=cst.p10_us, conv_p90_us=cst.p90_us)
            cbytes = nbytes + env.conv_bytes
            res["conv_floor_us"] = fl.floor_us(cbytes, bw)
            res["conv_pct_floor"] = 100.0 * res["conv_floor_us"] / cst.median_us
        return res
