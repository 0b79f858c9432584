"""The Triton backend: every layer and direction of fused_rnn.lstm in fused kernels, masks made in-kernel."""

from __future__ import annotations

from torch import Tensor

from .. import philox
from ..regularizers import Regularizers
from ..stack import LayerWeights, run_stack
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
    probabilities, modes = ops.layer_arguments(reg)

    def input_dropout(layer: int, x: Tensor) -> Tensor:
        p = reg.layer_input_dropout(layer)
        if not training or p == 0:
            return x
        return ops.feature_dropout(x, seed, philox.KIND_INPUT, layer, p, reg.locked)

    def layer(k: int, x: Tensor, h0: Tensor, c0: Tensor, w: LayerWeights, reverse: bool):
        bias = None if w.b_ih is None else w.b_ih + w.b_hh
        out, h_n, c_n, *_ = ops.lstm_layer(
            x.contiguous(), h0.contiguous(), c0.contiguous(), w.w_ih, w.w_hh, bias, w.w_hr, lengths, seed, k, reverse,
            training, probabilities, modes,
        )
        return out, h_n, c_n

    def output_dropout(x: Tensor) -> Tensor:
        if not training or reg.output_dropout == 0:
            return x
        return ops.feature_dropout(x, seed, philox.KIND_OUTPUT, 0, reg.output_dropout, reg.locked)

    return run_stack(x, h0, c0, weights, num_directions, input_dropout, layer, output_dropout)
