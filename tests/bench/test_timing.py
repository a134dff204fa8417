"""Kernel lists -> steps: trace parsing, marker splitting, spans and statistics (synthetic events)."""
from __future__ import annotations

import math

import pytest

from specssm.bench.timing import (BEGIN_MARKER, END_MARKER, DeviceEvent, events_from_trace, spans_by_position,
                                  split_by_count, split_steps, stats, step_busy, step_span)


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
