"""`fused_rnn.lstm`: nn.LSTM's forward as a function of its weights, with every regularizer.

This layer checks the input (nn.LSTM's exceptions and wording where nn.LSTM checks the same thing),
turns every input form (batch_first, unbatched, PackedSequence) into a time-major padded batch in the
caller's row order, draws the seed, and hands that to a backend.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import numbers
from typing import Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.nn.utils.rnn import PackedSequence
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backends
from .kept import current_stream_handle, kept
from .philox import SEED_LIMIT
from .regularizers import ArgumentTypeError, Regularizers
from .stack import split_flat_weights


def draw_seed() -> Tensor:
    """One 64-bit seed in [0, 2**63 - 1) from torch's default CPU generator, as a 0-dim int64 CPU tensor.

    A tensor, not an int, and drawn out of place, so that torch.compile traces the draw into the graph.
    """
    return torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64)


@torch.library.custom_op("fused_rnn::draw_seed", mutates_args=())
def _compiled_draw_seed(anchor: Tensor) -> Tensor:
    """draw_seed() as an op that torch.compile keeps opaque: inductor replaces torch.randint with a generator
    of its own (as it does F.dropout's draws), so a compiled call drew other masks than an eager one after the
    same torch.manual_seed. anchor: a tensor of the call, so that the draw is not folded into a constant."""
    return draw_seed()


@_compiled_draw_seed.register_fake
def _(anchor):
    return torch.empty((), dtype=torch.int64)


def check_seed(seed) -> Tensor:
    """A user's seed (an int in [0, 2**63)) as a 0-dim int64 CPU tensor."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ArgumentTypeError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed}")
    return torch.tensor(int(seed), dtype=torch.int64)


class HiddenStateTypeError(TypeError, AttributeError):
    """An hx that is no pair, or a pair with something other than a tensor in it: a TypeError, and the
    AttributeError that nn.LSTM's hx[0].dim() raises for it."""


def _refused_hx(stacked: bool) -> Exception:
    """What nn.LSTM's kernel raises for an hx that is not two tensors: a tensor is no list of tensors to it."""
    if stacked:
        return TypeError("LSTM: hx must be a tuple (h_0, c_0) of two tensors, got a tensor")
    return RuntimeError("lstm expects two hidden states")


def _check_packed(data: Tensor, batch_sizes: Tensor, sorted_indices: Tensor | None) -> None:
    if batch_sizes.dim() != 1 or batch_sizes.dtype != torch.int64 or batch_sizes.device.type != "cpu":
        raise RuntimeError("PackedSequence batch_sizes must be a 1-D int64 CPU tensor")
    sizes = batch_sizes.tolist()
    if not sizes or sizes[-1] <= 0 or any(a < b for a, b in zip(sizes, sizes[1:])):
        raise RuntimeError(
            "PackedSequence batch_sizes must be positive and non-increasing (lengths sorted in decreasing order), "
            f"got {sizes}"
        )
    if sum(sizes) != data.shape[0]:
        raise RuntimeError(f"PackedSequence data has {data.shape[0]} rows but its batch_sizes sum to {sum(sizes)}")
    # its values are not read here (on a GPU that would wait for the queue); nn.LSTM checks none of this
    if sorted_indices is not None and (
        sorted_indices.dim() != 1 or sorted_indices.dtype != torch.int64 or sorted_indices.numel() != sizes[0]
    ):
        raise RuntimeError(
            f"PackedSequence sorted_indices must be a 1-D int64 tensor of the batch's {sizes[0]} rows, got "
            f"{sorted_indices.dtype} of shape {tuple(sorted_indices.shape)}"
        )


def _packed_index(batch_sizes: Tensor, sorted_indices: Tensor | None, device) -> tuple[Tensor, Tensor, Tensor]:
    """For each row of packed data, its time step and its row in the caller's batch; and each row's length."""
    batch_sizes = batch_sizes.to(device)
    seq_len, batch = batch_sizes.shape[0], int(batch_sizes[0])
    time_index = torch.repeat_interleave(torch.arange(seq_len, device=device), batch_sizes)
    offsets = torch.cumsum(batch_sizes, 0) - batch_sizes
    sorted_row = torch.arange(time_index.shape[0], device=device) - offsets[time_index]
    lengths_sorted = (batch_sizes.unsqueeze(0) > torch.arange(batch, device=device).unsqueeze(1)).sum(1)
    if sorted_indices is None:
        return time_index, sorted_row, lengths_sorted
    lengths = torch.empty_like(lengths_sorted).index_put_((sorted_indices,), lengths_sorted)
    return time_index, sorted_indices[sorted_row], lengths


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know, such as meta
        return False


def _transformed(*tensors: Tensor) -> bool:
    """Whether a torch.func transform (grad, jvp, vmap, ...) is active, or a tensor carries a forward-mode
    tangent. The fused ops have reverse-mode derivatives only (reference/higher_order.py), and a transform
    or forward-mode AD would see them as constants; the reference's torch ops, with the same masks, are
    understood by every transform."""
    if torch.compiler.is_compiling():
        # traced graphs hold the fused ops as they are (a transform inside a compiled function meets them too)
        return False
    if backends.torch_func_transform_active():
        return True
    return forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


# hx=None's zero states, by shapes, dtype, device, stream and inference mode, the least recently used dropped
# past the limit. No backend writes its h0 or c0 (they are inputs, saved for the backward as they came), so
# a forward reuses them instead of filling two tensors: on a GPU two launches before the recurrence, while
# the GPU waits. Only small ones are kept, at most ZERO_STATES_KEPT * ZERO_STATES_MAX_BYTES in all.
_zero_states: collections.OrderedDict = collections.OrderedDict()
ZERO_STATES_KEPT = 8
ZERO_STATES_MAX_BYTES = 1 << 22


def zero_states(x: Tensor, states: int, batch: int, real_hidden_size: int, hidden_size: int) -> tuple[Tensor, Tensor]:
    """h0 [states, batch, real_hidden_size] and c0 [states, batch, hidden_size] of zeros like x: kept ones
    for plain eager tensors, new ones under a trace, a dispatch mode or a transform, or where they are large."""
    shapes = ((states, batch, real_hidden_size), (states, batch, hidden_size))
    size = states * batch * (real_hidden_size + hidden_size) * x.element_size()
    if (size > ZERO_STATES_MAX_BYTES or type(x) is not Tensor or x.device.type == "meta"
            or torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None
            or torch._C._functorch.is_functorch_wrapped_tensor(x)):
        return x.new_zeros(shapes[0]), x.new_zeros(shapes[1])
    key = (shapes, x.dtype, x.device, current_stream_handle(x.device), torch.is_inference_mode_enabled())
    return kept(_zero_states, key, ZERO_STATES_KEPT, lambda: (x.new_zeros(shapes[0]), x.new_zeros(shapes[1])))


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")
    if value < minimum:
        bound = "greater than zero" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__}")


@functools.lru_cache(maxsize=64)
def _weight_layout(
    input_size: int, hidden_size: int, proj_size: int, num_layers: int, num_directions: int, has_biases: bool
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The name and shape nn.LSTM gives each of its flat weights, in their order (cached: every forward asks)."""
    real_hidden_size = proj_size if proj_size > 0 else hidden_size
    gates = 4 * hidden_size
    layout = []
    for layer in range(num_layers):
        layer_input = input_size if layer == 0 else num_directions * real_hidden_size
        for direction in range(num_directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            layout += [(f"weight_ih{suffix}", (gates, layer_input)), (f"weight_hh{suffix}", (gates, real_hidden_size))]
            if has_biases:
                layout += [(f"bias_ih{suffix}", (gates,)), (f"bias_hh{suffix}", (gates,))]
            if proj_size > 0:
                layout.append((f"weight_hr{suffix}", (proj_size, hidden_size)))
    return tuple(layout)


def _size_from(weight: Tensor, name: str, dim: int) -> int:
    """A size read off nn.LSTM's weight `name`, which must be 2-D to give it."""
    if weight.dim() != 2:
        raise RuntimeError(f"{name} must be 2-D to give the LSTM's sizes, got size {list(weight.shape)}")
    return weight.shape[dim]


def _sizes(
    weights: Sequence[Tensor],
    num_layers: int,
    num_directions: int,
    has_biases: bool,
    input_size: int | None,
    hidden_size: int | None,
    proj_size: int | None,
) -> tuple[int, int, int]:
    """input_size, hidden_size, proj_size: the ones given, checked, the others read off the first layer's weights."""
    if proj_size is None:
        has_proj = len(weights) == num_layers * num_directions * (3 + 2 * has_biases)
    else:
        has_proj = _check_int("proj_size", proj_size, 0) > 0
    per_layer = 2 + 2 * has_biases + has_proj
    if len(weights) != num_layers * num_directions * per_layer:
        counts = f"{2 + 2 * has_biases} or {3 + 2 * has_biases}" if proj_size is None else str(per_layer)
        raise ValueError(
            f"expected {counts} weights per layer and direction, times {num_layers} layers and {num_directions} "
            f"directions, got {len(weights)} weights in all"
        )
    if input_size is None:
        input_size = _size_from(weights[0], "weight_ih_l0", 1)
    if hidden_size is None:
        hidden_size = _size_from(weights[0], "weight_ih_l0", 0) // 4
    if proj_size is None:
        proj_size = _size_from(weights[per_layer - 1], "weight_hr_l0", 0) if has_proj else 0
    input_size = _check_int("input_size", input_size, 1)
    hidden_size = _check_int("hidden_size", hidden_size, 1)
    if proj_size >= hidden_size:
        raise ValueError("proj_size has to be smaller than hidden_size")
    return input_size, hidden_size, proj_size


def lstm(
    input: Tensor | PackedSequence,
    hx: tuple[Tensor, Tensor] | None,
    weights: Sequence[Tensor],
    *,
    has_biases: bool = True,
    num_layers: int = 1,
    bidirectional: bool = False,
    batch_first: bool = False,
    training: bool = False,
    regularizers: Regularizers | None = None,
    seed: int | None = None,
    backend: str = "auto",
    input_size: int | None = None,
    hidden_size: int | None = None,
    proj_size: int | None = None,
    _settings_error: Exception | None = None,
) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
    """nn.LSTM's forward with the regularizers of SPEC.md.

    weights: nn.LSTM's flat weights in its order (w_ih, w_hh[, b_ih, b_hh][, w_hr] per layer and direction).
    input_size, hidden_size, proj_size: nn.LSTM's; each one left None is read off the first layer's
    weight_ih (input_size, hidden_size) or weight_hr (proj_size). Every weight's shape is checked against them.
    Returns output (a PackedSequence for packed input) and (h_n, c_n), shaped as nn.LSTM returns them.

    Input checks follow nn.LSTM.forward's order (input dims, hx dims, input dtype and feature size, hidden
    sizes, then what its kernel checks: devices, sequence length); all of them, and the backend's
    availability, come before the seed is drawn. _settings_error: fused_rnn.LSTM's, for a setting that nn.LSTM's
    kernel refuses once the input has passed those checks (a `dropout` set after construction), raised there.
    """
    if regularizers is not None and not isinstance(regularizers, Regularizers):
        raise TypeError(f"regularizers must be a fused_rnn.Regularizers or None, got {type(regularizers).__name__}")
    reg = Regularizers() if regularizers is None else regularizers
    backend = backends.check_backend_name(backend)
    num_layers = _check_int("num_layers", num_layers, 1)
    flags = dict(has_biases=has_biases, bidirectional=bidirectional, batch_first=batch_first, training=training)
    for name, flag in flags.items():
        _check_bool(name, flag)
    if not isinstance(weights, (list, tuple)) or not all(isinstance(w, Tensor) for w in weights):
        raise TypeError("weights must be a list or tuple of tensors (nn.LSTM's flat weights)")
    num_directions = 2 if bidirectional else 1
    input_size, hidden_size, proj_size = _sizes(
        weights, num_layers, num_directions, has_biases, input_size, hidden_size, proj_size
    )
    has_proj = proj_size > 0
    real_hidden_size = proj_size if has_proj else hidden_size

    packed = isinstance(input, PackedSequence)
    if packed:
        data, batch_sizes, sorted_indices, unsorted_indices = input
    else:
        data, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
        if data.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {data.dim()}D instead")
    batched = packed or data.dim() == 3
    # nn.LSTM indexes hx[0] and hx[1], which takes a stacked [2, ...] tensor too, and drops a third state.
    # Its kernel, which gets hx as it came where nn.LSTM did not index it (batched, or packed without
    # sorted_indices), wants a tuple of exactly two: it says so after nn.LSTM's own checks (hx_refused).
    hx_refused = None
    if hx is not None:
        stacked = isinstance(hx, Tensor)
        if not (stacked or isinstance(hx, (tuple, list))):
            # nn.LSTM raises a TypeError or an AttributeError, by what hx is
            raise HiddenStateTypeError(f"LSTM: hx must be a tuple (h_0, c_0) of two tensors, got {type(hx).__name__}")
        if not stacked and not all(isinstance(h, Tensor) for h in hx):
            found = ", ".join(type(h).__name__ for h in hx)
            raise HiddenStateTypeError(f"LSTM: hx must be a tuple (h_0, c_0) of two tensors, got ({found})")
        reaches_kernel = batched and not (packed and sorted_indices is not None)
        if packed and reaches_kernel and (stacked or len(hx) != 2):
            raise _refused_hx(stacked)  # no Python check of packed input comes before the kernel's
        if not stacked and len(hx) < 2:
            # nn.LSTM fails with an IndexError reaching for hx[1]
            raise IndexError(f"LSTM: hx must be a tuple (h_0, c_0) of two tensors, got {len(hx)}")
        if reaches_kernel and (stacked or len(hx) > 2):
            hx_refused = _refused_hx(stacked)
        h0, c0 = hx[0], hx[1]
        want = 3 if batched else 2
        if h0.dim() != want or c0.dim() != want:
            form = "batched 3-D" if batched else "unbatched 2-D"
            # nn.LSTM checks this for padded input; packed, it fails with an IndexError permuting hx
            error = IndexError if packed else RuntimeError
            raise error(
                f"For {form} input, hx and cx should also be {want}-D but got ({h0.dim()}-D, {c0.dim()}-D) tensors"
            )
        if not batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)

    # Under autocast, input runs in autocast's dtype, as nn.LSTM's: its padded overload is on CPU autocast's list,
    # and on CUDA cuDNN's RNN is cast for packed input too. Its packed overload is on no CPU list: there packed
    # data runs in its own dtype (float32 data in float32, data in autocast's dtype in that), so packed data in
    # another dtype runs here in the weights'. Either way the backend runs with autocast off (below): its
    # products are in the dtype chosen here, as they would be without autocast.
    autocast_on = _autocast_enabled(data.device.type)
    autocast = autocast_on and not (packed and data.device.type != "cuda"
                                    and data.dtype != torch.get_autocast_dtype(data.device.type))
    # what autocast makes of a dtype: floating-point ones but float64 go to its dtype (nn.LSTM under autocast runs a
    # float64 module on float64 input in float64, and its kernel refuses float64 input to a float32 module)
    autocast_dtype = torch.get_autocast_dtype(data.device.type) if autocast else None

    def cast(d: torch.dtype) -> torch.dtype:
        return autocast_dtype if autocast and d.is_floating_point and d != torch.float64 else d

    weight_dtype = weights[0].dtype
    if data.dtype != weight_dtype and not autocast:
        # nn.LSTM checks padded input's dtype (ValueError); packed input fails in its kernel (RuntimeError)
        raise (RuntimeError if packed else ValueError)(
            f"RNN input dtype ({data.dtype}) does not match weight dtype ({weight_dtype}). "
            f"Convert input: input.to({weight_dtype}), or convert model: model.to({data.dtype})"
        )
    if not data.is_floating_point() and not autocast:  # (under autocast: the kernel's dtype check below)
        raise ValueError(f"LSTM: input must be a floating-point tensor, got {data.dtype}")
    if packed and data.dim() != 2:
        raise RuntimeError(f"input must have 2 dimensions, got {data.dim()}")
    if data.size(-1) != input_size:
        raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {input_size}, got {data.size(-1)}")
    if packed:
        _check_packed(data, batch_sizes, sorted_indices)
        batch = int(batch_sizes[0])
    elif batched:
        batch = data.shape[0] if batch_first else data.shape[1]
    else:
        batch = 1
    if hx is not None:
        for index, (state, size) in enumerate(((h0, real_hidden_size), (c0, hidden_size))):
            expected = (num_layers * num_directions, batch, size)
            if state.shape != expected:
                raise RuntimeError(f"Expected hidden[{index}] size {expected}, got {list(state.shape)}")
        if hx_refused is not None:
            raise hx_refused
        for state in (h0, c0):
            if state.device != data.device:
                raise RuntimeError(
                    f"Input and hidden tensors are not at the same device, found input tensor at {data.device} "
                    f"and hidden tensor at {state.device}"
                )
    for w in weights:
        if w.device != data.device:
            raise RuntimeError(
                f"Input and parameter tensors are not at the same device, found input tensor at {data.device} "
                f"and parameter tensor at {w.device}"
            )
    if not packed and data.shape[1 if batched and batch_first else 0] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    if hx is not None:
        for index, state in enumerate((h0, c0)):
            if cast(state.dtype) != cast(data.dtype):
                raise RuntimeError(f"LSTM: hx[{index}] dtype ({state.dtype}) does not match input dtype ({data.dtype})")
    # (traced, the function itself: dynamo warns of an lru_cache it would ignore)
    weight_layout = _weight_layout.__wrapped__ if torch.compiler.is_compiling() else _weight_layout
    layout = weight_layout(input_size, hidden_size, proj_size, num_layers, num_directions, has_biases)
    for w, (name, shape) in zip(weights, layout):
        if cast(w.dtype) != cast(weight_dtype):
            raise RuntimeError(f"LSTM: {name} dtype ({w.dtype}) does not match weight_ih_l0 dtype ({weight_dtype})")
        if w.shape != shape:
            raise RuntimeError(f"Expected {name} size {shape}, got {list(w.shape)}")
    if cast(data.dtype) != cast(weight_dtype):
        # under autocast, where nn.LSTM's kernel meets them (a RuntimeError); without it, checked first (above)
        raise RuntimeError(f"LSTM under autocast: input dtype {data.dtype} runs in {cast(data.dtype)}, the weights' "
                           f"{weight_dtype} in {cast(weight_dtype)}: they must meet in one dtype")
    if _settings_error is not None:
        raise _settings_error
    if seed is not None:  # what nn.LSTM checks first, then ours
        seed = check_seed(seed)

    dtype = cast(data.dtype)
    chosen = backends.resolve(backend, data.device, dtype)
    # (a tensor already in dtype as it is: .to's call alone costs the GPU's host microseconds a tensor)
    weights = [w if w.dtype == dtype else w.to(dtype) for w in weights]

    # [T, B, I] time-major, rows in the caller's order; lengths [B] for packed input
    lengths = None
    if packed:
        time_index, batch_index, lengths = _packed_index(batch_sizes, sorted_indices, data.device)
        x = data.new_zeros(batch_sizes.shape[0], batch, input_size).index_put((time_index, batch_index), data)
    elif not batched:
        x = data.unsqueeze(1)
    else:
        x = data.transpose(0, 1) if batch_first else data
    x = x if x.dtype == dtype else x.to(dtype)
    if hx is None:
        h0, c0 = zero_states(x, num_layers * num_directions, batch, real_hidden_size, hidden_size)
    else:
        h0, c0 = h0.to(dtype), c0.to(dtype)
    # drawn once the input is laid out, which reads the packed input's sorted_indices: a failure there leaves
    # the generator as it was
    if not (training and reg.draws_masks(num_layers)):
        seed = torch.zeros((), dtype=torch.int64)
    elif seed is None:
        seed = _compiled_draw_seed(x.detach()) if torch.compiler.is_compiling() else draw_seed()

    if chosen != "reference" and _transformed(x, h0, c0, *weights):
        chosen = "reference"
    with torch.autocast(data.device.type, enabled=False) if autocast_on else contextlib.nullcontext():
        out, h_n, c_n = backends.module(chosen).run(
            x,
            h0,
            c0,
            split_flat_weights(weights, num_layers, num_directions, has_biases, has_proj),
            num_directions=num_directions,
            reg=reg,
            training=training,
            seed=seed,
            lengths=lengths,
        )

    if packed:
        return PackedSequence(out[time_index, batch_index], batch_sizes, sorted_indices, unsorted_indices), (h_n, c_n)
    if not batched:
        return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
    if batch_first:
        out = out.transpose(0, 1)  # a view, as nn.LSTM returns it
    return out, (h_n, c_n)
