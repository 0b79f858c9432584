"""`fused_rnn.lstm`: nn.LSTM's forward as a function of its weights, with every regularizer.

This layer checks the input (nn.LSTM's exceptions and wording where nn.LSTM checks the same thing),
turns every input form (batch_first, unbatched, PackedSequence) into a time-major padded batch in the
caller's row order, draws the seed, and hands that to a backend.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from . import backends
from .philox import SEED_LIMIT
from .regularizers import Regularizers
from .stack import split_flat_weights


def draw_seed() -> Tensor:
    """One 64-bit seed in [0, 2**63 - 1) from torch's default CPU generator, as a 0-dim int64 CPU tensor.

    A tensor, not an int, and drawn out of place, so that torch.compile traces the draw into the graph.
    """
    return torch.randint(0, SEED_LIMIT - 1, (), dtype=torch.int64)


def check_seed(seed) -> Tensor:
    """A user's seed (an int in [0, 2**63)) as a 0-dim int64 CPU tensor."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed}")
    return torch.tensor(int(seed), dtype=torch.int64)


def _check_packed(data: Tensor, batch_sizes: Tensor) -> None:
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
) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
    """nn.LSTM's forward with the regularizers of SPEC.md.

    weights: nn.LSTM's flat weights in its order (w_ih, w_hh[, b_ih, b_hh][, w_hr] per layer and direction).
    Returns output (a PackedSequence for packed input) and (h_n, c_n), shaped as nn.LSTM returns them.
    """
    reg = Regularizers() if regularizers is None else regularizers
    backend = backends.check_backend_name(backend)
    if seed is not None:
        seed = check_seed(seed)
    num_directions = 2 if bidirectional else 1
    per_layer = len(weights) // (num_layers * num_directions)
    has_proj = per_layer == 3 + 2 * has_biases
    if len(weights) != num_layers * num_directions * (2 + 2 * has_biases + has_proj):
        raise ValueError(
            f"expected {2 + 2 * has_biases} or {3 + 2 * has_biases} weights per layer and direction "
            f"({num_layers} layers, {num_directions} directions), got {len(weights)} weights"
        )
    w_ih0, w_hh0 = weights[0], weights[1]
    input_size, hidden_size, real_hidden_size = w_ih0.shape[1], w_hh0.shape[0] // 4, w_hh0.shape[1]

    packed = isinstance(input, PackedSequence)
    if packed:
        data, batch_sizes, sorted_indices, unsorted_indices = input
    else:
        data, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
        if data.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {data.dim()}D instead")
    autocast = torch.is_autocast_enabled(data.device.type)
    if data.dtype != w_ih0.dtype and not autocast:
        raise ValueError(
            f"RNN input dtype ({data.dtype}) does not match weight dtype ({w_ih0.dtype}). "
            f"Convert input: input.to({w_ih0.dtype}), or convert model: model.to({data.dtype})"
        )
    if not data.is_floating_point():
        raise ValueError(f"LSTM: input must be a floating-point tensor, got {data.dtype}")
    if packed and data.dim() != 2:
        raise RuntimeError(f"input must have 2 dimensions, got {data.dim()}")
    if data.size(-1) != input_size:
        raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {input_size}, got {data.size(-1)}")
    for w in weights:
        if w.device != data.device:
            raise RuntimeError(
                f"Input and parameter tensors are not at the same device, found input tensor at {data.device} "
                f"and parameter tensor at {w.device}"
            )
        if w.dtype != w_ih0.dtype:
            raise RuntimeError(f"LSTM: all weights must have the same dtype, found {w_ih0.dtype} and {w.dtype}")
    if packed:
        _check_packed(data, batch_sizes)

    batched = packed or data.dim() == 3
    if packed:
        batch = int(batch_sizes[0])
    elif batched:
        batch = data.shape[0] if batch_first else data.shape[1]
    else:
        batch = 1
    if hx is not None:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2 or not all(isinstance(h, Tensor) for h in hx):
            raise TypeError("LSTM: hx must be a tuple (h_0, c_0) of two tensors")
        h0, c0 = hx
        want = 3 if batched else 2
        if h0.dim() != want or c0.dim() != want:
            form = "batched 3-D" if batched else "unbatched 2-D"
            raise RuntimeError(
                f"For {form} input, hx and cx should also be {want}-D but got ({h0.dim()}-D, {c0.dim()}-D) tensors"
            )
        if not batched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        for index, (state, size) in enumerate(((h0, real_hidden_size), (c0, hidden_size))):
            expected = (num_layers * num_directions, batch, size)
            if state.shape != expected:
                raise RuntimeError(f"Expected hidden[{index}] size {expected}, got {list(state.shape)}")
            if state.device != data.device:
                raise RuntimeError(
                    f"Input and hidden tensors are not at the same device, found input tensor at {data.device} "
                    f"and hidden tensor at {state.device}"
                )
            if state.dtype != data.dtype and not autocast:
                raise RuntimeError(f"LSTM: hx[{index}] dtype ({state.dtype}) does not match input dtype ({data.dtype})")
    if not packed and data.shape[1 if batched and batch_first else 0] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")

    if not (training and reg.is_random):
        seed = torch.zeros((), dtype=torch.int64)
    elif seed is None:
        seed = draw_seed()
    dtype = torch.get_autocast_dtype(data.device.type) if autocast else data.dtype
    weights = [w.to(dtype) for w in weights]

    # [T, B, I] time-major, rows in the caller's order; lengths [B] for packed input
    lengths = None
    if packed:
        time_index, batch_index, lengths = _packed_index(batch_sizes, sorted_indices, data.device)
        x = data.new_zeros(batch_sizes.shape[0], batch, input_size).index_put((time_index, batch_index), data)
    elif not batched:
        x = data.unsqueeze(1)
    else:
        x = data.transpose(0, 1) if batch_first else data
    x = x.to(dtype)
    if hx is None:
        h0 = x.new_zeros(num_layers * num_directions, batch, real_hidden_size)
        c0 = x.new_zeros(num_layers * num_directions, batch, hidden_size)
    else:
        h0, c0 = h0.to(dtype), c0.to(dtype)

    chosen = backends.resolve(backend, x.device, dtype)
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
        out = out.transpose(0, 1).contiguous()
    return out, (h_n, c_n)
