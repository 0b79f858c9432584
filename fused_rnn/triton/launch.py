"""Launchers: buffers, grids and the time loop around the kernels of kernels.py."""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
from torch import Tensor

from .. import philox
from ..regularizers import Regularizers
from . import cell
from .kernels import (
    backward_projection_cell_kernel,
    backward_step_kernel,
    forward_step_kernel,
    hidden_dropout_kernel,
    packed_dropout_kernel,
    projection_step_kernel,
)

ELEMENTWISE_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class StepFlags:
    """Which regularizers a recurrence compiles in (the kernels' constexprs)."""

    hidden: bool
    update: int  # cell.UPDATE_*
    cell: bool
    zoneout_h: int  # cell.ZONEOUT_*
    zoneout_c: int
    weight: bool
    weight_rows: bool

    @classmethod
    def of(cls, reg: Regularizers, training: bool) -> "StepFlags":
        if not training:
            mean = lambda p: cell.ZONEOUT_MEAN if p > 0 else cell.ZONEOUT_OFF  # noqa: E731
            return cls(False, cell.UPDATE_OFF, False, mean(reg.zoneout_h), mean(reg.zoneout_c), False, False)
        update = cell.UPDATE_OFF
        if reg.update_dropout > 0:
            update = cell.UPDATE_STEP if reg.update_per_step else cell.UPDATE_SEQUENCE
        masked = lambda p: cell.ZONEOUT_MASK if p > 0 else cell.ZONEOUT_OFF  # noqa: E731
        return cls(
            reg.recurrent_dropout > 0,
            update,
            reg.cell_dropout > 0,
            masked(reg.zoneout_h),
            masked(reg.zoneout_c),
            reg.weight_dropout > 0,
            reg.weight_rows,
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The state and accumulation dtype: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def step_parameters(reg: Regularizers, seed: Tensor, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The int64 (seed, thresholds) and float (scales, zoneout p) tensors the kernels load; slots in cell.py."""
    ints = torch.tensor(
        [
            0,
            philox.threshold(reg.recurrent_dropout),
            philox.threshold(reg.update_dropout),
            philox.threshold(reg.cell_dropout),
            philox.threshold(reg.zoneout_h),
            philox.threshold(reg.zoneout_c),
            philox.threshold(reg.weight_dropout),
            0,
        ],
        dtype=torch.int64,
    )
    ints[cell.INT_SEED] = seed
    floats = torch.tensor(
        [
            philox.keep_scale(reg.recurrent_dropout),
            philox.keep_scale(reg.update_dropout),
            philox.keep_scale(reg.cell_dropout),
            reg.zoneout_h,
            reg.zoneout_c,
            philox.keep_scale(reg.weight_dropout),
        ],
        dtype=compute_dtype(dtype),
    )
    return ints.to(device), floats.to(device)


def dropout_parameters(p: float, seed: Tensor, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Seed and threshold (slots 0, 1) and scale (slot 0) of one bulk dropout."""
    ints = torch.tensor([0, philox.threshold(p)], dtype=torch.int64)
    ints[0] = seed
    return ints.to(device), torch.tensor([philox.keep_scale(p)], dtype=compute_dtype(dtype)).to(device)


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 products use TF32 where cuDNN would (torch.backends.cudnn.allow_tf32, nn.LSTM's switch)."""
    if dtype == torch.float64:
        return "ieee"
    if dtype == torch.float32:
        return "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "ieee"
    return "default"


def tile_sizes(batch: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_H, BLOCK_K): tl.dot needs 16 or more on every side."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # the interpreter runs programs one after another: few programs, wide tiles
        return max(16, triton.next_power_of_2(batch)), 64, 64
    return min(64, max(16, triton.next_power_of_2(batch))), 32, 32


def packed_dropout(
    x: Tensor, out: Tensor, ints: Tensor, floats: Tensor, threshold_slot: int, scale_slot: int,
    kind: int, stream: int, group: int = 1, locked: bool = False,
) -> Tensor:
    """out[t] = bulk dropout of x[t] with the layout's packed draws; x, out: [steps, ...] contiguous."""
    steps = x.shape[0]
    numel = x[0].numel() if steps else 0
    if numel:
        grid = (steps, triton.cdiv(numel, ELEMENTWISE_BLOCK))
        packed_dropout_kernel[grid](
            x, out, ints, floats, threshold_slot, scale_slot, kind, stream, numel, group,
            LOCKED=locked, BLOCK=ELEMENTWISE_BLOCK,
        )
    return out


def feature_dropout(x: Tensor, seed: Tensor, kind: int, index: int, p: float, locked: bool) -> Tensor:
    """The input / between-layer / output dropout of x [T, B, F] (kinds 1, 2 of docs/randomness.md)."""
    x = x.contiguous()
    ints, floats = dropout_parameters(p, seed, x.device, x.dtype)
    return packed_dropout(x, torch.empty_like(x), ints, floats, 1, 0, kind, index, locked=locked)


def dropped_weight(w: Tensor, ints: Tensor, floats: Tensor, stream: int, rows: bool) -> Tensor:
    """W_hh [4H, H_out] after weight drop (or a gradient of that shape scaled by the same mask)."""
    w = w.contiguous()
    out = torch.empty_like(w)
    return packed_dropout(
        w.unsqueeze(0), out.unsqueeze(0), ints, floats, cell.INT_WEIGHT, cell.FLOAT_WEIGHT,
        philox.KIND_WEIGHT, stream, group=w.shape[1] if rows else 1,
    ).squeeze(0)


def _positions(seq_len: int, reverse: bool) -> range:
    return range(seq_len - 1, -1, -1) if reverse else range(seq_len)


def layer_forward(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, bias: Tensor | None, w_hr: Tensor | None,
    lengths: Tensor | None, ints: Tensor, floats: Tensor, flags: StepFlags, stream: int, reverse: bool,
) -> tuple[Tensor, ...]:
    """One layer-direction. x [T, B, I]; h0 [B, H_out]; c0 [B, H]; w_hh already in its final dtype.

    Returns out [T, B, H_out], h_n, c_n and what the backward needs: xg (gate activations), rs, cs, hpre.
    """
    seq_len, batch, _ = x.shape
    hidden, real_hidden = w_hh.shape[0] // 4, w_hh.shape[1]
    dtype = compute_dtype(x.dtype)
    # [T, B, 4H]: every step's input projection in one GEMM
    xg = torch.matmul(x, w_ih.t())
    if bias is not None:
        xg = xg + bias
    xg = xg.to(dtype).contiguous()
    w = dropped_weight(w_hh, ints, floats, stream, flags.weight_rows) if flags.weight else w_hh.contiguous()
    hs = torch.empty(seq_len + 1, batch, real_hidden, dtype=dtype, device=x.device)
    cs = torch.empty(seq_len + 1, batch, hidden, dtype=dtype, device=x.device)
    first, last = (seq_len, 0) if reverse else (0, seq_len)
    hs[first] = h0
    cs[first] = c0
    rs = torch.empty_like(hs) if flags.hidden else hs
    out = torch.empty(seq_len, batch, real_hidden, dtype=dtype, device=x.device)
    hpre = torch.empty(seq_len, batch, hidden, dtype=dtype, device=x.device) if w_hr is not None else out
    lengths_arg = lengths if lengths is not None else hs
    block_b, block_h, block_k = tile_sizes(batch)
    if flags.hidden:
        hidden_dropout_kernel[(triton.cdiv(batch, block_b), triton.cdiv(real_hidden, block_h))](
            hs, rs, ints, floats, first, stream, batch, hidden, real_hidden, BLOCK_B=block_b, BLOCK_H=block_h
        )
    has_proj = w_hr is not None
    precision = dot_precision(w.dtype, x.device)
    cell_grid = (triton.cdiv(batch, block_b), triton.cdiv(hidden, block_h))
    proj_grid = (triton.cdiv(batch, block_b), triton.cdiv(real_hidden, block_h))
    for t in _positions(seq_len, reverse):
        forward_step_kernel[cell_grid](
            xg, w, hs, rs, cs, out, hpre, lengths_arg, ints, floats, t, int(reverse), stream, batch, hidden, real_hidden,
            HIDDEN=flags.hidden and not has_proj, UPDATE=flags.update, CELL=flags.cell,
            ZONEOUT_H=cell.ZONEOUT_OFF if has_proj else flags.zoneout_h, ZONEOUT_C=flags.zoneout_c,
            HAS_LENGTHS=lengths is not None, HAS_PROJ=has_proj, PRECISION=precision,
            BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k,
        )
        if has_proj:
            projection_step_kernel[proj_grid](
                hpre, w_hr, hs, rs, out, lengths_arg, ints, floats, t, int(reverse), stream, batch, hidden, real_hidden,
                HIDDEN=flags.hidden, ZONEOUT_H=flags.zoneout_h, HAS_LENGTHS=lengths is not None,
                PRECISION=dot_precision(w_hr.dtype, x.device), BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k,
            )
    return out, hs[last], cs[last], xg, rs, cs, hpre


def layer_backward(
    d_out: Tensor, d_h_n: Tensor, d_c_n: Tensor, x: Tensor, w_ih: Tensor, w_hh: Tensor, w_hr: Tensor | None,
    lengths: Tensor | None, ints: Tensor, floats: Tensor, flags: StepFlags, stream: int, reverse: bool,
    xg: Tensor, rs: Tensor, cs: Tensor, hpre: Tensor,
) -> tuple[Tensor, ...]:
    """Backward through time of layer_forward. Returns dx, dh0, dc0, dw_ih, dw_hh, dbias, dw_hr (None without proj)."""
    seq_len, batch, _ = x.shape
    hidden, real_hidden = w_hh.shape[0] // 4, w_hh.shape[1]
    dtype = compute_dtype(x.dtype)
    has_proj = w_hr is not None
    w = dropped_weight(w_hh, ints, floats, stream, flags.weight_rows) if flags.weight else w_hh.contiguous()
    dgates = torch.empty(seq_len, batch, 4 * hidden, dtype=dtype, device=x.device)
    gh = d_h_n.to(dtype).contiguous().clone()
    gc = d_c_n.to(dtype).contiguous().clone()
    d_out = d_out.to(dtype).contiguous()
    dht = torch.empty(seq_len, batch, real_hidden, dtype=dtype, device=x.device) if has_proj else d_out
    lengths_arg = lengths if lengths is not None else gh
    block_b, block_h, block_k = tile_sizes(batch)
    precision = dot_precision(w.dtype, x.device)
    h_grid = (triton.cdiv(batch, block_b), triton.cdiv(real_hidden, block_h))
    cell_grid = (triton.cdiv(batch, block_b), triton.cdiv(hidden, block_h))

    def step(t: int, t_next: int, has_next: bool, is_step: bool) -> None:
        backward_step_kernel[h_grid](
            dgates, xg, w, cs, d_out, gh, gc, dht, lengths_arg, ints, floats, t, t_next, int(reverse), stream,
            batch, hidden, real_hidden,
            HIDDEN=flags.hidden, UPDATE=flags.update, CELL=flags.cell, ZONEOUT_H=flags.zoneout_h,
            ZONEOUT_C=flags.zoneout_c, HAS_LENGTHS=lengths is not None, HAS_PROJ=has_proj, HAS_NEXT=has_next,
            STEP=is_step, PRECISION=precision, BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k,
        )

    order = list(_positions(seq_len, reverse))[::-1]
    for index, t in enumerate(order):
        step(t, order[index - 1] if index else t, index > 0, True)
        if has_proj:
            backward_projection_cell_kernel[cell_grid](
                dgates, xg, w_hr, cs, gc, dht, lengths_arg, ints, floats, t, int(reverse), stream,
                batch, hidden, real_hidden,
                UPDATE=flags.update, CELL=flags.cell, ZONEOUT_C=flags.zoneout_c, HAS_LENGTHS=lengths is not None,
                PRECISION=dot_precision(w_hr.dtype, x.device), BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k,
            )
    step(order[-1], order[-1], True, False)

    # weight and input gradients: one GEMM each over the whole sequence
    dg = dgates.reshape(seq_len * batch, 4 * hidden)
    r_prev = rs[int(reverse) : seq_len + int(reverse)].reshape(seq_len * batch, real_hidden)
    dw_hh = dg.t() @ r_prev
    if flags.weight:
        dw_hh = dropped_weight(dw_hh, ints, floats, stream, flags.weight_rows)
    x2 = x.reshape(seq_len * batch, -1)
    dx = (dg.to(w_ih.dtype) @ w_ih).reshape(x.shape)
    dw_ih = dg.t().to(x.dtype) @ x2
    dbias = dg.sum(0)
    dw_hr = None
    if has_proj:
        dw_hr = dht.reshape(seq_len * batch, real_hidden).t() @ hpre.reshape(seq_len * batch, hidden)
    return dx, gh, gc, dw_ih, dw_hh.to(w_hh.dtype), dbias, dw_hr
