"""The fused C++ CPU backend: csrc/ built as torch operators (see loader.py), run layer by layer.

Two operators do the work: fused_rnn_cpp::feature_dropout (the input, between-layer and output masks) and
fused_rnn_cpp::lstm_layer (one layer-direction, forward and backward through time). Masks are regenerated from
the seed wherever they are used, in the forward and in the backward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..regularizers import Regularizers
from ..stack import LayerWeights, run_fused_stack


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
    """As fused_rnn.reference.run: x [T, B, I] time-major, rows in the caller's order; lengths [B] or None."""
    ops = torch.ops.fused_rnn_cpp
    # the op's int[5] layer (after its index k) and float[6] regularizers
    probabilities, modes = reg.recurrence_arguments()

    def layer(k: int, x: Tensor, h0: Tensor, c0: Tensor, w: LayerWeights, reverse: bool):
        config = [k, int(reverse), int(training), *modes]
        out, h_n, c_n, *_ = ops.lstm_layer(x, h0, c0, w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.w_hr, seed, lengths, config, probabilities)
        return out, h_n, c_n

    return run_fused_stack(
        x, h0, c0, weights, num_directions=num_directions, reg=reg, training=training, seed=seed,
        feature_dropout=ops.feature_dropout, layer=layer,
    )
