"""Sizes of the tiny Mamba2 LM and the per-rank sizes under tensor parallelism."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Mamba2Config:
    """Sizes of a Mamba2 LM (whole model, before tensor-parallel sharding).

    d_inner = nheads * head_dim; the in_proj output is [z (d_inner), xBC (conv_dim), dt (nheads)] with
    xBC = [x (d_inner), B (ngroups * d_state), C (ngroups * d_state)]. The gated RMSNorm normalizes
    groups of d_inner / ngroups channels (as Mamba2 does), so a tensor-parallel rank holding whole
    groups needs no communication for it.
    """
    d_model: int = 64
    n_layers: int = 2
    nheads: int = 4
    head_dim: int = 16
    d_state: int = 16
    ngroups: int = 2
    d_conv: int = 4
    vocab_size: int = 256
    norm_eps: float = 1e-5

    def __post_init__(self):
        for name in ("d_model", "n_layers", "nheads", "head_dim", "d_state", "ngroups", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected a positive int, got {v!r}")
        if self.nheads % self.ngroups:
            raise ValueError(f"ngroups: expected a divisor of nheads={self.nheads}, got {self.ngroups}")
        if not 2 <= self.d_conv <= 4:
            raise ValueError(f"d_conv: expected an int in [2, 4], got {self.d_conv!r}")

    @property
    def d_inner(self) -> int:
        return self.nheads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    def check_tp(self, tp_size: int) -> None:
        if not isinstance(tp_size, int) or tp_size < 1:
            raise ValueError(f"tp_size: expected a positive int, got {tp_size!r}")
        if self.nheads % tp_size or self.ngroups % tp_size:
            raise ValueError(f"tp_size: expected a divisor of nheads={self.nheads} and ngroups={self.ngroups} "
                             f"(each rank holds whole heads and whole groups), got {tp_size}")

    def local(self, tp_size: int) -> Mamba2Config:
        """The sizes one of `tp_size` ranks holds: nheads / tp heads, ngroups / tp groups."""
        self.check_tp(tp_size)
        return replace(self, nheads=self.nheads // tp_size, ngroups=self.ngroups // tp_size)


# "small" runs through the Triton CPU interpreter in seconds; "large" is for a GPU.
SIZES = {
    "tiny": Mamba2Config(d_model=32, n_layers=2, nheads=2, head_dim=8, d_state=8, ngroups=2),
    "small": Mamba2Config(d_model=64, n_layers=2, nheads=4, head_dim=16, d_state=16, ngroups=2),
    "large": Mamba2Config(d_model=1024, n_layers=4, nheads=32, head_dim=64, d_state=128, ngroups=8),
}
