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

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

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

namespace philox_detail {

// The rounds on one vector of lanes: hi and lo 32-bit halves of the 32 x 32 products come from vpmulld (lo) and
// two vpmuludq on the even and odd lanes (hi); about twice the speed of the compiler's vectorisation of the
// scalar loop, which widens every lane to 64 bits.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
inline void rounds(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, PhiloxKey key, uint32_t* w0, uint32_t* w1, uint32_t* w2,
                   uint32_t* w3) {
  const __m512i a = _mm512_set1_epi32(static_cast<int>(kRoundA)), b = _mm512_set1_epi32(static_cast<int>(kRoundB));
  __m512i x0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(c0)), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i x1 = _mm512_set1_epi32(static_cast<int>(c1)), x2 = _mm512_set1_epi32(static_cast<int>(c2)), x3 = _mm512_set1_epi32(static_cast<int>(c3));
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int round = 0; round < 10; ++round) {
    const __m512i lo_a = _mm512_mullo_epi32(x0, a), lo_b = _mm512_mullo_epi32(x2, b);
    const __m512i even_a = _mm512_mul_epu32(x0, a), odd_a = _mm512_mul_epu32(_mm512_srli_epi64(x0, 32), a);
    const __m512i even_b = _mm512_mul_epu32(x2, b), odd_b = _mm512_mul_epu32(_mm512_srli_epi64(x2, 32), b);
    const __m512i hi_a = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even_a, 32), odd_a);
    const __m512i hi_b = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even_b, 32), odd_b);
    x0 = _mm512_xor_si512(_mm512_xor_si512(hi_b, x1), _mm512_set1_epi32(static_cast<int>(k0)));
    x2 = _mm512_xor_si512(_mm512_xor_si512(hi_a, x3), _mm512_set1_epi32(static_cast<int>(k1)));
    x1 = lo_b;
    x3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  _mm512_storeu_si512(w0, x0);
  _mm512_storeu_si512(w1, x1);
  _mm512_storeu_si512(w2, x2);
  if (w3) _mm512_storeu_si512(w3, x3);
}
#elif defined(__AVX2__)
constexpr int64_t kLanes = 8;
inline void rounds(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, PhiloxKey key, uint32_t* w0, uint32_t* w1, uint32_t* w2,
                   uint32_t* w3) {
  const __m256i a = _mm256_set1_epi32(static_cast<int>(kRoundA)), b = _mm256_set1_epi32(static_cast<int>(kRoundB));
  __m256i x0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(c0)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i x1 = _mm256_set1_epi32(static_cast<int>(c1)), x2 = _mm256_set1_epi32(static_cast<int>(c2)), x3 = _mm256_set1_epi32(static_cast<int>(c3));
  uint32_t k0 = key.k0, k1 = key.k1;
  for (int round = 0; round < 10; ++round) {
    const __m256i lo_a = _mm256_mullo_epi32(x0, a), lo_b = _mm256_mullo_epi32(x2, b);
    const __m256i even_a = _mm256_mul_epu32(x0, a), odd_a = _mm256_mul_epu32(_mm256_srli_epi64(x0, 32), a);
    const __m256i even_b = _mm256_mul_epu32(x2, b), odd_b = _mm256_mul_epu32(_mm256_srli_epi64(x2, 32), b);
    const __m256i hi_a = _mm256_blend_epi32(_mm256_srli_epi64(even_a, 32), odd_a, 0xAA);
    const __m256i hi_b = _mm256_blend_epi32(_mm256_srli_epi64(even_b, 32), odd_b, 0xAA);
    x0 = _mm256_xor_si256(_mm256_xor_si256(hi_b, x1), _mm256_set1_epi32(static_cast<int>(k0)));
    x2 = _mm256_xor_si256(_mm256_xor_si256(hi_a, x3), _mm256_set1_epi32(static_cast<int>(k1)));
    x1 = lo_b;
    x3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0), x0);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1), x1);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2), x2);
  if (w3) _mm256_storeu_si256(reinterpret_cast<__m256i*>(w3), x3);
}
#else
constexpr int64_t kLanes = 0;
inline void rounds(uint32_t, uint32_t, uint32_t, uint32_t, PhiloxKey, uint32_t*, uint32_t*, uint32_t*, uint32_t*) {}  // never called
#endif

}  // namespace philox_detail

// Philox of the n counters (c0 + i, c1, c2, c3), i in [0, n): word w of call i in ww[i]. w3 is written only when
// kFourWords (the per-unit masks never read it). Whole vectors of lanes go through philox_detail::rounds; the
// rest through a flat scalar loop.
template <bool kFourWords>
inline void philox_run(
    uint32_t c0, int64_t n, uint32_t c1, uint32_t c2, uint32_t c3, PhiloxKey key,
    uint32_t* __restrict w0, uint32_t* __restrict w1, uint32_t* __restrict w2, uint32_t* __restrict w3) {
  using namespace philox_detail;
  int64_t i = 0;
  if constexpr (kLanes > 0) {
    for (; i + kLanes <= n; i += kLanes) {
      rounds(c0 + static_cast<uint32_t>(i), c1, c2, c3, key, w0 + i, w1 + i, w2 + i, kFourWords ? w3 + i : nullptr);
    }
  }
  for (; i < n; ++i) {
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
  const int64_t end = e0 + n;
  for (int64_t first = e0 / 4; first * 4 < end; first += kGroups) {
    const int64_t groups = std::min<int64_t>(kGroups, (end + 3) / 4 - first);
    philox_run<true>(static_cast<uint32_t>(first), groups, step, index, kind, key, w[0], w[1], w[2], w[3]);
    const int64_t lo = std::max(e0, first * 4), hi = std::min(end, (first + groups) * 4);
    if (lo == first * 4 && hi == (first + groups) * 4) {
      // whole groups: interleave the four words
      uint32_t* o = out + (lo - e0);
      for (int64_t g = 0; g < groups; ++g) {
        o[4 * g] = w[0][g];
        o[4 * g + 1] = w[1][g];
        o[4 * g + 2] = w[2][g];
        o[4 * g + 3] = w[3][g];
      }
      continue;
    }
    for (int64_t e = lo; e < hi; ++e) {
      out[e - e0] = w[e % 4][e / 4 - first];
    }
  }
}

}  // namespace fused_rnn
