"""Byte counts of a step, checked against sums written out by hand for a tiny configuration."""
from __future__ import annotations

import pytest

from specssm.bench import floor as fl

# H=2 heads, P=4, N=8, G=1, T=2 tokens, W=4; bf16 activations (2 B).
SIZES = dict(H=2, P=4, N=8, G=1, T=2)


def test_checkpointing_fp32_two_rows_one_flush():
    # rows with K = 1 (1 + 2 <= 4: no write) and K = 3 (3 + 2 > 4: write)
    b = fl.ssu_step_bytes("checkpointing", **SIZES, pnat=[1, 3], state_dtype="fp32", window=4)
    state = 2 * 4 * 8 * 4                      # 256 B per state
    assert b.state_read == 2 * state           # 512
    assert b.state_write == 1 * state          # 256: only the K = 3 row
    assert b.scale_read == b.scale_write == 0
    per_hist_token = (2 * 4 + 1 * 8) * 2 + 4 * 2   # x row 16 B + B row 16 B + dt 8 B = 40 B
    assert b.history == (1 + 3) * per_hist_token   # 160
    # x (2*2*4*2 = 32) + B (2*1*8*2 = 32) + C (32) + dt (2*2*2 = 8) = 104 per row
    assert b.inputs == 2 * 104
    assert b.outputs == 2 * 32
    assert b.ring_appends == 2 * 2 * per_hist_token   # T = 2 tokens appended per row: 160
    assert b.total == 512 + 256 + 160 + 208 + 64 + 160 == 1360
    assert (b.rows, b.writes) == (2, 1)


def test_quantized_state_adds_scales():
    b = fl.ssu_step_bytes("checkpointing", **SIZES, pnat=[1, 3], state_dtype="int8", window=4)
    assert b.state_read == 2 * 64 and b.state_write == 64          # 1 B per element
    assert b.scale_read == 2 * 32 and b.scale_write == 32          # H*P fp32 scales per row
    assert b.total == 128 + 64 + 64 + 32 + 160 + 208 + 64 + 160


def test_z_gate_is_an_extra_input():
    a = fl.ssu_step_bytes("checkpointing", **SIZES, pnat=[1], state_dtype="bf16", window=4)
    b = fl.ssu_step_bytes("checkpointing", **SIZES, pnat=[1], state_dtype="bf16", window=4, has_z=True)
    assert b.total - a.total == 2 * 2 * 4 * 2      # T*H*P bf16


def test_always_write_writes_every_row():
    b = fl.ssu_step_bytes("always_write", **SIZES, pnat=[1, 2], state_dtype="fp32", window=16)
    assert b.writes == 2 and b.state_write == 512
    assert b.history == 3 * 40
    assert b.total == 512 + 512 + 120 + 208 + 64 + 160


def test_all_states_writes_T_states_and_has_no_ring():
    b = fl.ssu_step_bytes("all_states", **SIZES, pnat=[0, 0], state_dtype="fp32")
    assert b.state_read == 512 and b.state_write == 2 * 2 * 256
    assert b.history == b.ring_appends == 0
    assert b.total == 512 + 1024 + 208 + 64
    with pytest.raises(ValueError, match="state_dtype"):
        fl.ssu_step_bytes("all_states", **SIZES, pnat=[0], state_dtype="fp8")


def test_conv_bytes():
    # conv_dim = H*P + 2*G*N = 24, d_conv = 4: per row context 3 + inputs 2 + outputs 2 + store 5 rows
    per_row = (3 + 2 + 2 + 5) * 24 * 2
    per_step = 4 * 24 * 2 + 24 * 2                 # weights + bias
    assert fl.conv_step_bytes(**SIZES, rows=2, d_conv=4) == 2 * per_row + per_step == 1392


def test_floor_time_and_errors():
    assert fl.floor_us(3e6, 3e12) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        fl.floor_us(1, 0)
    with pytest.raises(ValueError, match="strategy"):
        fl.ssu_step_bytes("sometimes", **SIZES, pnat=[1], state_dtype="fp32")
    with pytest.raises(ValueError, match="dtype"):
        fl.ssu_step_bytes("checkpointing", **SIZES, pnat=[1], state_dtype="fp4")


def test_slot_memory_and_touched_bytes():
    # Super TP8 fp32: 512 KiB state; ring L = 22 rows of x (16*64), B (128) bf16 and dt fp32
    H, P, N, G, L = 16, 64, 128, 1, 22
    assert fl.touched_bytes_per_row("checkpointing", H=H, P=P, N=N, T=6, state_dtype="fp32") == 512 * 1024
    assert fl.touched_bytes_per_row("checkpointing", H=H, P=P, N=N, T=6, state_dtype="int8") == 128 * 1024 + 4096
    assert fl.touched_bytes_per_row("all_states", H=H, P=P, N=N, T=6, state_dtype="bf16") == 7 * 256 * 1024
    assert fl.state_bytes_per_slot("checkpointing", H=H, P=P, N=N, G=G, T=6, L=L, state_dtype="fp32") == \
        512 * 1024 + (16 * 22 * 64 + 22 * 128) * 2 + 4 * 16 * 22
