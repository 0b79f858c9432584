"""Second and higher derivatives through a fused layer-direction (the C++ and Triton ops).

The fused kernels compute first derivatives only. When a backward runs with create_graph=True, the kernel's
gradients are still what it returns (at the kernel's speed), but they come out of a graph node whose own backward
recomputes the layer in the reference and differentiates that: a gradient penalty that never differentiates the
LSTM's gradients pays nothing extra, one that does pays a reference forward and double backward of the layer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..masks import feature_keep_mask, unit_masks, weight_keep_mask
from ..philox import KIND_INPUT, KIND_OUTPUT
from ..regularizers import Regularizers
from ..stack import LayerWeights
from .naive import _LOW_PRECISION, apply_keep, lstm_layer_naive


@dataclasses.dataclass(frozen=True)
class FusedLayer:
    """What a fused layer op was called with besides its differentiable tensors."""

    k: int  # layer * num_directions + direction: which masks
    reverse: bool
    training: bool
    probabilities: Sequence[float]
    modes: Sequence[int]
    seed: Tensor
    lengths: Optional[Tensor]
    # the dropouts of x (kind input, index k) and of out (kind output) the op applies itself, in locked mode or not
    input_dropout: float = 0.0
    output_dropout: float = 0.0
    locked: bool = False


GradientsFn = Callable[[], Sequence[Optional[Tensor]]]


def layer_gradients(
    kernel: GradientsFn, layer: FusedLayer, grads: Sequence[Optional[Tensor]], inputs: Sequence[Optional[Tensor]]
) -> tuple[Optional[Tensor], ...]:
    """The gradients of a fused layer-direction's inputs, from its backward kernel, differentiable when asked.

    grads: the gradients of (out, h_n, c_n), None where unused; inputs: (x, h0, c0, w_ih, w_hh, *biases, w_hr)
    with None where absent (biases: b_ih and b_hh, or their sum); kernel() returns one gradient per input (None
    where not wanted). Without create_graph this is kernel(); with it, the same values as a function of inputs and
    grads whose derivatives (of every order) are the reference's.
    """
    def gradients() -> tuple[Optional[Tensor], ...]:
        return _unreached_projection(tuple(kernel()), grads, inputs)

    if not torch.is_grad_enabled():
        return gradients()
    return _Vjp.apply(functools.partial(_reference_layer, layer), len(inputs), gradients, *inputs, *grads)


def _unreached_projection(gradients: tuple, grads: Sequence[Optional[Tensor]],
                          inputs: Sequence[Optional[Tensor]]) -> tuple:
    """gradients with W_hr's None where nothing used reaches W_hr: a single step whose out and h_n went unused (c_n
    comes before the projection). nn.LSTM on CPU gives no gradient there, as the reference does; the kernels
    compute zeros."""
    x, w_hr = inputs[0], inputs[-1]
    if w_hr is not None and x.shape[0] == 1 and grads[0] is None and grads[1] is None:
        return (*gradients[:-1], None)
    return gradients


def _reference_layer(layer: FusedLayer, *inputs: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """(out, h_n, c_n) of the fused layer by the reference, in x's dtype."""
    x, h0, c0, w_ih, w_hh, *biases, w_hr = inputs
    dtype = x.dtype
    reg = Regularizers.of_recurrence_arguments(layer.probabilities, layer.modes)
    masks = None
    seq_len, batch, features = x.shape
    hidden, real = w_hh.shape[0] // 4, w_hh.shape[1]
    if layer.training:
        masks = unit_masks(reg, layer.seed, layer.k, seq_len, batch, hidden, real, x.device)
        masks["weight"] = weight_keep_mask(layer.seed, layer.k, reg.weight_dropout, reg.weight_rows, hidden, real, x.device)
    if dtype in _LOW_PRECISION:  # computed in float32, as the kernels and the reference do
        x, h0, c0, w_ih, w_hh, w_hr, *biases = (None if t is None else t.float() for t in (x, h0, c0, w_ih, w_hh, w_hr, *biases))
    b_ih = biases[0]
    b_hh = biases[1] if len(biases) == 2 else (None if b_ih is None else torch.zeros_like(b_ih))
    input_p, output_p = (layer.input_dropout, layer.output_dropout) if layer.training else (0.0, 0.0)
    keep = functools.partial(feature_keep_mask, layer.seed, steps=1 if layer.locked else seq_len, batch=batch,
                             device=x.device)
    x = apply_keep(x, keep(KIND_INPUT, layer.k, input_p, features=features), input_p)
    out, h_n, c_n = lstm_layer_naive(
        x, h0, c0, LayerWeights(w_ih, w_hh, b_ih, b_hh, w_hr),
        reverse=layer.reverse, reg=reg, masks=masks, training=layer.training, lengths=layer.lengths,
    )
    out = apply_keep(out, keep(KIND_OUTPUT, 0, output_p, features=real), output_p)
    return tuple(r.to(dtype) for r in (out, h_n, c_n))


def _vjp(fn, num_primals: int, create_graph: bool, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """The vector-Jacobian product of fn at primals tensors[:num_primals] with cotangents tensors[num_primals:] (one
    per output of fn): a gradient per primal, None where the primal is None or does not require grad."""
    primals, cotangents = tensors[:num_primals], tensors[num_primals:]
    outputs = fn(*primals)
    pairs = [(o, c) for o, c in zip(outputs, cotangents) if o is not None and c is not None and o.requires_grad]
    wanted = [i for i, p in enumerate(primals) if p is not None and p.requires_grad]
    result = [None] * num_primals
    if pairs and wanted:
        found = torch.autograd.grad(
            [o for o, _ in pairs], [primals[i] for i in wanted], [c for _, c in pairs],
            allow_unused=True, create_graph=create_graph,
        )
        for i, g in zip(wanted, found):
            result[i] = g
    return tuple(result)


class _Vjp(torch.autograd.Function):
    """_vjp(fn, num_primals, ...) as one graph node whose backward is again a _Vjp node, so that it is differentiable
    to any order. Its value comes from `kernel` when there is one (a fused first-order backward), else from autograd
    on leaves of its own: each derivative is then partial, whatever history the tensors share."""

    @staticmethod
    def forward(ctx, fn, num_primals, kernel, *tensors):
        ctx.fn, ctx.num_primals = fn, num_primals
        ctx.save_for_backward(*tensors)
        ctx.set_materialize_grads(False)
        if kernel is not None:
            return tuple(kernel())
        leaves = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in tensors]
        with torch.enable_grad():
            return tuple(None if g is None else g.detach() for g in _vjp(fn, num_primals, False, *leaves))

    @staticmethod
    def backward(ctx, *grads):
        tensors = ctx.saved_tensors
        if all(g is None for g in grads):
            return (None,) * (3 + len(tensors))
        derivative = functools.partial(_vjp, ctx.fn, ctx.num_primals, True)
        return (None, None, None, *_Vjp.apply(derivative, len(tensors), None, *tensors, *grads))
