// The pointwise LSTM cell of SPEC.md section 2, forward and backward, with its masks drawn in place.
//
// Everything here works on one chunk: one batch row b, at most kChunk consecutive hidden units
// j0 .. j0 + n, one step. Pointers are already offset to the chunk's first unit; arrays named [n] hold
// one value per unit of the chunk. Mask factors are nullable: null means that regularizer is off.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

#include "philox.h"

namespace fused_rnn {

constexpr int64_t kChunk = 64;

// Probabilities and modes of the recurrent regularizers of one layer-direction, as the op receives them.
struct Regs {
  bool training;
  double recurrent, weight, update, cell, zoneout_h, zoneout_c;
  bool weight_rows, update_per_step;

  // Masks drawn (training only).
  bool rec_mask() const { return training && recurrent > 0; }
  bool weight_mask() const { return training && weight > 0; }
  bool update_step_mask() const { return training && update > 0 && update_per_step; }
  bool update_seq_mask() const { return training && update > 0 && !update_per_step; }
  bool cell_mask() const { return training && cell > 0; }
  bool zh_mask() const { return training && zoneout_h > 0; }
  bool zc_mask() const { return training && zoneout_c > 0; }
  bool step_draws() const { return zh_mask() || zc_mask() || update_step_mask(); }
  bool sequence_draws() const { return rec_mask() || cell_mask() || update_seq_mask(); }
};

// Where one layer-direction's per-unit draws come from: Philox(c0 = b * H + j, c1, c2 = k, c3).
struct UnitStream {
  PhiloxKey key;
  uint32_t k;      // layer * num_directions + direction
  int64_t hidden;  // H: the row stride of c0, also for masks over H_out units

  // Words w0..w2 of units j0 .. j0 + n of row b.
  void draw(uint32_t kind, uint32_t step, int64_t b, int64_t j0, int64_t n, uint32_t* w0, uint32_t* w1, uint32_t* w2) const {
    philox_run<false>(static_cast<uint32_t>(b * hidden + j0), n, step, k, kind, key, w0, w1, w2, nullptr);
  }
};

// x times a mask factor (a dropout's 0 or scale, a zoneout weight), selected to exactly 0 where the factor is 0: a
// dropped element is 0 whatever its value, inf and NaN included (the reference's torch.where), never 0 * inf = NaN.
template <typename T>
inline at::vec::Vectorized<T> masked(const at::vec::Vectorized<T>& x, const at::vec::Vectorized<T>& factor) {
  return (x * factor) & (factor != at::vec::Vectorized<T>(T(0)));
}

template <typename T>
inline T masked(T x, T factor) {
  const T product = x * factor;  // unconditional, so that loops of it vectorise to a blend
  return factor != T(0) ? product : T(0);
}

// Dropout factor: scale where kept, exactly 0 where dropped.
template <typename T>
inline void keep_factors(const uint32_t* draws, int64_t n, double p, T* out) {
  const Event drop(p);
  const T scale = static_cast<T>(keep_scale(p));
  for (int64_t i = 0; i < n; ++i) {
    out[i] = drop.fires(draws[i]) ? T(0) : scale;
  }
}

// Zoneout weights: the new state is keep * previous + take * candidate. In training (keep, take) is (1, 0) where
// the unit zones out and (0, 1) elsewhere, which selects exactly; in eval it is (p, 1 - p), the expectation.
template <typename T>
inline void zoneout_factors(const uint32_t* draws, int64_t n, double p, T* keep, T* take) {
  const Event zone(p);
  for (int64_t i = 0; i < n; ++i) {
    const bool z = zone.fires(draws[i]);
    keep[i] = z ? T(1) : T(0);
    take[i] = z ? T(0) : T(1);
  }
}

// The per-step factors of one chunk: zoneout of h and c, update dropout in "step" mode.
template <typename T>
struct StepFactors {
  T update[kChunk], zc[kChunk], zc_take[kChunk], zh[kChunk], zh_take[kChunk];
  bool has_update = false, has_zc = false, has_zh = false;

  // Eval (or no step mask): zoneout by expectation, constants for the whole sequence.
  void init(const Regs& regs) {
    has_update = regs.update_step_mask();
    has_zc = regs.zoneout_c > 0;
    has_zh = regs.zoneout_h > 0;
    if (!regs.training) {
      std::fill_n(zc, kChunk, static_cast<T>(regs.zoneout_c));
      std::fill_n(zc_take, kChunk, static_cast<T>(1.0 - regs.zoneout_c));
      std::fill_n(zh, kChunk, static_cast<T>(regs.zoneout_h));
      std::fill_n(zh_take, kChunk, static_cast<T>(1.0 - regs.zoneout_h));
    }
  }

  // Draws of units j0 .. j0 + n of row b at step t (training). with_h / with_c_update choose which masks are made:
  // with proj_size, h's units and c's units are handled in different passes.
  void draw(const Regs& regs, const UnitStream& stream, uint32_t t, int64_t b, int64_t j0, int64_t n, bool with_h, bool with_c_update) {
    if (!regs.training || !((with_h && regs.zh_mask()) || (with_c_update && (regs.zc_mask() || regs.update_step_mask())))) {
      return;
    }
    uint32_t w[3][kChunk];
    stream.draw(kKindStep, t, b, j0, n, w[0], w[1], w[2]);
    if (with_h && regs.zh_mask()) {
      zoneout_factors(w[kWordZoneoutH], n, regs.zoneout_h, zh, zh_take);
    }
    if (with_c_update && regs.zc_mask()) {
      zoneout_factors(w[kWordZoneoutC], n, regs.zoneout_c, zc, zc_take);
    }
    if (with_c_update && regs.update_step_mask()) {
      keep_factors(w[kWordUpdate], n, regs.update, update);
    }
  }
};

// The per-sequence factors of units j0 .. j0 + n of row b: rec [n] (only units < H_out), cell [n], update [n].
template <typename T>
inline void sequence_factors(
    const Regs& regs, const UnitStream& stream, int64_t b, int64_t j0, int64_t n, int64_t real_hidden,
    T* rec, T* cell, T* update) {
  uint32_t w[3][kChunk];
  stream.draw(kKindSequence, 0, b, j0, n, w[0], w[1], w[2]);
  if (regs.rec_mask() && j0 < real_hidden) {
    keep_factors(w[kWordHidden], std::min(n, real_hidden - j0), regs.recurrent, rec);
  }
  if (regs.cell_mask()) {
    keep_factors(w[kWordCell], n, regs.cell, cell);
  }
  if (regs.update_seq_mask()) {
    keep_factors(w[kWordUpdate], n, regs.update, update);
  }
}

// tanh(x) = 1 - 2 / (exp(2x) + 1): one exp and one division, several times cheaper than SLEEF's tanh; the error is
// absolute (about 1e-7 in float32, 1e-16 in float64), which the cell's sums do not amplify.
template <typename T>
inline at::vec::Vectorized<T> fast_tanh(const at::vec::Vectorized<T>& x) {
  using Vec = at::vec::Vectorized<T>;
  const Vec one(T(1)), two(T(2));
  return one - two / ((x + x).exp() + one);
}

// Forward of one chunk. Gate order i, f, g, o.
template <typename T>
struct CellForward {
  int64_t n;
  const T* pre[4];   // [n] pre-activation of each gate: x_t W_ih^T + b_ih + b_hh + r W~^T
  const T* c_prev;   // [n]
  const T* h_prev;   // [n] read only when h is finished here (h, out non-null)
  const T* update;   // [n] update dropout factor, nullable
  const T* cell;     // [n] cell dropout factor, nullable
  const T* zc;       // [n] zoneout_c weights (zc, zc_take), nullable
  const T* zc_take;
  const T* zh;       // [n] zoneout_h weights, nullable
  const T* zh_take;
  const T* rec;      // [n] recurrent dropout factor of the next step's r, nullable
  T* act[4];         // [n] out: i, f, g, o after their nonlinearities (backward reserve)
  T* tc;             // [n] out: tanh(c~) (backward reserve)
  T* c;              // [n] out: c_t
  T* hh;             // [n] out: o * tanh(c~) when h is finished after the projection (nullable)
  T* h;              // [n] out: h_t when h is finished here (nullable; then out and r_next are written too)
  T* out;            // [n] out: output_t
  T* r_next;         // [n] out: h_t * rec, the next step's recurrent input (nullable)

  void run() const {
    using Vec = at::vec::Vectorized<T>;
    const Vec one(T(1));
    for (int64_t j = 0; j < n; j += Vec::size()) {
      const int64_t m = std::min<int64_t>(Vec::size(), n - j);
      auto load = [&](const T* p) { return Vec::loadu(p + j, m); };
      const Vec i = (one + load(pre[0]).neg().exp()).reciprocal();
      const Vec f = (one + load(pre[1]).neg().exp()).reciprocal();
      const Vec g = fast_tanh(load(pre[2]));
      const Vec o = (one + load(pre[3]).neg().exp()).reciprocal();
      i.store(act[0] + j, m);
      f.store(act[1] + j, m);
      g.store(act[2] + j, m);
      o.store(act[3] + j, m);
      const Vec gu = update ? masked(g, load(update)) : g;
      const Vec cp = load(c_prev);
      Vec cd = f * cp + i * gu;
      if (cell) {
        cd = masked(cd, load(cell));
      }
      const Vec t = fast_tanh(cd);
      t.store(tc + j, m);
      const Vec cn = zc ? masked(cp, load(zc)) + masked(cd, load(zc_take)) : cd;
      cn.store(c + j, m);
      const Vec hn = o * t;
      if (hh) {
        hn.store(hh + j, m);
      }
      if (h) {
        const Vec hz = zh ? masked(load(h_prev), load(zh)) + masked(hn, load(zh_take)) : hn;
        hz.store(h + j, m);
        hz.store(out + j, m);
        if (r_next) {
          masked(hz, load(rec)).store(r_next + j, m);
        }
      }
    }
  }
};

// Zoneout of h after the projection (proj_size > 0), one chunk of H_out units.
template <typename T>
inline void zoneout_h_forward(
    int64_t n, const T* h_prev, const T* hp, const T* zh, const T* zh_take, const T* rec, T* h, T* out, T* r_next) {
  using Vec = at::vec::Vectorized<T>;
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t m = std::min<int64_t>(Vec::size(), n - j);
    auto load = [&](const T* p) { return Vec::loadu(p + j, m); };
    const Vec hz = zh ? masked(load(h_prev), load(zh)) + masked(load(hp), load(zh_take)) : load(hp);
    hz.store(h + j, m);
    hz.store(out + j, m);
    if (r_next) {
      masked(hz, load(rec)).store(r_next + j, m);
    }
  }
}

// The gradient reaching h_t of an active row, split by zoneout: dh_prev gets zh * dh, the candidate take * dh.
template <typename T>
inline void zoneout_backward(int64_t n, const T* dh, const T* keep, const T* take, T* d_prev, T* d_new) {
  using Vec = at::vec::Vectorized<T>;
  for (int64_t j = 0; j < n; j += Vec::size()) {
    const int64_t m = std::min<int64_t>(Vec::size(), n - j);
    const Vec d = Vec::loadu(dh + j, m);
    if (keep) {
      masked(d, Vec::loadu(keep + j, m)).store(d_prev + j, m);
      masked(d, Vec::loadu(take + j, m)).store(d_new + j, m);
    } else {
      Vec(T(0)).store(d_prev + j, m);
      d.store(d_new + j, m);
    }
  }
}

// Backward of one chunk of an active row.
template <typename T>
struct CellBackward {
  int64_t n;
  const T* act[4];   // [n] i, f, g, o of the forward
  const T* tc;       // [n] tanh(c~)
  const T* c_prev;   // [n]
  const T* dhh;      // [n] gradient of o * tanh(c~) (before the projection)
  const T* update;   // [n] nullable, as in CellForward
  const T* cell;
  const T* zc;
  const T* zc_take;
  T* dc;             // [n] in: gradient of c_t; out: gradient of c_{t-1}
  T* hh;             // [n] out: o * tanh(c~), for dW_hr (nullable)
  T* dgate[4];       // [n] out: gradient of the pre-activations of i, f, g, o
  T* dgate_copy[4];  // [n] out: the same, a second layout (nullable)

  void run() const {
    using Vec = at::vec::Vectorized<T>;
    const Vec one(T(1));
    for (int64_t j = 0; j < n; j += Vec::size()) {
      const int64_t m = std::min<int64_t>(Vec::size(), n - j);
      auto load = [&](const T* p) { return Vec::loadu(p + j, m); };
      const Vec i = load(act[0]), f = load(act[1]), g = load(act[2]), o = load(act[3]);
      const Vec t = load(tc), d_hh = load(dhh), dc_new = load(dc);
      if (hh) {
        (o * t).store(hh + j, m);
      }
      // c_t = zc * c_prev + take * c~
      Vec dcd = zc ? masked(dc_new, load(zc_take)) : dc_new;
      const Vec dc_keep = zc ? masked(dc_new, load(zc)) : Vec(T(0));
      dcd = dcd + d_hh * o * (one - t * t);
      const Vec d_o = d_hh * t;
      const Vec dcc = cell ? masked(dcd, load(cell)) : dcd;
      const Vec d_i = dcc * (update ? masked(g, load(update)) : g);
      const Vec d_f = dcc * load(c_prev);
      const Vec d_g = update ? masked(dcc * i, load(update)) : dcc * i;
      (dcc * f + dc_keep).store(dc + j, m);
      const Vec da[4] = {d_i * i * (one - i), d_f * f * (one - f), d_g * (one - g * g), d_o * o * (one - o)};
      for (int q = 0; q < 4; ++q) {
        da[q].store(dgate[q] + j, m);
        if (dgate_copy[q]) {
          da[q].store(dgate_copy[q] + j, m);
        }
      }
    }
  }
};

}  // namespace fused_rnn
