"""Kernel lists -> steps: trace parsing, marker splitting, spans and statistics (synthetic events)."""
from __future__ import annotations

import math

import pytest

from specssm.bench.timing import (
    BEGIN_MARKER,
    END_MARKER,
    DeviceEvent,
    events_from_trace,
    keep_named,
    spans_by_position,
    split_by_count,
    split_steps,
    stats,
    step_busy,
    step_span,
)


def ev(name, start, dur):
    return DeviceEvent(name, float(start), float(start + dur))


def B(t):
    return ev(f"{BEGIN_MARKER}_0d", t, 1)


def E(t):
    return ev(END_MARKER, t, 1)


def test_split_keeps_only_what_is_inside_markers():
    events = [
        ev("graph_replay_prologue_fill", 0, 1),            # before the first begin: dropped
        B(10), ev("precompute", 12, 2), ev("main", 15, 5), E(21),
        ev("something_between", 23, 1),                    # between end and begin: dropped
        B(25), ev("memset", 26, 0.5), ev("main", 27, 3), E(31),
        B(40), E(42),                                      # an empty step
    ]
    steps = split_steps(events)
    assert [[e.name for e in s] for s in steps] == [["precompute", "main"], ["memset", "main"], []]
    assert step_span(steps[0]) == pytest.approx(20 - 12)
    assert step_busy(steps[0]) == pytest.approx(7)
    assert step_span(steps[1]) == pytest.approx(30 - 26)
    assert math.isnan(step_span(steps[2]))


def test_span_takes_overlapping_kernels_into_account():
    # a kernel that starts later but ends earlier than its predecessor (PDL-style overlap)
    step = [ev("a", 0, 10), ev("b", 2, 3)]
    assert step_span(step) == 10 and step_busy(step) == 13


def test_unmatched_markers_raise():
    with pytest.raises(ValueError, match="without a begin"):
        split_steps([E(0)])
    with pytest.raises(ValueError, match="no end marker"):
        split_steps([B(0), ev("k", 1, 1)])
    with pytest.raises(ValueError, match="inside an open step"):
        split_steps([B(0), B(2), E(3)])


def test_events_from_chrome_trace_sorted_device_only():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "k2", "ts": 105.5, "dur": 2.25},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 90, "dur": 5},
        {"ph": "X", "cat": "kernel", "name": "k1", "ts": 100.0, "dur": 1.0},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "ts": 103, "dur": 0.5},
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 1},
        {"ph": "M", "name": "process_name"},
    ]}
    events = events_from_trace(trace)
    assert [e.name for e in events] == ["k1", "Memset (Device)", "k2"]
    assert events[2].end == pytest.approx(107.75)


def test_many_replays_stats_and_positions():
    # 3 replays x 4 steps, step i of each replay takes 1 + i us, 2 kernels each
    events, t = [], 0.0
    for _ in range(3):
        for i in range(4):
            events += [B(t), ev("pre", t + 1, 0.5), ev("main", t + 2, 0.5 + i), E(t + 4 + i)]
            t += 10
    steps = split_steps(events)
    assert len(steps) == 12
    st = stats(steps)
    spans = [1.5 + i for i in range(4)] * 3
    assert st.samples == 12 and st.kernels_per_step == 2
    assert st.median_us == pytest.approx(sorted(spans)[5] / 2 + sorted(spans)[6] / 2)
    assert st.p10_us <= st.median_us <= st.p90_us
    assert st.mean_us == pytest.approx(sum(spans) / 12)
    by_pos = spans_by_position(steps, 4)
    assert [float(v[0]) for v in by_pos] == [1.5, 2.5, 3.5, 4.5]
    assert all(len(v) == 3 for v in by_pos)
    d = st.as_dict("conv_")
    assert d["conv_median_us"] == st.median_us


def test_split_by_count():
    events = [ev(str(i), i, 0.5) for i in range(6)]
    groups = split_by_count(events, 3)
    assert [[e.name for e in g] for g in groups] == [["0", "1", "2"], ["3", "4", "5"]]
    with pytest.raises(ValueError, match="multiple"):
        split_by_count(events, 4)


def test_stats_needs_a_step():
    with pytest.raises(ValueError, match="at least one step"):
        stats([[], []])


def peer_step(t):
    """One step of a peer as its wrapper runs it: torch gathers, its two kernels (the second overlapping
    the first under PDL), torch scatters. Only the kernels may count: t + 7 to t + 12, 5 us."""
    return [B(t), ev("Memset (Device)", t + 1, 1), ev("void at::native::gather_kernel<float>", t + 2, 4),
            ev("_dynamic_precompute_kernel", t + 7, 3), ev("_persistent_main_kernel", t + 8, 4),
            ev("void at::native::_scatter_gather_elementwise_kernel", t + 13, 5), E(t + 19)]


def test_name_filter_times_only_the_peer_kernels():
    steps = split_steps(peer_step(0) + peer_step(100) + peer_step(200))
    assert [step_span(s) for s in steps] == [17.0] * 3        # everything between the markers
    kept = keep_named(steps, ("precompute", "persistent"))
    assert [[e.name for e in s] for s in kept] == [["_dynamic_precompute_kernel", "_persistent_main_kernel"]] * 3
    st = stats(kept)
    assert st.median_us == 5.0 and st.busy_us == 7.0 and st.kernels_per_step == 2 and st.samples == 3
    # the unfiltered steps are untouched (the filter returns new lists)
    assert len(steps[0]) == 5
    # one fragment is enough to keep a kernel; an empty step stays empty
    assert [len(s) for s in keep_named([steps[0], []], ("persistent",))] == [1, 0]


def test_name_filter_refuses_a_step_that_keeps_nothing():
    steps = split_steps(peer_step(0) + [B(50), ev("void at::native::gather_kernel<float>", 51, 2), E(54)])
    with pytest.raises(ValueError, match=r"step 1: expected an activity whose name contains one of "
                                         r"\['precompute', 'persistent'\], got only \['void at::native::gather"):
        keep_named(steps, ("precompute", "persistent"))
    with pytest.raises(ValueError, match="at least one name fragment"):
        keep_named(steps, ())
