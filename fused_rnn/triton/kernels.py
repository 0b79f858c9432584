"""Triton kernels of the LSTM recurrence, forward and backward through time: one launch per step,
persistent (every step in one launch), and W~-resident (README.md, "Three ways to run the time loop").

Buffers (time-major, rows in the caller's batch order, T positions). Position t reads state
t + reverse and writes state t + 1 - reverse, so both directions walk the same buffers. "Stored" is the
layer's own dtype (x's), what the backward keeps, as cuDNN keeps its reserve; "compute" is float32
(float64 for float64), what the recurrence carries from step to step.
  xg      [T, B, 4H]      stored: the input projection plus biases; the forward overwrites it with the
                          gate activations i, f, g, o that the backward reads
  h_carry [2, B, H_out]   compute: h state s at s % 2
  c_carry [2, B, H]       compute: c state s at s % 2
  rs      [T + 1, B, H_out]  stored: every h state after recurrent dropout, the next step's product
                          operand (W~'s dtype, for tensor-core products) and dL/dW_hh's
  cs      [T + 1, B, H]      stored: every c state, for the backward
  out     [T, B, H_out]   stored: the layer's output, h_t, or 0 past a row's length; after the stack's
                          output dropout where the layer applies it (output_dropped)
  hpre    [T, B, H]       compute: o * tanh(c~) before the projection (proj_size > 0 only)
  seed    [1]             int64: the call's seed, every kernel's first argument (launch.seed_tensor;
                          read by cell.seed_value)
Backward:
  dgates [T, B, 4H]    stored: dL/dgates, the next step's product operand and the weight GEMMs' after
                       the loop (may be xg itself)
  db    [cdiv(B, BLOCK_B), 4H]  compute: dL/dbias summed over the rows of each row tile and every step,
                       from the unrounded dL/dgates (each element belongs to one tile: no atomics)
A tile is rows [pid_b * BLOCK_B, ...) and units [pid_h * BLOCK_H, ...) with the four gates of its
units, so the cell math needs nothing from another tile. Derivations: README.md.
"""

import triton
import triton.language as tl

from .cell import (
    FLOAT_CELL,
    FLOAT_HIDDEN,
    FLOAT_OUTPUT,
    FLOAT_UPDATE,
    FLOAT_WEIGHT,
    FLOAT_ZONEOUT_C,
    FLOAT_ZONEOUT_H,
    INT_OUTPUT,
    INT_OUTPUT_LOCKED,
    INT_WEIGHT,
    INT_ZONEOUT_C_MODE,
    INT_ZONEOUT_H_MODE,
    KIND_OUTPUT,
    KIND_WEIGHT,
    cell_backward,
    cell_forward,
    keep_scaled,
    not_fires,
    rounded,
    seed_value,
    setting,
    step_settings,
    store_rounded,
    tile_dot,
    unit_masks,
    zoneout,
    zoneout_backward,
)


@triton.jit(do_not_specialize=["threshold_slot", "scale_slot", "kind", "stream", "numel", "blocks_per_step", "group",
                               "locked"])
def packed_dropout_kernel(
    seed_ptr, x_ptr, y_ptr, x2_ptr, y2_ptr, ints_ptr, floats_ptr, threshold_slot, scale_slot, kind, stream, numel,
    blocks_per_step, group, locked, BLOCK: tl.constexpr, PAIRED: tl.constexpr,
):
    """y[t] = x[t] * keep * scale for the bulk masks (kinds input, output, weight); PAIRED: y2[t] = x2[t] * keep *
    scale too, with the same draws (a layer's input and the gradient of its dropped input).

    x, y (x2, y2): [steps, numel]; mask element m = e // group (group = H_out for whole rows of W_hh, else 1)
    reads word m % 4 of Philox(m // 4, t or 0 when locked, stream, kind). Grid: steps * blocks_per_step
    programs on axis 0, the only one not capped at 65535; a program's block lies within one step.
    """
    pid = tl.program_id(0)
    t = pid // blocks_per_step
    e = (pid % blocks_per_step) * BLOCK + tl.arange(0, BLOCK)
    inside = e < numel
    keep = bulk_keep(seed_ptr, ints_ptr, threshold_slot, e // group, t * (1 - locked), stream, kind)
    offset = t.to(tl.int64) * numel + e
    scale = tl.load(floats_ptr + scale_slot)
    # half inputs are scaled in float32 (the scale's dtype), as the reference computes them
    x = tl.load(x_ptr + offset, mask=inside, other=0.0).to(floats_ptr.dtype.element_ty)
    store_rounded(y_ptr + offset, keep_scaled(x, keep, scale), inside)
    if PAIRED:
        x2 = tl.load(x2_ptr + offset, mask=inside, other=0.0).to(floats_ptr.dtype.element_ty)
        store_rounded(y2_ptr + offset, keep_scaled(x2, keep, scale), inside)


@triton.jit
def bulk_draw(seed, m, step, stream, kind):
    """The draw of a bulk mask's element m (any shape) of `step`: word m % 4 of Philox(m // 4, step, stream,
    kind) (docs/randomness.md)."""
    w0, w1, w2, w3 = tl.philox(seed_value(seed), (m // 4).to(tl.uint32), step, stream, kind)
    word = m % 4
    return tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))


@triton.jit
def bulk_keep(seed, ints_ptr, threshold_slot, m, step, stream, kind):
    """Whether a bulk mask keeps mask element m of `step`: bulk_draw against the threshold in slot threshold_slot."""
    return not_fires(bulk_draw(seed, m, step, stream, kind), tl.load(ints_ptr + threshold_slot))


@triton.jit
def output_dropped(x, seed, rows, units, t, ints, floats, H_out):
    """x [BB, BH], a tile (rows, units of H_out) of out[t] or of dL/dout[t] in x's dtype, in the compute dtype
    (floats'), after the stack's output dropout where this layer applies it (INT_OUTPUT nonzero): the mask
    packed_dropout_kernel draws for out (element b * H_out + j of step t, or 0 locked; stream 0), inverted
    scaling, so that the values are the bits a launch of it after the recurrence gave."""
    scale = setting(floats, FLOAT_OUTPUT)
    x = x.to(scale.dtype)
    threshold = setting(ints, INT_OUTPUT)
    if threshold != 0:
        step = t * (1 - setting(ints, INT_OUTPUT_LOCKED).to(tl.int32))  # a Philox counter word: 32 bits
        keep = not_fires(bulk_draw(seed, rows * H_out + units, step, 0, KIND_OUTPUT), threshold)
        x = keep_scaled(x, keep, scale)
    return x


@triton.jit
def weight_dropped(w, m, seed, ints_ptr, floats_ptr, stream):
    """Elements of W_hh after weight drop, in the compute dtype (floats_ptr's): mask element m (W_hh's element,
    or its row in row mode) drawn as packed_dropout_kernel draws it, inverted scaling."""
    keep = bulk_keep(seed, ints_ptr, INT_WEIGHT, m, 0, stream, KIND_WEIGHT)
    return keep_scaled(w.to(floats_ptr.dtype.element_ty), keep, tl.load(floats_ptr + FLOAT_WEIGHT))


@triton.jit(do_not_specialize=["stream", "R", "C", "rows"])
def transposed_weight_dropout_kernel(
    seed_ptr, w_ptr, w_t_ptr, ints_ptr, floats_ptr, stream, R, C, rows,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """w_t [C, R] = (W [R, C] after weight drop) transposed, in one pass: packed_dropout_kernel's mask of W's
    elements (or of whole rows, where rows), element r * C + c (row r) drawn as there. Grid (R / BLOCK_R, C / BLOCK_C)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    inside = (r < R) & (c < C)
    element = r * C + c  # W_hh's elements are indexed in 32 bits by packed_dropout_kernel too
    w = tl.load(w_ptr + element, mask=inside, other=0.0)
    y = weight_dropped(w, tl.where(rows != 0, r, element), seed_ptr, ints_ptr, floats_ptr, stream)
    # written along R: the compiler moves the tile through shared memory so that both sides are coalesced
    store_rounded(w_t_ptr + c * R + r, y, inside)


@triton.jit(do_not_specialize=["state", "stream", "B", "H", "H_out"])
def initial_state_kernel(
    seed_ptr, h0_ptr, c0_ptr, h_carry_ptr, c_carry_ptr, rs_ptr, cs_ptr, ints_ptr, floats_ptr, state, stream,
    B, H, H_out, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """The states before the first step, at state: h_carry[state % 2] = h0 and c_carry[state % 2] = c0 in
    the compute dtype, cs[state] = c0, and rs[state] = h0 after recurrent dropout (a copy where it is
    off). h0 [B, H_out], c0 [B, H], in x's dtype; a grid over rows and max(H, H_out) units."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
    units = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
    carry = (state % 2).to(tl.int64)
    inside = (rows < B) & (units < H_out)
    here = rows * H_out + units
    h = tl.load(h0_ptr + here, mask=inside, other=0.0).to(h_carry_ptr.dtype.element_ty)
    tl.store(h_carry_ptr + carry * B * H_out + here, h, mask=inside)
    hidden_keep, _, _, _, _ = unit_masks(ints_ptr, seed_ptr, rows, units, H, 0, stream)
    r = keep_scaled(h, hidden_keep, setting(floats_ptr, FLOAT_HIDDEN))
    store_rounded(rs_ptr + state.to(tl.int64) * B * H_out + here, r, inside)
    inside = (rows < B) & (units < H)
    here = rows * H + units
    c = tl.load(c0_ptr + here, mask=inside, other=0.0)
    store_rounded(cs_ptr + state.to(tl.int64) * B * H + here, c, inside)
    tl.store(c_carry_ptr + carry * B * H + here, c.to(c_carry_ptr.dtype.element_ty), mask=inside)


@triton.jit
def row_is_active(lengths_ptr, rows, B, t, has_lengths):
    """[BB, 1]: whether position t lies inside each row's sequence (lengths_ptr: [B] int64, if has_lengths)."""
    active = rows >= 0
    if has_lengths != 0:
        active = t < tl.load(lengths_ptr + rows, mask=rows < B, other=0)
    return active


@triton.jit
def finish_h(
    h_tilde, h_prev, hidden_keep, zone_h, rows, units, inside, active, t, reverse, seed,
    h_carry_ptr, rs_ptr, out_ptr, ints, floats, B, H_out, OUTPUT_DROPOUT: tl.constexpr,
):
    """From h~ (after any projection): zoneout on h, frozen rows, and the stores of h_t, its dropped copy
    (in rs, for the next step's product) and the output, after the stack's output dropout with
    OUTPUT_DROPOUT (output_dropped; launch.output_dropped_in_loop). h_prev: the state before, loaded here
    where None."""
    if h_prev is None:
        h_prev = previous_h(h_carry_ptr, rows, units, inside, t, reverse, B, H_out)
    here = rows * H_out + units
    new = t + 1 - reverse
    h_new = zoneout(h_prev, h_tilde, zone_h, setting(floats, FLOAT_ZONEOUT_H), setting(ints, INT_ZONEOUT_H_MODE))
    h_state = tl.where(active, h_new, h_prev)
    tl.store(h_carry_ptr + (new % 2).to(tl.int64) * B * H_out + here, h_state, mask=inside)
    out = tl.where(active, h_new, 0.0)
    if OUTPUT_DROPOUT:
        # out as stored (x's dtype), then its dropout in the compute dtype, as a launch after the loop computes it
        out = output_dropped(rounded(out, out_ptr.dtype.element_ty), seed, rows, units, t, ints, floats, H_out)
    store_rounded(out_ptr + t.to(tl.int64) * B * H_out + here, out, inside)
    # without recurrent dropout every unit is kept at scale 1, exactly h; the mask is fixed for the
    # sequence, so a frozen row's dropped copy stays what it was
    r = keep_scaled(h_state, hidden_keep, setting(floats, FLOAT_HIDDEN))
    store_rounded(rs_ptr + new.to(tl.int64) * B * H_out + here, r, inside)


@triton.jit
def final_state_tile(carry_ptr, final_ptr, rows, units, seq_len, reverse, B, N):
    """final [B, N] in its dtype (x's) = the state after a direction's last step, from its slot of the
    carry [2, B, N], for a tile (rows, units of N): h_n or c_n without a conversion launched after."""
    inside = (rows < B) & (units < N)
    here = rows * N + units
    slot = (seq_len * (1 - reverse)) % 2  # the last step's `new` (finish_step): seq_len forward, 0 reverse
    state = tl.load(carry_ptr + slot.to(tl.int64) * B * N + here, mask=inside, other=0.0, cache_modifier=SHARED)
    store_rounded(final_ptr + here, state, inside)


@triton.jit
def previous_h(h_carry_ptr, rows, units, inside, t, reverse, B, H_out):
    """[BB, BH]: the h state before position t of the tile (rows, units of H_out)."""
    return tl.load(h_carry_ptr + ((t + reverse) % 2).to(tl.int64) * B * H_out + rows * H_out + units, mask=inside,
                   other=0.0)


# Runtime integers (not specialised, so one compiled kernel serves every step and option). In the
# persistent and resident kernels B, H and H_out are left to Triton's specialisation on divisibility by
# 16 (and on the value 1): rows of r_prev, xg and the states then load as vectors rather than an element
# at a time, for a few kernels per configuration. A launch per step is bound by the launch, not its loads.
STEP_ARGUMENTS = ["t", "t_next", "reverse", "stream", "has_lengths", "has_proj", "has_next", "step", "B", "H", "H_out"]
PERSISTENT_ARGUMENTS = ["seq_len", "reverse", "stream", "has_lengths", "has_proj", "fresh"]

# Bits of a persistent backward's `fresh`: the buffers the launcher left unfilled, which the launch zeroes
# before its first call, each program the tiles it owns (zero_fresh_tiles): dL/dh and dL/dc of the final
# state where their gradients are None, and the bias partials
FRESH_H: tl.constexpr = tl.constexpr(1)
FRESH_C: tl.constexpr = tl.constexpr(2)
FRESH_BIAS: tl.constexpr = tl.constexpr(4)

# Loads of what other programs wrote in this launch ask for L2 (a hint; the barrier's acquire, which
# invalidates L1, is what makes those stores visible).
SHARED: tl.constexpr = tl.constexpr(".cg")


@triton.jit
def forward_cell_tile(
    pid_b, pid_h, t, reverse, stream, seed, has_lengths, has_proj,
    xg_ptr, w_ptr, h_carry_ptr, rs_ptr, cs_ptr, c_carry_ptr, out_ptr, hpre_ptr, lengths_ptr, ints,
    floats, B, H, H_out,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Step at position t for one tile: gates = xg[t] + r_prev W~^T, the cell, c_t; h_t too unless a
    projection follows (has_proj: hpre[t] is stored and projection_tile finishes h). Its inputs are loaded
    after the product, where they are used (finish_step's None): loaded before it, they spilled registers
    (sm_90 compile: the 16 x 32 per-step tile, and inside the step loop the persistent 16 x 16 one). out is
    stored undropped (launch.output_dropped_in_loop: with the output dropout here, the 16-bit per-step tile and
    the persistent step loop spilled).

    w: [4H, H_out] W_hh after weight drop.
    """
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]  # [BB, 1]
    units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]  # [1, BH]
    inside = (rows < B) & (units < H)
    dtype = c_carry_ptr.dtype.element_ty
    # [BB, BH] per gate: r_prev [BB, H_out] @ W~[gate rows of my units]^T
    r_prev_ptr = rs_ptr + (t + reverse).to(tl.int64) * B * H_out
    acc_i = tl.zeros([BLOCK_B, BLOCK_H], dtype)
    acc_f = tl.zeros([BLOCK_B, BLOCK_H], dtype)
    acc_g = tl.zeros([BLOCK_B, BLOCK_H], dtype)
    acc_o = tl.zeros([BLOCK_B, BLOCK_H], dtype)
    for k0 in range(0, H_out, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        r = tl.load(r_prev_ptr + rows * H_out + ks[None, :], mask=(rows < B) & (ks[None, :] < H_out), other=0.0,
                    cache_modifier=SHARED)
        w_inside = (ks[:, None] < H_out) & (units < H)
        w_t = w_ptr + units * H_out + ks[:, None]  # [BK, BH]: element (k, j) is W~[gate * H + j, k]
        acc_i = tile_dot(r, tl.load(w_t, mask=w_inside, other=0.0), acc_i, PRECISION)
        acc_f = tile_dot(r, tl.load(w_t + H * H_out, mask=w_inside, other=0.0), acc_f, PRECISION)
        acc_g = tile_dot(r, tl.load(w_t + 2 * H * H_out, mask=w_inside, other=0.0), acc_g, PRECISION)
        acc_o = tile_dot(r, tl.load(w_t + 3 * H * H_out, mask=w_inside, other=0.0), acc_o, PRECISION)
    finish_step(acc_i, acc_f, acc_g, acc_o, None, rows, units, inside, t, reverse, stream, seed, has_lengths, has_proj,
                xg_ptr, h_carry_ptr, rs_ptr, cs_ptr, c_carry_ptr, out_ptr, hpre_ptr, lengths_ptr, ints, floats,
                B, H, H_out, False)


@triton.jit
def gate_inputs(xg_ptr, rows, units, inside, t, B, H):
    """xg[t]'s four gates [BB, BH] of the tile's units, as stored."""
    xg_here = xg_ptr + t.to(tl.int64) * B * 4 * H + rows * 4 * H + units
    x_i = tl.load(xg_here, mask=inside, other=0.0)
    x_f = tl.load(xg_here + H, mask=inside, other=0.0)
    x_g = tl.load(xg_here + 2 * H, mask=inside, other=0.0)
    x_o = tl.load(xg_here + 3 * H, mask=inside, other=0.0)
    return x_i, x_f, x_g, x_o


@triton.jit
def previous_c(c_carry_ptr, rows, units, inside, t, reverse, B, H):
    """[BB, BH]: the c state before position t of the tile."""
    return tl.load(c_carry_ptr + ((t + reverse) % 2).to(tl.int64) * B * H + rows * H + units, mask=inside, other=0.0)


@triton.jit
def step_inputs(gates, h_carry_ptr, c_carry_ptr, lengths_ptr, rows, units, inside, t, reverse, has_lengths, B, H, H_out):
    """What step t of a tile without projection reads besides its product, for loading before the product
    so that these trips to memory overlap its own: with the gates (gate_inputs), c and h before the step
    and which rows are active. None of it is written by another program: xg came from the GEMM before the
    launch, and the tile's program wrote the states at the step before. inside: (rows < B) & (units < H)."""
    x_i, x_f, x_g, x_o = gates
    c_prev = previous_c(c_carry_ptr, rows, units, inside, t, reverse, B, H)
    h_prev = previous_h(h_carry_ptr, rows, units, inside, t, reverse, B, H_out)
    return x_i, x_f, x_g, x_o, c_prev, h_prev, row_is_active(lengths_ptr, rows, B, t, has_lengths)


@triton.jit
def finish_step(
    acc_i, acc_f, acc_g, acc_o, inputs, rows, units, inside, t, reverse, stream, seed, has_lengths, has_proj,
    xg_ptr, h_carry_ptr, rs_ptr, cs_ptr, c_carry_ptr, out_ptr, hpre_ptr, lengths_ptr, ints, floats, B, H, H_out,
    OUTPUT_DROPOUT: tl.constexpr,
):
    """From the recurrent parts r_prev W~^T [BB, BH] of a tile's four gate pre-activations: xg[t] added,
    the cell, c_t, the gate activations over xg[t]; h_t too unless a projection follows (has_proj: hpre[t]
    is stored for projection_tile). inputs: step_inputs, or None to load each where it is used (a launch
    per step's registers are taken by its product until it ends). inside: (rows < B) & (units < H)."""
    h_prev = None
    if inputs is None:
        x_i, x_f, x_g, x_o = gate_inputs(xg_ptr, rows, units, inside, t, B, H)
        c_prev = previous_c(c_carry_ptr, rows, units, inside, t, reverse, B, H)
    else:
        x_i, x_f, x_g, x_o, c_prev, h_prev, active = inputs
    new = t + 1 - reverse
    xg_here = xg_ptr + t.to(tl.int64) * B * 4 * H + rows * 4 * H + units
    gi = x_i.to(acc_i.dtype) + acc_i
    gf = x_f.to(acc_f.dtype) + acc_f
    gg = x_g.to(acc_g.dtype) + acc_g
    go = x_o.to(acc_o.dtype) + acc_o
    c_here = rows * H + units
    hidden_keep, update_keep, cell_keep, zone_h, zone_c = unit_masks(ints, seed, rows, units, H, t, stream)
    i, f, g, o, c_tilde, h_tilde = cell_forward(
        gi, gf, gg, go, c_prev, update_keep, setting(floats, FLOAT_UPDATE), cell_keep, setting(floats, FLOAT_CELL)
    )
    if inputs is None:
        active = row_is_active(lengths_ptr, rows, B, t, has_lengths)
    c_new = zoneout(c_prev, c_tilde, zone_c, setting(floats, FLOAT_ZONEOUT_C), setting(ints, INT_ZONEOUT_C_MODE))
    c_state = tl.where(active, c_new, c_prev)
    tl.store(c_carry_ptr + (new % 2).to(tl.int64) * B * H + c_here, c_state, mask=inside)
    store_rounded(cs_ptr + new.to(tl.int64) * B * H + c_here, c_state, inside)
    # (stored here rather than straight after the cell: at the 32 x 16 half-precision step tile, ptxas
    # of Triton 3.6 spilled with them earlier)
    store_rounded(xg_here, i, inside)
    store_rounded(xg_here + H, f, inside)
    store_rounded(xg_here + 2 * H, g, inside)
    store_rounded(xg_here + 3 * H, o, inside)
    if has_proj != 0:
        tl.store(hpre_ptr + t.to(tl.int64) * B * H + c_here, h_tilde, mask=inside)
    else:
        finish_h(h_tilde, h_prev, hidden_keep, zone_h, rows, units, inside, active, t, reverse, seed,
                 h_carry_ptr, rs_ptr, out_ptr, ints, floats, B, H_out, OUTPUT_DROPOUT)


@triton.jit
def projection_tile(
    pid_b, pid_h, t, reverse, stream, seed, has_lengths,
    hpre_ptr, w_hr_ptr, h_carry_ptr, rs_ptr, out_ptr, lengths_ptr, ints, floats,
    B, H, H_out, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Step at position t, after forward_cell_tile: h~ = hpre[t] W_hr^T for my units of H_out, then finish_h.

    w_hr: [H_out, H].
    """
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
    units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]  # of H_out
    inside = (rows < B) & (units < H_out)
    hpre_t = hpre_ptr + t.to(tl.int64) * B * H
    acc = tl.zeros([BLOCK_B, BLOCK_H], h_carry_ptr.dtype.element_ty)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(hpre_t + rows * H + ks[None, :], mask=(rows < B) & (ks[None, :] < H), other=0.0, cache_modifier=SHARED)
        w = tl.load(w_hr_ptr + units * H + ks[:, None], mask=(ks[:, None] < H) & (units < H_out), other=0.0)
        acc = tile_dot(a, w, acc, PRECISION)
    hidden_keep, _, _, zone_h, _ = unit_masks(ints, seed, rows, units, H, t, stream)
    active = row_is_active(lengths_ptr, rows, B, t, has_lengths)
    finish_h(acc, None, hidden_keep, zone_h, rows, units, inside, active, t, reverse, seed, h_carry_ptr, rs_ptr,
             out_ptr, ints, floats, B, H_out, False)


@triton.jit
def cell_backward_inputs(xg_ptr, cs_ptr, gc_ptr, rows, units, inside, t, reverse, B, H):
    """What the cell backward of step t reads for a tile (units of H), for loading before the step's product:
    dL/dc after the step, and c before it and i, f, g, o in the compute dtype. None of it is written by
    another program: the activations and states came from the forward, and the tile's program wrote gc at
    the step before (dgates, which may be xg, is written at other positions this step)."""
    compute = gc_ptr.dtype.element_ty
    g_c = tl.load(gc_ptr + rows * H + units, mask=inside, other=0.0)
    c_prev = tl.load(cs_ptr + (t + reverse).to(tl.int64) * B * H + rows * H + units, mask=inside, other=0.0).to(compute)
    i, f, g, o = gate_inputs(xg_ptr, rows, units, inside, t, B, H)  # the forward wrote the activations over xg
    return g_c, c_prev, i.to(compute), f.to(compute), g.to(compute), o.to(compute)


@triton.jit
def backward_cell(
    d_h_tilde, inputs, pid_b, rows, units, inside, active, update_keep, cell_keep, zone_c, t, reverse,
    xg_ptr, cs_ptr, dgates_ptr, db_ptr, gc_ptr, ints, floats, B, H,
):
    """Given dL/dh~ (before any projection) of my units at step t: dL/dgates[t] and dL/dc of the previous
    state, and my tile's share of dL/dbias. inputs: cell_backward_inputs, or None to load them here."""
    if inputs is None:
        inputs = cell_backward_inputs(xg_ptr, cs_ptr, gc_ptr, rows, units, inside, t, reverse, B, H)
    g_c, c_prev, i, f, g, o = inputs
    c_here = rows * H + units
    d_c_new = tl.where(active, g_c, 0.0)
    g_c_prev, d_c_tilde = zoneout_backward(
        d_c_new, zone_c, setting(floats, FLOAT_ZONEOUT_C), setting(ints, INT_ZONEOUT_C_MODE)
    )
    d_gi, d_gf, d_gg, d_go, d_c_prev = cell_backward(
        i, f, g, o, c_prev, d_h_tilde, d_c_tilde, update_keep, setting(floats, FLOAT_UPDATE), cell_keep,
        setting(floats, FLOAT_CELL),
    )
    # rows past their length pass the gradient of their frozen state straight through
    tl.store(gc_ptr + c_here, g_c_prev + d_c_prev + tl.where(active, 0.0, g_c), mask=inside)
    dg_here = dgates_ptr + t.to(tl.int64) * B * 4 * H + rows * 4 * H + units
    store_rounded(dg_here, d_gi, inside)
    store_rounded(dg_here + H, d_gf, inside)
    store_rounded(dg_here + 2 * H, d_gg, inside)
    store_rounded(dg_here + 3 * H, d_go, inside)
    db_here = db_ptr + pid_b * 4 * H + units
    add_row_sum(db_here, d_gi, inside, units < H)
    add_row_sum(db_here + H, d_gf, inside, units < H)
    add_row_sum(db_here + 2 * H, d_gg, inside, units < H)
    add_row_sum(db_here + 3 * H, d_go, inside, units < H)


@triton.jit
def add_row_sum(ptr, x, inside, units_inside):
    """ptr [1, BH] += x [BB, BH] summed over its rows inside the layer."""
    total = tl.sum(tl.where(inside, x, 0.0), axis=0, keep_dims=True)
    tl.store(ptr, tl.load(ptr, mask=units_inside, other=0.0) + total, mask=units_inside)


@triton.jit
def backward_h_tile(
    pid_b, pid_h, t, t_next, reverse, stream, seed, has_lengths, has_proj, has_next, step,
    dgates_ptr, db_ptr, xg_ptr, w_t_ptr, cs_ptr, dout_ptr, gh_ptr, gc_ptr, dht_ptr, lengths_ptr, ints, floats,
    B, H, H_out, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    AHEAD: tl.constexpr, OUTPUT_DROPOUT: tl.constexpr,
):
    """Backward of the step at position t, for one tile of h (units of H_out; of H too without a projection).

    gh [B, H_out], gc [B, H] carry dL/dh and dL/dc of the state between steps. First (has_next):
    add the recurrent part dL/dr_{t_next} = dgates[t_next] W~ through recurrent dropout, completing
    dL/dh of the state after step t. Then (step) zoneout and frozen rows on h: gh becomes the part for
    the state before t, and either dh~[t] is stored for the projection (has_proj) or the cell backward
    follows here. The final call (has_next, not step) completes gh into dL/dh0. AHEAD: the step's inputs
    are loaded before the product (h_backward_inputs, cell_backward_inputs), else where they are used.
    OUTPUT_DROPOUT: dL/dout is dropped as it loads (output_gradient).
    """
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
    units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
    inside = (rows < B) & (units < H_out)
    h_inputs = None
    cell_inputs = None
    if AHEAD:
        h_inputs = h_backward_inputs(gh_ptr, dout_ptr, lengths_ptr, rows, units, inside, t, has_lengths, seed, ints,
                                     floats, B, H_out, OUTPUT_DROPOUT)
        # with a projection the cell backward is backward_projection_cell_tile's, which loads its own: none here
        cell_units = tl.where(has_proj == 0, H, 0)
        cell_inputs = cell_backward_inputs(xg_ptr, cs_ptr, gc_ptr, rows, units, (rows < B) & (units < cell_units), t,
                                           reverse, B, H)
    acc = tl.zeros([BLOCK_B, BLOCK_H], gh_ptr.dtype.element_ty)
    if has_next != 0:
        # [BB, BH] = dgates[t_next] [BB, 4H] @ W~[:, my units] [4H, BH]
        dg_next = dgates_ptr + t_next.to(tl.int64) * B * 4 * H
        for k0 in range(0, 4 * H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(dg_next + rows * 4 * H + ks[None, :], mask=(rows < B) & (ks[None, :] < 4 * H), other=0.0,
                        cache_modifier=SHARED)
            # W~ transposed, [H_out, 4H]: its tile's contiguous side is the product's depth, whose length 4H
            # lets the compiler copy it asynchronously (rows of H_out, 1150 on PTB, would not)
            w = tl.load(w_t_ptr + units * (4 * H) + ks[:, None], mask=(ks[:, None] < 4 * H) & (units < H_out), other=0.0)
            acc = tile_dot(a, w, acc, PRECISION)
    finish_h_backward(acc, h_inputs, cell_inputs, pid_b, rows, units, inside, t, reverse, stream, seed, has_lengths,
                      has_proj, has_next, step, dgates_ptr, db_ptr, xg_ptr, cs_ptr, dout_ptr, gh_ptr, gc_ptr, dht_ptr,
                      lengths_ptr, ints, floats, B, H, H_out, OUTPUT_DROPOUT)


@triton.jit
def h_backward_inputs(gh_ptr, dout_ptr, lengths_ptr, rows, units, inside, t, has_lengths, seed, ints, floats, B, H_out,
                      OUTPUT_DROPOUT: tl.constexpr):
    """What the backward of step t reads for a tile of h besides the product and the cell's inputs, for
    loading before the product: dL/dh so far (the tile's program wrote it), dL/dout[t] (output_gradient),
    and which rows are active. (The final call, at no step, reads dL/dout at a valid position it does not use.)"""
    g_h = tl.load(gh_ptr + rows * H_out + units, mask=inside, other=0.0)
    d_out = output_gradient(dout_ptr, rows, units, inside, t, seed, ints, floats, B, H_out, g_h.dtype, OUTPUT_DROPOUT)
    return g_h, d_out, row_is_active(lengths_ptr, rows, B, t, has_lengths)


@triton.jit
def output_gradient(dout_ptr, rows, units, inside, t, seed, ints, floats, B, H_out, dtype: tl.constexpr,
                    OUTPUT_DROPOUT: tl.constexpr):
    """dL/dh_t from the output, for a tile (rows, units of H_out), in dtype (the compute dtype): dL/dout[t], with
    OUTPUT_DROPOUT through the stack's output dropout where this layer applies it (output_dropped), rounded to
    dL/dout's dtype (x's), the bits a dropout launch before the recurrence stores (launch.output_dropped_in_loop)."""
    d_out = tl.load(dout_ptr + t.to(tl.int64) * B * H_out + rows * H_out + units, mask=inside, other=0.0)
    if OUTPUT_DROPOUT:
        d_out = rounded(output_dropped(d_out, seed, rows, units, t, ints, floats, H_out), dout_ptr.dtype.element_ty)
    return d_out.to(dtype)


@triton.jit
def finish_h_backward(
    acc, h_inputs, cell_inputs, pid_b, rows, units, inside, t, reverse, stream, seed, has_lengths, has_proj,
    has_next, step, dgates_ptr, db_ptr, xg_ptr, cs_ptr, dout_ptr, gh_ptr, gc_ptr, dht_ptr, lengths_ptr, ints,
    floats, B, H, H_out, OUTPUT_DROPOUT: tl.constexpr,
):
    """backward_h_tile from acc = dgates[t_next] W~[:, units] (read only with has_next): the gh update, and
    the step's backward if `step`. h_inputs, cell_inputs: loaded before the product, or None to load each
    where it is used. inside: (rows < B) & (units < H_out)."""
    h_here = rows * H_out + units
    hidden_keep, update_keep, cell_keep, zone_h, zone_c = unit_masks(ints, seed, rows, units, H, t, stream)
    if h_inputs is None:
        g_h = tl.load(gh_ptr + h_here, mask=inside, other=0.0)
    else:
        g_h, d_out, active = h_inputs
    if has_next != 0:
        g_h += keep_scaled(acc, hidden_keep, setting(floats, FLOAT_HIDDEN))
    if step != 0:
        if h_inputs is None:
            active = row_is_active(lengths_ptr, rows, B, t, has_lengths)
            d_out = output_gradient(dout_ptr, rows, units, inside, t, seed, ints, floats, B, H_out, g_h.dtype,
                                    OUTPUT_DROPOUT)
        d_h_new = tl.where(active, d_out + g_h, 0.0)
        g_h_prev, d_h_tilde = zoneout_backward(
            d_h_new, zone_h, setting(floats, FLOAT_ZONEOUT_H), setting(ints, INT_ZONEOUT_H_MODE)
        )
        tl.store(gh_ptr + h_here, g_h_prev + tl.where(active, 0.0, g_h), mask=inside)
        if has_proj != 0:
            tl.store(dht_ptr + t.to(tl.int64) * B * H_out + h_here, d_h_tilde, mask=inside)
        else:
            backward_cell(d_h_tilde, cell_inputs, pid_b, rows, units, inside, active, update_keep, cell_keep, zone_c, t,
                          reverse, xg_ptr, cs_ptr, dgates_ptr, db_ptr, gc_ptr, ints, floats, B, H)
    else:
        tl.store(gh_ptr + h_here, g_h, mask=inside)


@triton.jit
def backward_projection_cell_tile(
    pid_b, pid_h, t, reverse, stream, seed, has_lengths,
    dgates_ptr, db_ptr, xg_ptr, w_hr_ptr, cs_ptr, gc_ptr, dht_ptr, lengths_ptr, ints, floats,
    B, H, H_out, PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    AHEAD: tl.constexpr,
):
    """With a projection, after backward_h_tile: dL/dhpre = dh~[t] W_hr for my units of H, then the cell
    backward, its inputs loaded before the product with AHEAD."""
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
    units = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]  # of H
    inside = (rows < B) & (units < H)
    cell_inputs = None
    if AHEAD:
        cell_inputs = cell_backward_inputs(xg_ptr, cs_ptr, gc_ptr, rows, units, inside, t, reverse, B, H)
    dht_t = dht_ptr + t.to(tl.int64) * B * H_out
    acc = tl.zeros([BLOCK_B, BLOCK_H], gc_ptr.dtype.element_ty)
    for k0 in range(0, H_out, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(dht_t + rows * H_out + ks[None, :], mask=(rows < B) & (ks[None, :] < H_out), other=0.0,
                    cache_modifier=SHARED)
        w = tl.load(w_hr_ptr + ks[:, None] * H + units, mask=(ks[:, None] < H_out) & (units < H), other=0.0)
        acc = tile_dot(a, w, acc, PRECISION)
    _, update_keep, cell_keep, _, zone_c = unit_masks(ints, seed, rows, units, H, t, stream)
    active = row_is_active(lengths_ptr, rows, B, t, has_lengths)
    backward_cell(acc, cell_inputs, pid_b, rows, units, inside, active, update_keep, cell_keep, zone_c, t, reverse,
                  xg_ptr, cs_ptr, dgates_ptr, db_ptr, gc_ptr, ints, floats, B, H)


@triton.jit(do_not_specialize=STEP_ARGUMENTS)
def forward_step_kernel(
    seed_ptr, xg_ptr, w_ptr, h_carry_ptr, rs_ptr, cs_ptr, c_carry_ptr, out_ptr, hpre_ptr, lengths_ptr, ints_ptr,
    floats_ptr, t, reverse, stream, has_lengths, has_proj, B, H, H_out,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One launch per step: forward_cell_tile on a (row tiles, unit tiles) grid."""
    forward_cell_tile(
        tl.program_id(0), tl.program_id(1), t, reverse, stream, seed_ptr, has_lengths, has_proj,
        xg_ptr, w_ptr, h_carry_ptr, rs_ptr, cs_ptr, c_carry_ptr, out_ptr, hpre_ptr, lengths_ptr, ints_ptr,
        floats_ptr, B, H, H_out, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K,
    )


@triton.jit(do_not_specialize=STEP_ARGUMENTS)
def projection_step_kernel(
    seed_ptr, hpre_ptr, w_hr_ptr, h_carry_ptr, rs_ptr, out_ptr, lengths_ptr, ints_ptr, floats_ptr,
    t, reverse, stream, has_lengths, B, H, H_out,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One launch per step, after forward_step_kernel: projection_tile on a (row tiles, H_out tiles) grid."""
    projection_tile(
        tl.program_id(0), tl.program_id(1), t, reverse, stream, seed_ptr, has_lengths,
        hpre_ptr, w_hr_ptr, h_carry_ptr, rs_ptr, out_ptr, lengths_ptr, ints_ptr, floats_ptr,
        B, H, H_out, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K,
    )


@triton.jit(do_not_specialize=STEP_ARGUMENTS)
def backward_step_kernel(
    seed_ptr, dgates_ptr, db_ptr, xg_ptr, w_t_ptr, cs_ptr, dout_ptr, gh_ptr, gc_ptr, dht_ptr, lengths_ptr, ints_ptr,
    floats_ptr,
    t, t_next, reverse, stream, has_lengths, has_proj, has_next, step, B, H, H_out,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One launch per step: backward_h_tile on a (row tiles, H_out tiles) grid. dL/dout comes dropped
    (launch.output_dropped_in_loop): with the dropout here the IEEE float32 32 x 16 tile spilled (sm_90, Triton 3.6)."""
    backward_h_tile(
        tl.program_id(0), tl.program_id(1), t, t_next, reverse, stream, seed_ptr, has_lengths, has_proj, has_next, step,
        dgates_ptr, db_ptr, xg_ptr, w_t_ptr, cs_ptr, dout_ptr, gh_ptr, gc_ptr, dht_ptr, lengths_ptr, ints_ptr, floats_ptr,
        B, H, H_out, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, False, False,
    )


@triton.jit(do_not_specialize=STEP_ARGUMENTS)
def backward_projection_cell_kernel(
    seed_ptr, dgates_ptr, db_ptr, xg_ptr, w_hr_ptr, cs_ptr, gc_ptr, dht_ptr, lengths_ptr, ints_ptr, floats_ptr,
    t, reverse, stream, has_lengths, B, H, H_out,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One launch per step, after backward_step_kernel: backward_projection_cell_tile on a (row tiles, H tiles) grid."""
    backward_projection_cell_tile(
        tl.program_id(0), tl.program_id(1), t, reverse, stream, seed_ptr, has_lengths,
        dgates_ptr, db_ptr, xg_ptr, w_hr_ptr, cs_ptr, gc_ptr, dht_ptr, lengths_ptr, ints_ptr, floats_ptr,
        B, H, H_out, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, False,
    )


@triton.jit
def zero_fresh_tiles(gh_ptr, gc_ptr, db_ptr, pid_b, units, fresh, B, H, H_out, BLOCK_B: tl.constexpr,
                     BLOCK_H: tl.constexpr, OF_H: tl.constexpr, OF_CELL: tl.constexpr):
    """The zeros of a backward's fresh buffers (FRESH_*) in a tile its program owns, row tile pid_b and units
    [1, BH]: OF_H, gh's (units of H_out); OF_CELL, gc's and the bias partials' four gates (units of H). The
    program is the only one to read and write them in the launch (backward_h_tile, backward_cell), so a
    CTA barrier after these stores is all its loads need. Done before the step loop, so that nothing of it
    is live in the loop: applied there as load masks, it spilled registers inside the T=1024 resident
    backward's loop on Triton 3.6 (sm_90 compile). Not in the resident backward, whose W~ slab leaves no
    registers for it there either (its launcher fills them)."""
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)[:, None]
    if OF_H:
        if (fresh & FRESH_H) != 0:
            tl.store(gh_ptr + rows * H_out + units, tl.zeros([BLOCK_B, BLOCK_H], gh_ptr.dtype.element_ty),
                     mask=(rows < B) & (units < H_out))
    if OF_CELL:
        if (fresh & FRESH_C) != 0:
            tl.store(gc_ptr + rows * H + units, tl.zeros([BLOCK_B, BLOCK_H], gc_ptr.dtype.element_ty),
                     mask=(rows < B) & (units < H))
        if (fresh & FRESH_BIAS) != 0:
            db_here = db_ptr + pid_b * 4 * H + units
            for gate in range(4):
                tl.store(db_here + gate * H, tl.zeros([1, BLOCK_H], db_ptr.dtype.element_ty), mask=units < H)


@triton.jit
def grid_barrier(arrivals_ptr, expected, POLL_LOADS: tl.constexpr):
    """Wait until the launch's arrival counter reaches `expected`, after adding this program's arrival.

    Every program of the launch must be resident (a cooperative launch guarantees it). The release
    add publishes this program's stores, after a CTA barrier has gathered them; the acquire reads make
    every other program's stores visible here. POLL_LOADS: the reads are acquire loads (arrivals),
    else atomic adds of 0 (launch.barrier_poll_loads chooses; the interpreter has only the latter).
    """
    barrier_arrive(arrivals_ptr)
    barrier_wait(arrivals_ptr, expected, POLL_LOADS)


@triton.jit
def barrier_arrive(arrivals_ptr):
    """grid_barrier's first half: this program's arrival, once its threads' stores are gathered. Loads
    issued after it and before barrier_wait overlap the wait; issued before, the release's fence would
    wait for them to complete first."""
    tl.debug_barrier()
    tl.atomic_add(arrivals_ptr, 1, sem="release")


@triton.jit
def barrier_wait(arrivals_ptr, expected, POLL_LOADS: tl.constexpr):
    """grid_barrier's second half: poll until every program has arrived."""
    arrived = arrivals(arrivals_ptr, POLL_LOADS)
    while arrived < expected:
        arrived = arrivals(arrivals_ptr, POLL_LOADS)
    tl.debug_barrier()


@triton.jit
def barriers_done(arrivals_ptr):
    """After a launch's last grid barrier: this program counts itself out in the counter's second word, and
    the last one out sets both words back to 0, so that the next launch on the stream finds a fresh counter
    without a fill of its own (launch.arrival_counter). Every other program read the arrivals for the last
    time before its count (its acquire orders the count after that read): none reads them after the reset."""
    left = tl.atomic_add(arrivals_ptr + 1, 1, sem="relaxed")
    if left == tl.num_programs(0) - 1:
        tl.atomic_xchg(arrivals_ptr, 0, sem="relaxed")
        tl.atomic_xchg(arrivals_ptr + 1, 0, sem="relaxed")


@triton.jit
def arrivals(ptr, LOAD: tl.constexpr):
    """The arrival counter at ptr, read with acquire semantics at GPU scope: with LOAD, by a load in every
    thread (PTX ld.acquire.gpu), else by an atomic add of 0 (Triton 3.9 and 3.6 make it thread 0's acquire load,
    passed to the CTA through shared memory: two bar.sync a poll)."""
    if LOAD:
        count = tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                          is_pure=False, pack=1)
    else:
        count = tl.atomic_add(ptr, 0, sem="acquire")
    return count


@triton.jit
def position(s, seq_len, reverse):
    """The sequence position of the s-th step a direction processes."""
    return s + reverse * (seq_len - 1 - 2 * s)


@triton.jit
def backward_positions(back, seq_len, reverse):
    """(t, t_next) of the back-th call of a backward through time: the step at position t, after the
    recurrent gradient from position t_next (the step after it) is added. back = seq_len is the final
    call that completes dL/dh0 from the first step's dgates."""
    s = tl.maximum(tl.minimum(seq_len - 1 - back, seq_len - 1), 0)
    t_next = position(tl.minimum(seq_len - back, seq_len - 1), seq_len, reverse)
    return position(s, seq_len, reverse), t_next


@triton.jit(do_not_specialize=PERSISTENT_ARGUMENTS)
def forward_persistent_kernel(
    seed_ptr, xg_ptr, w_ptr, w_hr_ptr, h_carry_ptr, rs_ptr, cs_ptr, c_carry_ptr, out_ptr, hpre_ptr, lengths_ptr,
    ints_ptr,
    floats_ptr, arrivals_ptr, h_n_ptr, c_n_ptr, seq_len, reverse, stream, has_lengths, has_proj, B, H, H_out,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    BARRIER_POLL_LOADS: tl.constexpr, LOAD_AHEAD: tl.constexpr,
):
    """The whole forward of a layer-direction in one launch: the step tiles of forward_step_kernel (and
    projection_step_kernel) shared among resident programs, one grid barrier after each phase; then h_n
    [B, H_out] and c_n [B, H] in x's dtype, each program its tiles, which the last barrier made visible.
    The output dropout is a launch after it (launch.output_dropped_in_loop)."""
    # each setting (and the seed) loaded where it is used, whatever LOAD_AHEAD says: held through the loop,
    # they spilled registers inside the step loop (sm_90 compile, 16-bit 16 x 16 tiles)
    seed = seed_ptr
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    tiles_b = tl.cdiv(B, BLOCK_B)
    tiles_h = tl.cdiv(H, BLOCK_H)
    tiles_out = tl.cdiv(H_out, BLOCK_H)
    expected = 0
    for s in range(seq_len):
        t = position(s, seq_len, reverse)
        for tile in range(pid, tiles_b * tiles_h, programs):
            forward_cell_tile(
                tile // tiles_h, tile % tiles_h, t, reverse, stream, seed, has_lengths, has_proj,
                xg_ptr, w_ptr, h_carry_ptr, rs_ptr, cs_ptr, c_carry_ptr, out_ptr, hpre_ptr, lengths_ptr,
                ints_ptr, floats_ptr, B, H, H_out, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K,
            )
        expected += programs
        grid_barrier(arrivals_ptr, expected, BARRIER_POLL_LOADS)
        if has_proj != 0:
            for tile in range(pid, tiles_b * tiles_out, programs):
                projection_tile(
                    tile // tiles_out, tile % tiles_out, t, reverse, stream, seed, has_lengths,
                    hpre_ptr, w_hr_ptr, h_carry_ptr, rs_ptr, out_ptr, lengths_ptr, ints_ptr, floats_ptr,
                    B, H, H_out, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K,
                )
            expected += programs
            grid_barrier(arrivals_ptr, expected, BARRIER_POLL_LOADS)
    barriers_done(arrivals_ptr)
    for tile in range(pid, tiles_b * tiles_h, programs):
        final_state_tile(c_carry_ptr, c_n_ptr, (tile // tiles_h) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None],
                         (tile % tiles_h) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :], seq_len, reverse, B, H)
    for tile in range(pid, tiles_b * tiles_out, programs):
        final_state_tile(h_carry_ptr, h_n_ptr, (tile // tiles_out) * BLOCK_B + tl.arange(0, BLOCK_B)[:, None],
                         (tile % tiles_out) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :], seq_len, reverse, B, H_out)


@triton.jit(do_not_specialize=PERSISTENT_ARGUMENTS)
def backward_persistent_kernel(
    seed_ptr, dgates_ptr, db_ptr, xg_ptr, w_t_ptr, w_hr_ptr, cs_ptr, dout_ptr, gh_ptr, gc_ptr, dht_ptr, lengths_ptr,
    ints_ptr,
    floats_ptr, arrivals_ptr, seq_len, reverse, stream, has_lengths, has_proj, fresh, B, H, H_out,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    BARRIER_POLL_LOADS: tl.constexpr, LOAD_AHEAD: tl.constexpr, OUTPUT_DROPOUT: tl.constexpr,
):
    """The whole backward through time of a layer-direction in one launch, steps in reverse order, after
    the zeros of its fresh buffers (zero_fresh_tiles). OUTPUT_DROPOUT: dL/dout is dropped as it loads."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    tiles_b = tl.cdiv(B, BLOCK_B)
    tiles_h = tl.cdiv(H, BLOCK_H)
    tiles_out = tl.cdiv(H_out, BLOCK_H)
    # gh's tiles as backward_h_tile walks them; gc's and the bias partials' as the cell backward does
    # (backward_projection_cell_tile's, or without a projection backward_h_tile's again: H_out = H)
    for tile in range(pid, tiles_b * tiles_out, programs):
        units = (tile % tiles_out) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
        zero_fresh_tiles(gh_ptr, gc_ptr, db_ptr, tile // tiles_out, units, fresh, B, H, H_out, BLOCK_B, BLOCK_H, True,
                         False)
    for tile in range(pid, tiles_b * tiles_h, programs):
        units = (tile % tiles_h) * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]
        zero_fresh_tiles(gh_ptr, gc_ptr, db_ptr, tile // tiles_h, units, fresh, B, H, H_out, BLOCK_B, BLOCK_H, False,
                         True)
    tl.debug_barrier()
    # the call's settings before the time loop (step_settings) and each step's inputs before its product
    # (h_backward_inputs, cell_backward_inputs), except in TF32, whose persistent forward spilled registers
    # inside the step loop with the settings held (sm_90 compile): there each where used
    AHEAD: tl.constexpr = LOAD_AHEAD and PRECISION != "tf32"
    ints, floats, seed = ints_ptr, floats_ptr, seed_ptr
    if AHEAD:
        ints, floats = step_settings(ints_ptr, floats_ptr)
        seed = tl.load(seed_ptr)
    expected = 0
    for back in range(seq_len + 1):
        t, t_next = backward_positions(back, seq_len, reverse)
        for tile in range(pid, tiles_b * tiles_out, programs):
            backward_h_tile(
                tile // tiles_out, tile % tiles_out, t, t_next, reverse, stream, seed, has_lengths, has_proj,
                back > 0, back < seq_len,
                dgates_ptr, db_ptr, xg_ptr, w_t_ptr, cs_ptr, dout_ptr, gh_ptr, gc_ptr, dht_ptr, lengths_ptr, ints,
                floats, B, H, H_out, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, AHEAD, OUTPUT_DROPOUT,
            )
        expected += programs
        grid_barrier(arrivals_ptr, expected, BARRIER_POLL_LOADS)
        if has_proj != 0:
            if back < seq_len:
                for tile in range(pid, tiles_b * tiles_h, programs):
                    backward_projection_cell_tile(
                        tile // tiles_h, tile % tiles_h, t, reverse, stream, seed, has_lengths,
                        dgates_ptr, db_ptr, xg_ptr, w_hr_ptr, cs_ptr, gc_ptr, dht_ptr, lengths_ptr, ints, floats,
                        B, H, H_out, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K, AHEAD,
                    )
                expected += programs
                grid_barrier(arrivals_ptr, expected, BARRIER_POLL_LOADS)
    barriers_done(arrivals_ptr)


# Runtime integers of the W~-resident kernels: steps [first, last) of the sequence in one launch.
RESIDENT_ARGUMENTS = ["seq_len", "first", "last", "synchronize", "reverse", "stream", "has_lengths"]


# weight drop applied by a resident kernel as it loads W_hh (launch.weight_drop_loaded): off, per element, per row
WEIGHT_KEPT: tl.constexpr = tl.constexpr(0)
WEIGHT_ELEMENTS: tl.constexpr = tl.constexpr(1)
WEIGHT_ROWS: tl.constexpr = tl.constexpr(2)


@triton.jit
def resident_slab(w_ptr, offsets, k_stride, n_inside, K, drop, K_START: tl.constexpr, K_SIZE: tl.constexpr,
                  WEIGHT_DROP: tl.constexpr):
    """[K_SIZE, N]: element (k, n) = w_ptr[offsets[n] + (K_START + k) * k_stride], 0 past K. Loaded before a
    program's step loop and used only as a dot operand, it stays in the SM's shared memory for every step.

    w_ptr: W_hh [4H, H_out], dense. With WEIGHT_DROP, each element is W~'s, made as it loads:
    packed_dropout_kernel's mask of W_hh's element e (or row e // H_out), scaled and rounded to W_hh's
    dtype as that kernel stores it (weight_dropped), so the slab holds W~'s bits. drop: (seed, ints_ptr, floats_ptr,
    stream, H_out)."""
    ks = K_START + tl.arange(0, K_SIZE)[:, None]
    # (the row pointers first, as W~'s slabs were addressed: element indices there put the where-used PTB
    # forward's registers over the edge, spilling inside its step loop in the sm_90 compile)
    w = tl.load((w_ptr + offsets) + ks * k_stride, mask=(ks < K) & n_inside, other=0.0)
    if WEIGHT_DROP != WEIGHT_KEPT:
        seed, ints_ptr, floats_ptr, stream, H_out = drop
        element = offsets + ks * k_stride
        if WEIGHT_DROP == WEIGHT_ROWS:
            element = element // H_out
        w = rounded(weight_dropped(w, element, seed, ints_ptr, floats_ptr, stream), w_ptr.dtype.element_ty)
    return w


# A resident slab at least this deep is split in two (halves 16 deep or more, tl.dot's least K)
SPLIT_SLAB_DEPTH: tl.constexpr = tl.constexpr(32)


@triton.jit
def resident_halves(w_ptr, offsets, k_stride, n_inside, K, drop, K_START: tl.constexpr, K_SIZE: tl.constexpr,
                    WEIGHT_DROP: tl.constexpr):
    """K_SIZE rows of an operand from K_START, as two slabs of K_SIZE / 2 where K_SIZE is SPLIT_SLAB_DEPTH or
    more; else the one slab, twice."""
    if K_SIZE >= SPLIT_SLAB_DEPTH:
        low = resident_slab(w_ptr, offsets, k_stride, n_inside, K, drop, K_START, K_SIZE // 2, WEIGHT_DROP)
        high = resident_slab(w_ptr, offsets, k_stride, n_inside, K, drop, K_START + K_SIZE // 2, K_SIZE // 2,
                             WEIGHT_DROP)
    else:
        low = resident_slab(w_ptr, offsets, k_stride, n_inside, K, drop, K_START, K_SIZE, WEIGHT_DROP)
        high = low
    return low, high


@triton.jit
def resident_weight(w_ptr, offsets, k_stride, n_inside, K, drop, K_MAIN: tl.constexpr, K_REST: tl.constexpr,
                    WEIGHT_DROP: tl.constexpr):
    """A [K, N] operand of W_hh or W~ (resident_slab) in two power-of-two parts, K_MAIN + K_REST >= K (K_REST
    may be 0): a 768-deep operand is 512 + 256, not 1024, of on-chip memory. Each part in halves
    (resident_halves), so that resident_dot's product runs as up to four independent chains of MMAs rather
    than one."""
    main_low, main_high = resident_halves(w_ptr, offsets, k_stride, n_inside, K, drop, 0, K_MAIN, WEIGHT_DROP)
    rest_low, rest_high = main_low, main_high
    if K_REST > 0:
        rest_low, rest_high = resident_halves(w_ptr, offsets, k_stride, n_inside, K, drop, K_MAIN, K_REST,
                                              WEIGHT_DROP)
    return main_low, main_high, rest_low, rest_high


@triton.jit
def resident_left(a_ptr, rows, B, a_stride, K, K_START: tl.constexpr, K_SIZE: tl.constexpr):
    """a[:, K_START : K_START + K_SIZE] [BB, K_SIZE], 0 past B and K: a part of a product's left operand."""
    ks = K_START + tl.arange(0, K_SIZE)[None, :]
    return tl.load(a_ptr + rows * a_stride + ks, mask=(rows < B) & (ks < K), other=0.0, cache_modifier=SHARED)


@triton.jit
def resident_left_halves(a_ptr, rows, B, a_stride, K, K_START: tl.constexpr, K_SIZE: tl.constexpr):
    """The left operand's columns K_START .. K_START + K_SIZE, split as resident_halves splits the slab's rows."""
    if K_SIZE >= SPLIT_SLAB_DEPTH:
        low = resident_left(a_ptr, rows, B, a_stride, K, K_START, K_SIZE // 2)
        high = resident_left(a_ptr, rows, B, a_stride, K, K_START + K_SIZE // 2, K_SIZE // 2)
    else:
        low = resident_left(a_ptr, rows, B, a_stride, K, K_START, K_SIZE)
        high = low
    return low, high


@triton.jit
def resident_product(a_halves, low, high, K_SIZE: tl.constexpr, zeros, PRECISION: tl.constexpr):
    """a_halves @ (low; high): halves of resident_left_halves and resident_halves, each product apart."""
    a_low, a_high = a_halves
    product = tile_dot(a_low, low, zeros, PRECISION)
    if K_SIZE >= SPLIT_SLAB_DEPTH:
        product += tile_dot(a_high, high, zeros, PRECISION)
    return product


@triton.jit
def resident_product_loading(a_ptr, rows, B, a_stride, K, low, high, K_START: tl.constexpr, K_SIZE: tl.constexpr,
                             zeros, PRECISION: tl.constexpr):
    """resident_product of a[:, K_START : K_START + K_SIZE], each half of a loaded just before its product."""
    if K_SIZE >= SPLIT_SLAB_DEPTH:
        product = tile_dot(resident_left(a_ptr, rows, B, a_stride, K, K_START, K_SIZE // 2), low, zeros, PRECISION)
        product += tile_dot(resident_left(a_ptr, rows, B, a_stride, K, K_START + K_SIZE // 2, K_SIZE // 2), high,
                            zeros, PRECISION)
    else:
        product = tile_dot(resident_left(a_ptr, rows, B, a_stride, K, K_START, K_SIZE), low, zeros, PRECISION)
    return product


@triton.jit
def resident_dot(a_ptr, rows, B, a_stride, K, main_low, main_high, rest_low, rest_high, acc,
                 K_MAIN: tl.constexpr, K_REST: tl.constexpr, PRECISION: tl.constexpr, WHOLE: tl.constexpr):
    """acc + a [BB, K] @ the slabs of resident_weight, a's row b at a_ptr + b * a_stride. Each slab's
    product accumulates on its own: one accumulator for all of K made the MMAs one dependent chain (192
    in a row for the T=1024 H=768 backward's 16 x 8 tile, in the sm_90 code), each waiting for the last.
    A 16-bit a is loaded whole before the first product: loaded part by part, each part's trip to L2
    waited for the layout conversion (through shared memory) of the part before it. A float32 a whole,
    or both halves of its 1024-deep part, spilled registers inside the step loop (TF32, H = 768 and
    1024, in the sm_90 compile): there each half is loaded just before its product, as a 16-bit one is
    without WHOLE (launch.loads_ahead)."""
    zeros = tl.zeros(acc.shape, acc.dtype)
    if WHOLE and a_ptr.dtype.element_ty.primitive_bitwidth <= 16:
        a_main = resident_left_halves(a_ptr, rows, B, a_stride, K, 0, K_MAIN)
        a_rest = a_main
        if K_REST > 0:
            a_rest = resident_left_halves(a_ptr, rows, B, a_stride, K, K_MAIN, K_REST)
        acc += resident_product(a_main, main_low, main_high, K_MAIN, zeros, PRECISION)
        if K_REST > 0:
            acc += resident_product(a_rest, rest_low, rest_high, K_REST, zeros, PRECISION)
    else:
        acc += resident_product_loading(a_ptr, rows, B, a_stride, K, main_low, main_high, 0, K_MAIN, zeros,
                                        PRECISION)
        if K_REST > 0:
            acc += resident_product_loading(a_ptr, rows, B, a_stride, K, rest_low, rest_high, K_MAIN, K_REST, zeros,
                                            PRECISION)
    return acc


@triton.jit
def resident_program(unit_tiles):
    """(unit tile, first row tile, row tiles apart) of this resident program: the launch's programs are
    unit_tiles for each of its row programs (launch.Plan.row_programs), a program per unit tile where it
    is one."""
    pid = tl.program_id(0)
    return pid % unit_tiles, pid // unit_tiles, tl.num_programs(0) // unit_tiles


@triton.jit(do_not_specialize=RESIDENT_ARGUMENTS)
def forward_resident_kernel(
    seed_ptr, xg_ptr, w_ptr, h_carry_ptr, rs_ptr, cs_ptr, c_carry_ptr, out_ptr, lengths_ptr, ints_ptr, floats_ptr,
    arrivals_ptr, h_n_ptr, c_n_ptr,
    seq_len, first, last, synchronize, reverse, stream, has_lengths, B, H, H_out,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, K_MAIN: tl.constexpr, K_REST: tl.constexpr,
    BARRIER_POLL_LOADS: tl.constexpr, LOAD_AHEAD: tl.constexpr, WEIGHT_DROP: tl.constexpr, OUTPUT_DROPOUT: tl.constexpr,
):
    """Steps [first, last) of a layer-direction without projection, W~ on chip: program p owns the units
    of unit tile p % tiles (tiles = H / BLOCK_H) for the row tiles p // tiles, p // tiles + R, ... (R =
    programs / tiles, launch.Plan.row_programs) at every step, and loads their four gates' rows of W~
    once, before the first step. With synchronize, a grid barrier ends each step (the whole sequence in
    one launch); without, the caller launches one step at a time. With LOAD_AHEAD, the launch that ends the
    sequence stores the program's tiles of h_n and c_n in x's dtype. OUTPUT_DROPOUT: out is stored after the
    stack's output dropout (finish_h)."""
    # the call's settings and each step's inputs loaded ahead (step_settings, step_inputs; the gates during
    # the barrier), except in TF32, which spilled registers inside the step loop with them (sm_90, H = 256
    # and 1024)
    AHEAD: tl.constexpr = LOAD_AHEAD and PRECISION != "tf32"
    ints, floats, seed = ints_ptr, floats_ptr, seed_ptr
    if AHEAD:
        ints, floats = step_settings(ints_ptr, floats_ptr)
        seed = tl.load(seed_ptr)
    unit_tile, row_program, row_programs = resident_program(tl.cdiv(H, BLOCK_H))
    units = unit_tile * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]  # [1, BH]
    # column n of the [H_out, 4 BH] slab is unit n // 4's gate n % 4: W~ row (n % 4) * H + unit
    n = tl.arange(0, 4 * BLOCK_H)[None, :]
    n_unit = unit_tile * BLOCK_H + n // 4
    w_main_low, w_main_high, w_rest_low, w_rest_high = resident_weight(
        w_ptr, ((n % 4) * H + n_unit) * H_out, 1, n_unit < H, H_out, (seed, ints_ptr, floats_ptr, stream, H_out),
        K_MAIN, K_REST, WEIGHT_DROP,
    )
    expected = 0
    # xg's gates at the program's first row tile for the step to come, loaded while the program waits at
    # the barrier before it: at long T xg comes from DRAM, and the wait hides the trip
    first_row = row_program * BLOCK_B
    first_rows = first_row + tl.arange(0, BLOCK_B)[:, None]
    if AHEAD:
        next_i, next_f, next_g, next_o = gate_inputs(xg_ptr, first_rows, units, (first_rows < B) & (units < H),
                                                     position(first, seq_len, reverse), B, H)
    for s in range(first, last):
        t = position(s, seq_len, reverse)
        r_prev_ptr = rs_ptr + (t + reverse).to(tl.int64) * B * H_out
        for row0 in range(first_row, B, row_programs * BLOCK_B):
            rows = row0 + tl.arange(0, BLOCK_B)[:, None]
            inside = (rows < B) & (units < H)
            inputs = None
            if AHEAD:
                x_i, x_f, x_g, x_o = next_i, next_f, next_g, next_o
                if row0 != first_row:
                    x_i, x_f, x_g, x_o = gate_inputs(xg_ptr, rows, units, inside, t, B, H)
                inputs = step_inputs((x_i, x_f, x_g, x_o), h_carry_ptr, c_carry_ptr, lengths_ptr, rows, units, inside,
                                     t, reverse, has_lengths, B, H, H_out)
            acc = resident_dot(r_prev_ptr, rows, B, H_out, H_out, w_main_low, w_main_high, w_rest_low, w_rest_high,
                               tl.zeros([BLOCK_B, 4 * BLOCK_H], c_carry_ptr.dtype.element_ty), K_MAIN, K_REST,
                               PRECISION, LOAD_AHEAD)
            # column u * 4 + 2 a + b as [BB, BH, a, b]: split on b gives gates (i, g) and (f, o), on a each one
            even, odd = tl.split(tl.reshape(acc, [BLOCK_B, BLOCK_H, 2, 2]))
            acc_i, acc_g = tl.split(even)
            acc_f, acc_o = tl.split(odd)
            finish_step(acc_i, acc_f, acc_g, acc_o, inputs, rows, units, inside, t, reverse, stream, seed,
                        has_lengths, 0,
                        xg_ptr, h_carry_ptr, rs_ptr, cs_ptr, c_carry_ptr, out_ptr, out_ptr, lengths_ptr, ints, floats,
                        B, H, H_out, OUTPUT_DROPOUT)
        if synchronize != 0:
            barrier_arrive(arrivals_ptr)
        if AHEAD:
            # between the arrival and the wait (see barrier_arrive); none past the last step
            rows_ahead = tl.where(s + 1 < last, B, 0)
            next_i, next_f, next_g, next_o = gate_inputs(
                xg_ptr, first_rows, units, (first_rows < rows_ahead) & (units < H),
                position(tl.minimum(s + 1, last - 1), seq_len, reverse), B, H,
            )
        if synchronize != 0:
            expected += tl.num_programs(0)
            barrier_wait(arrivals_ptr, expected, BARRIER_POLL_LOADS)
    if synchronize != 0:
        barriers_done(arrivals_ptr)
    # not in the where-used variant (LOAD_AHEAD off), whose registers are full: with these stores after its loop,
    # the PTB layer's fp16 16 x 16 tiles spilled inside it (sm_90 compile); its caller converts the carries
    if LOAD_AHEAD and last == seq_len:
        tl.debug_barrier()  # the tiles' carries, which other threads of the program stored
        for row0 in range(first_row, B, row_programs * BLOCK_B):
            rows = row0 + tl.arange(0, BLOCK_B)[:, None]
            final_state_tile(c_carry_ptr, c_n_ptr, rows, units, seq_len, reverse, B, H)
            final_state_tile(h_carry_ptr, h_n_ptr, rows, units, seq_len, reverse, B, H_out)


@triton.jit(do_not_specialize=RESIDENT_ARGUMENTS)
def backward_resident_kernel(
    seed_ptr, dgates_ptr, db_ptr, xg_ptr, w_ptr, cs_ptr, dout_ptr, gh_ptr, gc_ptr, lengths_ptr, ints_ptr, floats_ptr,
    arrivals_ptr, seq_len, first, last, synchronize, reverse, stream, has_lengths, B, H, H_out,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, K_MAIN: tl.constexpr, K_REST: tl.constexpr,
    BARRIER_POLL_LOADS: tl.constexpr, LOAD_AHEAD: tl.constexpr, WEIGHT_DROP: tl.constexpr, OUTPUT_DROPOUT: tl.constexpr,
):
    """Calls [first, last) of the backward through time of a layer-direction without projection (the
    seq_len + 1 calls of backward_positions), W~ on chip: program p owns the units of its unit tile for its
    row tiles, as the forward's (resident_program), and loads W~'s columns for them, a [4H, BLOCK_H] slab,
    once. Each call, per row tile: dgates[t_next] [BB, 4H] @ slab, then finish_h_backward. Barriers and
    launches as the forward's, on a counter of its own that it leaves as it is: resetting it after the loop
    (barriers_done) spilled registers inside the loop of the T=1024 layer on Triton 3.6 (sm_90 compile).
    OUTPUT_DROPOUT: dL/dout is dropped as it loads."""
    # each step's inputs loaded ahead of the product where a tile has at most 128 elements: at 16 x 16
    # they spilled registers inside the step loop (sm_90 compile, H = 512's row-split plans). The call's
    # settings are loaded where used: held through the loop, they spilled at T = 1024 H = 768 on Triton 3.6
    INPUTS_AHEAD: tl.constexpr = LOAD_AHEAD and BLOCK_B * BLOCK_H <= 128
    unit_tile, row_program, row_programs = resident_program(tl.cdiv(H_out, BLOCK_H))
    units = unit_tile * BLOCK_H + tl.arange(0, BLOCK_H)[None, :]  # [1, BH]
    w_main_low, w_main_high, w_rest_low, w_rest_high = resident_weight(
        w_ptr, units, H_out, units < H_out, 4 * H, (seed_ptr, ints_ptr, floats_ptr, stream, H_out), K_MAIN, K_REST,
        WEIGHT_DROP,
    )
    expected = 0
    for back in range(first, last):
        t, t_next = backward_positions(back, seq_len, reverse)
        for row0 in range(row_program * BLOCK_B, B, row_programs * BLOCK_B):
            rows = row0 + tl.arange(0, BLOCK_B)[:, None]
            inside = (rows < B) & (units < H_out)
            h_inputs = None
            cell_inputs = None
            if INPUTS_AHEAD:
                h_inputs = h_backward_inputs(gh_ptr, dout_ptr, lengths_ptr, rows, units, inside, t, has_lengths,
                                             seed_ptr, ints_ptr, floats_ptr, B, H_out, OUTPUT_DROPOUT)
                cell_inputs = cell_backward_inputs(xg_ptr, cs_ptr, gc_ptr, rows, units, inside, t, reverse, B, H)
            acc = tl.zeros([BLOCK_B, BLOCK_H], gh_ptr.dtype.element_ty)
            if back > 0:
                acc = resident_dot(dgates_ptr + t_next.to(tl.int64) * B * 4 * H, rows, B, 4 * H, 4 * H, w_main_low,
                                   w_main_high, w_rest_low, w_rest_high, acc, K_MAIN, K_REST, PRECISION, LOAD_AHEAD)
            finish_h_backward(acc, h_inputs, cell_inputs, row0 // BLOCK_B, rows, units, inside, t, reverse, stream,
                              seed_ptr, has_lengths, 0, back > 0, back < seq_len, dgates_ptr, db_ptr, xg_ptr, cs_ptr,
                              dout_ptr,
                              gh_ptr, gc_ptr, dout_ptr, lengths_ptr, ints_ptr, floats_ptr, B, H, H_out, OUTPUT_DROPOUT)
        if synchronize != 0:
            expected += tl.num_programs(0)
            grid_barrier(arrivals_ptr, expected, BARRIER_POLL_LOADS)
