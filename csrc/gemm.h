// C[M, N] = (0 | C | bias) + A[M, K] B[K, N]: the recurrence's products at each step (M the batch's rows), forward and
// backward, and the forward's input projection of all steps. (The backward's products over a whole sequence, whose
// A is strided, go to ATen's mm, which packs A too: lstm.cpp's matmul.)
//
// B is packed once into panels of V columns (V = the vector width): panel p holds B(k, p V + v) at [p][k][v],
// zero-padded past N, an even number of panels. A is read in place, its rows sm apart (a state or x as it is
// stored, no copy). The micro-kernel keeps kRows rows x 2 panels of C in registers and
// walks k, one broadcast of A and two vector loads of B per k. For M = 16 (a batch), where a library GEMM repacks
// its operands on every call, this is about 1.4x faster per step than MKL's packed GEMM.
//
// Only built with a vector instruction set (AVX2 / AVX-512 through ATen's Vectorized); without one the callers
// use ATen's mm (kVectorGemm is false).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

namespace fused_rnn {

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr bool kVectorGemm = true;
#else
constexpr bool kVectorGemm = false;
#endif

enum class Init { kZero, kAccumulate, kBias };

// B packed into panels, in memory the caller provides (bytes(K, N) elements of T, reused across calls).
template <typename T>
class PackedB {
 public:
  using Vec = at::vec::Vectorized<T>;
  static constexpr int64_t V = Vec::size();

  static int64_t panels_of(int64_t N) { return ((N + V - 1) / V + 1) / 2 * 2; }
  // Elements of T that a K x N panel set occupies.
  static int64_t size(int64_t K, int64_t N) { return panels_of(N) * K * V; }

  void attach(int64_t K, int64_t N, T* memory) {
    K_ = K;
    N_ = N;
    panels_ = panels_of(N);
    data_ = memory;
  }
  // Panels [p0, p1) of B(k, n) = column(n)[k * sk], so that threads can share the packing.
  template <typename Column>
  void pack_panels(const Column& column, int64_t sk, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      T* dst = data_ + p * K_ * V;
      const int64_t n0 = p * V, width = std::max<int64_t>(0, std::min(V, N_ - n0));
      const T* src[V];
      for (int64_t v = 0; v < width; ++v) src[v] = column(n0 + v);
      for (int64_t k = 0; k < K_; ++k, dst += V) {
        int64_t v = 0;
        for (; v < width; ++v) dst[v] = src[v][k * sk];
        for (; v < V; ++v) dst[v] = T(0);
      }
    }
  }
  // All panels of B(k, n) = b[k sk + n sn].
  void pack(const T* b, int64_t sk, int64_t sn) {
    pack_panels([&](int64_t n) { return b + n * sn; }, sk, 0, panels_);
  }

  int64_t K() const { return K_; }
  int64_t N() const { return N_; }
  int64_t panels() const { return panels_; }
  const T* panel(int64_t p) const { return data_ + p * K_ * V; }

 private:
  int64_t K_ = 0, N_ = 0, panels_ = 0;
  T* data_ = nullptr;
};

namespace gemm_detail {

template <typename T>
constexpr int rows() {
  // accumulators: rows x 2 vectors, plus 2 of B and 1 of A, within the register file (32 with AVX-512, 16 with AVX2)
#if defined(CPU_CAPABILITY_AVX512)
  return 8;
#else
  return 6;
#endif
}

// A native vector of V lanes (GCC / clang vector extension): arrays of these stay in registers in the tile loop,
// where arrays of at::vec::Vectorized objects are kept in memory as well.
template <typename T>
struct Lanes {
  static constexpr int64_t V = at::vec::Vectorized<T>::size();
  typedef T type __attribute__((vector_size(V * sizeof(T))));
};

// n of the V lanes from p, the rest 0. A whole vector is one load: a copy of n elements goes through the stack, 8
// bytes at a time, and the vector read back from there waits for those stores (a store-forwarding stall).
template <typename T>
inline typename Lanes<T>::type load(const T* p, int64_t n) {
  typename Lanes<T>::type v = {};
  if (n == Lanes<T>::V) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    std::memcpy(&v, p, sizeof(T) * n);
  }
  return v;
}

template <typename T>
inline void store(typename Lanes<T>::type v, T* p, int64_t n) {
  if (n == Lanes<T>::V) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    std::memcpy(p, &v, sizeof(T) * n);
  }
}

// C rows [0, MR) x columns of panels p, p + 1, over k in [k0, k1); a points at A(0, k0).
template <typename T, int MR>
inline void tile(const PackedB<T>& b, int64_t p, int64_t k0, int64_t k1, const T* a, int64_t sm, T* c, int64_t ldc, Init init,
                 const T* bias) {
  using vec = typename Lanes<T>::type;
  constexpr int64_t V = Lanes<T>::V;
  const int64_t n0 = p * V;
  // valid columns of the two panels
  const int64_t w0 = std::min<int64_t>(V, b.N() - n0), w1 = std::max<int64_t>(0, std::min<int64_t>(V, b.N() - n0 - V));
  vec acc0[MR], acc1[MR];
  for (int r = 0; r < MR; ++r) {
    if (init == Init::kAccumulate) {
      acc0[r] = load(c + r * ldc + n0, w0);
      acc1[r] = load(c + r * ldc + n0 + V, w1);
    } else if (init == Init::kBias) {
      acc0[r] = load(bias + n0, w0);
      acc1[r] = load(bias + n0 + V, w1);
    } else {
      acc0[r] = vec{};
      acc1[r] = vec{};
    }
  }
  const T* b0 = b.panel(p) + k0 * V;
  const T* b1 = b.panel(p + 1) + k0 * V;
  const T* ak = a;
  for (int64_t k = k0; k < k1; ++k, b0 += V, b1 += V, ++ak) {
    const vec x0 = load(b0, V), x1 = load(b1, V);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const vec ar = ak[r * sm] - vec{};  // a splat: x - 0 == x exactly, so this folds to a broadcast
      acc0[r] += ar * x0;
      acc1[r] += ar * x1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store(acc0[r], c + r * ldc + n0, w0);
    store(acc1[r], c + r * ldc + n0 + V, w1);
  }
}

template <typename T, int MR>
inline void rows_tail(int64_t mr, const PackedB<T>& b, int64_t p, int64_t k0, int64_t k1, const T* a, int64_t sm, T* c,
                      int64_t ldc, Init init, const T* bias) {
  if constexpr (MR > 0) {
    if (mr == MR) {
      tile<T, MR>(b, p, k0, k1, a, sm, c, ldc, init, bias);
    } else {
      rows_tail<T, MR - 1>(mr, b, p, k0, k1, a, sm, c, ldc, init, bias);
    }
  }
}

}  // namespace gemm_detail

// C[m0:m1, :] = init + A[m0:m1, :] B, A(m, k) = a[m sm + k], C row stride ldc; bias [N] for Init::kBias.
// K is walked in blocks, so that a block of A rows stays in cache while every panel of B passes.
template <typename T>
void gemm_rows(const PackedB<T>& b, int64_t m0, int64_t m1, const T* a, int64_t sm, T* c, int64_t ldc, Init init,
               const T* bias = nullptr) {
  constexpr int MR = gemm_detail::rows<T>();
  const int64_t K = b.K();
  // equal blocks of at most 768 (a 48-long tail block would reload and store C for little work)
  const int64_t kBlockK = (K + (K + 767) / 768 - 1) / std::max<int64_t>(1, (K + 767) / 768);
  if (K == 0) {
    // nothing to multiply: C is its initial value
    for (int64_t m = m0; m < m1 && init != Init::kAccumulate; ++m) {
      for (int64_t n = 0; n < b.N(); ++n) c[m * ldc + n] = init == Init::kBias ? bias[n] : T(0);
    }
    return;
  }
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t k1 = std::min(K, k0 + kBlockK);
    const Init block_init = k0 == 0 ? init : Init::kAccumulate;
    for (int64_t m = m0; m < m1; m += MR) {
      const int64_t mr = std::min<int64_t>(MR, m1 - m);
      for (int64_t p = 0; p < b.panels(); p += 2) {
        gemm_detail::rows_tail<T, MR>(mr, b, p, k0, k1, a + m * sm + k0, sm, c + m * ldc, ldc, block_init, bias);
      }
    }
  }
}

}  // namespace fused_rnn
