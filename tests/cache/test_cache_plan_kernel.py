"""The one-launch Triton plan kernel against the torch reference (`StepPlan.build_reference`): random
mixes over batch sizes 1..300, padding rows, varlen lengths, int64 and strided inputs, one plan object
reused across batch sizes; the sm_90 compile; on a GPU, the full range and a CUDA-graph replay."""
import pytest
import torch

from specssm.cache import StepPlan
from specssm.cache import plan as plan_module

PAD = -1
POISON = -7


def poisoned(max_batch, device="cpu"):
    plan = StepPlan(max_batch, device)
    for t in (plan.write_flag, plan.order, plan.slots, plan.counts):
        t.fill_(POISON)
    return plan


def random_step(gen, num_slots, batch, T, W, p_pad, varlen=False, pad_slot_id=PAD, dtype=torch.int32):
    """pnat in [0, max(W, T)] (every value a commit can leave), distinct slots, some rows padding."""
    pnat = torch.randint(0, max(W, T) + 1, (num_slots,), generator=gen, dtype=torch.int32)
    slots = torch.randperm(num_slots, generator=gen)[:batch]
    pad = torch.rand(batch, generator=gen) < p_pad
    rows = torch.where(pad, pad_slot_id, slots).to(dtype)
    lens = torch.randint(0, T + 1, (batch,), generator=gen, dtype=dtype) if varlen else T
    return pnat, rows, lens


def assert_same_as_reference(pnat, rows, W, lens, pad_slot_id=PAD, kernel_plan=None, ref_plan=None,
                             device="cpu"):
    """Both builds start from the same buffers (poisoned when fresh): equal everywhere afterwards, so
    the kernel writes every element of [:batch] and nothing past it."""
    batch = rows.shape[0]
    kernel_plan = kernel_plan or poisoned(max(batch, 1), device)
    ref_plan = ref_plan or poisoned(max(batch, 1), device)
    for a, b in ((kernel_plan.write_flag, ref_plan.write_flag), (kernel_plan.order, ref_plan.order),
                 (kernel_plan.slots, ref_plan.slots)):
        assert torch.equal(a[batch:], b[batch:]), "test setup: buffers past the batch must start equal"
    assert kernel_plan.build(pnat, rows, W, lens, pad_slot_id) is kernel_plan
    ref_plan.build_reference(pnat, rows, W, lens, pad_slot_id)
    assert kernel_plan.batch == ref_plan.batch == batch
    for name in ("write_flag", "order", "slots", "counts"):
        got, want = getattr(kernel_plan, name), getattr(ref_plan, name)
        assert got.dtype == torch.int32
        assert torch.equal(got, want), f"{name}: kernel {got.tolist()} != reference {want.tolist()}"
    assert sorted(kernel_plan.order[:batch].tolist()) == list(range(batch))
    return kernel_plan


@pytest.mark.interpreter
def test_kernel_is_what_build_runs(monkeypatch):
    """Under the interpreter, build must not fall back to the torch ops."""
    def no_torch(*a, **k):
        raise AssertionError("build ran the torch reference instead of the kernel")
    monkeypatch.setattr(plan_module, "_fill_with_torch", no_torch)
    pnat = torch.tensor([15, 2, 9], dtype=torch.int32)
    plan = StepPlan(4).build(pnat, torch.tensor([1, PAD, 0, 2], dtype=torch.int32), 16, 4)
    assert plan.write_flag.tolist() == [0, 0, 1, 0] and plan.order.tolist() == [2, 1, 0, 3]
    assert plan.counts.tolist() == [1, 3]


@pytest.mark.interpreter
@pytest.mark.parametrize("varlen", [False, True])
def test_batch_sizes_1_to_300(varlen):
    """Every batch size 1..300 (blocks 1..512), each with its own random mix of T, W and padding."""
    gen = torch.Generator().manual_seed(10 + varlen)
    for batch in range(1, 301):
        T = int(torch.randint(1, 9, (), generator=gen))
        W = int(torch.randint(0, 17, (), generator=gen))
        p_pad = [0.0, 0.2, 0.7, 1.0][batch % 4]
        pnat, rows, lens = random_step(gen, batch + 5, batch, T, W, p_pad, varlen)
        assert_same_as_reference(pnat, rows, W, lens)


@pytest.mark.interpreter
@pytest.mark.parametrize("T,W", [(1, 16), (6, 16), (16, 16), (6, 0), (3, 5)])
@pytest.mark.parametrize("p_pad", [0.0, 0.3, 1.0])
def test_random_mixes(T, W, p_pad):
    gen = torch.Generator().manual_seed(T * 31 + W)
    for _ in range(6):
        batch = int(torch.randint(1, 70, (), generator=gen))
        pnat, rows, lens = random_step(gen, 80, batch, T, W, p_pad)
        assert_same_as_reference(pnat, rows, W, lens)


@pytest.mark.interpreter
def test_boundary_and_stable_order():
    """pnat = W - T stays, W - T + 1 writes; rows keep their order inside each group."""
    T, W = 6, 16
    pnat = torch.tensor([W - T, W - T + 1, 0, 16, 3], dtype=torch.int32)
    rows = torch.tensor([PAD, 0, 1, 2, PAD, 3, 4], dtype=torch.int32)
    plan = assert_same_as_reference(pnat, rows, W, T)
    assert plan.write_flag[:7].tolist() == [0, 0, 1, 0, 0, 1, 0]
    assert plan.order[:7].tolist() == [2, 5, 0, 4, 1, 3, 6]
    assert plan.slots[:7].tolist() == [1, 3, PAD, PAD, 0, 2, 4]
    assert plan.counts.tolist() == [2, 5]


@pytest.mark.interpreter
def test_varlen_lengths_zero_to_T():
    gen = torch.Generator().manual_seed(3)
    for batch in (1, 5, 16, 33):
        for lens_dtype in (torch.int32, torch.int64):
            pnat, rows, _ = random_step(gen, 40, batch, 6, 16, 0.2)
            lens = torch.randint(0, 7, (batch,), generator=gen).to(lens_dtype)
            assert_same_as_reference(pnat, rows, 16, lens)


@pytest.mark.interpreter
def test_varlen_from_cu_seqlens_like_the_op():
    """The op passes cu_seqlens[1:] - cu_seqlens[:-1]."""
    cu = torch.tensor([0, 6, 6, 9, 15, 17], dtype=torch.int32)
    pnat = torch.tensor([10, 16, 7, 0, 15], dtype=torch.int32)
    rows = torch.tensor([0, 1, 2, PAD, 4], dtype=torch.int32)
    plan = assert_same_as_reference(pnat, rows, 16, cu[1:] - cu[:-1])
    assert plan.write_flag.tolist() == [0, 0, 0, 0, 1] and plan.counts.tolist() == [1, 4]


@pytest.mark.interpreter
@pytest.mark.parametrize("pad_slot_id", [-1, -5, 80])
def test_pad_rows_and_pad_ids(pad_slot_id):
    """No padding, all padding, padding at the ends; a pad id past the slot range is still padding."""
    gen = torch.Generator().manual_seed(4)
    for batch in (1, 2, 17, 64):
        for p_pad in (0.0, 0.5, 1.0):
            pnat, rows, lens = random_step(gen, 80, batch, 4, 16, p_pad, pad_slot_id=pad_slot_id)
            assert_same_as_reference(pnat, rows, 16, lens, pad_slot_id)
        pnat, rows, lens = random_step(gen, 80, batch, 4, 16, 0.0, pad_slot_id=pad_slot_id)
        rows[0] = rows[-1] = pad_slot_id
        assert_same_as_reference(pnat, rows, 16, lens, pad_slot_id)


@pytest.mark.interpreter
def test_int64_and_strided_inputs():
    gen = torch.Generator().manual_seed(5)
    for batch in (1, 9, 40):
        pnat, rows, lens = random_step(gen, 50, batch, 6, 16, 0.25, varlen=True, dtype=torch.int64)
        assert_same_as_reference(pnat.long(), rows, 16, lens)
        # every other element of a wider tensor: the kernel must use the strides
        wide_pnat = torch.stack([pnat, pnat + 100], 1).reshape(-1)[::2]
        wide_rows = torch.stack([rows, rows.new_full((batch,), 3)], 1).reshape(-1)[::2]
        wide_lens = torch.stack([lens, lens + 50], 1).reshape(-1)[::2]
        assert wide_rows.stride(0) == 2 and wide_pnat.stride(0) == 2
        assert_same_as_reference(wide_pnat, wide_rows, 16, wide_lens)
        assert_same_as_reference(wide_pnat, wide_rows, 16, 6)


@pytest.mark.interpreter
def test_one_plan_reused_across_batch_sizes():
    """Shrinking and growing batches on one kernel plan and one reference plan: equal after each
    build, including the stale entries past the current batch."""
    gen = torch.Generator().manual_seed(6)
    kernel_plan, ref_plan = poisoned(300), poisoned(300)
    for batch in (300, 3, 17, 1, 256, 257, 0, 8, 129, 300, 2):
        varlen = batch % 2 == 1
        pnat, rows, lens = random_step(gen, 310, batch, 6, 16, 0.25, varlen)
        assert_same_as_reference(pnat, rows, 16, lens, kernel_plan=kernel_plan, ref_plan=ref_plan)


@pytest.mark.interpreter
def test_empty_batch():
    pnat = torch.tensor([15, 2], dtype=torch.int32)
    plan = assert_same_as_reference(pnat, torch.zeros(0, dtype=torch.int32), 16, 4)
    assert plan.batch == 0 and plan.counts.tolist() == [0, 0]


@pytest.mark.interpreter
def test_unchecked_out_of_range_slot_reads_nothing_outside_pnat():
    """validate=False leaves slot ids to the caller; the kernel still never loads past pnat."""
    pnat = torch.tensor([16, 0], dtype=torch.int32)
    plan = StepPlan(3).build(pnat, torch.tensor([1, 1000, 0], dtype=torch.int32), 16, 1, validate=False)
    assert sorted(plan.order.tolist()) == [0, 1, 2] and plan.write_flag.tolist() == [0, 0, 1]


def test_cpu_without_the_interpreter_uses_the_torch_ops(monkeypatch):
    """Where Triton cannot launch (CPU, no interpreter) build fills the same buffers with torch."""
    monkeypatch.setattr(plan_module, "kernel_runs_on", lambda device: False)
    pnat = torch.tensor([15, 2, 9], dtype=torch.int32)
    plan = StepPlan(4).build(pnat, torch.tensor([1, PAD, 0, 2], dtype=torch.int32), 16, 4)
    assert plan.write_flag.tolist() == [0, 0, 1, 0] and plan.order.tolist() == [2, 1, 0, 3]
    assert plan.counts.tolist() == [1, 3]


COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from specssm.cache.plan_kernel import _num_warps, _plan_kernel
pointers = dict(pnat_ptr="*i32", sbi_ptr="*i64", lens_ptr="*i32", write_flag_ptr="*i32", order_ptr="*i32",
                slots_ptr="*i32", counts_ptr="*i32", rs_ptr="*i32", faults_ptr="*i64")
for block, varlen, check in ((1, False, False), (1, True, True), (4096, False, True), (4096, True, False)):
    constexprs = dict(VARLEN=varlen, CHECK_RING=check, BLOCK=block)
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in _plan_kernel.arg_names}
    k = triton.compile(ASTSource(_plan_kernel, sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=_num_warps(block)))
    assert len(k.asm["cubin"]) > 0
print("compiled")
"""


def test_compiles_for_sm90(tmp_path):
    """The kernel lowers to sm_90 cubins on this machine (no GPU needed). In a fresh process without
    TRITON_INTERPRET (the interpreter's language patches break code generation) and with an empty
    Triton cache, so the source is really compiled."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("varlen", [False, True])
def test_gpu_kernel_matches_reference(varlen):
    gen = torch.Generator().manual_seed(7 + varlen)
    kernel_plan, ref_plan = poisoned(4096, "cuda"), poisoned(4096, "cuda")
    for batch in list(range(1, 301)) + [511, 512, 513, 1024, 2047, 4096, 0, 5]:
        pnat, rows, lens = random_step(gen, batch + 7, batch, 6, 16, 0.2, varlen)
        lens = lens.cuda() if varlen else lens
        assert_same_as_reference(pnat.cuda(), rows.cuda(), 16, lens, kernel_plan=kernel_plan, ref_plan=ref_plan,
                                 device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 64, 1024])
def test_gpu_build_in_a_cuda_graph(batch):
    """Capture one build, then change pnat, slots and lengths in place: each replay is the new plan."""
    gen = torch.Generator().manual_seed(batch)
    pnat, rows, lens = random_step(gen, batch + 9, batch, 6, 16, 0.2, varlen=True)
    pnat, rows, lens = pnat.cuda(), rows.cuda(), lens.cuda()
    plan = StepPlan(batch, "cuda")
    plan.build(pnat, rows, 16, lens, validate=False)          # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        plan.build(pnat, rows, 16, lens, validate=False)
    for _ in range(5):
        p2, r2, l2 = random_step(gen, batch + 9, batch, 6, 16, float(torch.rand((), generator=gen)), varlen=True)
        pnat.copy_(p2)
        rows.copy_(r2)
        lens.copy_(l2)
        graph.replay()
        ref = StepPlan(batch, "cuda").build_reference(pnat, rows, 16, lens)
        for name in ("write_flag", "order", "slots", "counts"):
            assert torch.equal(getattr(plan, name), getattr(ref, name)), name
