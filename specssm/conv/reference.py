"""Float64 PyTorch references of the Mamba2 depthwise causal conv1d decode update.

These are the specification the Triton kernel in ``conv1d.py`` is tested against. Everything is
computed in float64 on whatever device the inputs live on; nothing here is fast.

Terms used below (one layer, one channel ``c``, ``D = d_conv``):

    out_t[c] = act( bias[c] + sum_{k < D} weight[c, k] * u_{t + k - (D - 1)}[c] )

where ``u_j`` is the conv input (``xBC``) of token ``j`` of the current step for ``j >= 0`` and, for
``j < 0``, the ``-j``-th most recent input before the step (the "context", ``D - 1`` rows, oldest
first). ``act`` is SiLU (``v * sigmoid(v)``) or the identity.

Three references:

* :func:`conv1d_window_ref` - the pure function above: context + ``T`` new tokens -> outputs.
* :func:`conv1d_sequential_ref` - classic one-token-at-a-time update (the ``causal_conv1d_update``
  semantics): shift the ``D - 1`` input window by one, append the token, dot with the weights.
  Used to prove the speculative update + commit equals feeding only the accepted tokens.
* :func:`conv1d_update_ref` - the whole cache contract of ``conv1d_update`` (slot indirection, pad
  rows, offset-addressed context, stored rows), returning the output and the new conv state.
"""

from __future__ import annotations

import torch

_ACTIVATIONS = (None, "silu", "swish")


def _check_activation(activation):
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation: got {activation!r}, expected one of {_ACTIVATIONS}")
    return activation is not None


def _act(v: torch.Tensor, silu: bool) -> torch.Tensor:
    return v * torch.sigmoid(v) if silu else v


def _weight_2d(weight: torch.Tensor) -> torch.Tensor:
    # nn.Conv1d(groups=conv_dim) stores (conv_dim, 1, d_conv); the math only needs (conv_dim, d_conv).
    return weight[:, 0, :] if weight.dim() == 3 else weight


def conv1d_window_ref(xBC: torch.Tensor, context: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None = None, activation: str | None = "silu") -> torch.Tensor:
    """Outputs of ``T`` new tokens given the ``d_conv - 1`` inputs that precede them.

    xBC:     (batch, T, conv_dim) new conv inputs, any float dtype.
    context: (batch, d_conv - 1, conv_dim) the previous inputs, oldest first.
    weight:  (conv_dim, d_conv) (or (conv_dim, 1, d_conv)); bias: (conv_dim,) or None.
    Returns (batch, T, conv_dim) float64.
    """
    silu = _check_activation(activation)
    w = _weight_2d(weight).double()
    d_conv = w.shape[1]
    T = xBC.shape[1]
    window = torch.cat([context.double(), xBC.double()], dim=1)  # (batch, d_conv - 1 + T, conv_dim)
    acc = torch.zeros(xBC.shape, dtype=torch.float64, device=xBC.device)
    for k in range(d_conv):
        acc += w[:, k] * window[:, k:k + T]
    if bias is not None:
        acc += bias.double()
    return _act(acc, silu)


def conv1d_sequential_ref(xBC: torch.Tensor, window: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None = None, activation: str | None = "silu"):
    """Classic decode: feed the tokens one at a time through a shifting input window.

    xBC:    (batch, T, conv_dim) tokens, fed in order t = 0, 1, ... T-1.
    window: (batch, d_conv - 1, conv_dim) the last ``d_conv - 1`` inputs, oldest first (not modified).
    Returns (out (batch, T, conv_dim) float64, new window (batch, d_conv - 1, conv_dim) in
    ``window.dtype``). The window only ever holds copies of inputs, so it is exact in any dtype.
    """
    silu = _check_activation(activation)
    w = _weight_2d(weight).double()
    d_conv = w.shape[1]
    win = window.clone()
    outs = []
    for t in range(xBC.shape[1]):
        full = torch.cat([win, xBC[:, t:t + 1].to(win.dtype)], dim=1)  # (batch, d_conv, conv_dim)
        v = (full.double() * w.t()).sum(dim=1)
        if bias is not None:
            v = v + bias.double()
        outs.append(_act(v, silu))
        win = full[:, 1:]
    assert win.shape[1] == d_conv - 1
    out = torch.stack(outs, dim=1) if outs else xBC.new_zeros(xBC.shape, dtype=torch.float64)
    return out, win.contiguous()


def conv_context_ref(conv_state: torch.Tensor, conv_offset: torch.Tensor, slots: torch.Tensor,
                     d_conv: int) -> torch.Tensor:
    """The ``d_conv - 1`` context rows a step reads for each slot: rows ``[off, off + d_conv - 1)``.

    conv_state: (num_slots, d_conv - 1 + T_max, conv_dim); conv_offset: (num_slots,) int;
    slots: (batch,) valid slot ids. Returns (batch, d_conv - 1, conv_dim) in ``conv_state.dtype``.
    """
    slots = slots.long()
    rows = conv_offset.long()[slots][:, None] + torch.arange(d_conv - 1, device=conv_state.device)
    return conv_state[slots[:, None], rows]


def conv1d_update_ref(xBC: torch.Tensor, conv_state: torch.Tensor, conv_offset: torch.Tensor,
                      weight: torch.Tensor, bias: torch.Tensor | None = None,
                      activation: str | None = "silu", state_batch_indices: torch.Tensor | None = None,
                      pad_slot_id: int = -1):
    """The cache contract of ``conv1d_update``, in plain PyTorch, without touching its inputs.

    Returns ``(out, new_conv_state, live)``: ``out`` (batch, T, conv_dim) float64 whose pad rows are
    NaN (the kernel leaves them untouched, so tests compare only ``live`` rows); ``new_conv_state`` a
    copy of ``conv_state`` where every live row's slot holds ``[context, xBC]`` in rows
    ``[0, d_conv - 1 + T)``; ``live`` (batch,) bool.
    """
    w = _weight_2d(weight)
    d_conv = w.shape[1]
    batch, T, _ = xBC.shape
    if state_batch_indices is None:
        state_batch_indices = torch.arange(batch, device=xBC.device)
    idx = state_batch_indices.to(xBC.device).long()
    live = idx != pad_slot_id
    out = torch.full(xBC.shape, float("nan"), dtype=torch.float64, device=xBC.device)
    new_state = conv_state.clone()
    if bool(live.any()):
        slots = idx[live]
        context = conv_context_ref(conv_state, conv_offset.to(xBC.device), slots, d_conv)
        out[live] = conv1d_window_ref(xBC[live], context, w, bias, activation)
        new_state[slots, : d_conv - 1 + T] = torch.cat([context, xBC[live].to(conv_state.dtype)], dim=1)
    return out, new_state, live
