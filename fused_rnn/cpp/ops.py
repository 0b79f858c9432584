"""Fake and autograd registrations of the operators of csrc/lstm.cpp (namespace fused_rnn_cpp).

Imported by loader.py once the library is loaded (and by torch itself, through the library's
set_python_module, when a compiled graph meets the operators first).
"""

from __future__ import annotations

import torch
from torch.library import register_autograd, register_fake

from ..reference.higher_order import FusedLayer, layer_gradients

_ops = torch.ops.fused_rnn_cpp


# ---- feature dropout: x [T, B, F] -> x * mask / (1 - p); linear, so its backward is itself ------------------------

@register_fake("fused_rnn_cpp::feature_dropout")
def _feature_dropout_fake(x, seed, kind, index, p, locked):
    return x.new_empty(x.shape)


def _feature_dropout_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.mask_args = inputs[2:]


def _feature_dropout_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return _ops.feature_dropout(grad, seed, *ctx.mask_args), None, None, None, None, None


register_autograd("fused_rnn_cpp::feature_dropout", _feature_dropout_backward, setup_context=_feature_dropout_setup)


# ---- one layer-direction: forward and backward through time -------------------------------------------------------

@register_fake("fused_rnn_cpp::lstm_layer")
def _lstm_layer_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, seed, lengths, layer, regularizers):
    steps, batch = x.shape[0], x.shape[1]
    hidden, real = w_hh.shape[0] // 4, w_hh.shape[1]
    return (
        x.new_empty(steps, batch, real),  # out
        x.new_empty(batch, real),  # h_n
        x.new_empty(batch, hidden),  # c_n
        x.new_empty(steps, batch, 4 * hidden),  # gates: i, f, g, o after their nonlinearities
        x.new_empty(steps, batch, hidden),  # tanh(c~)
        x.new_empty(steps + 1, batch, real),  # every h state
        x.new_empty(steps + 1, batch, hidden),  # every c state
    )


@register_fake("fused_rnn_cpp::lstm_layer_backward")
def _lstm_layer_backward_fake(grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, seed, lengths, gates, tanh_c, hs, cs, layer,
                              regularizers, input_grad):
    steps, batch, inputs = x.shape
    hidden, real = w_hh.shape[0] // 4, w_hh.shape[1]
    return (
        x.new_empty(steps, batch, inputs) if input_grad else x.new_empty(0),
        x.new_empty(batch, real),
        x.new_empty(batch, hidden),
        x.new_empty(4 * hidden, inputs),
        x.new_empty(4 * hidden, real),
        x.new_empty(4 * hidden),
        x.new_empty(real, hidden) if w_hr is not None else x.new_empty(0),
    )


def _lstm_layer_setup(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, seed, lengths, layer, regularizers = inputs
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, seed, lengths, *output[3:])
    ctx.layer_args = (layer, regularizers)
    ctx.mark_non_differentiable(*output[3:])
    # unused outputs (the reserve, often h_n / c_n) reach the backward as None, not as zero tensors to fill
    ctx.set_materialize_grads(False)


def _lstm_layer_backward(ctx, grad_out, grad_h_n, grad_c_n, *reserve_grads):
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, seed, lengths, gates, tanh_c, hs, cs = ctx.saved_tensors
    layer, regularizers = ctx.layer_args
    input_grad = ctx.needs_input_grad[0]

    def kernel():
        dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr = _ops.lstm_layer_backward(
            grad_out, grad_h_n, grad_c_n, x, w_ih, w_hh, w_hr, seed, lengths, gates, tanh_c, hs, cs, layer, regularizers,
            input_grad,
        )
        biases = (db, db.clone()) if b_ih is not None else (None, None)
        return dx if input_grad else None, dh0, dc0, dw_ih, dw_hh, *biases, dw_hr if w_hr is not None else None

    # layer: [k, reverse, training, weight_rows, update_per_step]
    fused = FusedLayer(layer[0], bool(layer[1]), bool(layer[2]), regularizers, layer[3:], seed, lengths)
    grads = layer_gradients(kernel, fused, (grad_out, grad_h_n, grad_c_n), (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr))
    return (*grads, None, None, None, None)


register_autograd("fused_rnn_cpp::lstm_layer", _lstm_layer_backward, setup_context=_lstm_layer_setup)
