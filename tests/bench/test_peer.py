"""`--peer`: parsing its argument, loading the peer from a folder, its work items from a StepPlan (CPU)."""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch

from specssm.bench import peer as pr
from specssm.cache import StepPlan

REPO = Path(__file__).resolve().parents[2]
# the vendored peer: next to the checkout (../shared/peers) or copied into it (.peers, see benchmarks/README.md)
VENDORED = next((d for d in (REPO.parent / "shared" / "peers", REPO / ".peers") if (d / pr.PACKAGE).is_dir()), None)


def fake_peer(root: Path, value: int) -> Path:
    """A package shaped like the peer: its entry imports a sibling module relatively."""
    pkg = root / pr.PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "helper.py").write_text(f"VALUE = {value}\n")
    (pkg / f"{pr.ENTRY_MODULE}.py").write_text(
        f"from .helper import VALUE\n\n\ndef {pr.ENTRY}(**kw):\n    return VALUE + len(kw)\n")
    return pkg


# ---- the argument ----------------------------------------------------------------------------------
def test_parse_accepts_the_parent_folder_or_the_package_folder(tmp_path):
    pkg = fake_peer(tmp_path, 1)
    for spec in (f"trtllm={tmp_path}", f"trtllm={pkg}", f" trtllm = {tmp_path} "):
        p = pr.parse_peer(spec)
        assert (p.name, p.folder) == ("trtllm", pkg.resolve())
    assert pr.parse_peer(f"trtllm={tmp_path}").label() == f"trtllm={pkg.resolve()}"


@pytest.mark.parametrize("spec,why", [
    ("{root}", "no NAME= before the path"),
    ("vllm={root}", "unknown peer 'vllm'; known: trtllm"),
    ("trtllm=", "an empty PATH"),
    ("trtllm={root}/missing", "no such folder"),
    ("trtllm={root}/empty", "neither it nor"),
    ("trtllm={root}/no_init", "holds __init__.py and replay_selective_state_update.py"),
])
def test_parse_errors_name_the_flag_what_it_got_and_what_it_expects(tmp_path, spec, why):
    fake_peer(tmp_path / "ok", 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_init" / pr.PACKAGE).mkdir(parents=True)
    (tmp_path / "no_init" / pr.PACKAGE / f"{pr.ENTRY_MODULE}.py").write_text("")
    spec = spec.format(root=tmp_path)
    with pytest.raises(ValueError) as e:
        pr.parse_peer(spec)
    msg = str(e.value)
    assert msg.startswith("--peer: expected 'trtllm=PATH', PATH a folder holding trtllm_replay/")
    assert f"got {spec!r}" in msg and why in msg


# ---- loading -----------------------------------------------------------------------------------------
def test_load_runs_the_entry_of_the_given_folder(tmp_path):
    first = pr.parse_peer(f"trtllm={fake_peer(tmp_path / 'a', 40)}")
    entry = pr.load_entry(first)
    assert entry(x=1, y=2) == 42                        # relative import inside the package works
    assert pr.load_entry(first) is entry                # same folder: loaded once
    assert "trtllm_replay" not in sys.modules           # under a private name only
    second = pr.parse_peer(f"trtllm={fake_peer(tmp_path / 'b', 0)}")
    assert pr.load_entry(second)(x=1) == 1              # another folder: that folder's code


def test_load_failures_raise_and_leave_nothing_behind(tmp_path):
    pkg = fake_peer(tmp_path / "broken", 1)
    (pkg / "helper.py").write_text("VALUE = (\n")
    with pytest.raises(SyntaxError):
        pr.load_entry(pr.parse_peer(f"trtllm={pkg}"))
    assert not [k for k in sys.modules if k.startswith(pr._MODULE_NAME)]
    pkg = fake_peer(tmp_path / "noentry", 1)
    (pkg / f"{pr.ENTRY_MODULE}.py").write_text("X = 1\n")
    with pytest.raises(ImportError, match="expected a function replay_selective_state_update"):
        pr.load_entry(pr.parse_peer(f"trtllm={pkg}"))


@pytest.mark.skipif(VENDORED is None, reason="no vendored peer next to the checkout (../shared/peers or .peers)")
def test_the_vendored_peer_imports_and_takes_what_the_bench_passes():
    """Import only (its kernels need a GPU): the loader works on the real package, its work-item columns
    are the ones replay_work_items writes, its timed kernels exist under the names the span filter
    keeps, and its entry takes every keyword step_fn passes."""
    pytest.importorskip("triton")
    spec = pr.parse_peer(f"trtllm={VENDORED}")
    mod = pr.load_module(spec)
    cols = [mod.REPLAY_WORK_POSITION_IN_DECODE_BATCH, mod.REPLAY_WORK_CACHE_SLOT, mod.REPLAY_WORK_PNAT,
            mod.REPLAY_WORK_CACHE_BUF_IDX]
    assert cols == list(range(len(pr.WORK_ITEM_COLUMNS))) and mod.REPLAY_WORK_ITEM_WIDTH == 4
    for fragment in pr.TIMED_KERNELS["trtllm"]:
        assert [n for n in vars(mod) if fragment in n and n.endswith("_kernel")], fragment
    params = inspect.signature(pr.load_entry(spec)).parameters
    passed = {"state", "x_cache", "B_cache", "dt_cache", "ring_start", "prev_num_accepted_tokens", "x", "dt", "A",
              "B", "C", "out", "D", "z", "dt_bias", "dt_softplus", "philox_rounds", "state_scales", "rand_seed",
              "state_batch_indices", "n_writes", "replay_work_items"}
    assert passed <= set(params)


# ---- work items ----------------------------------------------------------------------------------------
# 8 slots, W = 16, T = 6: a row writes when pnat + 6 > 16, i.e. slots 2 (pnat 12) and 4 (pnat 16)
PNAT = torch.tensor([0, 5, 12, 3, 16, 9, 7, 4], dtype=torch.int32)


@pytest.mark.parametrize("pad", [-1, 8])
def test_work_items_from_a_plan_with_padding_and_a_write_mix(pad):
    plan = StepPlan(8)
    # an earlier, larger build leaves stale entries past the batch of the next one
    plan.build(PNAT, torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.int32), 16, 6, pad_slot_id=pad)
    rows = torch.tensor([3, 4, pad, 2, 7, pad], dtype=torch.int32)
    plan.build(PNAT, rows, 16, 6, pad_slot_id=pad)
    n_writes, items = pr.replay_work_items(plan, PNAT, pad_slot_id=pad)
    # write rows 1 (slot 4) and 3 (slot 2), padding rows 2 and 5 (pnat 0: a pad id of -1 must not read
    # slot 7's pnat 4, one of 8 must not read past the end), then no-write rows 0 (slot 3), 4 (slot 7)
    expected = [[1, 4, 16, 0], [3, 2, 12, 0], [2, pad, 0, 0], [5, pad, 0, 0], [0, 3, 3, 0], [4, 7, 4, 0]]
    assert items.tolist() == expected
    assert items.dtype == torch.int32 and items.is_contiguous() and items.shape == (6, 4)
    assert n_writes.tolist() == [2] and n_writes.dtype == torch.int32 and n_writes.shape == (1,)
    # built once per slot set: a later build of the plan leaves them as they are
    plan.build(PNAT, torch.tensor([0, 1], dtype=torch.int32), 16, 6, pad_slot_id=pad)
    assert plan.counts[0].item() == 0 and n_writes.tolist() == [2] and items.tolist() == expected


def test_work_items_all_no_write_and_all_write():
    plan = StepPlan(4).build(PNAT, torch.tensor([0, 1, 3], dtype=torch.int32), 16, 6)
    n_writes, items = pr.replay_work_items(plan, PNAT)
    assert n_writes.tolist() == [0] and items.tolist() == [[0, 0, 0, 0], [1, 1, 5, 0], [2, 3, 3, 0]]
    plan.build(PNAT, torch.tensor([4, 2], dtype=torch.int32), 16, 6)
    n_writes, items = pr.replay_work_items(plan, PNAT)
    assert n_writes.tolist() == [2] and items.tolist() == [[0, 4, 16, 0], [1, 2, 12, 0]]


def test_unsupported_sizes():
    assert pr.unsupported_reason(6, 16) is None and pr.unsupported_reason(6, 6) is None
    assert "needs W >= T" in pr.unsupported_reason(6, 4)
