"""The reference LSTM: SPEC.md section 2 written step by step in PyTorch, with explicit masks.

This is the oracle the Triton and C++ backends are held to, and the CPU fallback. It is differentiable
by autograd; half-precision inputs are computed in float32 and the results cast back.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..philox import keep_scale
from ..regularizers import Regularizers
from ..stack import LayerWeights, run_stack

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def apply_keep(x: Tensor, keep: Tensor | None, p: float) -> Tensor:
    """Inverted dropout with an explicit keep-mask (broadcast against x); exact zeros where dropped."""
    if keep is None:
        return x
    return torch.where(keep, x * keep_scale(p), 0.0)


def apply_zoneout(previous: Tensor, new: Tensor, zone: Tensor | None, p: float, training: bool) -> Tensor:
    """Zoneout: keep `previous` where the mask says so (training), or mix by the expectation p (eval).
    A weight of 0 selects, as a dropped element does: p = 1 keeps `previous` whatever `new` holds (inf, NaN)."""
    if p == 0:
        return new
    if training:
        return torch.where(zone, previous, new)
    if p == 1:
        # selected rather than returned, so that the result stays in the graph (a backward in eval mode
        # through states that are all frozen gives zero gradients, as the fused backends do)
        return torch.where(torch.ones((), dtype=torch.bool, device=previous.device), previous, new)
    return p * previous + (1.0 - p) * new


def lstm_layer_naive(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: LayerWeights,
    *,
    reverse: bool,
    reg: Regularizers,
    masks: dict | None,
    training: bool,
    lengths: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One layer, one direction.

    x: [T, B, I] (input-side dropout already applied); h0: [B, H_out]; c0: [B, H];
    masks: this layer-direction's masks (hidden, weight, update, cell, zoneout_h, zoneout_c), needed
    in training; lengths: [B] valid steps per row (None: all T), rows past their length keep their state
    and output zeros. Returns out [T, B, H_out], h_n [B, H_out], c_n [B, H].
    """
    if not training:
        masks = dict.fromkeys(("hidden", "weight", "update", "cell", "zoneout_h", "zoneout_c"))
    seq_len = x.shape[0]
    w_hh = apply_keep(weights.w_hh, masks["weight"], reg.weight_dropout)
    # [T, B, 4H]: the input projection of every step at once
    x_proj = x @ weights.w_ih.T
    if weights.b_ih is not None:
        x_proj = x_proj + weights.b_ih + weights.b_hh
    update = masks["update"]
    h, c = h0, c0
    outputs = [None] * seq_len
    for t in reversed(range(seq_len)) if reverse else range(seq_len):
        r = apply_keep(h, masks["hidden"], reg.recurrent_dropout)
        gates = x_proj[t] + r @ w_hh.T
        i, f, g, o = gates.chunk(4, dim=-1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        g = apply_keep(g, None if update is None else update[t if update.shape[0] > 1 else 0], reg.update_dropout)
        c_new = apply_keep(f * c + i * g, masks["cell"], reg.cell_dropout)
        h_new = o * torch.tanh(c_new)
        if weights.w_hr is not None:
            h_new = h_new @ weights.w_hr.T
        c_new = apply_zoneout(c, c_new, None if masks["zoneout_c"] is None else masks["zoneout_c"][t], reg.zoneout_c, training)
        h_new = apply_zoneout(h, h_new, None if masks["zoneout_h"] is None else masks["zoneout_h"][t], reg.zoneout_h, training)
        if lengths is None:
            h, c = h_new, c_new
            outputs[t] = h
        else:
            active = (t < lengths).unsqueeze(-1)  # [B, 1]
            h, c = torch.where(active, h_new, h), torch.where(active, c_new, c)
            outputs[t] = torch.where(active, h_new, 0.0)
    return torch.stack(outputs), h, c


def lstm_naive(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: list[LayerWeights],
    *,
    num_directions: int,
    reg: Regularizers,
    masks: dict | None,
    training: bool,
    lengths: Tensor | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The whole stack with explicit masks (as `sample_masks` returns them; None in eval).

    x: [T, B, I] time-major; h0: [L*D, B, H_out]; c0: [L*D, B, H]; lengths: [B] or None.
    Returns output [T, B, D*H_out], h_n [L*D, B, H_out], c_n [L*D, B, H] in x's dtype.
    compute_dtype: what the math runs in; by default float32 for half inputs, else x's dtype (a test
    passes a half dtype to get PyTorch's own low-precision result, the yardstick for the kernels').
    """
    if training and masks is None:
        raise ValueError("lstm_naive: a training forward needs its masks (sample_masks)")
    dtype = x.dtype
    if compute_dtype is None:
        compute_dtype = torch.float32 if dtype in _LOW_PRECISION else dtype
    if compute_dtype != dtype:
        x, h0, c0 = x.to(compute_dtype), h0.to(compute_dtype), c0.to(compute_dtype)
        weights = [LayerWeights(*(None if w is None else w.to(compute_dtype) for w in lw)) for lw in weights]

    layer_mask_names = ("hidden", "weight", "update", "cell", "zoneout_h", "zoneout_c")

    def input_dropout(layer: int, x: Tensor) -> Tensor:
        return apply_keep(x, masks["input"][layer] if training else None, reg.layer_input_dropout(layer))

    def layer(k: int, x: Tensor, h0: Tensor, c0: Tensor, w: LayerWeights, reverse: bool):
        layer_masks = {name: masks[name][k] for name in layer_mask_names} if training else None
        return lstm_layer_naive(x, h0, c0, w, reverse=reverse, reg=reg, masks=layer_masks, training=training, lengths=lengths)

    def output_dropout(x: Tensor) -> Tensor:
        return apply_keep(x, masks["output"] if training else None, reg.output_dropout)

    out, h_n, c_n = run_stack(x, h0, c0, weights, num_directions, input_dropout, layer, output_dropout)
    return out.to(dtype), h_n.to(dtype), c_n.to(dtype)
