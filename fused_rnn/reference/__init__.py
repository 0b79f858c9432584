"""The reference backend: masks drawn by fused_rnn.masks (and drawn again by the backward), recurrence by lstm_naive."""

from __future__ import annotations

import functools

from torch import Tensor

from ..masks import sample_masks
from ..regularizers import Regularizers
from ..stack import LayerWeights
from .naive import apply_keep, apply_zoneout, lstm_layer_naive, lstm_naive
from .regenerated import masks_regenerated_in_backward

__all__ = ["apply_keep", "apply_zoneout", "lstm_layer_naive", "lstm_naive", "run"]


def run(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: list[LayerWeights],
    *,
    num_directions: int,
    reg: Regularizers,
    training: bool,
    seed: Tensor,
    lengths: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """x: [T, B, I] time-major, rows in the caller's batch order; see fused_rnn.functional.lstm."""
    first = weights[0]
    draw = functools.partial(
        sample_masks,
        reg,
        num_layers=len(weights) // num_directions,
        num_directions=num_directions,
        input_size=first.w_ih.shape[1],
        hidden_size=first.w_hh.shape[0] // 4,
        proj_size=0 if first.w_hr is None else first.w_hr.shape[0],
        seq_len=x.shape[0],
        batch_size=x.shape[1],
        seed=seed,
        device=x.device,
    )
    masks = draw() if training else None
    with masks_regenerated_in_backward(masks, draw, x.device):
        return lstm_naive(
            x, h0, c0, weights, num_directions=num_directions, reg=reg, masks=masks, training=training, lengths=lengths
        )
