"""The pieces of one LSTM step that every Triton kernel shares: Philox draws of the counter layout,
the cell's pointwise math forward and backward, zoneout, and the tile products.

Derivations: README.md beside this file. Counter layout: docs/randomness.md.
"""

import triton
import triton.language as tl

from ..backends import triton_interpreted

# docs/randomness.md: counter word c3
KIND_INPUT = tl.constexpr(1)
KIND_OUTPUT = tl.constexpr(2)
KIND_WEIGHT = tl.constexpr(3)
KIND_SEQUENCE = tl.constexpr(4)
KIND_STEP = tl.constexpr(5)

# Slots of the int64 parameter tensor: thresholds (0 when a dropout is off, so it keeps everything) and
# mode words; and of the float one: keep scales (1.0 when off) and zoneout's p. The seed is not among
# them: each launch takes the call's seed tensor of its own (seed_value), so that these depend only on
# the regularizers and are sent to a GPU once, not once a call.
INT_HIDDEN = tl.constexpr(0)
INT_UPDATE = tl.constexpr(1)
INT_CELL = tl.constexpr(2)
INT_ZONEOUT_H = tl.constexpr(3)
INT_ZONEOUT_C = tl.constexpr(4)
INT_WEIGHT = tl.constexpr(5)
INT_SEQUENCE_DRAWS = tl.constexpr(6)  # 1 when a kind-4 draw is needed (hidden, cell, update per sequence)
INT_STEP_DRAWS = tl.constexpr(7)  # 1 when a kind-5 draw is needed (zoneout masks, update per step)
INT_UPDATE_MODE = tl.constexpr(8)  # UPDATE_*
INT_ZONEOUT_H_MODE = tl.constexpr(9)  # ZONEOUT_*
INT_ZONEOUT_C_MODE = tl.constexpr(10)
# the stack's output dropout where this layer-direction's kernels apply it (kernels.output_dropped; 0 elsewhere),
# and 1 in locked mode (one mask for every step)
INT_OUTPUT = tl.constexpr(11)
INT_OUTPUT_LOCKED = tl.constexpr(12)
INT_SLOTS = tl.constexpr(13)
FLOAT_HIDDEN = tl.constexpr(0)
FLOAT_UPDATE = tl.constexpr(1)
FLOAT_CELL = tl.constexpr(2)
FLOAT_ZONEOUT_H = tl.constexpr(3)
FLOAT_ZONEOUT_C = tl.constexpr(4)
FLOAT_WEIGHT = tl.constexpr(5)
FLOAT_OUTPUT = tl.constexpr(6)
FLOAT_SLOTS = tl.constexpr(7)

# TRITON_INTERPRET, set before import as the tests do: kernels then run as Python on CPU tensors
INTERPRETED = tl.constexpr(triton_interpreted())

ZONEOUT_OFF = tl.constexpr(0)
ZONEOUT_MASK = tl.constexpr(1)  # training: a Philox mask
ZONEOUT_MEAN = tl.constexpr(2)  # eval: the expectation p
UPDATE_OFF = tl.constexpr(0)
UPDATE_STEP = tl.constexpr(1)
UPDATE_SEQUENCE = tl.constexpr(2)


@triton.jit
def fires(draw, threshold):
    """The event with probability p happens iff draw < threshold(p); compared in 64 bits since threshold(1) = 2**32."""
    return draw.to(tl.int64) < threshold


@triton.jit
def not_fires(draw, threshold):
    """A dropout keeps its element iff the drop event does not fire."""
    return draw.to(tl.int64) >= threshold


@triton.jit
def tanh(x):
    # the interpreter has no tanh; 2 sigmoid(2x) - 1 is exact in the limits and within an ulp-scale error elsewhere
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def step_settings(ints_ptr, floats_ptr):
    """The per-call parameters as two tuples indexed by slot, ints[INT_*] and floats[FLOAT_*], loaded
    once: a persistent or resident kernel loads them before its time loop. Loaded where they were used,
    they were trips to L2 at every step, some after branches on others, since each grid barrier's acquire
    empties L1. The flag and mode words as int32; the thresholds (up to 2**32) as int64."""
    ints = (
        tl.load(ints_ptr + INT_HIDDEN),
        tl.load(ints_ptr + INT_UPDATE),
        tl.load(ints_ptr + INT_CELL),
        tl.load(ints_ptr + INT_ZONEOUT_H),
        tl.load(ints_ptr + INT_ZONEOUT_C),
        tl.load(ints_ptr + INT_WEIGHT),
        tl.load(ints_ptr + INT_SEQUENCE_DRAWS).to(tl.int32),
        tl.load(ints_ptr + INT_STEP_DRAWS).to(tl.int32),
        tl.load(ints_ptr + INT_UPDATE_MODE).to(tl.int32),
        tl.load(ints_ptr + INT_ZONEOUT_H_MODE).to(tl.int32),
        tl.load(ints_ptr + INT_ZONEOUT_C_MODE).to(tl.int32),
        tl.load(ints_ptr + INT_OUTPUT),
        tl.load(ints_ptr + INT_OUTPUT_LOCKED).to(tl.int32),
    )
    floats = (
        tl.load(floats_ptr + FLOAT_HIDDEN),
        tl.load(floats_ptr + FLOAT_UPDATE),
        tl.load(floats_ptr + FLOAT_CELL),
        tl.load(floats_ptr + FLOAT_ZONEOUT_H),
        tl.load(floats_ptr + FLOAT_ZONEOUT_C),
        tl.load(floats_ptr + FLOAT_WEIGHT),
        tl.load(floats_ptr + FLOAT_OUTPUT),
    )
    return ints, floats


@triton.jit
def setting(settings, SLOT: tl.constexpr):
    """Slot SLOT of a call's ints or floats: from step_settings' tuple, or loaded here, where it is used, from
    the parameter tensor itself (a launch per step, whose registers are all taken by its product and cell,
    holds none of them from its start)."""
    if isinstance(settings, tl.tensor):
        value = tl.load(settings + SLOT)
    else:
        value = settings[SLOT]
    return value


@triton.jit
def seed_value(seed):
    """The call's seed: loaded here from its one-element int64 tensor (seed a pointer), or the value a time
    loop loaded before its steps, as step_settings loads the settings."""
    if seed.dtype.is_ptr():
        seed = tl.load(seed)
    return seed


@triton.jit
def unit_draws(seed, rows, units, H, t, stream, KIND: tl.constexpr):
    """Philox words of the per-unit masks of layer-direction `stream`: counter (b * H + j, t, stream, KIND).

    rows: [BB, 1] batch rows b; units: [1, BJ] units j; returns four uint32 [BB, BJ] words.
    """
    unit = (rows * H + units).to(tl.uint32)
    return tl.philox(seed, unit, t, stream, KIND)


@triton.jit
def unit_masks(ints, seed, rows, units, H, t, stream):
    """Every per-unit mask of step t for units (rows, units), as docs/randomness.md lays them out.

    Returns [BB, BJ] booleans (hidden keep, update keep, cell keep, zoneout_h, zoneout_c). A dropout
    that is off keeps everything (its threshold is 0) and a zoneout that is off never fires, so the
    cell math applies every mask unconditionally; Philox runs only for the kinds in use.
    """
    seed = seed_value(seed)
    update_mode = setting(ints, INT_UPDATE_MODE)
    keep_all = (rows + units) >= 0
    hidden_keep, update_keep, cell_keep = keep_all, keep_all, keep_all
    zone_h, zone_c = ~keep_all, ~keep_all
    if setting(ints, INT_SEQUENCE_DRAWS) != 0:
        w0, w1, w2, _ = unit_draws(seed, rows, units, H, 0, stream, KIND_SEQUENCE)
        hidden_keep = not_fires(w0, setting(ints, INT_HIDDEN))
        cell_keep = not_fires(w1, setting(ints, INT_CELL))
        if update_mode == UPDATE_SEQUENCE:
            update_keep = not_fires(w2, setting(ints, INT_UPDATE))
    if setting(ints, INT_STEP_DRAWS) != 0:
        w0, w1, w2, _ = unit_draws(seed, rows, units, H, t, stream, KIND_STEP)
        zone_h = fires(w0, setting(ints, INT_ZONEOUT_H))
        zone_c = fires(w1, setting(ints, INT_ZONEOUT_C))
        if update_mode == UPDATE_STEP:
            update_keep = not_fires(w2, setting(ints, INT_UPDATE))
    return hidden_keep, update_keep, cell_keep, zone_h, zone_c


@triton.jit
def keep_scaled(x, keep, scale):
    """Inverted dropout: x * scale where kept, exact 0 where dropped (never NaN, whatever the scale)."""
    return tl.where(keep, x * scale, 0.0)


@triton.jit
def zoneout(previous, new, zone, p, mode):
    """SPEC: z * previous + (1 - z) * new, with z the mask (training) or the probability p (eval)."""
    result = new
    if mode == ZONEOUT_MASK:
        result = tl.where(zone, previous, new)
    elif mode == ZONEOUT_MEAN:
        # p = 1 selects previous, as a dropped element is selected: (1 - p) * inf would be NaN
        result = tl.where(p == 1.0, previous, p * previous + (1.0 - p) * new)
    return result


@triton.jit
def zoneout_backward(grad, zone, p, mode):
    """Gradients (to previous, to new) of zoneout(previous, new) given the gradient of its result."""
    to_previous = grad * 0.0
    to_new = grad
    if mode == ZONEOUT_MASK:
        to_previous = tl.where(zone, grad, 0.0)
        to_new = tl.where(zone, 0.0, grad)
    elif mode == ZONEOUT_MEAN:
        to_previous = p * grad
        to_new = tl.where(p == 1.0, 0.0, (1.0 - p) * grad)
    return to_previous, to_new


@triton.jit
def cell_forward(gi, gf, gg, go, c_prev, update_keep, update_scale, cell_keep, cell_scale):
    """Gate pre-activations -> (i, f, g, o, c~, o * tanh(c~)) with update and cell dropout (SPEC section 2)."""
    i = tl.sigmoid(gi)
    f = tl.sigmoid(gf)
    g = tanh(gg)
    o = tl.sigmoid(go)
    c_new = keep_scaled(f * c_prev + i * keep_scaled(g, update_keep, update_scale), cell_keep, cell_scale)
    return i, f, g, o, c_new, o * tanh(c_new)


@triton.jit
def cell_backward(i, f, g, o, c_prev, d_h_tilde, d_c_tilde, update_keep, update_scale, cell_keep, cell_scale):
    """Gradients of the gate pre-activations and of c_prev, given those of h~ = o tanh(c~) and of c~.

    The forward's c~ is recomputed from the stored activations and c_prev, with the same masks.
    """
    g_kept = keep_scaled(g, update_keep, update_scale)
    tanh_c = tanh(keep_scaled(f * c_prev + i * g_kept, cell_keep, cell_scale))
    d_o = d_h_tilde * tanh_c
    # through cell dropout to the sum f c_prev + i g^
    d_c = keep_scaled(d_c_tilde + d_h_tilde * o * (1.0 - tanh_c * tanh_c), cell_keep, cell_scale)
    d_g = keep_scaled(d_c * i, update_keep, update_scale)
    d_gi = d_c * g_kept * i * (1.0 - i)
    d_gf = d_c * c_prev * f * (1.0 - f)
    d_gg = d_g * (1.0 - g * g)
    d_go = d_o * o * (1.0 - o)
    return d_gi, d_gf, d_gg, d_go, d_c * f


@triton.jit
def round_to_tf32(x):
    """float32 x rounded to TF32's 10 mantissa bits, to nearest with ties away from zero (cvt.rna, as
    cuBLAS and cuDNN round): half a TF32 unit added to the magnitude's bits, the 13 bits below cleared.
    NaN stays NaN; a carry into the exponent is the correct rounding, up to infinity past the largest."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def tile_dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a [M, K] @ b [K, N]. "ieee": both operands in acc's float type, exact products; otherwise
    the product in b's dtype (tensor cores for half weights, TF32 for float32 with "tf32")."""
    # out_dtype spelled out: Triton 3.6 defaults it to float32, even for a float64 accumulator
    if PRECISION == "ieee":
        return tl.dot(a.to(acc.dtype), b.to(acc.dtype), acc, input_precision="ieee", out_dtype=acc.dtype)
    elif PRECISION == "tf32":
        # TF32 tensor cores drop an operand's 13 low mantissa bits (truncation), about twice the error of
        # cuBLAS's and cuDNN's rounding to nearest, which nn.LSTM gets (H100: 2.1-2.9x PyTorch's in the
        # TF32 error tests at a77d610): round first
        return tl.dot(round_to_tf32(a.to(tl.float32)), round_to_tf32(b), acc, input_precision="tf32",
                      out_dtype=acc.dtype)
    elif PRECISION == "default":
        return tl.dot(a.to(b.dtype), b, acc, out_dtype=acc.dtype)
    else:
        return tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def rounded(x, dtype: tl.constexpr):
    """x in dtype, rounded to the nearest (ties to even), as a compiled kernel converts. The interpreter
    truncates float32 -> bfloat16 instead, which would double the error of every activation kept in bf16
    in the CPU tests; there the bits are rounded first, so the truncation is exact."""
    if INTERPRETED:
        if dtype == tl.bfloat16 and x.dtype == tl.float32:
            bits = x.to(tl.uint32, bitcast=True)
            bits += 0x7FFF + ((bits >> 16) & 1)
            x = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def store_rounded(ptr, x, mask):
    """Store x in ptr's dtype, rounded as `rounded` rounds."""
    tl.store(ptr, rounded(x, ptr.dtype.element_ty), mask=mask)
