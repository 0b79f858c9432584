"""Every mask of a training forward, drawn from Philox as docs/randomness.md lays out.

Keep-masks are True where an element is kept; zoneout masks are True where a unit keeps its previous
value. The kernels draw the same bits in place; this module is what the reference and
`LSTM.sample_masks` use.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import philox
from .regularizers import ArgumentTypeError, Regularizers


def check_count(name: str, value, minimum: int) -> int:
    """A user's sequence length or batch size: an int (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def keep_mask(draws: Tensor, p: float) -> Tensor:
    """Dropout keep-mask: an element is dropped iff its draw < threshold(p)."""
    return draws >= philox.threshold(p)


def zoneout_mask(draws: Tensor, p: float) -> Tensor:
    """Zoneout mask: a unit keeps its previous value iff its draw < threshold(p)."""
    return draws < philox.threshold(p)


def feature_keep_mask(seed: int | Tensor, kind: int, index: int, p: float, steps: int, batch: int, features: int, device) -> Tensor | None:
    """Keep-mask [steps, batch, features] of an input-side dropout (KIND_INPUT / KIND_OUTPUT), or None for p = 0."""
    if p == 0:
        return None
    t = torch.arange(steps, dtype=torch.int64, device=device)
    draws = philox.packed_draws(seed, kind, index, t, batch * features, device)
    return keep_mask(draws, p).reshape(steps, batch, features)


def weight_keep_mask(seed: int | Tensor, k: int, p: float, rows: bool, hidden_size: int, real_hidden_size: int, device) -> Tensor | None:
    """Keep-mask [4H, H_out] (or [4H, 1] when whole rows drop) of W_hh of layer-direction k, or None for p = 0."""
    if p == 0:
        return None
    columns = 1 if rows else real_hidden_size
    draws = philox.packed_draws(seed, philox.KIND_WEIGHT, k, 0, 4 * hidden_size * columns, device)
    return keep_mask(draws, p).reshape(4 * hidden_size, columns)


def unit_masks(reg: Regularizers, seed: int | Tensor, k: int, seq_len: int, batch: int, hidden_size: int, real_hidden_size: int, device) -> dict:
    """The masks of layer-direction k drawn per unit: hidden, update, cell, zoneout_h, zoneout_c (None where off)."""
    out = dict(hidden=None, update=None, cell=None, zoneout_h=None, zoneout_c=None)
    update_per_sequence = reg.update_dropout > 0 and not reg.update_per_step
    if reg.recurrent_dropout > 0 or reg.cell_dropout > 0 or update_per_sequence:
        words = philox.unit_draws(seed, philox.KIND_SEQUENCE, k, 0, batch, hidden_size, device)
        if reg.recurrent_dropout > 0:
            out["hidden"] = keep_mask(words[philox.WORD_HIDDEN][0, :, :real_hidden_size], reg.recurrent_dropout)
        if reg.cell_dropout > 0:
            out["cell"] = keep_mask(words[philox.WORD_CELL][0], reg.cell_dropout)
        if update_per_sequence:
            out["update"] = keep_mask(words[philox.WORD_UPDATE], reg.update_dropout)
    update_per_step = reg.update_dropout > 0 and reg.update_per_step
    if reg.zoneout_h > 0 or reg.zoneout_c > 0 or update_per_step:
        t = torch.arange(seq_len, dtype=torch.int64, device=device)
        words = philox.unit_draws(seed, philox.KIND_STEP, k, t, batch, hidden_size, device)
        if reg.zoneout_h > 0:
            out["zoneout_h"] = zoneout_mask(words[philox.WORD_ZONEOUT_H][:, :, :real_hidden_size], reg.zoneout_h)
        if reg.zoneout_c > 0:
            out["zoneout_c"] = zoneout_mask(words[philox.WORD_ZONEOUT_C], reg.zoneout_c)
        if update_per_step:
            out["update"] = keep_mask(words[philox.WORD_UPDATE], reg.update_dropout)
    return out


def sample_masks(
    reg: Regularizers,
    *,
    num_layers: int,
    num_directions: int,
    input_size: int,
    hidden_size: int,
    proj_size: int,
    seq_len: int,
    batch_size: int,
    seed: int | Tensor,
    device=None,
) -> dict:
    """All masks of a training forward with this seed, as SPEC.md section 4 lists them."""
    device = torch.device("cpu") if device is None else torch.device(device)
    real_hidden_size = proj_size if proj_size > 0 else hidden_size
    io_steps = 1 if reg.locked else seq_len
    layer_inputs = [input_size] + [num_directions * real_hidden_size] * (num_layers - 1)
    masks = {
        "input": [
            feature_keep_mask(seed, philox.KIND_INPUT, layer, reg.layer_input_dropout(layer), io_steps, batch_size, features, device)
            for layer, features in enumerate(layer_inputs)
        ],
        "output": feature_keep_mask(
            seed, philox.KIND_OUTPUT, 0, reg.output_dropout, io_steps, batch_size, num_directions * real_hidden_size, device
        ),
        "hidden": [], "weight": [], "update": [], "cell": [], "zoneout_h": [], "zoneout_c": [],
    }
    for k in range(num_layers * num_directions):
        units = unit_masks(reg, seed, k, seq_len, batch_size, hidden_size, real_hidden_size, device)
        units["weight"] = weight_keep_mask(seed, k, reg.weight_dropout, reg.weight_rows, hidden_size, real_hidden_size, device)
        for name, mask in units.items():
            masks[name].append(mask)
    return masks
