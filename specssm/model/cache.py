"""The model-level decode cache: the SSM cache of all layers plus the conv states and offsets."""
from __future__ import annotations

import torch

from specssm.cache import SSMCache
from specssm.conv import conv_commit, new_conv_offset, new_conv_state
from specssm.model.config import Mamba2Config


class ModelCache:
    """Everything a Mamba2 LM keeps per request slot while decoding, for one tensor-parallel rank.

    ssm: `SSMCache` (state, x/B/dt rings, ring_start, pnat per slot); conv_states: per layer
    `(slots, d_conv - 1 + T, conv_dim)` in the activation dtype; conv_offset `(slots,)` int32, shared
    by the layers (every layer of a row accepts the same tokens).

    Args:
        cfg: the rank's sizes (`Mamba2Config.local(tp)`).
        num_slots: request slots; max_tokens: T, the most tokens per verify step.
        window: W of the checkpointing strategy; strategy: "checkpointing" or "always_write".
    """

    def __init__(self, cfg: Mamba2Config, num_slots: int, max_tokens: int, window: int = 16,
                 state_dtype=torch.float32, act_dtype=torch.float32, device="cpu",
                 strategy: str = "checkpointing", pad_slot_id: int = -1):
        if strategy not in ("checkpointing", "always_write"):
            raise ValueError(f"strategy: expected 'checkpointing' or 'always_write' (ring strategies), "
                             f"got {strategy!r}")
        self.cfg, self.max_tokens, self.pad_slot_id = cfg, max_tokens, pad_slot_id
        self.device = torch.device(device)
        self.ssm = SSMCache(cfg.n_layers, num_slots, cfg.nheads, cfg.head_dim, cfg.d_state, cfg.ngroups,
                            max_tokens, window, state_dtype=state_dtype, act_dtype=act_dtype, device=device,
                            strategy=strategy, pad_slot_id=pad_slot_id)
        self.conv_states = [new_conv_state(num_slots, cfg.conv_dim, cfg.d_conv, max_tokens, act_dtype, device)
                            for _ in range(cfg.n_layers)]
        self.conv_offset = new_conv_offset(num_slots, device)

    @property
    def window(self) -> int:
        return self.ssm.W

    def tensors(self) -> list:
        """Every tensor of the cache (SSM cache, conv states, conv offsets), e.g. to mark them static
        inputs of a CUDA-graphed compiled step."""
        return [*self.ssm.tensors(), *self.conv_states, self.conv_offset]

    def allocate(self, n: int = 1) -> torch.Tensor:
        """Take n free slots, reset (SSM state, pnat, ring_start, conv context, conv offset)."""
        slots = self.ssm.allocate(n)
        idx = slots.long()
        self.conv_offset[idx] = 0
        for cs in self.conv_states:
            cs[idx] = 0
        return slots

    def free(self, slots) -> None:
        self.ssm.free(slots)

    def will_write(self, slots: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """(batch,) bool: rows whose step of num_tokens tokens flushes (writes) its checkpoint,
        pnat + T > W (padding rows: False)."""
        live = slots != self.pad_slot_id
        pnat = self.ssm.pnat[torch.where(live, slots.long(), 0)]
        return live & (pnat + num_tokens > self.ssm.W)

    def commit(self, slots: torch.Tensor, accepted: torch.Tensor, num_tokens: int,
               validate: bool = True) -> None:
        """After verification of a step of num_tokens tokens per row: keep `accepted` (batch,) tokens
        of each row (1 <= accepted <= num_tokens; ignored on padding rows)."""
        n = torch.full(slots.shape, num_tokens, dtype=torch.int32, device=slots.device)
        self.ssm.commit(slots, accepted, n, validate=validate)
        conv_commit(self.conv_offset, slots, accepted, pad_slot_id=self.pad_slot_id, num_tokens=num_tokens,
                    validate=validate)
