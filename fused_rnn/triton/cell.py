"""The pieces of one LSTM step that every Triton kernel shares: Philox draws of the counter layout,
the cell's pointwise math forward and backward, zoneout, and the tile products.

Derivations: README.md beside this file. Counter layout: docs/randomness.md.
"""

import triton
import triton.language as tl

# docs/randomness.md: counter word c3
KIND_INPUT: tl.constexpr = 1
KIND_OUTPUT: tl.constexpr = 2
KIND_WEIGHT: tl.constexpr = 3
KIND_SEQUENCE: tl.constexpr = 4
KIND_STEP: tl.constexpr = 5

# Slots of the per-call int64 parameter tensor (seed and thresholds) and of the float one (scales).
INT_SEED: tl.constexpr = 0
INT_HIDDEN: tl.constexpr = 1
INT_UPDATE: tl.constexpr = 2
INT_CELL: tl.constexpr = 3
INT_ZONEOUT_H: tl.constexpr = 4
INT_ZONEOUT_C: tl.constexpr = 5
INT_WEIGHT: tl.constexpr = 6
FLOAT_HIDDEN: tl.constexpr = 0  # keep scale 1 / (1 - p)
FLOAT_UPDATE: tl.constexpr = 1
FLOAT_CELL: tl.constexpr = 2
FLOAT_ZONEOUT_H: tl.constexpr = 3  # p, for the eval-mode expectation
FLOAT_ZONEOUT_C: tl.constexpr = 4
FLOAT_WEIGHT: tl.constexpr = 5

# Zoneout modes (constexpr): off, a Philox mask (training), the expectation p (eval).
ZONEOUT_OFF: tl.constexpr = 0
ZONEOUT_MASK: tl.constexpr = 1
ZONEOUT_MEAN: tl.constexpr = 2
# Update dropout modes (constexpr): off, one mask per step, one per sequence.
UPDATE_OFF: tl.constexpr = 0
UPDATE_STEP: tl.constexpr = 1
UPDATE_SEQUENCE: tl.constexpr = 2


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
def unit_draws(seed, rows, units, H, t, stream, KIND: tl.constexpr):
    """Philox words of the per-unit masks of layer-direction `stream`: counter (b * H + j, t, stream, KIND).

    rows: [BB, 1] batch rows b; units: [1, BJ] units j; returns four uint32 [BB, BJ] words.
    """
    unit = (rows * H + units).to(tl.uint32)
    return tl.philox(seed, unit, t, stream, KIND)


@triton.jit
def unit_masks(
    ints_ptr, rows, units, H, t, stream,
    HIDDEN: tl.constexpr, UPDATE: tl.constexpr, CELL: tl.constexpr, ZONEOUT_H: tl.constexpr, ZONEOUT_C: tl.constexpr,
):
    """Every per-unit mask of step t for units (rows, units), as docs/randomness.md lays them out.

    Returns (hidden keep, update keep, cell keep, zoneout_h, zoneout_c), [BB, BJ] booleans; those whose
    regularizer is off are all False and unused.
    """
    seed = tl.load(ints_ptr + INT_SEED)
    none = (rows + units) < 0
    hidden_keep, update_keep, cell_keep, zone_h, zone_c = none, none, none, none, none
    if HIDDEN or CELL or UPDATE == UPDATE_SEQUENCE:
        w0, w1, w2, _ = unit_draws(seed, rows, units, H, 0, stream, KIND_SEQUENCE)
        if HIDDEN:
            hidden_keep = not_fires(w0, tl.load(ints_ptr + INT_HIDDEN))
        if CELL:
            cell_keep = not_fires(w1, tl.load(ints_ptr + INT_CELL))
        if UPDATE == UPDATE_SEQUENCE:
            update_keep = not_fires(w2, tl.load(ints_ptr + INT_UPDATE))
    if ZONEOUT_H == ZONEOUT_MASK or ZONEOUT_C == ZONEOUT_MASK or UPDATE == UPDATE_STEP:
        w0, w1, w2, _ = unit_draws(seed, rows, units, H, t, stream, KIND_STEP)
        if ZONEOUT_H == ZONEOUT_MASK:
            zone_h = fires(w0, tl.load(ints_ptr + INT_ZONEOUT_H))
        if ZONEOUT_C == ZONEOUT_MASK:
            zone_c = fires(w1, tl.load(ints_ptr + INT_ZONEOUT_C))
        if UPDATE == UPDATE_STEP:
            update_keep = not_fires(w2, tl.load(ints_ptr + INT_UPDATE))
    return hidden_keep, update_keep, cell_keep, zone_h, zone_c


@triton.jit
def keep_scaled(x, keep, scale):
    """Inverted dropout: x * scale where kept, exact 0 where dropped (never NaN, whatever the scale)."""
    return tl.where(keep, x * scale, 0.0)


@triton.jit
def zoneout(previous, new, zone, p, MODE: tl.constexpr):
    """SPEC: z * previous + (1 - z) * new, with z the mask (training) or the probability p (eval)."""
    if MODE == ZONEOUT_MASK:
        return tl.where(zone, previous, new)
    elif MODE == ZONEOUT_MEAN:
        return p * previous + (1.0 - p) * new
    else:
        return new


@triton.jit
def zoneout_backward(grad, zone, p, MODE: tl.constexpr):
    """Gradients (to previous, to new) of zoneout(previous, new) given the gradient of its result."""
    if MODE == ZONEOUT_MASK:
        return tl.where(zone, grad, 0.0), tl.where(zone, 0.0, grad)
    elif MODE == ZONEOUT_MEAN:
        return p * grad, (1.0 - p) * grad
    else:
        return grad * 0.0, grad


@triton.jit
def cell_forward(
    gi, gf, gg, go, c_prev, update_keep, update_scale, cell_keep, cell_scale,
    UPDATE: tl.constexpr, CELL: tl.constexpr,
):
    """Gate pre-activations -> (i, f, g, o, c~, o * tanh(c~)) with update and cell dropout (SPEC section 2)."""
    i = tl.sigmoid(gi)
    f = tl.sigmoid(gf)
    g = tanh(gg)
    o = tl.sigmoid(go)
    g_kept = g
    if UPDATE != UPDATE_OFF:
        g_kept = keep_scaled(g, update_keep, update_scale)
    c_new = f * c_prev + i * g_kept
    if CELL:
        c_new = keep_scaled(c_new, cell_keep, cell_scale)
    return i, f, g, o, c_new, o * tanh(c_new)


@triton.jit
def cell_backward(
    i, f, g, o, c_prev, d_h_tilde, d_c_tilde, update_keep, update_scale, cell_keep, cell_scale,
    UPDATE: tl.constexpr, CELL: tl.constexpr,
):
    """Gradients of the gate pre-activations and of c_prev, given those of h~ = o tanh(c~) and of c~.

    The forward's c~ is recomputed from the stored activations and c_prev, with the same masks.
    """
    g_kept = g
    if UPDATE != UPDATE_OFF:
        g_kept = keep_scaled(g, update_keep, update_scale)
    c_new = f * c_prev + i * g_kept
    if CELL:
        c_new = keep_scaled(c_new, cell_keep, cell_scale)
    tanh_c = tanh(c_new)
    d_o = d_h_tilde * tanh_c
    d_c = d_c_tilde + d_h_tilde * o * (1.0 - tanh_c * tanh_c)
    if CELL:
        d_c = keep_scaled(d_c, cell_keep, cell_scale)
    d_g_kept = d_c * i
    d_g = d_g_kept
    if UPDATE != UPDATE_OFF:
        d_g = keep_scaled(d_g_kept, update_keep, update_scale)
    d_gi = d_c * g_kept * i * (1.0 - i)
    d_gf = d_c * c_prev * f * (1.0 - f)
    d_gg = d_g * (1.0 - g * g)
    d_go = d_o * o * (1.0 - o)
    return d_gi, d_gf, d_gg, d_go, d_c * f


@triton.jit
def tile_dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a [M, K] @ b [K, N], the product in b's dtype (tensor cores for half weights), acc in float32/64."""
    if PRECISION == "default":
        return tl.dot(a.to(b.dtype), b, acc)
    else:
        return tl.dot(a.to(b.dtype), b, acc, input_precision=PRECISION)
