"""Tensor parallelism: run the same decoding on `tp` processes, each holding H/tp heads and G/tp groups.

`launch` starts one process per rank (torch.multiprocessing, spawn), joins them through
torch.distributed (gloo on CPU, nccl on GPUs) over a free TCP port on 127.0.0.1, runs a function on
every rank and returns the ranks' results. `generate_worker` is the function the demo and the tests
run: build the sharded model, decode, return tokens and logits.
"""
from __future__ import annotations

import os
import queue as queue_mod
import socket
import traceback
from datetime import timedelta

import torch

NVLS_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, fn, args, results):
    import torch.distributed as dist
    try:
        if backend == "gloo":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")      # loopback only
            torch.set_num_threads(1)                                # ranks share the cores
        else:
            # NVLink multicast stays off: on shared hosts a program using it can take the GPUs down
            os.environ.update(NVLS_OFF)
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=120))
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - report, don't hang the parent
        results.put((rank, False, traceback.format_exc()))


def launch(fn, world_size: int, args=(), backend: str = "gloo", timeout_s: float = 300.0) -> list:
    """Run `fn(rank, world_size, *args)` on `world_size` new processes joined in one process group.

    fn must be importable by name (a module-level function) and return picklable values (no tensors
    shared across processes: return lists or numpy arrays). Returns the results in rank order; raises
    RuntimeError with the failing rank's traceback.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend: expected 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and torch.cuda.device_count() < world_size:
        raise ValueError(f"world_size: expected at most {torch.cuda.device_count()} ranks (CUDA devices) "
                         f"for nccl, got {world_size}")
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    out, errors = {}, []
    try:
        for _ in range(world_size):
            try:
                rank, ok, value = results.get(timeout=timeout_s)
            except queue_mod.Empty:
                raise RuntimeError(f"tensor-parallel run: no result from some rank within {timeout_s} s "
                                   f"(exit codes {[p.exitcode for p in procs]})") from None
            if ok:
                out[rank] = value
            else:
                errors.append(f"rank {rank}:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=10 if not errors else 1)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    if errors:
        raise RuntimeError("tensor-parallel run failed on " + "\n".join(errors))
    return [out[r] for r in range(world_size)]


def generate_worker(rank, world_size, spec: dict):
    """Build rank `rank`'s shard of `TinyMamba2LM(spec['cfg'], spec['seed'])` and decode.

    spec keys: cfg, seed, dtype ("fp64" | "fp32" | ...), device ("cpu" | "cuda"), prompts (lists of
    ints), max_new_tokens, T, drafter ("ngram" | "random"), ssu, conv, precision, pdl, window,
    state_dtype.
    Returns dict(tokens, mean_accepted, flush_fraction, tokens_per_s, prefill_logits (first prompt,
    numpy float64), step_logits (one verify step of the first prompt's continuation, numpy float64)).
    """
    from specssm.model.decode import NgramDrafter, RandomDrafter, speculative_generate
    from specssm.model.lm import TinyMamba2LM
    device = "cpu" if spec["device"] == "cpu" else f"cuda:{torch.cuda.current_device()}"
    model = TinyMamba2LM(spec["cfg"], seed=spec["seed"], dtype=DTYPES[spec["dtype"]], device=device,
                         tp_rank=rank, tp_size=world_size, ssu=spec.get("ssu", "auto"),
                         conv=spec.get("conv", "auto"), precision=spec.get("precision", "exact"),
                         pdl=spec.get("pdl", False))
    prompts = [torch.tensor(p, dtype=torch.int64) for p in spec["prompts"]]
    T = spec["T"]
    drafter = (NgramDrafter() if spec.get("drafter", "ngram") == "ngram"
               else RandomDrafter(spec["cfg"].vocab_size, spec["seed"]))
    state_dtype = DTYPES[spec.get("state_dtype", "fp32")]
    window = spec.get("window", 16)
    res = speculative_generate(model, prompts, spec["max_new_tokens"], T, drafter, window=window,
                               state_dtype=state_dtype)
    # logits of a prefill and of one verify step, to compare across tp sizes
    cache = model.new_cache(1, T, window, state_dtype)
    slot = cache.allocate(1).to(model.device)
    prefill_logits = model.prefill(prompts[0], cache, int(slot[0]))
    step_tokens = torch.tensor([(res.tokens[0] * T)[:T]], dtype=torch.int64, device=model.device)
    step_logits = model.step(step_tokens, cache, slot)
    return dict(tokens=res.tokens, mean_accepted=res.mean_accepted, flush_fraction=res.flush_fraction,
                tokens_per_s=res.tokens_per_s, decode_s=res.decode_s,
                prefill_logits=prefill_logits.double().cpu().numpy(),
                step_logits=step_logits[0].double().cpu().numpy())


def generate_many(rank, world_size, specs: list):
    """`generate_worker` for several specs in one process group (one start-up for all)."""
    return [generate_worker(rank, world_size, s) for s in specs]
