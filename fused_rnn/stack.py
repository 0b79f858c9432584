"""Layers and directions around one recurrence: the part of an LSTM that every backend shares."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .philox import KIND_INPUT, KIND_OUTPUT
from .regularizers import Regularizers


class LayerWeights(NamedTuple):
    """The parameters of one layer-direction, named as in nn.LSTM (b_* and w_hr may be None)."""

    w_ih: Tensor  # [4H, I_l]
    w_hh: Tensor  # [4H, H_out]
    b_ih: Tensor | None  # [4H]
    b_hh: Tensor | None  # [4H]
    w_hr: Tensor | None  # [H_out, H]


def split_flat_weights(flat_weights, num_layers: int, num_directions: int, has_biases: bool, has_proj: bool) -> list[LayerWeights]:
    """nn.LSTM's `_flat_weights` order -> one LayerWeights per k = layer * num_directions + direction."""
    per_layer = 2 + 2 * has_biases + has_proj
    weights = []
    for k in range(num_layers * num_directions):
        w = list(flat_weights[k * per_layer : (k + 1) * per_layer])
        b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
        weights.append(LayerWeights(w[0], w[1], b_ih, b_hh, w[-1] if has_proj else None))
    return weights


LayerFn = Callable[[int, Tensor, Tensor, Tensor, LayerWeights, bool], "tuple[Tensor, Tensor, Tensor]"]


def run_stack(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: list[LayerWeights],
    num_directions: int,
    input_dropout: Callable[[int, Tensor], Tensor],
    layer: LayerFn,
    output_dropout: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Run every layer and direction.

    x: [T, B, I] time-major; h0: [L*D, B, H_out]; c0: [L*D, B, H].
    input_dropout(l, x) masks layer l's input; layer(k, x, h0_k, c0_k, weights_k, reverse) runs one
    recurrence and returns (out [T, B, H_out], h_n [B, H_out] and c_n [B, H], or both
    with a leading dimension of 1); output_dropout masks the result.
    """
    num_layers = len(weights) // num_directions
    h_n, c_n = [], []
    for layer_index in range(num_layers):
        x = input_dropout(layer_index, x)
        outputs = []
        for direction in range(num_directions):
            k = layer_index * num_directions + direction
            out, h, c = layer(k, x, h0[k], c0[k], weights[k], direction == 1)
            outputs.append(out)
            h_n.append(h)
            c_n.append(c)
        x = outputs[0] if num_directions == 1 else torch.cat(outputs, dim=-1)
    return output_dropout(x), _stack(h_n), _stack(c_n)


def _stack(states: list[Tensor]) -> Tensor:
    """[L*D, B, H] of the layer-directions' final states, each [B, H], or [1, B, H] where the backend gives them so
    (the Triton op's): those are concatenated, and a single one returned as it is, a tensor of its own as nn.LSTM's
    (a view would refuse h_n.detach_(), truncated BPTT's idiom), one copy less a state and training step."""
    if states[0].dim() == 3:
        return states[0] if len(states) == 1 else torch.cat(states)
    return torch.stack(states)


def feature_dropouts(reg: Regularizers, training: bool, layer_index: int, num_layers: int) -> tuple[float, float]:
    """(p of layer layer_index's input dropout, p of the stack's output dropout where it is the last layer), 0
    where off or in eval (kinds 1 and 2 of docs/randomness.md)."""
    if not training:
        return 0.0, 0.0
    return reg.layer_input_dropout(layer_index), reg.output_dropout if layer_index == num_layers - 1 else 0.0


def run_fused_stack(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    weights: list[LayerWeights],
    *,
    num_directions: int,
    reg: Regularizers,
    training: bool,
    seed: Tensor,
    feature_dropout: Callable[..., Tensor] | None,
    layer: LayerFn,
) -> tuple[Tensor, Tensor, Tensor]:
    """run_stack for a backend whose ops draw their own masks: feature_dropout(x, seed, kind, index, p,
    locked) applies the input, between-layer and output masks (kinds 1 and 2 of docs/randomness.md); None
    where each layer applies its own (feature_dropouts), as a stack of one direction may."""
    num_layers = len(weights) // num_directions

    def input_dropout(layer_index: int, x: Tensor) -> Tensor:
        p = feature_dropouts(reg, training, layer_index, num_layers)[0]
        if feature_dropout is None or p == 0:
            return x
        return feature_dropout(x, seed, KIND_INPUT, layer_index, p, reg.locked)

    def output_dropout(x: Tensor) -> Tensor:
        p = feature_dropouts(reg, training, num_layers - 1, num_layers)[1]
        if feature_dropout is None or p == 0:
            return x
        return feature_dropout(x, seed, KIND_OUTPUT, 0, p, reg.locked)

    return run_stack(x, h0, c0, weights, num_directions, input_dropout, layer, output_dropout)
