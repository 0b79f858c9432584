// Philox4x32-10 and the counter layout of docs/randomness.md, bit for bit as fused_rnn/philox.py.
//
// Every mask is a pure function of the 64-bit seed and of a counter (c0, c1, c2, c3):
//   c0  the element (kinds 1-3: the group of four elements e / 4) or the unit b * H + j (kinds 4, 5)
//   c1  the sequence position t for masks that change per step, else 0
//   c2  the layer l (kind 1), 0 (kind 2), or k = l * num_directions + d (kinds 3-5)
//   c3  the kind
// and a draw r fires (drop, or zone out) iff r < threshold(p) = floor(p * 2**32), compared in 64 bits.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fused_rnn {

enum Kind : uint32_t {
  kKindInput = 1,     // masks["input"][l]: input_dropout (l = 0), the between-layer dropout (l > 0)
  kKindOutput = 2,    // masks["output"]: output_dropout
  kKindWeight = 3,    // masks["weight"][k]: weight drop on W_hh
  kKindSequence = 4,  // one call per unit (b, j) and sequence
  kKindStep = 5,      // one call per unit (b, j) and step
};

// The word of a per-unit call that each mask reads.
constexpr int kWordHidden = 0;    // kKindSequence: recurrent_dropout
constexpr int kWordCell = 1;      // kKindSequence: cell_dropout
constexpr int kWordUpdate = 2;    // kKindSequence ("sequence" mode) and kKindStep ("step" mode): update_dropout
constexpr int kWordZoneoutH = 0;  // kKindStep
constexpr int kWordZoneoutC = 1;  // kKindStep

struct PhiloxKey {
  uint32_t k0, k1;
};

// k0 = seed mod 2**32, k1 = seed div 2**32, for a seed in [0, 2**63).
inline PhiloxKey seed_key(int64_t seed) {
  const uint64_t s = static_cast<uint64_t>(seed);
  return {static_cast<uint32_t>(s), static_cast<uint32_t>(s >> 32)};
}

namespace philox_detail {
constexpr uint32_t kRoundA = 0xD2511F53u;
constexpr uint32_t kRoundB = 0xCD9E8D57u;
constexpr uint32_t kKeyA = 0x9E3779B9u;
constexpr uint32_t kKeyB = 0xBB67AE85u;
}  // namespace philox_detail

// Philox of the n counters (c0 + i, c1, c2, c3), i in [0, n): word w of call i in ww[i]. w3 is written only when
// kFourWords (the per-unit masks never read it). A flat loop over i with the rounds inside, so that the compiler
// vectorises it across i.
template <bool kFourWords>
inline void philox_run(
    uint32_t c0, int64_t n, uint32_t c1, uint32_t c2, uint32_t c3, PhiloxKey key,
    uint32_t* __restrict w0, uint32_t* __restrict w1, uint32_t* __restrict w2, uint32_t* __restrict w3) {
  using namespace philox_detail;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t x0 = c0 + static_cast<uint32_t>(i), x1 = c1, x2 = c2, x3 = c3;
    uint32_t k0 = key.k0, k1 = key.k1;
    for (int round = 0; round < 10; ++round) {
      const uint64_t a = static_cast<uint64_t>(kRoundA) * x0;
      const uint64_t b = static_cast<uint64_t>(kRoundB) * x2;
      const uint32_t n0 = static_cast<uint32_t>(b >> 32) ^ x1 ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(a >> 32) ^ x3 ^ k1;
      x1 = static_cast<uint32_t>(b);
      x3 = static_cast<uint32_t>(a);
      x0 = n0;
      x2 = n2;
      k0 += kKeyA;
      k1 += kKeyB;
    }
    w0[i] = x0;
    w1[i] = x1;
    w2[i] = x2;
    if (kFourWords) {
      w3[i] = x3;
    }
  }
}

// One call: out[0..3] = w0..w3 of Philox(c0, c1, c2, c3).
inline void philox(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, PhiloxKey key, uint32_t out[4]) {
  philox_run<true>(c0, 1, c1, c2, c3, key, out, out + 1, out + 2, out + 3);
}

// The integer threshold of a probability: floor(p * 2**32), exact in float64, in [0, 2**32].
inline uint64_t threshold(double p) {
  return static_cast<uint64_t>(std::floor(p * 4294967296.0));
}

// Inverted-dropout scale 1 / (1 - p), 0 for p = 1 (every element is dropped and the scale never used).
inline double keep_scale(double p) {
  return p < 1.0 ? 1.0 / (1.0 - p) : 0.0;
}

// The event "r < threshold" on 32-bit draws, vectorisable: for threshold = 2**32 every draw fires.
struct Event {
  uint32_t below;  // threshold when < 2**32
  bool always;     // threshold == 2**32 (p = 1)

  explicit Event(double p) {
    const uint64_t t = threshold(p);
    always = t >= (uint64_t{1} << 32);
    below = always ? 0u : static_cast<uint32_t>(t);
  }
  bool fires(uint32_t r) const {
    return always || r < below;
  }
};

// Element e of a bulk mask (kinds 1-3) of one step: word e % 4 of Philox(e / 4, c1, c2, c3).
// Draws of the elements [e0, e0 + n) into out[0, n).
inline void packed_draws(PhiloxKey key, uint32_t kind, uint32_t index, uint32_t step, int64_t e0, int64_t n, uint32_t* out) {
  constexpr int64_t kGroups = 64;
  uint32_t w[4][kGroups];
  int64_t e = e0;
  const int64_t end = e0 + n;
  while (e < end) {
    const int64_t first = e / 4;
    const int64_t groups = std::min<int64_t>(kGroups, (end - 1) / 4 - first + 1);
    philox_run<true>(static_cast<uint32_t>(first), groups, step, index, kind, key, w[0], w[1], w[2], w[3]);
    const int64_t last = std::min(end, (first + groups) * 4);
    for (; e < last; ++e) {
      const int64_t g = e / 4 - first;
      out[e - e0] = w[e % 4][g];
    }
  }
}

}  // namespace fused_rnn
