"""The model-level decode cache: the SSM cache of all layers plus the conv states and offsets."""
from __future__ import annotations

import torch

from specssm._checks import check_tensor
from specssm.cache import SSMCache, transfer
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

    # ---- moving slots: the SSM cache's operations plus the conv context --------------------------------
    def fork(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """`SSMCache.fork` plus each layer's conv state and the conv offset: a destination continues
        exactly where its source is (parallel sampling). Checked before anything is written."""
        self.ssm.fork(src_slots, dst_slots)
        self.copy_conv(src_slots, dst_slots)

    def copy_conv(self, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Each layer's conv state and the conv offset of the checked pairs' sources to their destinations
        (the conv side of `fork` and of `TinyMamba2LM.materialize`)."""
        src, dst = transfer.live_pairs(src_slots, dst_slots, self.pad_slot_id, self.device)
        for cs in self.conv_states:
            cs[dst] = cs[src]
        self.conv_offset[dst] = self.conv_offset[src]

    def _context_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """(n, d_conv - 1) conv-state rows holding the committed context of slots idx (int64, device)."""
        return self.conv_offset[idx].long()[:, None] + torch.arange(self.cfg.d_conv - 1, device=self.device)

    def export_states(self, slots: torch.Tensor) -> dict:
        """`SSMCache.export_states` (materialized slots only) plus "conv": (layers, n, d_conv - 1, conv_dim),
        the committed conv context of each slot (what a prefix cache must restore with the SSM state)."""
        out = self.ssm.export_states(slots)
        idx = slots.detach().cpu().long().to(self.device)
        rows = self._context_rows(idx)
        out["conv"] = torch.stack([cs[idx[:, None], rows] for cs in self.conv_states])
        return out

    def import_states(self, slots: torch.Tensor, tensors: dict) -> None:
        """Write states from `export_states` to `slots` as fresh slots: SSM checkpoints (pnat 0, new seeds)
        and conv contexts (offset 0). Everything is checked before anything is written."""
        if not isinstance(tensors, dict) or "conv" not in tensors:
            got = sorted(tensors) if isinstance(tensors, dict) else type(tensors).__name__
            raise ValueError(f"tensors: expected a ModelCache export with a 'conv' entry, got {got}")
        ssm_part = {k: v for k, v in tensors.items() if k != "conv"}
        s = transfer.check_import(self.ssm, slots, ssm_part)
        ctx, cd = self.cfg.d_conv - 1, self.conv_states[0].shape[2]
        check_tensor("tensors['conv']", tensors["conv"], shape=(self.cfg.n_layers, s.numel(), ctx, cd),
                     dtype=self.conv_states[0].dtype, why="layers, slots, d_conv - 1, conv_dim")
        transfer.write_imported(self.ssm, s, ssm_part)
        idx = s.to(self.device)
        for cs, conv in zip(self.conv_states, tensors["conv"]):
            cs[idx, :ctx] = conv.to(self.device)
        self.conv_offset[idx] = 0

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
