"""specssm._checks: every error names its argument (message starts with "name:"), says what it got and
what was expected; the per-head helpers return compact views without copying."""
import pytest
import torch

from specssm import _checks as ck

META = torch.device("meta")


def raises(exc, name, fn, *args, **kw):
    with pytest.raises(exc) as e:
        fn(*args, **kw)
    assert str(e.value).startswith(f"{name}:"), e.value
    return str(e.value)


def test_check_tensor():
    t = torch.zeros(2, 3, dtype=torch.float32)
    assert ck.check_tensor("t", t, shape=(None, 3), dtype=torch.float32, ndim=2, device=torch.device("cpu")) is t
    raises(TypeError, "t", ck.check_tensor, "t", [1, 2])
    msg = raises(ValueError, "t", ck.check_tensor, "t", t, ndim=3)
    assert "(2, 3)" in msg
    msg = raises(ValueError, "t", ck.check_tensor, "t", t, shape=(None, 4))
    assert "(*, 4)" in msg and "(2, 3)" in msg
    raises(ValueError, "t", ck.check_tensor, "t", t, shape=(2, 3, 1))
    msg = raises(TypeError, "t", ck.check_tensor, "t", t, dtype=torch.float64)
    assert "float64" in msg and "float32" in msg
    raises(TypeError, "t", ck.check_tensor, "t", t, dtypes=(torch.int32, torch.int64))
    msg = raises(ValueError, "t", ck.check_tensor, "t", t.to(META), device=torch.device("cpu"))
    assert "meta" in msg


def test_check_inner_contiguous():
    t = torch.zeros(4, 3, 5, 6)
    assert ck.check_inner_contiguous("t", t, 2) is t
    ck.check_inner_contiguous("t", t[::2, 1:], 2)                          # leading dims may be strided
    ck.check_inner_contiguous("t", t[:, :, 1:4], 2)                        # a packed block of rows
    ck.check_inner_contiguous("t", torch.zeros(18).as_strided((3, 1, 6), (6, 99, 1)), 2)  # size-1 dim: any stride
    raises(ValueError, "t", ck.check_inner_contiguous, "t", t.transpose(2, 3), 2)
    raises(ValueError, "t", ck.check_inner_contiguous, "t", t[..., ::2], 2)
    raises(ValueError, "t", ck.check_inner_contiguous, "t", t[..., :4], 2)             # rows not adjacent


@pytest.mark.parametrize("full", [(4, 3), (4, 3, 5)])
def test_tied_per_head(full):
    H = 4
    a = torch.randn(H)
    view = a.reshape(H, *([1] * (len(full) - 1))).expand(*full)
    got = ck.tied_per_head("A", view, H, 3, 5 if len(full) == 3 else None)
    assert torch.equal(got, a) and got.data_ptr() == a.data_ptr()
    assert ck.tied_per_head("A", a, H, 3, 5) is a
    assert ck.tied_per_head("A", None, H, 3, 5) is None
    raises(ValueError, "A", ck.tied_per_head, "A", view.contiguous(), H, 3, 5 if len(full) == 3 else None)
    raises(ValueError, "A", ck.tied_per_head, "A", torch.randn(H + 1), H, 3, 5)
    raises(ValueError, "A", ck.tied_per_head, "A", torch.randn(H, 2), H, 3)
    raises(ValueError, "A", ck.tied_per_head, "A", a.to(META), H, 3, device=torch.device("cpu"))


def test_tied_per_head_size_one_dims_need_no_zero_stride():
    a = torch.randn(4, 1)
    assert torch.equal(ck.tied_per_head("D", a, 4, 1), a[:, 0])


def test_tied_dt():
    dt = torch.randn(2, 3, 4)
    assert ck.tied_dt(dt, (2, 3), 4, 8) is dt
    view = dt[..., None].expand(2, 3, 4, 8)
    got = ck.tied_dt(view, (2, 3), 4, 8)
    assert torch.equal(got, dt) and got.data_ptr() == dt.data_ptr()
    msg = raises(ValueError, "dt", ck.tied_dt, view.contiguous(), (2, 3), 4, 8)
    assert "stride" in msg
    raises(ValueError, "dt", ck.tied_dt, torch.randn(2, 3, 5), (2, 3), 4, 8)
    raises(ValueError, "dt", ck.tied_dt, dt.to(META), (2, 3), 4, 8, device=torch.device("cpu"))
    assert ck.tied_dt(torch.randn(2, 3, 4, 1), (2, 3), 4, 1).shape == (2, 3, 4)     # P = 1: any stride


def test_check_slots_host():
    ck.check_slots_host("s", torch.tensor([3, -1, 0, -1, 2]), 4, -1)       # pad may repeat
    ck.check_slots_host("s", torch.tensor([3, 7, 0]), 4, 7)                  # any pad id
    msg = raises(ValueError, "s", ck.check_slots_host, "s", torch.tensor([3, -1, 4]), 4, -1)
    assert "row 2" in msg and "4" in msg
    raises(ValueError, "s", ck.check_slots_host, "s", torch.tensor([3, -2]), 4, -1)
    raises(ValueError, "s", ck.check_slots_host, "s", torch.tensor([1, 2, 1]), 4, -1)


def ssu_args(batch=3, T=4, H=4, P=8, N=16, G=2, slots=5, L=20, varlen=False, **over):
    """Valid float32 arguments of one checkpointing step; `over` replaces some."""
    lead = (batch * T,) if varlen else (batch, T)
    z = torch.zeros
    d = dict(state=z(slots, H, P, N), x_cache=z(slots, H, L, P), B_cache=z(slots, G, L, N), dt_cache=z(slots, H, L),
             ring_start=z(slots, dtype=torch.int32), pnat=z(slots, dtype=torch.int32),
             x=z(*lead, H, P), dt=z(*lead, H)[..., None].expand(*lead, H, P),
             A=(-torch.ones(H))[:, None, None].expand(H, P, N), B=z(*lead, G, N), C=z(*lead, G, N),
             out=z(*lead, H, P), D=torch.ones(H), z=None, dt_bias=None,
             state_batch_indices=torch.tensor([4, -1, 0][:batch], dtype=torch.int32), pad_slot_id=-1,
             state_scale=None, window=None,
             cu_seqlens=torch.arange(0, batch * T + 1, T, dtype=torch.int32) if varlen else None,
             max_seqlen=T if varlen else None)
    d.update(over)
    return d


def test_check_ssu_args_derives_the_sizes():
    sh, A_h, dt_c, D_h, bias_h = ck.check_ssu_args(**ssu_args())
    assert sh == ck.SSUShapes(batch=3, T=4, H=4, P=8, N=16, G=2, L=20, W=16, num_slots=5, varlen=False)
    assert A_h.shape == (4,) and dt_c.shape == (3, 4, 4) and D_h.shape == (4,) and bias_h is None
    sh, *_ = ck.check_ssu_args(**ssu_args(window=8))
    assert sh.W == 8
    sh, _, dt_c, _, _ = ck.check_ssu_args(**ssu_args(varlen=True))
    assert sh.varlen and sh.T == 4 and sh.batch == 3 and dt_c.shape == (12, 4)


def test_check_ssu_args_slot_check_can_be_skipped():
    bad = torch.tensor([9, 9, 9], dtype=torch.int32)
    raises(ValueError, "state_batch_indices", ck.check_ssu_args, **ssu_args(state_batch_indices=bad))
    ck.check_ssu_args(**ssu_args(state_batch_indices=bad), check_slots=False)


def test_check_ssu_args_state_scale_for_quantized_states():
    for dt in ck.QUANT_STATE_DTYPES:
        kw = ssu_args(state=torch.zeros(5, 4, 8, 16).to(dt))
        raises(ValueError, "state_scale", ck.check_ssu_args, **kw)
        ck.check_ssu_args(**dict(kw, state_scale=torch.ones(5, 4, 8)))


def test_check_ssu_args_ring_bound():
    """max(W, T) + T <= L: a T=6 step on a 20-row ring needs W <= 14."""
    x = torch.zeros(3, 6, 4, 8)
    lead6 = dict(x=x, dt=torch.zeros(3, 6, 4), B=torch.zeros(3, 6, 2, 16), C=torch.zeros(3, 6, 2, 16),
                 out=torch.zeros(3, 6, 4, 8))
    ck.check_ssu_args(**ssu_args(**lead6, window=14))
    raises(ValueError, "x", ck.check_ssu_args, **ssu_args(**lead6, window=15))


def test_agreed_size_blames_the_odd_one_out():
    assert ck.agreed_size("L", {"a": 5, "b": 5, "c": 5}) == 5
    msg = raises(ValueError, "a", ck.agreed_size, "ring length", {"a": 11, "b": 20, "c": 20})
    assert msg == "a: expected ring length 20 (that of b and c), got 11 (ring length: a 11, b 20, c 20)"
    raises(ValueError, "c", ck.agreed_size, "L", {"a": 20, "b": 20, "c": 11})
    raises(ValueError, "b", ck.agreed_size, "L", {"a": 1, "b": 2, "c": 3})             # no majority: a sets it
    raises(ValueError, "c", ck.agreed_size, "L", {"a": 1, "b": 1, "c": 2, "d": 2})     # a tie: a sets it


def test_check_ring_values_host():
    """pnat in [0, max(W, T)], ring_start in [0, L) for the slots of live rows; free slots and
    padding rows may hold anything. The message names the argument, value, slot, row and range."""
    W, T, L = 16, 4, 20
    rs = torch.tensor([0, 99, 19, 5, -3], dtype=torch.int32)          # slots 1 and 4 are not in the step
    pn = torch.tensor([16, -1, 0, 3, 40], dtype=torch.int32)
    sbi = torch.tensor([2, -1, 0, 3], dtype=torch.int32)
    ck.check_ring_values_host(rs, pn, sbi, 4, -1, W, T, L)
    cases = [("prev_num_accepted_tokens", pn, 17, "[0, 16]"), ("prev_num_accepted_tokens", pn, -1, "[0, 16]"),
             ("ring_start", rs, 20, "[0, 20)"), ("ring_start", rs, -1, "[0, 20)")]
    for name, t, v, rng in cases:
        bad = t.clone()
        bad[3] = v                                                       # slot 3 is row 3
        args = (bad, pn, sbi) if name == "ring_start" else (rs, bad, sbi)
        msg = raises(ValueError, name, ck.check_ring_values_host, *args, 4, -1, W, T, L)
        assert f"got {v} for slot 3 (row 3)" in msg and rng in msg, msg
    # W < T: a flush leaves pnat = accepted <= T, so T is in range
    rs12 = rs % 12
    ck.check_ring_values_host(rs12, torch.full((5,), 6, dtype=torch.int32), sbi, 4, -1, 4, 6, 12)
    raises(ValueError, "prev_num_accepted_tokens", ck.check_ring_values_host, rs12,
           torch.full((5,), 7, dtype=torch.int32), sbi, 4, -1, 4, 6, 12)
    # no state_batch_indices: row b is slot b (slot 4, holding -3 / 40, is not in a batch of 4)
    ck.check_ring_values_host(rs.clamp(0, 19), pn.clamp(0, 16), None, 4, -1, W, T, L)
    msg = raises(ValueError, "ring_start", ck.check_ring_values_host, rs, pn.clamp(0, 16), None, 4, -1, W, T, L)
    assert "got 99 for slot 1 (row 1)" in msg


def test_check_ssu_args_ring_values():
    """check_ssu_args runs the ring-value check with the slot check, and skips both with check_slots=False."""
    pn = torch.zeros(5, dtype=torch.int32)
    pn[4] = 17                                                          # row 0's slot
    msg = raises(ValueError, "prev_num_accepted_tokens", ck.check_ssu_args, **ssu_args(pnat=pn))
    assert "got 17 for slot 4 (row 0)" in msg
    ck.check_ssu_args(**ssu_args(pnat=pn), check_slots=False)
    rs = torch.zeros(5, dtype=torch.int32)
    rs[0] = 20                                                          # row 2's slot; L = 20
    msg = raises(ValueError, "ring_start", ck.check_ssu_args, **ssu_args(ring_start=rs))
    assert "got 20 for slot 0 (row 2)" in msg
    rs[0], rs[1] = 0, 20                                                # slot 1: not in the step
    ck.check_ssu_args(**ssu_args(ring_start=rs))
