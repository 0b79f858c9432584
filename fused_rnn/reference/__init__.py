"""The reference backend: masks drawn by fused_rnn.masks (and drawn again by the backward), recurrence by lstm_naive."""

from __future__ import annotations

import functools
import warnings

import torch
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
    if torch.jit.is_tracing():
        x = _traced_length_fixed(x)
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


def _traced_length_fixed(x: Tensor) -> Tensor:
    """x, in a torch.jit.trace that then refuses another sequence length: this backend's loop over the steps is
    unrolled at the example's, and a traced call of another length would silently return that many steps.
    (The C++ and Triton backends trace as one op, any length.)"""
    steps = len(range(x.shape[0]))  # a plain int, which the trace records as a constant, not as x's size
    warnings.warn(
        f"fused_rnn: the reference backend's loop over time steps is traced for sequences of {steps} steps; "
        "the trace refuses other lengths (the C++ and Triton backends trace for any length)",
        torch.jit.TracerWarning, stacklevel=2,
    )
    return x.expand(steps, *x.shape[1:])
