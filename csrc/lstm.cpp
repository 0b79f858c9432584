// The fused C++ CPU backend: one layer-direction of the LSTM (forward and backward through time) and the
// feature dropout between layers, registered as torch operators in the namespace fused_rnn_cpp.
//
// Shapes: S steps, B batch rows, I input features, H hidden units, R = H_out (proj_size, or H).
// Gate order i, f, g, o. Masks follow docs/randomness.md and are regenerated wherever they are used.
//
// Threads: the time loop runs inside one OpenMP team. The hidden units are split into contiguous blocks, one per
// thread; a thread owns units j of its block for all four gates (rows j, H + j, 2H + j, 3H + j of W_hh), so its
// step GEMM produces exactly the gates its pointwise pass needs, and threads meet once per step (twice with
// proj_size). Gate rows are stored block-major for this ("perm" layout): the rows of block [s, e) are the
// 4 (e - s) rows 4 s + g (e - s) + (j - s), one contiguous GEMM operand per thread; the input projection of every
// step is computed up front in the same layout, and each step adds r W~^T to its slice.
//
// Memory: temporaries come from a per-thread workspace and the backward reserve from a recycling pool, both kept
// between calls; a training loop asks for the same sizes every step, and fresh pages cost a page fault each.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "cell.h"
#include "gemm.h"
#include "philox.h"

namespace fused_rnn {
namespace {

using at::Tensor;

// ---- memory -------------------------------------------------------------------------------------------------------

// Scratch memory of the calling thread, kept between calls. Carved by the calling thread only (before a team
// starts); a Frame gives back everything carved since it opened. When one call needed several blocks, the next
// outermost frame replaces them by one block of the total.
class Workspace {
 public:
  static Workspace& local() {
    static thread_local Workspace workspace;
    return workspace;
  }

  template <typename T>
  T* take(int64_t n) {
    const int64_t bytes = (std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64;
    if (blocks_.empty() || used_ + bytes > blocks_.back().bytes) {
      blocks_.push_back(Block(std::max<int64_t>(bytes, int64_t{1} << 20)));
      used_ = 0;
    }
    char* p = blocks_.back().data.get() + used_;
    used_ += bytes;
    taken_ += bytes;
    return reinterpret_cast<T*>(p);
  }

  class Frame {
   public:
    explicit Frame(Workspace& w) : w_(w), blocks_(w.blocks_.size()), used_(w.used_), taken_(w.taken_) { ++w_.depth_; }
    ~Frame() {
      if (--w_.depth_ > 0) {
        // nested: give back what this frame took
        const size_t keep = std::max<size_t>(blocks_, 1);
        if (w_.blocks_.size() > keep) {
          w_.blocks_.erase(w_.blocks_.begin() + keep, w_.blocks_.end());
        }
        w_.used_ = used_;
        w_.taken_ = taken_;
        return;
      }
      const int64_t total = w_.taken_;
      if (w_.blocks_.size() > 1 || total > kKept) {
        w_.blocks_.clear();
        if (total > 0 && total <= kKept) {
          w_.blocks_.push_back(Block(total));
        }
      }
      w_.used_ = 0;
      w_.taken_ = 0;
    }
    Frame(const Frame&) = delete;
    Frame& operator=(const Frame&) = delete;

   private:
    Workspace& w_;
    size_t blocks_;
    int64_t used_, taken_;
  };

 private:
  static constexpr int64_t kKept = int64_t{256} << 20;  // larger needs are given back after the call

  struct Block {
    explicit Block(int64_t n) : data(static_cast<char*>(std::aligned_alloc(64, (n + 63) / 64 * 64)), &std::free), bytes(n) {
      TORCH_CHECK(data, "fused_rnn_cpp: out of memory (", n, " bytes of workspace)");
    }
    std::unique_ptr<char, decltype(&std::free)> data;
    int64_t bytes;
  };
  std::vector<Block> blocks_;
  int64_t used_ = 0, taken_ = 0;
  int depth_ = 0;
};

// Tensors for the backward reserve (gates, tanh(c~), states): they live from a forward to its backward, and the
// next forward asks for the same sizes, so their memory is recycled (exact sizes, at most 1 GiB kept). Never
// handed to the user: only the autograd formula holds them.
class ReservePool {
 public:
  static ReservePool& get() {
    static ReservePool* pool = new ReservePool;  // never destroyed: a tensor may be freed after static destruction
    return *pool;
  }

  Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    int64_t numel = 1;
    for (int64_t s : sizes) numel *= s;
    const size_t bytes = (std::max<size_t>(numel * options.dtype().itemsize(), 1) + 63) / 64 * 64;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        p = it->second.back();
        it->second.pop_back();
        pooled_ -= bytes;
      }
    }
    if (!p) {
      p = std::aligned_alloc(64, bytes);
      TORCH_CHECK(p, "fused_rnn_cpp: out of memory (", bytes, " bytes of reserve)");
    }
    return at::from_blob(p, sizes, [bytes](void* q) { ReservePool::get().give(q, bytes); }, options);
  }

 private:
  void give(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (pooled_ + bytes > (size_t{1} << 30)) {
      std::free(p);
      return;
    }
    free_[bytes].push_back(p);
    pooled_ += bytes;
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t pooled_ = 0;
};

// ---- matrix products ------------------------------------------------------------------------------------------------

// FUSED_RNN_CPP_GEMM=aten forces ATen's mm instead of gemm.h (tests use it to cover that path).
bool vector_gemm() {
  const char* choice = std::getenv("FUSED_RNN_CPP_GEMM");
  return kVectorGemm && !(choice && std::strcmp(choice, "aten") == 0);
}

template <typename scalar_t>
Tensor strided(const scalar_t* p, int64_t rows, int64_t cols, int64_t s0, int64_t s1) {
  return at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {s0, s1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
}

// C[M, N] = init + A[M, K] B[K, N] with B fixed for a whole sequence: packed once (gemm.h), or without vector
// instructions an ATen mm per product.
template <typename scalar_t>
class FixedRhs {
 public:
  // Elements of workspace that init() needs for these sizes.
  static int64_t workspace(int64_t m, int64_t n, int64_t k) {
    return vector_gemm() && m > 0 && n > 0 ? PackedB<scalar_t>::size(k, n) : 0;
  }

  // B(k, n) = b[k sk + n sn]; memory: workspace(m, n, k) elements. b must outlive this object when not packed.
  void init(int64_t m, int64_t n, int64_t k, const scalar_t* b, int64_t sk, int64_t sn, scalar_t* memory) {
    m_ = m;
    n_ = n;
    k_ = k;
    b_ = b;
    sk_ = sk;
    sn_ = sn;
    packed_ = vector_gemm() && m > 0 && n > 0;
    if (packed_) {
      pack_.attach(k, n, memory);
      pack_.pack(b, sk, sn);
    }
  }

  // a: A [M, K] with row stride lda; c: C [M, N] with row stride ldc (not overlapping A or B); bias [N] for kBias.
  void operator()(const scalar_t* a, int64_t lda, scalar_t* c, int64_t ldc, Init init, const scalar_t* bias = nullptr) const {
    if (m_ == 0 || n_ == 0) {
      return;
    }
    if (packed_) {
      gemm_rows(pack_, 0, m_, a, lda, c, ldc, init, bias);
      return;
    }
    Tensor c_view = strided(c, m_, n_, ldc, 1);
    const Tensor a_view = strided(a, m_, k_, lda, 1), b_view = strided(b_, k_, n_, sk_, sn_);
    if (init == Init::kAccumulate) {
      c_view.addmm_(a_view, b_view);
    } else if (init == Init::kBias) {
      at::addmm_out(c_view, strided(bias, m_, n_, 0, 1), a_view, b_view);
    } else {
      at::mm_out(c_view, a_view, b_view);
    }
  }

 private:
  int64_t m_ = 0, n_ = 0, k_ = 0, sk_ = 0, sn_ = 0;
  const scalar_t* b_ = nullptr;
  bool packed_ = false;
  PackedB<scalar_t> pack_;
};

// c [M, N] (contiguous) = A B for the backward's products over a whole sequence, A(m, k) = a[m sm + k sk],
// B(k, n) = b[k bsk + n bsn]: ATen's mm, which packs both operands. gemm.h, which reads A in place (here dgates^T,
// a 4H stride between its k), made the backward at cpu_h256x2 1.5x slower on the Intel Xeon VM (AVX-512, 2
// threads); still slower with MKL held to AVX2, as MKL runs on non-Intel CPUs.
template <typename scalar_t>
void matmul(int64_t M, int64_t N, int64_t K, const scalar_t* a, int64_t sm, int64_t sk, const scalar_t* b, int64_t bsk, int64_t bsn,
            scalar_t* c) {
  if (M == 0 || N == 0) {
    return;
  }
  Tensor c_view = strided(c, M, N, N, 1);
  at::mm_out(c_view, strided(a, M, K, sm, sk), strided(b, K, N, bsk, bsn));
}

// ---- threads ----------------------------------------------------------------------------------------------------

// Where a team of threads meets once per step. It spins first, because the wait is usually short (one step's
// imbalance) and waking a sleeping thread costs tens of microseconds; then it blocks (a futex, with C++20), so that
// on a busy machine a waiting thread gives its core to the teammate it waits for.
class Sync {
 public:
  explicit Sync(int size) : size_(size) {}
  void operator()() {
    if (size_ == 1) {
      return;
    }
    const unsigned generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == size_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
#if defined(__cpp_lib_atomic_wait)
      generation_.notify_all();
#endif
      return;
    }
    for (int spins = 0; spins < 4000; ++spins) {
      if (generation_.load(std::memory_order_acquire) != generation) {
        return;
      }
      pause();
    }
    while (generation_.load(std::memory_order_acquire) == generation) {
#if defined(__cpp_lib_atomic_wait)
      generation_.wait(generation, std::memory_order_acquire);
#else
      std::this_thread::yield();
#endif
    }
  }

 private:
  static void pause() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
  }
  alignas(64) std::atomic<int> arrived_{0};
  alignas(64) std::atomic<unsigned> generation_{0};
  int size_;
};

// body(thread, team_size, sync) on every thread of one team (OpenMP's, which keeps its threads between calls);
// sync() waits for the whole team. With OpenMP absent, or inside a parallel region, the team is the caller alone.
template <typename F>
void run_team(int64_t wanted, const F& body) {
#ifdef _OPENMP
  if (wanted > 1 && !omp_in_parallel()) {
    std::unique_ptr<Sync> sync;
#pragma omp parallel num_threads(static_cast<int>(wanted))
    {
#pragma omp single
      sync = std::make_unique<Sync>(omp_get_num_threads());
      body(omp_get_thread_num(), omp_get_num_threads(), *sync);
    }
    return;
  }
#endif
  Sync alone(1);
  body(0, 1, alone);
}

// n units in `count` contiguous blocks, boundaries rounded down to multiples of 8 (whole vectors where possible).
struct Blocks {
  int64_t n, count;

  static Blocks split(int64_t n, int64_t threads) {
    return {n, std::max<int64_t>(1, std::min<int64_t>(threads, n / 16))};
  }
  int64_t begin(int64_t q) const { return q >= count ? n : (n * q / count) / 8 * 8; }
  int64_t end(int64_t q) const { return begin(q + 1); }
};

int64_t team_size() {
  return at::in_parallel_region() ? 1 : at::get_num_threads();
}

// pre [rows, 4H] (perm layout of `units`) = x [rows, I] W_ih^T + bias, for all steps at once; W_ih's rows are
// packed in perm order straight away. gemm.h here, unlike matmul: x is read in place row by row, and with MKL held to
// AVX2 (MKL_ENABLE_INSTRUCTIONS=AVX2) ATen's mm made the forward at cpu_h256x2 1.1-1.2x slower on the Intel Xeon VM;
// with MKL's AVX-512 the two were even.
template <typename scalar_t>
void input_projection(int64_t rows, int64_t I, int64_t H, const Blocks& units, const scalar_t* x, const scalar_t* w_ih,
                      const scalar_t* bias, scalar_t* pre, Workspace& ws) {
  const int64_t N = 4 * H;
  int64_t* row_of = ws.take<int64_t>(N);  // perm column -> row of W_ih
  for (int64_t q = 0; q < units.count; ++q) {
    const int64_t s = units.begin(q), e = units.end(q);
    for (int64_t g = 0; g < 4; ++g) {
      for (int64_t j = s; j < e; ++j) row_of[4 * s + g * (e - s) + (j - s)] = g * H + j;
    }
  }
  scalar_t* bias_perm = bias ? ws.take<scalar_t>(N) : nullptr;
  for (int64_t n = 0; n < N && bias; ++n) bias_perm[n] = bias[row_of[n]];
  if (rows == 0) {
    return;
  }
  auto column = [&](int64_t n) { return w_ih + row_of[n] * I; };
  if (!vector_gemm()) {
    scalar_t* w_perm = ws.take<scalar_t>(N * I);
    for (int64_t n = 0; n < N; ++n) std::memcpy(w_perm + n * I, column(n), sizeof(scalar_t) * I);
    Tensor c_view = strided(pre, rows, N, N, 1);
    const Tensor a_view = strided(x, rows, I, I, 1), b_view = strided(w_perm, I, N, 1, I);
    if (bias_perm) {
      at::addmm_out(c_view, strided(bias_perm, rows, N, 0, 1), a_view, b_view);
    } else {
      at::mm_out(c_view, a_view, b_view);
    }
    return;
  }
  PackedB<scalar_t> packed;
  packed.attach(I, N, ws.take<scalar_t>(PackedB<scalar_t>::size(I, N)));
  at::parallel_for(0, packed.panels(), 1, [&](int64_t p0, int64_t p1) { packed.pack_panels(column, 1, p0, p1); });
  at::parallel_for(0, rows, 64, [&](int64_t m0, int64_t m1) {
    gemm_rows(packed, m0, m1, x, I, pre, N, bias_perm ? Init::kBias : Init::kZero, bias_perm);
  });
}

// ---- masks ------------------------------------------------------------------------------------------------------

// out = in * keep-mask / (1 - p) for the draws of in's elements; exactly 0 where dropped.
template <typename scalar_t>
void apply_keep(const uint32_t* __restrict draws, const scalar_t* __restrict in, scalar_t* __restrict out, int64_t n, Event drop,
                scalar_t scale) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = drop.fires(draws[i]) ? scalar_t(0) : in[i] * scale;
  }
}

// out = a masked by the factors b (cell.h's masked): exactly 0 where a factor is 0. out may be a.
template <typename scalar_t>
void mask_row(const scalar_t* a, const scalar_t* b, int64_t n, scalar_t* out) {
  using Vec = at::vec::Vectorized<scalar_t>;
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t m = std::min<int64_t>(Vec::size(), n - i);
    masked(Vec::loadu(a + i, m), Vec::loadu(b + i, m)).store(out + i, m);
  }
}

// The same with one factor for the whole row (weight drop in row mode).
template <typename scalar_t>
void mask_row(const scalar_t* a, scalar_t b, int64_t n, scalar_t* out) {
  if (b == scalar_t(0)) {
    std::fill_n(out, n, scalar_t(0));
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    out[i] = a[i] * b;
  }
}

template <typename scalar_t>
void add_row(const scalar_t* __restrict a, int64_t n, scalar_t* __restrict acc) {
  for (int64_t i = 0; i < n; ++i) {
    acc[i] += a[i];
  }
}

// Factors of row r of the weight-drop mask of W_hh, columns [c0, c0 + n) of cols (R in element mode, 1 in row mode).
template <typename scalar_t>
void weight_row_factors_at(PhiloxKey key, uint32_t k, double p, int64_t cols, int64_t r, int64_t c0, int64_t n, scalar_t* out) {
  uint32_t draws[256];
  for (int64_t i = 0; i < n; i += 256) {
    const int64_t m = std::min<int64_t>(256, n - i);
    packed_draws(key, kKindWeight, k, 0, r * cols + c0 + i, m, draws);
    keep_factors(draws, m, p, out + i);
  }
}

template <typename scalar_t>
void weight_row_factors(PhiloxKey key, uint32_t k, double p, int64_t cols, int64_t r, scalar_t* out) {
  weight_row_factors_at(key, k, p, cols, r, 0, cols, out);
}

// Rows of W~ (perm layout) of unit block [s, e): w_perm[4 s + g (e - s) + jj] = W_hh[g H + s + jj] * mask.
// w_hh: [4H, R]; w_perm: [4H, R] (perm); factors: [4H, cols] standard layout, written when non-null (backward).
template <typename scalar_t>
void build_weight_block(const Regs& regs, PhiloxKey key, uint32_t k, int64_t hidden, int64_t real, int64_t s, int64_t e,
                        const scalar_t* w_hh, scalar_t* w_perm, scalar_t* factors) {
  const bool masked = regs.weight_mask(), rows = regs.weight_rows;
  const int64_t cols = rows ? 1 : real;
  scalar_t row[256];
  for (int64_t g = 0; g < 4; ++g) {
    for (int64_t j = s; j < e; ++j) {
      const int64_t r = g * hidden + j;
      const scalar_t* src = w_hh + r * real;
      scalar_t* dst = w_perm + (4 * s + g * (e - s) + (j - s)) * real;
      if (!masked) {
        std::memcpy(dst, src, sizeof(scalar_t) * real);
      } else if (rows) {
        weight_row_factors(key, k, regs.weight, 1, r, row);
        mask_row(src, row[0], real, dst);
        if (factors) factors[r] = row[0];
      } else {
        for (int64_t c0 = 0; c0 < cols; c0 += 256) {
          const int64_t n = std::min<int64_t>(256, cols - c0);
          weight_row_factors_at(key, k, regs.weight, cols, r, c0, n, row);
          mask_row(src + c0, row, n, dst + c0);
          if (factors) std::memcpy(factors + r * cols + c0, row, sizeof(scalar_t) * n);
        }
      }
    }
  }
}

// ---- one layer-direction ----------------------------------------------------------------------------------------

struct Dims {
  int64_t steps, batch, input, hidden, real;  // S, B, I, H, R
  bool proj;
};

// layer = [index, reverse, training, weight_rows, update_per_step];
// p = [recurrent_dropout, weight_dropout, update_dropout, cell_dropout, zoneout_h, zoneout_c].
Regs make_regs(at::IntArrayRef layer, c10::ArrayRef<double> p) {
  TORCH_CHECK(layer.size() == 5 && p.size() == 6, "fused_rnn_cpp: layer must be int[5] and regularizers float[6]");
  return Regs{layer[2] != 0, p[0], p[1], p[2], p[3], p[4], p[5], layer[3] != 0, layer[4] != 0};
}

Dims check_layer(const Tensor& x, const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& w_hr) {
  TORCH_CHECK(x.dim() == 3, "fused_rnn_cpp: x must be [T, B, I], got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "fused_rnn_cpp: float32 or float64 only, got ",
              x.scalar_type());
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % 4 == 0, "fused_rnn_cpp: w_hh must be [4H, R]");
  Dims d{x.size(0), x.size(1), x.size(2), w_hh.size(0) / 4, w_hh.size(1), w_hr.has_value()};
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == 4 * d.hidden && w_ih.size(1) == d.input, "fused_rnn_cpp: w_ih must be [4H, I]");
  TORCH_CHECK(d.proj ? (w_hr->dim() == 2 && w_hr->size(0) == d.real && w_hr->size(1) == d.hidden) : d.real == d.hidden,
              "fused_rnn_cpp: w_hh / w_hr shapes disagree");
  TORCH_CHECK(d.batch * d.hidden < (int64_t{1} << 32), "fused_rnn_cpp: B * H must be below 2**32 (the Philox counter)");
  for (const Tensor& t : {w_ih, w_hh}) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fused_rnn_cpp: dtypes differ");
  }
  return d;
}

std::vector<int64_t> read_lengths(const std::optional<Tensor>& lengths, int64_t batch) {
  if (!lengths.has_value()) {
    return {};
  }
  const Tensor l = lengths->to(at::kLong).contiguous();
  TORCH_CHECK(l.dim() == 1 && l.size(0) == batch, "fused_rnn_cpp: lengths must be [B]");
  return std::vector<int64_t>(l.data_ptr<int64_t>(), l.data_ptr<int64_t>() + batch);
}

// The per-sequence mask factors of one layer-direction: rec [B, H] (units < R used), cell [B, H], update [B, H],
// in the calling thread's workspace; each null when its mask is off.
template <typename scalar_t>
struct SequenceFactors {
  scalar_t* rec = nullptr;
  scalar_t* cell = nullptr;
  scalar_t* update = nullptr;

  SequenceFactors(const Regs& regs, int64_t batch, int64_t hidden, Workspace& ws) {
    if (regs.rec_mask()) rec = ws.take<scalar_t>(batch * hidden);
    if (regs.cell_mask()) cell = ws.take<scalar_t>(batch * hidden);
    if (regs.update_seq_mask()) update = ws.take<scalar_t>(batch * hidden);
  }
  // Units [s, e) of every row.
  void draw(const Regs& regs, const UnitStream& stream, int64_t batch, int64_t real, int64_t s, int64_t e) {
    if (!regs.sequence_draws()) {
      return;
    }
    const int64_t hidden = stream.hidden;
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t j0 = s; j0 < e; j0 += kChunk) {
        const int64_t n = std::min(kChunk, e - j0), at = b * hidden + j0;
        sequence_factors<scalar_t>(regs, stream, b, j0, n, real, rec ? rec + at : nullptr, cell ? cell + at : nullptr,
                                   update ? update + at : nullptr);
      }
    }
  }
  static const scalar_t* row(const scalar_t* v, int64_t b, int64_t hidden) { return v ? v + b * hidden : nullptr; }
  // The factors on c's side (update, cell, zoneout_c) of units j0.. of row b at this step, for a CellForward or
  // CellBackward: the update mask per step or per sequence.
  template <typename Cell>
  void c_factors(Cell& cell, const StepFactors<scalar_t>& step_f, int64_t b, int64_t j0, int64_t hidden) const {
    const scalar_t* upd_seq = row(update, b, hidden);
    cell.update = step_f.has_update ? step_f.update : (upd_seq ? upd_seq + j0 : nullptr);
    const scalar_t* cell_seq = row(this->cell, b, hidden);
    cell.cell = cell_seq ? cell_seq + j0 : nullptr;
    cell.zc = step_f.has_zc ? step_f.zc : nullptr;
    cell.zc_take = step_f.zc_take;
  }
};

// Forward through time of one layer-direction. The state slots of hs / cs: the state before step t is slot t
// (forward direction) or t + 1 (reverse), the state after it slot t + 1 or t.
template <typename scalar_t>
void layer_forward(const Dims& d, const Regs& regs, PhiloxKey key, uint32_t k, bool reverse, const std::vector<int64_t>& lengths,
                   const scalar_t* x,      // [S, B, I]
                   const scalar_t* w_ih,   // [4H, I]
                   const scalar_t* bias,   // [4H] b_ih + b_hh, or null
                   const scalar_t* w_hh,   // [4H, R]
                   const scalar_t* w_hr,   // [R, H] or null
                   scalar_t* out,          // [S, B, R] out
                   scalar_t* gates,        // [S, B, 4H] out: i, f, g, o after their nonlinearities
                   scalar_t* tanh_c,       // [S, B, H] out: tanh(c~)
                   scalar_t* hs,           // [S + 1, B, R] in: the h0 slot; out: every other slot
                   scalar_t* cs) {         // [S + 1, B, H] in: the c0 slot; out: every other slot
  const int64_t S = d.steps, B = d.batch, I = d.input, H = d.hidden, R = d.real;
  Workspace& ws = Workspace::local();
  const Blocks units = Blocks::split(H, team_size());
  // With proj_size, h's R units get blocks of their own (the projection GEMM is split over them).
  const Blocks h_units = d.proj ? Blocks::split(R, units.count) : units;
  const UnitStream stream{key, k, H};
  SequenceFactors<scalar_t> seq(regs, B, H, ws);

  // W~ in perm layout; W_hh itself when that layout is the standard one (one block) and nothing is dropped.
  const bool copy_w = units.count > 1 || regs.weight_mask();
  scalar_t* w_perm = copy_w ? ws.take<scalar_t>(4 * H * R) : nullptr;  // [4H, R] W~
  const scalar_t* w_rec = copy_w ? w_perm : w_hh;
  // [S, B, 4H] perm: x_t W_ih^T + b_ih + b_hh of every step, one product for the whole sequence (so that the step
  // loop keeps only W~ in cache); each step then adds r W~^T in place.
  scalar_t* pre = ws.take<scalar_t>(S * B * 4 * H);
  input_projection(S * B, I, H, units, x, w_ih, bias, pre, ws);
  scalar_t* r_buf = regs.rec_mask() ? ws.take<scalar_t>(2 * B * R) : nullptr;  // [2, B, R]: r = h * rec, by step parity
  scalar_t* hh = d.proj ? ws.take<scalar_t>(B * H) : nullptr;                 // [B, H] o * tanh(c~) before the projection
  scalar_t* hp = d.proj ? ws.take<scalar_t>(B * R) : nullptr;                 // [B, R] its projection

  std::vector<FixedRhs<scalar_t>> gate_gemm(units.count), proj_gemm(d.proj ? h_units.count : 0);
  std::vector<scalar_t*> gate_mem(units.count), proj_mem(proj_gemm.size());
  for (int64_t q = 0; q < units.count; ++q) {
    gate_mem[q] = ws.take<scalar_t>(FixedRhs<scalar_t>::workspace(B, 4 * (units.end(q) - units.begin(q)), R));
  }
  for (size_t q = 0; q < proj_gemm.size(); ++q) {
    proj_mem[q] = ws.take<scalar_t>(FixedRhs<scalar_t>::workspace(B, h_units.end(q) - h_units.begin(q), H));
  }

  auto active = [&](int64_t b, int64_t t) { return lengths.empty() || t < lengths[b]; };

  run_team(units.count, [&](int thread, int team, Sync& sync) {
    StepFactors<scalar_t> step_f;
    step_f.init(regs);
    for (int64_t q = thread; q < units.count; q += team) {
      const int64_t s = units.begin(q), e = units.end(q);
      if (copy_w) {
        build_weight_block(regs, key, k, H, R, s, e, w_hh, w_perm, static_cast<scalar_t*>(nullptr));
      }
      gate_gemm[q].init(B, 4 * (e - s), R, w_rec + 4 * s * R, 1, R, gate_mem[q]);  // B(k, n) = W~[4s + n, k] (perm)
      seq.draw(regs, stream, B, R, s, e);
    }
    for (int64_t q = thread; q < static_cast<int64_t>(proj_gemm.size()); q += team) {
      const int64_t s = h_units.begin(q), e = h_units.end(q);
      proj_gemm[q].init(B, e - s, H, w_hr + s * H, 1, H, proj_mem[q]);  // B(k, n) = W_hr[s + n, k]
    }
    sync();
    const int64_t first_slot = reverse ? S : 0;
    if (regs.rec_mask()) {
      for (int64_t q = thread; q < h_units.count; q += team) {
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t j = h_units.begin(q); j < h_units.end(q); ++j) {
            r_buf[b * R + j] = masked(hs[(first_slot * B + b) * R + j], seq.rec[b * H + j]);
          }
        }
      }
      sync();
    }

    for (int64_t step = 0; step < S; ++step) {
      const int64_t t = reverse ? S - 1 - step : step;
      const int64_t prev = reverse ? t + 1 : t, next = reverse ? t : t + 1;
      // [B, R] this step's recurrent input, and where the next step's goes
      const scalar_t* r_prev = regs.rec_mask() ? r_buf + (step % 2) * B * R : hs + prev * B * R;
      scalar_t* r_next = regs.rec_mask() ? r_buf + ((step + 1) % 2) * B * R : nullptr;

      for (int64_t q = thread; q < units.count; q += team) {
        const int64_t s = units.begin(q), e = units.end(q), width = e - s;
        scalar_t* pre_t = pre + t * B * 4 * H;  // [B, 4H] perm
        gate_gemm[q](r_prev, R, pre_t + 4 * s, 4 * H, Init::kAccumulate);
        for (int64_t b = 0; b < B; ++b) {
          const int64_t row = t * B + b;
          for (int64_t j0 = s; j0 < e; j0 += kChunk) {
            const int64_t n = std::min(kChunk, e - j0);
            step_f.draw(regs, stream, static_cast<uint32_t>(t), b, j0, n, !d.proj, true);
            CellForward<scalar_t> cell;
            cell.n = n;
            for (int g = 0; g < 4; ++g) {
              cell.pre[g] = pre_t + b * 4 * H + 4 * s + g * width + (j0 - s);
              cell.act[g] = gates + row * 4 * H + g * H + j0;
            }
            cell.c_prev = cs + (prev * B + b) * H + j0;
            cell.h_prev = hs + (prev * B + b) * R + j0;
            seq.c_factors(cell, step_f, b, j0, H);
            cell.zh = step_f.has_zh ? step_f.zh : nullptr;
            cell.zh_take = step_f.zh_take;
            const scalar_t* rec = seq.row(seq.rec, b, H);
            cell.rec = rec ? rec + j0 : nullptr;
            cell.tc = tanh_c + row * H + j0;
            cell.c = cs + (next * B + b) * H + j0;
            cell.hh = d.proj ? hh + b * H + j0 : nullptr;
            cell.h = d.proj ? nullptr : hs + (next * B + b) * R + j0;
            cell.out = d.proj ? nullptr : out + row * R + j0;
            cell.r_next = (d.proj || !r_next) ? nullptr : r_next + b * R + j0;
            cell.run();
            if (!active(b, t)) {
              // a finished row keeps its state and outputs zeros
              std::memcpy(cell.c, cell.c_prev, sizeof(scalar_t) * n);
              if (!d.proj) {
                std::memcpy(cell.h, cell.h_prev, sizeof(scalar_t) * n);
                std::fill_n(cell.out, n, scalar_t(0));
                if (cell.r_next) {
                  std::memcpy(cell.r_next, r_prev + b * R + j0, sizeof(scalar_t) * n);
                }
              }
            }
          }
        }
      }
      if (d.proj) {
        sync();
        for (int64_t q = thread; q < h_units.count; q += team) {
          const int64_t s = h_units.begin(q), e = h_units.end(q);
          proj_gemm[q](hh, H, hp + s, R, Init::kZero);
          for (int64_t b = 0; b < B; ++b) {
            const int64_t row = t * B + b;
            for (int64_t j0 = s; j0 < e; j0 += kChunk) {
              const int64_t n = std::min(kChunk, e - j0);
              const scalar_t* h_prev = hs + (prev * B + b) * R + j0;
              scalar_t* h = hs + (next * B + b) * R + j0;
              scalar_t* o = out + row * R + j0;
              scalar_t* rn = r_next ? r_next + b * R + j0 : nullptr;
              if (!active(b, t)) {
                std::memcpy(h, h_prev, sizeof(scalar_t) * n);
                std::fill_n(o, n, scalar_t(0));
                if (rn) {
                  std::memcpy(rn, r_prev + b * R + j0, sizeof(scalar_t) * n);
                }
                continue;
              }
              step_f.draw(regs, stream, static_cast<uint32_t>(t), b, j0, n, true, false);
              const scalar_t* rec = seq.row(seq.rec, b, H);
              zoneout_h_forward<scalar_t>(n, h_prev, hp + b * R + j0, step_f.has_zh ? step_f.zh : nullptr, step_f.zh_take,
                                          rec ? rec + j0 : nullptr, h, o, rn);
            }
          }
        }
      }
      sync();
    }
  });
}

// Backward through time of one layer-direction: fills dgates and the gradients of h0 and c0.
template <typename scalar_t>
void layer_backward(const Dims& d, const Regs& regs, PhiloxKey key, uint32_t k, bool reverse, const std::vector<int64_t>& lengths,
                    const scalar_t* w_hh,      // [4H, R]
                    const scalar_t* w_hr,      // [R, H] or null
                    const scalar_t* gates,     // [S, B, 4H] the forward's reserve
                    const scalar_t* tanh_c,    // [S, B, H]
                    const scalar_t* cs,        // [S + 1, B, H]
                    const scalar_t* d_out,     // [S, B, R] or null (zero)
                    const scalar_t* d_hn,      // [B, R] or null
                    const scalar_t* d_cn,      // [B, H] or null
                    scalar_t* dgates,          // [S, B, 4H] out: gradient of the gate pre-activations
                    scalar_t* weight_factors,  // [4H, 1 or R] out: the weight-drop factors (when weight drop is on)
                    scalar_t* rec_factors,     // [B, R] out: the recurrent-dropout factors (when it is on)
                    scalar_t* d_hp,            // [S, B, R] out (proj): gradient of h~ W_hr^T; null without proj
                    scalar_t* hh_all,          // [S, B, H] out (proj): o * tanh(c~)
                    scalar_t* dh0,             // [B, R] out
                    scalar_t* dc0) {           // [B, H] out
  const int64_t S = d.steps, B = d.batch, H = d.hidden, R = d.real;
  const Blocks units = Blocks::split(H, team_size());
  const Blocks h_units = d.proj ? Blocks::split(R, units.count) : units;
  const UnitStream stream{key, k, H};
  Workspace& ws = Workspace::local();
  SequenceFactors<scalar_t> seq(regs, B, H, ws);

  const bool copy_w = regs.weight_mask() || units.count > 1;
  scalar_t* w_perm_store = copy_w ? ws.take<scalar_t>(4 * H * R) : nullptr;  // [4H, R] W~ in perm layout
  const scalar_t* w_perm = copy_w ? w_perm_store : w_hh;
  scalar_t* dg_perm = ws.take<scalar_t>(B * 4 * H);                 // [B, 4H] perm: this step's dgates for the dh GEMM
  scalar_t* partial = ws.take<scalar_t>(2 * units.count * B * R);   // [2, blocks, B, R]: dgates W~ per unit block, by step parity
  scalar_t* dh_keep = ws.take<scalar_t>(B * R);  // [B, R] gradient of h_{t-1} outside the GEMM (zoneout, finished rows)
  scalar_t* dc = ws.take<scalar_t>(B * H);       // [B, H] gradient of c_t, then c_{t-1}
  scalar_t* dhh = d.proj ? ws.take<scalar_t>(B * H) : nullptr;  // [B, H] gradient of o * tanh(c~)

  std::vector<FixedRhs<scalar_t>> dh_gemm(units.count), proj_gemm(d.proj ? units.count : 0);
  std::vector<scalar_t*> dh_mem(units.count), proj_mem(proj_gemm.size());
  for (int64_t q = 0; q < units.count; ++q) {
    const int64_t width = units.end(q) - units.begin(q);
    dh_mem[q] = ws.take<scalar_t>(FixedRhs<scalar_t>::workspace(B, R, 4 * width));
    if (d.proj) {
      proj_mem[q] = ws.take<scalar_t>(FixedRhs<scalar_t>::workspace(B, width, R));
    }
  }

  auto active = [&](int64_t b, int64_t t) { return lengths.empty() || t < lengths[b]; };

  run_team(units.count, [&](int thread, int team, Sync& sync) {
    StepFactors<scalar_t> step_f;
    step_f.init(regs);
    scalar_t dh_new[kChunk], dh_cand[kChunk];
    for (int64_t q = thread; q < units.count; q += team) {
      const int64_t s = units.begin(q), e = units.end(q);
      if (copy_w) {
        build_weight_block(regs, key, k, H, R, s, e, w_hh, w_perm_store, weight_factors);
      }
      dh_gemm[q].init(B, R, 4 * (e - s), w_perm + 4 * s * R, R, 1, dh_mem[q]);  // B(k, n) = W~[4s + k, n]
      if (d.proj) {
        proj_gemm[q].init(B, e - s, R, w_hr + s, H, 1, proj_mem[q]);  // B(k, n) = W_hr[k, s + n]
      }
      seq.draw(regs, stream, B, R, s, e);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t j = s; j < e; ++j) {
          dc[b * H + j] = d_cn ? d_cn[b * H + j] : scalar_t(0);
        }
      }
    }
    for (int64_t q = thread; q < h_units.count; q += team) {
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t j = h_units.begin(q); j < h_units.end(q); ++j) {
          dh_keep[b * R + j] = d_hn ? d_hn[b * R + j] : scalar_t(0);
        }
      }
    }
    sync();

    // The gradient of h_t for units [j0, j0 + n) of row b: what reached it outside the GEMM, plus the GEMM's
    // partial products of every unit block (through the recurrent dropout factor).
    auto gather_dh = [&](int64_t step, int64_t b, int64_t j0, int64_t n, scalar_t* dh) {
      const scalar_t* rec = seq.row(seq.rec, b, H);
      for (int64_t i = 0; i < n; ++i) {
        dh[i] = dh_keep[b * R + j0 + i];
      }
      if (step == 0) {
        return;
      }
      const scalar_t* p = partial + (step % 2) * units.count * B * R + b * R + j0;
      for (int64_t q = 0; q < units.count; ++q, p += B * R) {
        for (int64_t i = 0; i < n; ++i) {
          dh[i] += rec ? masked(p[i], rec[j0 + i]) : p[i];
        }
      }
    };

    // The cell backward of units [j0, j0 + n) of row b at step t, in the unit block [s, e), from d_hh, the
    // gradient of o * tanh(c~); this step's masks are already drawn in step_f. hh: o * tanh(c~) out (nullable).
    auto cell_backward = [&](int64_t t, int64_t prev, int64_t b, int64_t s, int64_t e, int64_t j0, int64_t n,
                             const scalar_t* d_hh, scalar_t* hh) {
      const int64_t row = t * B + b;
      CellBackward<scalar_t> cell;
      cell.n = n;
      for (int g = 0; g < 4; ++g) {
        cell.act[g] = gates + row * 4 * H + g * H + j0;
        cell.dgate[g] = dgates + row * 4 * H + g * H + j0;
        cell.dgate_copy[g] = dg_perm + b * 4 * H + 4 * s + g * (e - s) + (j0 - s);
      }
      cell.tc = tanh_c + row * H + j0;
      cell.c_prev = cs + (prev * B + b) * H + j0;
      cell.dhh = d_hh;
      seq.c_factors(cell, step_f, b, j0, H);
      cell.dc = dc + b * H + j0;
      cell.hh = hh;
      cell.run();
    };

    for (int64_t step = 0; step < S; ++step) {
      const int64_t t = reverse ? step : S - 1 - step;
      const int64_t prev = reverse ? t + 1 : t;

      // h's units: the output gradient, zoneout of h, finished rows.
      for (int64_t q = thread; q < h_units.count; q += team) {
        const int64_t s = h_units.begin(q), e = h_units.end(q);
        for (int64_t b = 0; b < B; ++b) {
          const int64_t row = t * B + b;
          for (int64_t j0 = s; j0 < e; j0 += kChunk) {
            const int64_t n = std::min(kChunk, e - j0);
            gather_dh(step, b, j0, n, dh_new);
            if (!active(b, t)) {
              // h_t = h_{t-1}: the gradient passes through; the cell saw none
              std::memcpy(dh_keep + b * R + j0, dh_new, sizeof(scalar_t) * n);
              if (d.proj) {
                std::fill_n(d_hp + row * R + j0, n, scalar_t(0));
              }
              continue;
            }
            if (d_out) {
              for (int64_t i = 0; i < n; ++i) {
                dh_new[i] += d_out[row * R + j0 + i];
              }
            }
            step_f.draw(regs, stream, static_cast<uint32_t>(t), b, j0, n, true, !d.proj);
            scalar_t* cand = d.proj ? d_hp + row * R + j0 : dh_cand;
            zoneout_backward<scalar_t>(n, dh_new, step_f.has_zh ? step_f.zh : nullptr, step_f.zh_take, dh_keep + b * R + j0, cand);
            if (d.proj) {
              continue;
            }
            // no projection: h's units are the cell's units, finish the cell here
            cell_backward(t, prev, b, s, e, j0, n, dh_cand, nullptr);
          }
        }
        if (!d.proj) {
          // rows that were finished at t: zero dgates
          for (int64_t b = 0; b < B; ++b) {
            if (active(b, t)) continue;
            for (int g = 0; g < 4; ++g) {
              std::fill_n(dgates + (t * B + b) * 4 * H + g * H + s, e - s, scalar_t(0));
              std::fill_n(dg_perm + b * 4 * H + 4 * s + g * (e - s), e - s, scalar_t(0));
            }
          }
        }
      }
      if (d.proj) {
        sync();
        for (int64_t q = thread; q < units.count; q += team) {
          const int64_t s = units.begin(q), e = units.end(q);
          proj_gemm[q](d_hp + t * B * R, R, dhh + s, H, Init::kZero);
          for (int64_t b = 0; b < B; ++b) {
            const int64_t row = t * B + b;
            if (!active(b, t)) {
              for (int g = 0; g < 4; ++g) {
                std::fill_n(dgates + row * 4 * H + g * H + s, e - s, scalar_t(0));
                std::fill_n(dg_perm + b * 4 * H + 4 * s + g * (e - s), e - s, scalar_t(0));
              }
              std::fill_n(hh_all + row * H + s, e - s, scalar_t(0));
              continue;
            }
            for (int64_t j0 = s; j0 < e; j0 += kChunk) {
              const int64_t n = std::min(kChunk, e - j0);
              step_f.draw(regs, stream, static_cast<uint32_t>(t), b, j0, n, false, true);
              cell_backward(t, prev, b, s, e, j0, n, dhh + b * H + j0, hh_all + row * H + j0);
            }
          }
        }
      }
      // dh_{t-1} partial products of this thread's unit blocks
      for (int64_t q = thread; q < units.count; q += team) {
        const int64_t s = units.begin(q);
        scalar_t* p = partial + (((step + 1) % 2) * units.count + q) * B * R;
        dh_gemm[q](dg_perm + 4 * s, 4 * H, p, R, Init::kZero);
      }
      sync();
    }

    for (int64_t q = thread; q < h_units.count; q += team) {
      const int64_t s = h_units.begin(q), e = h_units.end(q);
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t j0 = s; j0 < e; j0 += kChunk) {
          gather_dh(S, b, j0, std::min(kChunk, e - j0), dh0 + b * R + j0);
        }
      }
    }
  });
  std::memcpy(dc0, dc, sizeof(scalar_t) * B * H);
  if (rec_factors) {
    for (int64_t b = 0; b < B; ++b) {
      std::memcpy(rec_factors + b * R, seq.rec + b * H, sizeof(scalar_t) * R);
    }
  }
}

// ---- operators ----------------------------------------------------------------------------------------------------

int64_t read_seed(const Tensor& seed) {
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "fused_rnn_cpp: seed must be a one-element int64 tensor");
  return seed.item<int64_t>();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer(
    const Tensor& x_, const Tensor& h0, const Tensor& c0, const Tensor& w_ih_, const Tensor& w_hh_,
    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr_,
    const Tensor& seed, const std::optional<Tensor>& lengths_, at::IntArrayRef layer, c10::ArrayRef<double> regularizers) {
  const Dims d = check_layer(x_, w_ih_, w_hh_, w_hr_);
  const Regs regs = make_regs(layer, regularizers);
  const int64_t index = layer[0];
  const bool reverse = layer[1] != 0;
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({d.batch, d.real}) && c0.sizes() == at::IntArrayRef({d.batch, d.hidden}),
              "fused_rnn_cpp: h0 must be [B, R] and c0 [B, H]");
  const PhiloxKey key = seed_key(read_seed(seed));
  const std::vector<int64_t> lengths = read_lengths(lengths_, d.batch);
  const int64_t S = d.steps, B = d.batch, H = d.hidden, R = d.real;
  const auto options = x_.options();
  Workspace::Frame frame(Workspace::local());

  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor w_hr = d.proj ? w_hr_->contiguous() : Tensor();
  const Tensor bias = b_ih.has_value() ? (*b_ih + *b_hh).contiguous() : Tensor();  // [4H] both biases folded

  Tensor out = at::empty({S, B, R}, options);
  ReservePool& pool = ReservePool::get();
  Tensor gates = pool.empty({S, B, 4 * H}, options);
  Tensor tanh_c = pool.empty({S, B, H}, options);
  Tensor hs = pool.empty({S + 1, B, R}, options);
  Tensor cs = pool.empty({S + 1, B, H}, options);
  const int64_t first = reverse ? S : 0, last = reverse ? 0 : S;
  hs[first].copy_(h0);
  cs[first].copy_(c0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_rnn_cpp::lstm_layer", [&] {
    auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    layer_forward<scalar_t>(d, regs, key, static_cast<uint32_t>(index), reverse, lengths, ptr(x), ptr(w_ih), ptr(bias), ptr(w_hh),
                            ptr(w_hr), ptr(out), ptr(gates), ptr(tanh_c), ptr(hs), ptr(cs));
  });
  return {out, hs[last].clone(), cs[last].clone(), gates, tanh_c, hs, cs};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_layer_backward(
    const std::optional<Tensor>& grad_out_, const std::optional<Tensor>& grad_hn_, const std::optional<Tensor>& grad_cn_,
    const Tensor& x_, const Tensor& w_ih_, const Tensor& w_hh_, const std::optional<Tensor>& w_hr_, const Tensor& seed,
    const std::optional<Tensor>& lengths_, const Tensor& gates_, const Tensor& tanh_c_, const Tensor& hs_, const Tensor& cs_,
    at::IntArrayRef layer, c10::ArrayRef<double> regularizers, bool input_grad) {
  const Dims d = check_layer(x_, w_ih_, w_hh_, w_hr_);
  const Regs regs = make_regs(layer, regularizers);
  const int64_t index = layer[0];
  const bool reverse = layer[1] != 0;
  const PhiloxKey key = seed_key(read_seed(seed));
  const std::vector<int64_t> lengths = read_lengths(lengths_, d.batch);
  const int64_t S = d.steps, B = d.batch, I = d.input, H = d.hidden, R = d.real;
  const auto options = x_.options();
  Workspace& ws = Workspace::local();
  Workspace::Frame frame(ws);

  const Tensor x = x_.contiguous(), w_ih = w_ih_.contiguous(), w_hh = w_hh_.contiguous();
  const Tensor w_hr = d.proj ? w_hr_->contiguous() : Tensor();
  const Tensor gates = gates_.contiguous(), tanh_c = tanh_c_.contiguous(), hs = hs_.contiguous(), cs = cs_.contiguous();
  const Tensor grad_out = grad_out_.has_value() ? grad_out_->contiguous() : Tensor();
  const Tensor grad_hn = grad_hn_.has_value() ? grad_hn_->contiguous() : Tensor();
  const Tensor grad_cn = grad_cn_.has_value() ? grad_cn_->contiguous() : Tensor();

  Tensor dx = at::empty(input_grad ? at::IntArrayRef({S, B, I}) : at::IntArrayRef({0}), options);
  Tensor dh0 = at::empty({B, R}, options);
  Tensor dc0 = at::empty({B, H}, options);
  Tensor dw_ih = at::empty({4 * H, I}, options);
  Tensor dw_hh = at::empty({4 * H, R}, options);
  Tensor db = at::empty({4 * H}, options);
  Tensor dw_hr = at::empty(d.proj ? at::IntArrayRef({R, H}) : at::IntArrayRef({0}), options);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_rnn_cpp::lstm_layer_backward", [&] {
    auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    const int64_t rows = S * B, cols = regs.weight_rows ? 1 : R;
    scalar_t* dgates = ws.take<scalar_t>(rows * 4 * H);                                      // [S, B, 4H]
    scalar_t* weight_factors = regs.weight_mask() ? ws.take<scalar_t>(4 * H * cols) : nullptr;  // [4H, 1 or R]
    scalar_t* rec_factors = regs.rec_mask() ? ws.take<scalar_t>(B * R) : nullptr;              // [B, R]
    scalar_t* d_hp = d.proj ? ws.take<scalar_t>(rows * R) : nullptr;                          // [S, B, R]
    scalar_t* hh_all = d.proj ? ws.take<scalar_t>(rows * H) : nullptr;                        // [S, B, H]
    layer_backward<scalar_t>(d, regs, key, static_cast<uint32_t>(index), reverse, lengths, ptr(w_hh), ptr(w_hr), ptr(gates), ptr(tanh_c),
                             ptr(cs), ptr(grad_out), ptr(grad_hn), ptr(grad_cn), dgates, weight_factors, rec_factors, d_hp, hh_all,
                             ptr(dh0), ptr(dc0));

    // The weight gradients and dx: one product each over all steps. dgates^T is read in place (row stride 1).
    // [S * B, R] the recurrent input of every step: h_{t-1} (slots 0..S-1 forward, 1..S reverse), times rec
    const scalar_t* r_all = ptr(hs) + (reverse ? B * R : 0);
    if (rec_factors) {
      scalar_t* scaled = ws.take<scalar_t>(rows * R);
      at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) mask_row(r_all + r * R, rec_factors + (r % B) * R, R, scaled + r * R);
      });
      r_all = scaled;
    }
    matmul<scalar_t>(4 * H, R, rows, dgates, 1, 4 * H, r_all, R, 1, ptr(dw_hh));
    if (weight_factors) {
      scalar_t* w = ptr(dw_hh);
      at::parallel_for(0, 4 * H, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          if (cols == 1) {
            mask_row(w + r * R, weight_factors[r], R, w + r * R);
          } else {
            mask_row(w + r * R, weight_factors + r * R, R, w + r * R);
          }
        }
      });
    }
    matmul<scalar_t>(4 * H, I, rows, dgates, 1, 4 * H, ptr(x), I, 1, ptr(dw_ih));
    if (input_grad) {
      matmul<scalar_t>(rows, I, 4 * H, dgates, 4 * H, 1, ptr(w_ih), I, 1, ptr(dx));
    }
    if (d.proj) {
      matmul<scalar_t>(R, H, rows, d_hp, 1, R, hh_all, H, 1, ptr(dw_hr));
    }
    // db: column sums of dgates, in blocks of columns
    scalar_t* bias_grad = ptr(db);
    at::parallel_for(0, (4 * H + 255) / 256, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t c0 = blk * 256, n = std::min<int64_t>(256, 4 * H - c0);
        scalar_t acc[256] = {};
        for (int64_t r = 0; r < rows; ++r) {
          add_row(dgates + r * 4 * H + c0, n, acc);
        }
        std::memcpy(bias_grad + c0, acc, sizeof(scalar_t) * n);
      }
    });
  });
  return {dx, dh0, dc0, dw_ih, dw_hh, db, dw_hr};
}

// y = x * keep-mask / (1 - p) of one feature-dropout mask (kinds 1 and 2): x [S, B, F], element e = b F + f of step
// t (or of step 0 when locked). Its own backward: the same op applied to the gradient.
Tensor feature_dropout(const Tensor& x_, const Tensor& seed, int64_t kind, int64_t index, double p, bool locked) {
  TORCH_CHECK(x_.dim() == 3, "fused_rnn_cpp::feature_dropout: x must be [T, B, F], got ", x_.sizes());
  TORCH_CHECK(x_.scalar_type() == at::kFloat || x_.scalar_type() == at::kDouble, "fused_rnn_cpp: float32 or float64 only");
  const PhiloxKey key = seed_key(read_seed(seed));
  const Tensor x = x_.contiguous();
  const int64_t S = x.size(0), per_step = x.size(1) * x.size(2);
  TORCH_CHECK(per_step / 4 < (int64_t{1} << 32), "fused_rnn_cpp::feature_dropout: too many elements per step");
  Tensor y = at::empty_like(x);
  const Event drop(p);
  constexpr int64_t kBlock = 1024;
  const int64_t blocks = (per_step + kBlock - 1) / kBlock;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused_rnn_cpp::feature_dropout", [&] {
    const scalar_t scale = static_cast<scalar_t>(keep_scale(p));
    const scalar_t* src = x.data_ptr<scalar_t>();
    scalar_t* dst = y.data_ptr<scalar_t>();
    if (locked) {
      // one mask for every step: draw it once
      std::vector<uint32_t> draws(per_step);
      at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t blk = b0; blk < b1; ++blk) {
          const int64_t e0 = blk * kBlock;
          packed_draws(key, static_cast<uint32_t>(kind), static_cast<uint32_t>(index), 0, e0, std::min(kBlock, per_step - e0),
                       draws.data() + e0);
        }
      });
      at::parallel_for(0, S * blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t i = b0; i < b1; ++i) {
          const int64_t t = i / blocks, e0 = (i % blocks) * kBlock, n = std::min(kBlock, per_step - e0);
          apply_keep(draws.data() + e0, src + t * per_step + e0, dst + t * per_step + e0, n, drop, scale);
        }
      });
      return;
    }
    at::parallel_for(0, S * blocks, 1, [&](int64_t b0, int64_t b1) {
      uint32_t draws[kBlock];
      for (int64_t i = b0; i < b1; ++i) {
        const int64_t t = i / blocks, e0 = (i % blocks) * kBlock, n = std::min(kBlock, per_step - e0);
        packed_draws(key, static_cast<uint32_t>(kind), static_cast<uint32_t>(index), static_cast<uint32_t>(t), e0, n, draws);
        apply_keep(draws, src + t * per_step + e0, dst + t * per_step + e0, n, drop, scale);
      }
    });
  });
  return y;
}

// ---- test hooks: the draws exactly as the kernels make them -------------------------------------------------------

// Philox4x32-10 of counters [N, 4] (int64 holding uint32 values): words [N, 4].
Tensor philox_words(const Tensor& seed, const Tensor& counters_) {
  const PhiloxKey key = seed_key(read_seed(seed));
  const Tensor counters = counters_.to(at::kLong).contiguous();
  TORCH_CHECK(counters.dim() == 2 && counters.size(1) == 4, "fused_rnn_cpp::philox: counters must be [N, 4]");
  Tensor words = at::empty_like(counters);
  const int64_t* c = counters.data_ptr<int64_t>();
  int64_t* w = words.data_ptr<int64_t>();
  for (int64_t i = 0; i < counters.size(0); ++i) {
    uint32_t out[4];
    philox(uint32_t(c[4 * i]), uint32_t(c[4 * i + 1]), uint32_t(c[4 * i + 2]), uint32_t(c[4 * i + 3]), key, out);
    for (int q = 0; q < 4; ++q) w[4 * i + q] = out[q];
  }
  return words;
}

// The draws of a bulk mask (kinds 1-3) of one step: int64 [numel], element e reading word e % 4 of call e / 4.
Tensor bulk_draws(const Tensor& seed, int64_t kind, int64_t index, int64_t step, int64_t numel) {
  const PhiloxKey key = seed_key(read_seed(seed));
  std::vector<uint32_t> draws(numel);
  // in uneven pieces, so that pieces starting inside a group of four are covered too
  for (int64_t e0 = 0, piece = 1; e0 < numel; e0 += piece, piece = piece % 7 + 3) {
    packed_draws(key, uint32_t(kind), uint32_t(index), uint32_t(step), e0, std::min(piece, numel - e0), draws.data() + e0);
  }
  Tensor out = at::empty({numel}, at::kLong);
  std::copy(draws.begin(), draws.end(), out.data_ptr<int64_t>());
  return out;
}

// The words of the per-unit draws (kinds 4, 5) of one step as the cell kernels make them: int64 [3, batch, hidden].
Tensor unit_draws(const Tensor& seed, int64_t kind, int64_t index, int64_t step, int64_t batch, int64_t hidden) {
  const UnitStream stream{seed_key(read_seed(seed)), uint32_t(index), hidden};
  Tensor out = at::empty({3, batch, hidden}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  uint32_t w[3][kChunk];
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t j0 = 0; j0 < hidden; j0 += kChunk) {
      const int64_t n = std::min(kChunk, hidden - j0);
      stream.draw(uint32_t(kind), uint32_t(step), b, j0, n, w[0], w[1], w[2]);
      for (int q = 0; q < 3; ++q) {
        for (int64_t i = 0; i < n; ++i) o[(q * batch + b) * hidden + j0 + i] = w[q][i];
      }
    }
  }
  return out;
}

// The weight-drop factors of W_hh (0 or 1 / (1 - p)) as the kernels apply them: [4H, R] or [4H, 1] in row mode.
Tensor weight_factors(const Tensor& seed, int64_t index, double p, bool rows, int64_t hidden, int64_t real, at::ScalarType dtype) {
  const PhiloxKey key = seed_key(read_seed(seed));
  const int64_t cols = rows ? 1 : real;
  Tensor out = at::empty({4 * hidden, cols}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "fused_rnn_cpp::weight_factors", [&] {
    for (int64_t r = 0; r < 4 * hidden; ++r) {
      weight_row_factors(key, uint32_t(index), p, cols, r, out.data_ptr<scalar_t>() + r * cols);
    }
  });
  return out;
}

bool uses_vector_gemm() {
  return vector_gemm();
}

}  // namespace
}  // namespace fused_rnn

TORCH_LIBRARY(fused_rnn_cpp, m) {
  m.set_python_module("fused_rnn.cpp.ops");
  m.def("feature_dropout(Tensor x, Tensor seed, int kind, int index, float p, bool locked) -> Tensor");
  // layer: [index k = l * D + d, reverse, training, weight_dropout_mode == "row", update_dropout_mode == "step"];
  // regularizers: [recurrent_dropout, weight_dropout, update_dropout, cell_dropout, zoneout_h, zoneout_c].
  // (Few arguments: torch's autograd wrapper walks the schema on every call.)
  m.def(
      "lstm_layer(Tensor x, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, "
      "Tensor seed, Tensor? lengths, int[5] layer, float[6] regularizers) "
      "-> (Tensor out, Tensor h_n, Tensor c_n, Tensor gates, Tensor tanh_c, Tensor hs, Tensor cs)");
  m.def(
      "lstm_layer_backward(Tensor? grad_out, Tensor? grad_h_n, Tensor? grad_c_n, Tensor x, Tensor w_ih, Tensor w_hh, "
      "Tensor? w_hr, Tensor seed, Tensor? lengths, Tensor gates, Tensor tanh_c, Tensor hs, Tensor cs, int[5] layer, "
      "float[6] regularizers, bool input_grad) "
      "-> (Tensor grad_x, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b, Tensor grad_w_hr)");
  m.def("philox(Tensor seed, Tensor counters) -> Tensor");
  m.def("bulk_draws(Tensor seed, int kind, int index, int step, int numel) -> Tensor");
  m.def("unit_draws(Tensor seed, int kind, int index, int step, int batch, int hidden) -> Tensor");
  m.def("weight_factors(Tensor seed, int index, float p, bool rows, int hidden, int real, ScalarType dtype) -> Tensor");
  m.def("vector_gemm() -> bool", &fused_rnn::uses_vector_gemm);
}

TORCH_LIBRARY_IMPL(fused_rnn_cpp, CPU, m) {
  m.impl("feature_dropout", &fused_rnn::feature_dropout);
  m.impl("lstm_layer", &fused_rnn::lstm_layer);
  m.impl("lstm_layer_backward", &fused_rnn::lstm_layer_backward);
  m.impl("philox", &fused_rnn::philox_words);
  m.impl("bulk_draws", &fused_rnn::bulk_draws);
  m.impl("unit_draws", &fused_rnn::unit_draws);
  m.impl("weight_factors", &fused_rnn::weight_factors);
}
