"""The Triton backend: every layer and direction of fused_rnn.lstm in fused kernels, masks made in-kernel."""

from __future__ import annotations

import functools

from torch import Tensor

from ..regularizers import Regularizers
from ..stack import LayerWeights, feature_dropouts, run_fused_stack
from . import ops


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
    probabilities, modes = reg.recurrence_arguments()
    # the ops' tensors all derive from these, in this call's modes: one dispatch_free for all of its ops
    free = ops.dispatch_free((x, h0, c0, *(w for layer in weights for w in layer), lengths, seed))
    num_layers = len(weights) // num_directions
    # one direction: each layer's op applies its input's dropout and the last one the output's, which spares
    # the graph a node per dropout (two directions share their input's mask, and the output's spans both)
    folded = num_directions == 1

    def layer(k: int, x: Tensor, h0: Tensor, c0: Tensor, w: LayerWeights, reverse: bool):
        bias = None if w.b_ih is None else w.b_ih + w.b_hh
        features = list(feature_dropouts(reg, training, k, num_layers)) if folded else [0.0, 0.0]
        out, h_n, c_n, *_ = ops.layer(
            x.contiguous(), h0.contiguous(), c0.contiguous(), w.w_ih, w.w_hh, bias, w.w_hr, lengths, seed, k, reverse,
            training, probabilities, modes, features, reg.locked, free,
        )
        return out, h_n, c_n

    return run_fused_stack(
        x, h0, c0, weights, num_directions=num_directions, reg=reg, training=training, seed=seed,
        feature_dropout=None if folded else functools.partial(ops.dropout, free=free), layer=layer,
    )
