"""torch.library custom ops around the launchers, with fake and autograd registrations, so that
torch.compile(fullgraph=True) traces through a model that uses them, and `layer` and `dropout`, which
call them, or (eager, plain tensors) the same functions and autograd without the ops' dispatch. The
seed is an explicit input."""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..reference.higher_order import FusedLayer, layer_gradients
from . import launch


def _prepare(x: Tensor, training: bool, probabilities: list[float], modes: list[int], feature_dropouts: list[float],
             locked: bool):
    return launch.layer_settings(tuple(probabilities), tuple(modes), tuple(feature_dropouts), locked, training, x.device,
                                 x.dtype)


def _lstm_layer(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor], w_hr: Optional[Tensor],
    lengths: Optional[Tensor], seed: Tensor, stream: int, reverse: bool, training: bool,
    probabilities: list[float], modes: list[int], feature_dropouts: list[float], locked: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One layer-direction: (out, h_n [1, B, H_out], c_n [1, B, H]) in x's dtype, then the reserve (xg, rs, cs,
    hpre) for the backward.
    feature_dropouts: [input, output] probabilities of the dropouts of x and of out that the layer applies
    itself (launch.Recurrence), in `locked` mode."""
    ints, floats, flags = _prepare(x, training, probabilities, modes, feature_dropouts, locked)
    out, h_n, c_n, xg, rs, cs, hpre = launch.layer_forward(
        x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, int(seed), ints, floats, flags, stream, reverse
    )
    if w_hr is None:
        hpre = hpre.new_empty(0)
    return out, h_n, c_n, xg, rs, cs, hpre


lstm_layer = torch.library.custom_op("fused_rnn::triton_lstm_layer", mutates_args=())(_lstm_layer)


@lstm_layer.register_fake
def _(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, seed, stream, reverse, training, probabilities, modes,
      feature_dropouts, locked):
    seq_len, batch, _ = x.shape
    hidden, real_hidden = w_hh.shape[0] // 4, w_hh.shape[1]
    dtype = launch.compute_dtype(x.dtype)
    empty = lambda *shape, dtype=dtype: x.new_empty(shape, dtype=dtype)  # noqa: E731
    return (
        empty(seq_len, batch, real_hidden, dtype=x.dtype),
        empty(1, batch, real_hidden, dtype=x.dtype),
        empty(1, batch, hidden, dtype=x.dtype),
        empty(seq_len, batch, 4 * hidden, dtype=x.dtype),
        empty(seq_len + 1, batch, real_hidden, dtype=x.dtype),
        empty(seq_len + 1, batch, hidden, dtype=x.dtype),
        empty(seq_len, batch, hidden) if w_hr is not None else empty(0),
    )


def layer_backward_into(
    dgates: Tensor, d_out: Tensor, d_h_n: Optional[Tensor], d_c_n: Optional[Tensor], x: Tensor, w_ih: Tensor, w_hh: Tensor,
    w_hr: Optional[Tensor], lengths: Optional[Tensor], seed: Tensor, stream: int, reverse: bool, training: bool,
    probabilities: list[float], modes: list[int], feature_dropouts: list[float], locked: bool, xg: Tensor, rs: Tensor,
    cs: Tensor, hpre: Tensor, states_wanted: tuple[bool, bool] = (True, True),
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Tensor, Tensor, Tensor, Tensor]:
    """Gradients of x, h0, c0, w_ih, w_hh, bias and w_hr (empty without a projection); dL/dgates go to
    dgates [T, B, 4H], which may be xg itself (launch.layer_backward). d_h_n, d_c_n: None for zeros.
    states_wanted: whether dh0, dc0 are (None where not: their float32 carries are not converted)."""
    ints, floats, flags = _prepare(x, training, probabilities, modes, feature_dropouts, locked)
    dx, dh0, dc0, dw_ih, dw_hh, dbias, dw_hr = launch.layer_backward(
        d_out, d_h_n, d_c_n, x, w_ih, w_hh, w_hr, lengths, int(seed), ints, floats, flags, stream, reverse, xg, rs, cs,
        hpre, dgates,
    )
    dw_hr = x.new_empty(0) if dw_hr is None else dw_hr if dw_hr.dtype == w_ih.dtype else dw_hr.to(w_ih.dtype)
    dh0, dc0 = (state.to(x.dtype) if wanted else None for state, wanted in zip((dh0, dc0), states_wanted))
    # dx, dw_ih and dw_hh come from products in x's dtype, which F.linear holds w_ih's (launch.layer_backward
    # gives dw_hh w_hh's); dL/dbias and dL/dW_hr come in the compute dtype
    return dx, dh0, dc0, dw_ih, dw_hh, dbias if dbias.dtype == w_ih.dtype else dbias.to(w_ih.dtype), dw_hr


def _lstm_layer_backward(
    d_out: Tensor, d_h_n: Tensor, d_c_n: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor, w_hr: Optional[Tensor],
    lengths: Optional[Tensor], seed: Tensor, stream: int, reverse: bool, training: bool,
    probabilities: list[float], modes: list[int], feature_dropouts: list[float], locked: bool, xg: Tensor, rs: Tensor,
    cs: Tensor, hpre: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """layer_backward_into a buffer of its own, xg left as it was: for a graph that is kept or traced."""
    return layer_backward_into(
        torch.empty_like(xg), d_out, d_h_n, d_c_n, x, w_ih, w_hh, w_hr, lengths, seed, stream, reverse, training,
        probabilities, modes, feature_dropouts, locked, xg, rs, cs, hpre,
    )


lstm_layer_backward = torch.library.custom_op("fused_rnn::triton_lstm_layer_backward", mutates_args=())(
    _lstm_layer_backward
)


@lstm_layer_backward.register_fake
def _(d_out, d_h_n, d_c_n, x, w_ih, w_hh, w_hr, lengths, seed, stream, reverse, training, probabilities, modes,
      feature_dropouts, locked, xg, rs, cs, hpre):
    return (
        torch.empty_like(x),
        torch.empty_like(d_h_n, dtype=x.dtype),
        torch.empty_like(d_c_n, dtype=x.dtype),
        torch.empty_like(w_ih),
        torch.empty_like(w_hh),
        w_ih.new_empty(w_ih.shape[0]),
        torch.empty_like(w_hr) if w_hr is not None else x.new_empty(0),
    )


def _layer_setup_context(ctx, inputs, output):
    x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, seed, stream, reverse, training, probabilities, modes, *features = inputs
    _, _, _, xg, rs, cs, hpre = output
    # x as it came: with an input dropout, the backward draws its mask again (launch.layer_backward)
    ctx.save_for_backward(x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, seed, xg, rs, cs, hpre)
    # unused outputs' gradients stay None: autograd would otherwise fill [T, B, 4H] of zeros for the
    # reserve outputs (xg, rs, cs, hpre), which no backward reads
    ctx.set_materialize_grads(False)
    ctx.arguments = (stream, reverse, training, probabilities, modes, *features)
    ctx.xg_output = weakref.ref(xg)  # dead once the caller has dropped it
    ctx.reserve_overwritten = False


def _has_storage(t: Tensor) -> bool:
    """False for the batched and wrapped tensors of vmap and is_grads_batched, which have none of their own."""
    try:
        t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return False
    return True


def reserve_is_spent(ctx, xg: Tensor, grads: tuple[Tensor, ...]) -> bool:
    """Whether this backward may write dL/dgates over the saved gate activations xg, as cuDNN's backward does
    its reserve: an eager backward of plain tensors that frees the graph after it (not retain_graph or
    create_graph; not a trace by torch.compile or make_fx, whose tensors are fake or functional or under a
    dispatch mode; not functorch's batched gradients), with the forward's xg output dropped by its caller."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    if not all(type(t) is torch.Tensor and _has_storage(t) for t in (xg, *grads)):
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph() and ctx.xg_output() is None


def _layer_backward(ctx, d_out, d_h_n, d_c_n, *_reserve):
    # first: a second backward through a freed graph gets autograd's own error, as every other node's
    x, h0, c0, w_ih, w_hh, bias, w_hr, lengths, seed, xg, rs, cs, hpre = ctx.saved_tensors
    if ctx.reserve_overwritten:
        # an earlier backward of this node wrote over the activations and then failed before freeing the graph
        raise RuntimeError(
            "fused_rnn: this backward already ran once and wrote its gradients over the saved activations; "
            "run the forward again (or pass retain_graph=True to a backward that is to be repeated)"
        )
    stream, reverse, training, probabilities, modes, feature_dropouts, locked = ctx.arguments
    # h_n and c_n came with a leading dimension of 1, which h0 and c0 have not
    d_h_n, d_c_n = (None if grad is None else grad.squeeze(0) for grad in (d_h_n, d_c_n))

    def kernel():
        seq_len, batch, _ = x.shape
        hidden, real_hidden = w_hh.shape[0] // 4, w_hh.shape[1]
        # outputs nobody used come back as None; the final state's gradients (h_n and c_n are seldom used)
        # may stay None where the launcher is called directly, which starts them at zero in its own buffers
        d_out_or_zeros = x.new_zeros(seq_len, batch, real_hidden) if d_out is None else d_out
        given = (d_out_or_zeros, *(g for g in (d_h_n, d_c_n) if g is not None))
        settings = (x, w_ih, w_hh, w_hr, lengths, seed, stream, reverse, training, probabilities, modes,
                    feature_dropouts, locked)
        if reserve_is_spent(ctx, xg, given):
            ctx.reserve_overwritten = True
            results = layer_backward_into(xg, d_out_or_zeros, d_h_n, d_c_n, *settings, xg, rs, cs, hpre,
                                          states_wanted=tuple(ctx.needs_input_grad[1:3]))
        else:
            grads = (
                d_out_or_zeros,
                x.new_zeros(batch, real_hidden) if d_h_n is None else d_h_n,
                x.new_zeros(batch, hidden) if d_c_n is None else d_c_n,
            )
            results = _call(lstm_layer_backward, _lstm_layer_backward, None,
                            (*grads, x, w_ih, w_hh, w_hr, lengths, seed, xg, rs, cs, hpre), (),
                            (*grads, *settings, xg, rs, cs, hpre))
        dx, dh0, dc0, dw_ih, dw_hh, dbias, dw_hr = results
        return dx, dh0, dc0, dw_ih, dw_hh, dbias if bias is not None else None, dw_hr if w_hr is not None else None

    layer = FusedLayer(stream, reverse, training, probabilities, modes, seed, lengths, *feature_dropouts, locked)
    grads = layer_gradients(kernel, layer, (d_out, d_h_n, d_c_n), (x, h0, c0, w_ih, w_hh, bias, w_hr))
    return (*grads, *(None,) * 9)  # lengths, seed and the settings


lstm_layer.register_autograd(_layer_backward, setup_context=_layer_setup_context)


def _feature_dropout(x: Tensor, seed: Tensor, kind: int, index: int, p: float, locked: bool) -> Tensor:
    """x [T, B, F] times the keep-mask of (kind, index) of docs/randomness.md, inverted scaling."""
    return launch.feature_dropout(x, int(seed), kind, index, p, locked)


feature_dropout = torch.library.custom_op("fused_rnn::triton_feature_dropout", mutates_args=())(_feature_dropout)


@feature_dropout.register_fake
def _(x, seed, kind, index, p, locked):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _dropout_setup_context(ctx, inputs, output):
    _, seed, kind, index, p, locked = inputs
    ctx.save_for_backward(seed)
    ctx.arguments = (kind, index, p, locked)


def _dropout_backward(ctx, grad):
    (seed,) = ctx.saved_tensors
    return dropout(grad, seed, *ctx.arguments), None, None, None, None, None


feature_dropout.register_autograd(_dropout_backward, setup_context=_dropout_setup_context)


PLAIN = (Tensor, torch.nn.Parameter)


def dispatch_free(tensors) -> bool:
    """Whether a call may skip its custom op's dispatch, going straight to the op's autograd.Function (or,
    with no gradient to record, to its function): an eager call on plain tensors. Traces (torch.compile,
    torch.jit.trace, make_fx, dispatch and function modes), functorch's wrapped and batched tensors,
    tensor subclasses and forward-mode AD go through the custom op, whose registrations they need. On
    the H200's host the dispatch of a custom op with autograd took 100-350 us a call more than the
    function it wraps; here the same results come from the same function, setup_context and backward."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
        return False
    if torch._C._is_torch_function_mode_enabled() or torch.autograd.forward_ad._current_level >= 0:
        return False
    if torch._C._functorch.maybe_current_level() is not None:  # inside vmap, grad, jvp (is_grads_batched too)
        return False
    return all(
        t is None or (type(t) in PLAIN and not torch._C._functorch.is_functorch_wrapped_tensor(t) and _has_storage(t))
        for t in tensors
    )


def _records_gradients(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _eager_autograd(function, setup_context, backward_fn) -> type[torch.autograd.Function]:
    """A custom op's autograd registrations as an autograd.Function of its function, for dispatch_free calls.
    forward(ctx, ...) rather than a separate setup_context, which autograd.Function.apply would bind to the
    forward's signature through inspect at every call (50 us a call on CI's CPU, more than the dispatch saved)."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = function(*inputs)
            setup_context(ctx, inputs, output)
            return output

        backward = staticmethod(backward_fn)

    Eager.__name__ = Eager.__qualname__ = f"Eager{function.__name__}"
    return Eager


_LayerFunction = _eager_autograd(_lstm_layer, _layer_setup_context, _layer_backward)
_DropoutFunction = _eager_autograd(_feature_dropout, _dropout_setup_context, _dropout_backward)


def _call(op, function, eager: Optional[type[torch.autograd.Function]], tensors: tuple, differentiable: tuple,
          arguments: tuple, free: Optional[bool] = None):
    """op(*arguments) where a trace or transform needs the custom op (dispatch_free of tensors, or `free` where
    the caller asked it of tensors these derive from), else its autograd.Function, or its function alone
    where no gradient is recorded (nothing differentiable: an op without autograd)."""
    if not (dispatch_free(tensors) if free is None else free):
        return op(*arguments)
    if _records_gradients(differentiable):
        return eager.apply(*arguments)
    return function(*arguments)


def layer(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Optional[Tensor], w_hr: Optional[Tensor],
    lengths: Optional[Tensor], seed: Tensor, stream: int, reverse: bool, training: bool,
    probabilities: list[float], modes: list[int], feature_dropouts: list[float], locked: bool,
    free: Optional[bool] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """lstm_layer, through its custom op only where a trace or transform needs it (_call)."""
    differentiable = (x, h0, c0, w_ih, w_hh, bias, w_hr)
    arguments = (*differentiable, lengths, seed, stream, reverse, training, probabilities, modes, feature_dropouts, locked)
    return _call(lstm_layer, _lstm_layer, _LayerFunction, (*differentiable, lengths, seed), differentiable, arguments,
                 free)


def dropout(x: Tensor, seed: Tensor, kind: int, index: int, p: float, locked: bool, free: Optional[bool] = None) -> Tensor:
    """feature_dropout, through its custom op only where a trace or transform needs it (_call)."""
    return _call(feature_dropout, _feature_dropout, _DropoutFunction, (x, seed), (x,), (x, seed, kind, index, p, locked),
                 free)
