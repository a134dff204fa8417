"""Step times from CUPTI kernel timestamps (benchmarks/README.md, "What is measured": step time).

A CUDA graph holds several steps, each between a begin-marker and an end-marker kernel:

    [begin] step 0 kernels [end] [begin] step 1 kernels [end] ... (replayed R times)

The graph is replayed under `torch.profiler` (ProfilerActivity.CUDA, i.e. CUPTI). The device activities of
the trace (kernels, memsets, memcpys) are sorted by start time and split at the markers; a step's time is
the span from the start of its first activity to the end of its last one. Anything outside a begin/end
pair (e.g. work the graph replay itself launches) is dropped. For a peer, only its own kernels count
(`keep_named`, by name), so its span skips the torch ops its wrapper adds around them. The pure part
(trace parsing, splitting, statistics) runs on a CPU; the GPU part imports torch.cuda / triton only
when called.

The quick timer (`specssm bench --timer events`, `time_graph_events`) skips the profiler: CUDA events
around whole replays of a graph without markers, the loop used while tuning.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

import numpy as np

BEGIN_MARKER = "specssm_bench_begin_marker"
END_MARKER = "specssm_bench_end_marker"
DEVICE_CATEGORIES = ("kernel", "gpu_memset", "gpu_memcpy")


def no_cuda(command: str, without: str) -> bool:
    """True (after saying so on stderr) when no CUDA device is present: `command` (e.g. "specssm bench
    --materialize") needs one; `without` names what works on a CPU."""
    import sys

    import torch
    if torch.cuda.is_available():
        return False
    print(f"{command}: expected a CUDA device, got none ({without})", file=sys.stderr)
    return True


@dataclass(frozen=True)
class DeviceEvent:
    name: str
    start: float         # microseconds
    end: float


# ---- pure part ------------------------------------------------------------------------------------
def events_from_trace(trace: dict, categories=DEVICE_CATEGORIES) -> list[DeviceEvent]:
    """Device activities of a Chrome trace (as torch.profiler exports it), sorted by start."""
    out = []
    for e in trace.get("traceEvents", []):
        if e.get("ph") != "X" or e.get("cat") not in categories:
            continue
        start = float(e["ts"])
        out.append(DeviceEvent(str(e.get("name", "")), start, start + float(e.get("dur", 0.0))))
    out.sort(key=lambda ev: (ev.start, ev.end))
    return out


def split_steps(events, begin=BEGIN_MARKER, end=END_MARKER) -> list[list[DeviceEvent]]:
    """Split a start-sorted activity list into steps at begin / end markers (matched by substring).

    Returns one list of activities per begin..end pair (possibly empty). Raises ValueError on a begin
    without an end or an end without a begin (a truncated or interleaved trace).
    """
    steps, current = [], None
    for ev in events:
        if begin in ev.name:
            if current is not None:
                raise ValueError(f"events: begin marker at {ev.start} us inside an open step "
                                 f"(expected an end marker first)")
            current = []
        elif end in ev.name:
            if current is None:
                raise ValueError(f"events: end marker at {ev.start} us without a begin marker")
            steps.append(current)
            current = None
        elif current is not None:
            current.append(ev)
    if current is not None:
        raise ValueError("events: the last step has a begin marker but no end marker (truncated trace)")
    return steps


def split_by_count(events, per_step: int) -> list[list[DeviceEvent]]:
    """Split a start-sorted activity list into consecutive groups of `per_step` (no markers)."""
    if per_step < 1:
        raise ValueError(f"per_step: expected >= 1, got {per_step}")
    if len(events) % per_step:
        raise ValueError(f"events: expected a multiple of per_step={per_step} activities, got {len(events)}")
    return [list(events[i:i + per_step]) for i in range(0, len(events), per_step)]


def keep_named(steps, substrings) -> list[list[DeviceEvent]]:
    """Each step's activities whose names contain one of `substrings` (a peer's own kernels, without
    the torch ops its wrapper launches around them). Raises ValueError when a step with activity keeps
    none of it: the kernels were renamed, or the filter is wrong, and the span would silently vanish."""
    substrings = tuple(substrings)
    if not substrings:
        raise ValueError("substrings: expected at least one name fragment, got none")
    kept = []
    for i, step in enumerate(steps):
        sel = [e for e in step if any(k in e.name for k in substrings)]
        if step and not sel:
            names = sorted({e.name for e in step})
            raise ValueError(f"step {i}: expected an activity whose name contains one of {list(substrings)}, "
                             f"got only {names[:8]}")
        kept.append(sel)
    return kept


def step_span(step) -> float:
    """First start to last end of a step's activities, in microseconds (nan for an empty step)."""
    if not step:
        return float("nan")
    return max(e.end for e in step) - min(e.start for e in step)


def step_busy(step) -> float:
    """Sum of the activities' durations (the span minus gaps, if nothing overlaps)."""
    return float(sum(e.end - e.start for e in step))


@dataclass
class StepStats:
    median_us: float
    p10_us: float
    p90_us: float
    mean_us: float
    busy_us: float           # median of per-step summed kernel durations
    samples: int
    kernels_per_step: int    # most common activity count per step

    def as_dict(self, prefix="") -> dict:
        return {f"{prefix}{k}": v for k, v in self.__dict__.items()}


def stats(steps) -> StepStats:
    spans = np.array([step_span(s) for s in steps if s], dtype=np.float64)
    if spans.size == 0:
        raise ValueError("steps: expected at least one step with device activity, got none")
    busy = np.array([step_busy(s) for s in steps if s])
    counts = np.bincount([len(s) for s in steps])
    return StepStats(float(np.median(spans)), float(np.percentile(spans, 10)), float(np.percentile(spans, 90)),
                     float(spans.mean()), float(np.median(busy)), int(spans.size), int(counts.argmax()))


def spans_by_position(steps, period: int) -> list[np.ndarray]:
    """Step spans grouped by their position in the graph (step i of each replay), for per-slot-set data."""
    return [np.array([step_span(s) for s in steps[i::period]]) for i in range(period)]


# ---- GPU part -------------------------------------------------------------------------------------
class StepMarkers:
    """Launches the begin / end markers on the current stream (capturable in a CUDA graph)."""

    def __init__(self, device):
        import torch

        from specssm.bench import markers
        self.flag = torch.zeros(1, dtype=torch.int32, device=device)
        self._begin, self._end = markers.specssm_bench_begin_marker, markers.specssm_bench_end_marker

    def begin(self):
        self._begin[(1,)](self.flag)

    def end(self):
        self._end[(1,)](self.flag)


def capture_graph(body, warmup=None):
    """Run `warmup()` (default: `body()`) on a side stream, which compiles kernels and does lazy
    initialization outside the capture, then capture `body()` in a CUDA graph."""
    import torch
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        (warmup or body)()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    torch.cuda.synchronize()
    return graph


def profile_device_events(fn) -> list[DeviceEvent]:
    """Run fn() under torch.profiler (CUDA activity only) and return the device activities."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json", prefix="specssm_bench_trace_")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    return events_from_trace(trace)


def time_graph(graph, steps_per_replay: int, min_samples: int = 200, min_replays: int = 2,
               warmup_replays: int = 1, keep=None) -> tuple[StepStats, list[list[DeviceEvent]]]:
    """Replay a marker-delimited graph enough times for `min_samples` steps; stats of the step spans.

    `keep`: None (every activity between the markers counts: our own strategies) or name fragments;
    then a step's span runs from the first start to the last end of its activities whose names contain
    one of them (`keep_named`). The returned steps are unfiltered either way.
    """
    import torch
    for _ in range(warmup_replays):
        graph.replay()
    torch.cuda.synchronize()
    replays = max(min_replays, -(-min_samples // steps_per_replay))

    def run():
        for _ in range(replays):
            graph.replay()

    steps = split_steps(profile_device_events(run))
    expected = replays * steps_per_replay
    if len(steps) != expected:
        raise RuntimeError(f"trace: expected {expected} marked steps ({replays} replays x {steps_per_replay}), "
                           f"got {len(steps)} (the profiler lost device activity?)")
    return stats(steps if keep is None else keep_named(steps, keep)), steps


def time_graph_events(graph, steps_per_replay: int, min_samples: int = 200, min_replays: int = 5,
                      warmup_replays: int = 1) -> StepStats:
    """The quick timer (`specssm bench --timer events`): CUDA events around whole replays of a graph of
    `steps_per_replay` steps, no profiler and no markers. Each sample is one replay's time / its steps,
    so the spread is that of replays, not of single steps; kernels_per_step and busy_us are unknown
    (0 and nan). Includes everything in the graph (a peer's wrapper ops too)."""
    if steps_per_replay < 1:
        raise ValueError(f"steps_per_replay: expected >= 1, got {steps_per_replay}")
    replays = max(min_replays, -(-min_samples // steps_per_replay))
    return time_events(graph.replay, steps_per_replay, replays, warmup_replays)


def time_events(fn, steps_per_call: int = 1, calls: int = 20, warmup: int = 1, host_us=None) -> StepStats:
    """CUDA events around each of `calls` calls of fn() (after `warmup` untimed ones), the stream
    synchronized after each, so a sample is what the call costs from its first launch to the end of its
    last kernel, host launch time included: a graph replay (`time_graph_events`) or a step launched op by
    op from Python. Each sample is one call's time / `steps_per_call`; kernels_per_step and busy_us are
    unknown (0 and nan). `host_us`: a list that gets each call's host time (to its return), in µs."""
    import time

    import torch
    if steps_per_call < 1:
        raise ValueError(f"steps_per_call: expected >= 1, got {steps_per_call}")
    if calls < 1:
        raise ValueError(f"calls: expected >= 1, got {calls}")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    per_step = []
    for _ in range(calls):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        end.record()
        if host_us is not None:
            host_us.append((time.perf_counter() - t0) * 1e6)
        end.synchronize()
        per_step.append(start.elapsed_time(end) * 1e3 / steps_per_call)
    t = np.array(per_step, dtype=np.float64)
    return StepStats(float(np.median(t)), float(np.percentile(t, 10)), float(np.percentile(t, 90)),
                     float(t.mean()), float("nan"), int(t.size), 0)


def copy_bandwidth(device, nbytes: int, iters: int = 20) -> dict:
    """Device-to-device copy bandwidth (bytes read + written per second), from CUPTI durations."""
    import torch
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    src.random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)

    def run():
        for _ in range(iters):
            dst.copy_(src)

    events = profile_device_events(run)
    durs = np.array([e.end - e.start for e in events if e.end > e.start])
    src = dst = None                  # free both (run() holds them) before emptying the cache
    torch.cuda.empty_cache()
    if durs.size < iters:
        raise RuntimeError(f"copy bandwidth: expected {iters} copy activities in the trace, got {durs.size}")
    med = float(np.median(durs))
    return {"copy_bytes": int(nbytes), "copy_us": med, "copy_bw_GBps": 2 * nbytes / med * 1e-3,
            "copy_bw_bytes_per_s": 2 * nbytes / (med * 1e-6)}
