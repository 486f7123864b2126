// mote_kernels_selftest: checks every instruction set this CPU runs against a reference written directly from the
// spec in mote_ternary.h (naive loops, no code shared with the kernels), serially and on a thread pool; with
// --bench, times the kernels and the memory bandwidth bound and prints one JSON object.
//
//   mote_kernels_selftest                       the check: one line per instruction set, then "selftest passed"
//   mote_kernels_selftest --bench [--threads N] [--isa NAME]
//   mote_kernels_selftest --bench-quantized [--threads N] [--isa NAME]
//                                               quantized_linear (int4 groups of 32, int8 per channel) against
//                                               fp32 float_linear on the product's linear shapes, weights in DRAM
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "mote_ternary.h"

using namespace mote;

namespace {

// ---- utilities

// splitmix64: deterministic everywhere (the std distributions are not specified bit for bit).
class Rng {
 public:
  explicit Rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
  float uniform(float lo, float hi) { return lo + (hi - lo) * static_cast<float>(next() >> 40) / 16777216.0f; }

 private:
  uint64_t s_;
};

// A 64-byte aligned buffer with a canary after `size` bytes, filled with garbage: proves a workspace needs no
// initialisation and that its size function is not short.
class Workspace {
 public:
  explicit Workspace(size_t size) : size_(size), raw_(size + kCanary + 64) {
    const auto addr = reinterpret_cast<uintptr_t>(raw_.data());
    data_ = raw_.data() + ((64 - addr % 64) % 64);
    std::memset(data_, 0xA5, size_ + kCanary);
  }
  void* data() { return data_; }
  bool canary_intact() const {
    for (size_t i = 0; i < kCanary; ++i) {
      if (data_[size_ + i] != 0xA5) return false;
    }
    return true;
  }

 private:
  static constexpr size_t kCanary = 256;
  size_t size_;
  std::vector<uint8_t> raw_;
  uint8_t* data_;
};

// A thread pool behind the ParallelFor interface: the caller and threads-1 workers take chunks of `grain` items
// from a shared cursor and the caller returns once every chunk is done. The cursor carries the job's number, so a
// worker that wakes late (its core busy elsewhere) finds its job finished instead of holding up the caller or
// running a later job's chunks. Workers spin for a while before sleeping, as a production pool does, so that timed
// decode calls do not measure a futex wake-up.
class ThreadPool {
 public:
  explicit ThreadPool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { work(); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      generation_.fetch_add(1);
    }
    wake_.notify_all();
    for (std::thread& w : workers_) w.join();
  }
  ParallelFor parallel_for() {
    return [this](int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) { run(n, grain, fn); };
  }

 private:
  struct Job {
    const std::function<void(int64_t, int64_t)>* fn;
    int64_t n, grain, chunks;
    uint64_t generation;
  };

  void run(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
    grain = std::max<int64_t>(grain, 1);
    if (workers_.empty() || n <= grain) {
      if (n > 0) fn(0, n);
      return;
    }
    Job job{&fn, n, grain, (n + grain - 1) / grain, 0};
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job.generation = generation_.load() + 1;
      job_ = job;
      done_.store(0);
      cursor_.store(job.generation << 32);
      generation_.store(job.generation);
    }
    wake_.notify_all();
    take_chunks(job);
    while (done_.load() < job.chunks) std::this_thread::yield();
  }

  // Runs chunks of `job` until none is left; the cursor is (job number << 32) + next chunk.
  void take_chunks(const Job& job) {
    for (;;) {
      uint64_t c = cursor_.load();
      do {
        if ((c >> 32) != job.generation || static_cast<int64_t>(c & 0xFFFFFFFFu) >= job.chunks) return;
      } while (!cursor_.compare_exchange_weak(c, c + 1));
      const int64_t begin = static_cast<int64_t>(c & 0xFFFFFFFFu) * job.grain;
      (*job.fn)(begin, std::min(begin + job.grain, job.n));
      done_.fetch_add(1);
    }
  }

  void work() {
    uint64_t seen = 0;
    for (;;) {
      for (int spin = 0; spin < (1 << 16) && generation_.load() == seen; ++spin) {
      }
      Job job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        if (stop_) return;
        job = job_;
        seen = job.generation;
      }
      take_chunks(job);
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<uint64_t> cursor_{0};
  std::atomic<int64_t> done_{0};
  Job job_{};
  bool stop_ = false;
};

std::vector<Isa> supported_isas() {
  std::vector<Isa> isas;
  for (Isa isa : {Isa::kScalar, Isa::kAvx2, Isa::kAvx512Vnni, Isa::kNeon, Isa::kNeonDot}) {
    if (isa_supported(isa)) isas.push_back(isa);
  }
  return isas;
}

int64_t row_bytes(int64_t k) { return (k + 3) / 4; }

// ---- the reference, from the spec in mote_ternary.h

struct RefQ8 {
  std::vector<int> q;
  float scale;
};

RefQ8 ref_quantize(const float* v, int64_t k) {
  float amax = 0.0f;
  for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(v[i]));
  amax = std::max(amax, 1e-5f);
  const float inv = (1.0f / amax) * 127.0f;
  RefQ8 r{std::vector<int>(k), amax / 127.0f};
  for (int64_t i = 0; i < k; ++i) {
    r.q[i] = static_cast<int>(std::min(std::max(std::nearbyint(v[i] * inv), -128.0f), 127.0f));
  }
  return r;
}

int ref_trit(const uint8_t* codes, int64_t k, int64_t r, int64_t i) {
  return ((codes[r * row_bytes(k) + i / 4] >> (2 * (i % 4))) & 3) - 2;
}

std::vector<float> ref_bitlinear(const float* x, const TernaryMatrix& w) {
  const RefQ8 a = ref_quantize(x, w.k);
  std::vector<float> y(w.rows);
  for (int64_t r = 0; r < w.rows; ++r) {
    int32_t acc = 0;
    for (int64_t i = 0; i < w.k; ++i) acc += ref_trit(w.codes, w.k, r, i) * a.q[i];
    y[r] = (static_cast<float>(acc) * a.scale) * w.scale[w.per_row_scale ? r : 0];
  }
  return y;
}

std::vector<float> ref_expert(const float* x, const RoutedExperts& w, int64_t e) {
  const std::vector<float> g = ref_bitlinear(x, w.gate.expert(e)), u = ref_bitlinear(x, w.up.expert(e));
  std::vector<float> h(g.size());
  for (size_t i = 0; i < g.size(); ++i) h[i] = (g[i] / (1.0f + std::exp(-g[i]))) * u[i];
  return ref_bitlinear(h.data(), w.down.expert(e));
}

// The token's (expert, p) choices in ascending expert id.
std::vector<std::pair<int64_t, float>> ref_choices(const int64_t* top_i, const float* top_p, int64_t t,
                                                   int64_t top_k) {
  std::vector<std::pair<int64_t, float>> c;
  for (int64_t s = 0; s < top_k; ++s) c.emplace_back(top_i[t * top_k + s], top_p[t * top_k + s]);
  std::sort(c.begin(), c.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  return c;
}

std::vector<float> ref_routed(const float* x, int64_t n, const float* top_p, const int64_t* top_i, int64_t top_k,
                              const RoutedExperts& w) {
  const int64_t d = w.down.rows;
  std::vector<float> y(n * d, 0.0f);
  for (int64_t t = 0; t < n; ++t) {
    for (const auto& [e, p] : ref_choices(top_i, top_p, t, top_k)) {
      const std::vector<float> o = ref_expert(x + t * w.gate.k, w, e);
      for (int64_t r = 0; r < d; ++r) y[t * d + r] = y[t * d + r] + p * o[r];
    }
  }
  return y;
}

std::vector<double> ref_float_linear(const std::vector<double>& x, const FloatExperts& w, int64_t e) {
  std::vector<double> y(w.rows, 0.0);
  for (int64_t r = 0; r < w.rows; ++r) {
    for (int64_t i = 0; i < w.k; ++i) y[r] += static_cast<double>(w.weight[(e * w.rows + r) * w.k + i]) * x[i];
  }
  return y;
}

std::vector<double> ref_routed_float(const float* x, int64_t n, const float* top_p, const int64_t* top_i,
                                     int64_t top_k, const RoutedFloatExperts& w) {
  const int64_t d = w.down.rows;
  std::vector<double> y(n * d, 0.0);
  for (int64_t t = 0; t < n; ++t) {
    const std::vector<double> xt(x + t * w.gate.k, x + (t + 1) * w.gate.k);
    for (const auto& [e, p] : ref_choices(top_i, top_p, t, top_k)) {
      const std::vector<double> g = ref_float_linear(xt, w.gate, e), u = ref_float_linear(xt, w.up, e);
      std::vector<double> h(g.size());
      for (size_t i = 0; i < g.size(); ++i) h[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
      const std::vector<double> o = ref_float_linear(h, w.down, e);
      for (int64_t r = 0; r < d; ++r) y[t * d + r] += p * o[r];
    }
  }
  return y;
}

// ---- test data

// Ternary matrices [count, rows, k] in the storage of mote_ternary.h; a few rows are all zero trits.
struct TernaryData {
  std::vector<uint8_t> codes;
  std::vector<float> scale;
};

TernaryData random_ternary(Rng& rng, int64_t count, int64_t rows, int64_t k, bool per_row) {
  TernaryData d;
  const int64_t rb = row_bytes(k);
  d.codes.assign(count * rows * rb, 0);
  for (int64_t r = 0; r < count * rows; ++r) {
    const bool zero_row = rng.below(16) == 0;
    for (int64_t i = 0; i < rb * 4; ++i) {
      const int code = (i >= k || zero_row) ? 2 : 1 + static_cast<int>(rng.below(3));
      d.codes[r * rb + i / 4] |= static_cast<uint8_t>(code << (2 * (i % 4)));
    }
  }
  d.scale.resize(per_row ? count * rows : count);
  for (float& s : d.scale) s = rng.uniform(0.01f, 0.2f);
  return d;
}

// A value v with v * inv exactly `target` (a rounding tie when target is m + 0.5), or 0 if none is near.
float tie_value(float target, float inv) {
  float v = target / inv;
  for (int step = 0; step < 64; ++step) {
    if (v * inv == target) return v;
    v = (v * inv < target) ? std::nextafter(v, target > 0 ? INFINITY : -INFINITY)
                           : std::nextafter(v, target > 0 ? -INFINITY : INFINITY);
  }
  return 0.0f;
}

// One token of activations: random values of magnitude up to `amax`, one of them exactly +-amax, and about one in
// eight an exact rounding tie of v * inv. amax 0 gives the all-zero token, amax < 1e-5 exercises the clamp.
void fill_token(Rng& rng, float* v, int64_t k, float amax) {
  for (int64_t i = 0; i < k; ++i) v[i] = rng.uniform(-amax, amax);
  if (amax == 0.0f) return;
  v[rng.below(k)] = rng.below(2) ? amax : -amax;
  const float inv = (1.0f / std::max(amax, 1e-5f)) * 127.0f;
  for (int64_t i = 0; i < k; ++i) {
    if (rng.below(8) != 0 || std::fabs(v[i]) == amax) continue;
    const float target = static_cast<float>(rng.below(253) - 126) + 0.5f;
    const float tie = tie_value(target, inv);
    if (tie != 0.0f && std::fabs(tie) < amax) v[i] = tie;
  }
}

std::vector<float> random_tokens(Rng& rng, int64_t n, int64_t k) {
  std::vector<float> x(n * k);
  for (int64_t t = 0; t < n; ++t) {
    const int64_t kind = rng.below(8);
    const float amax = kind == 0 ? 0.0f : kind == 1 ? 6e-6f : rng.uniform(0.5f, 4.0f);
    fill_token(rng, x.data() + t * k, k, amax);
  }
  return x;
}

// top_k distinct experts per token, in random order, with random weights.
void random_routing(Rng& rng, int64_t n, int64_t top_k, int64_t experts, std::vector<int64_t>& top_i,
                    std::vector<float>& top_p) {
  top_i.resize(n * top_k);
  top_p.resize(n * top_k);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t s = 0; s < top_k; ++s) {
      int64_t e;
      do {
        e = rng.below(experts);
      } while (std::find(&top_i[t * top_k], &top_i[t * top_k + s], e) != &top_i[t * top_k + s]);
      top_i[t * top_k + s] = e;
      top_p[t * top_k + s] = rng.uniform(0.05f, 1.0f);
    }
  }
}

// Below 512 the AVX-512 VNNI dispatch runs the AVX2 kernels (ternary_dispatch.cpp: code_kernels_for), so the K of 512
// and more (whole and partial 64-byte groups) are what test the VNNI kernels.
const int64_t kOddK[] = {1, 3, 5, 31, 33, 127, 129, 200, 128, 256, 384, 512, 517, 700, 1000, 1025};

int64_t random_k(Rng& rng) { return kOddK[rng.below(sizeof(kOddK) / sizeof(kOddK[0]))]; }

// ---- the check

struct Mode {
  Isa isa;
  const char* threading;
  ParallelFor parallel;
};

// Counts cases per instruction set and remembers the first failure.
class Checker {
 public:
  bool failed() const { return !failure_.empty(); }
  void fail(const std::string& what) {
    if (failure_.empty()) failure_ = what;
  }
  const std::string& failure() const { return failure_; }

 private:
  std::string failure_;
};

std::string describe_isa(const Mode& m) { return std::string(isa_name(m.isa)) + " (" + m.threading + ")"; }

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof(float)) == 0; }

void compare_exact(Checker& check, const Mode& m, const std::string& what, const std::vector<float>& got,
                   const std::vector<float>& want, int64_t width) {
  for (size_t i = 0; i < want.size() && !check.failed(); ++i) {
    if (!same_bits(got[i], want[i])) {
      char buf[256];
      std::snprintf(buf, sizeof buf, ": token %lld output %lld is %.9g, the reference %.9g",
                    static_cast<long long>(i / width), static_cast<long long>(i % width), got[i], want[i]);
      check.fail(describe_isa(m) + " " + what + buf);
    }
  }
}

void check_linear(Rng& rng, const std::vector<Mode>& modes, Checker& check) {
  const int64_t k = random_k(rng), rows = 1 + rng.below(80), n = 1 + rng.below(17);
  const bool per_row = rng.below(2);
  const TernaryData data = random_ternary(rng, 1, rows, k, per_row);
  const TernaryMatrix w{data.codes.data(), data.scale.data(), rows, k, per_row};
  const std::vector<float> x = random_tokens(rng, n, k);
  std::vector<float> want;
  for (int64_t t = 0; t < n; ++t) {
    const std::vector<float> y = ref_bitlinear(x.data() + t * k, w);
    want.insert(want.end(), y.begin(), y.end());
  }
  const std::string what = "ternary_linear [" + std::to_string(rows) + " x " + std::to_string(k) +
                           "] n=" + std::to_string(n) + (per_row ? " per-row" : " per-tensor");
  for (const Mode& m : modes) {
    Workspace ws(ternary_linear_workspace(n, w));
    std::vector<float> y(n * rows, NAN);
    ternary_linear(m.isa, x.data(), n, w, y.data(), ws.data(), m.parallel);
    if (!ws.canary_intact()) check.fail(describe_isa(m) + " " + what + ": wrote past its workspace");
    compare_exact(check, m, what, y, want, rows);
  }
}

struct RoutedCase {
  int64_t d, inter, experts, top_k, n;
  TernaryData gate, up, down;
  RoutedExperts w;
  std::vector<float> x, top_p;
  std::vector<int64_t> top_i;
  std::string what;
};

RoutedCase random_routed(Rng& rng) {
  RoutedCase c;
  const int64_t kExperts[] = {1, 2, 3, 5};
  do {  // keep the naive reference quick
    c.d = random_k(rng);
    c.inter = random_k(rng);
    c.experts = kExperts[rng.below(4)];
    c.top_k = std::min<int64_t>(c.experts, 1 + rng.below(2));
    c.n = 1 + rng.below(17);
  } while (c.n * c.top_k * c.d * c.inter > 4000000);
  const bool per_row[3] = {rng.below(2) == 1, rng.below(2) == 1, rng.below(2) == 1};
  c.gate = random_ternary(rng, c.experts, c.inter, c.d, per_row[0]);
  c.up = random_ternary(rng, c.experts, c.inter, c.d, per_row[1]);
  c.down = random_ternary(rng, c.experts, c.d, c.inter, per_row[2]);
  c.w = RoutedExperts{{c.gate.codes.data(), c.gate.scale.data(), c.experts, c.inter, c.d, per_row[0]},
                      {c.up.codes.data(), c.up.scale.data(), c.experts, c.inter, c.d, per_row[1]},
                      {c.down.codes.data(), c.down.scale.data(), c.experts, c.d, c.inter, per_row[2]}};
  c.x = random_tokens(rng, c.n, c.d);
  random_routing(rng, c.n, c.top_k, c.experts, c.top_i, c.top_p);
  c.what = "d=" + std::to_string(c.d) + " I=" + std::to_string(c.inter) + " E=" + std::to_string(c.experts) +
           " top_k=" + std::to_string(c.top_k) + " n=" + std::to_string(c.n);
  return c;
}

void check_routed(Rng& rng, const std::vector<Mode>& modes, Checker& check) {
  const RoutedCase c = random_routed(rng);
  const std::vector<float> want = ref_routed(c.x.data(), c.n, c.top_p.data(), c.top_i.data(), c.top_k, c.w);
  const std::string what = "routed_experts " + c.what;
  for (const Mode& m : modes) {
    Workspace ws(routed_experts_workspace(c.n, c.top_k, c.w));
    std::vector<float> y(c.n * c.d, NAN);
    const char* error = routed_experts(m.isa, c.x.data(), c.n, c.top_p.data(), c.top_i.data(), c.top_k, c.w,
                                       y.data(), ws.data(), m.parallel);
    if (error) check.fail(describe_isa(m) + " " + what + ": unexpected error: " + error);
    if (!ws.canary_intact()) check.fail(describe_isa(m) + " " + what + ": wrote past its workspace");
    compare_exact(check, m, what, y, want, c.d);
  }
}

// routed_experts_float against the double reference: every output within 1e-4 of its token's largest output. The
// kernels sum in float32, in their own order: a short dot product that cancels (d=33, I=1) was 1.5e-5 off; an
// indexing mistake is off by the output's whole size.
constexpr double kFloatTolerance = 1e-4;
void check_routed_float(Rng& rng, const std::vector<Mode>& modes, Checker& check, double& worst) {
  const RoutedCase c = random_routed(rng);
  std::vector<float> weights[3];
  const int64_t shapes[3][2] = {{c.inter, c.d}, {c.inter, c.d}, {c.d, c.inter}};
  for (int i = 0; i < 3; ++i) {
    weights[i].resize(c.experts * shapes[i][0] * shapes[i][1]);
    for (float& v : weights[i]) v = rng.uniform(-0.1f, 0.1f);
  }
  const RoutedFloatExperts w{{weights[0].data(), c.experts, c.inter, c.d},
                             {weights[1].data(), c.experts, c.inter, c.d},
                             {weights[2].data(), c.experts, c.d, c.inter}};
  const std::vector<double> want = ref_routed_float(c.x.data(), c.n, c.top_p.data(), c.top_i.data(), c.top_k, w);
  const std::string what = "routed_experts_float " + c.what;
  for (const Mode& m : modes) {
    Workspace ws(routed_experts_float_workspace(c.n, c.top_k, w));
    std::vector<float> y(c.n * c.d, NAN);
    const char* error = routed_experts_float(m.isa, c.x.data(), c.n, c.top_p.data(), c.top_i.data(), c.top_k, w,
                                             y.data(), ws.data(), m.parallel);
    if (error) check.fail(describe_isa(m) + " " + what + ": unexpected error: " + error);
    if (!ws.canary_intact()) check.fail(describe_isa(m) + " " + what + ": wrote past its workspace");
    for (int64_t t = 0; t < c.n && !check.failed(); ++t) {
      double norm = 1e-30;
      for (int64_t r = 0; r < c.d; ++r) norm = std::max(norm, std::fabs(want[t * c.d + r]));
      for (int64_t r = 0; r < c.d; ++r) {
        const double err = std::fabs(y[t * c.d + r] - want[t * c.d + r]) / norm;
        worst = std::max(worst, err);
        if (!(err <= kFloatTolerance)) {
          char buf[200];
          std::snprintf(buf, sizeof buf, ": token %lld output %lld is %.9g, the reference %.9g (%.2g relative)",
                        static_cast<long long>(t), static_cast<long long>(r), y[t * c.d + r], want[t * c.d + r],
                        err);
          check.fail(describe_isa(m) + " " + what + buf);
          break;
        }
      }
    }
  }
}

// An id outside [0, E) returns a message before any work: y keeps its contents.
void check_bad_ids(Rng& rng, const std::vector<Mode>& modes, Checker& check) {
  RoutedCase c = random_routed(rng);
  const RoutedFloatExperts fw{{nullptr, c.experts, c.inter, c.d}, {nullptr, c.experts, c.inter, c.d},
                              {nullptr, c.experts, c.d, c.inter}};
  for (int64_t bad : {int64_t{-1}, c.experts}) {
    c.top_i[rng.below(c.n * c.top_k)] = bad;
    for (const Mode& m : modes) {
      Workspace ws(std::max(routed_experts_workspace(c.n, c.top_k, c.w),
                            routed_experts_float_workspace(c.n, c.top_k, fw)));
      std::vector<float> y(c.n * c.d, 7.0f);
      const char* e1 = routed_experts(m.isa, c.x.data(), c.n, c.top_p.data(), c.top_i.data(), c.top_k, c.w,
                                      y.data(), ws.data(), m.parallel);
      const char* e2 = routed_experts_float(m.isa, c.x.data(), c.n, c.top_p.data(), c.top_i.data(), c.top_k, fw,
                                            y.data(), ws.data(), m.parallel);
      const bool untouched = std::all_of(y.begin(), y.end(), [](float v) { return v == 7.0f; });
      if (!e1 || !e2 || !untouched) {
        check.fail(describe_isa(m) + " expert id " + std::to_string(bad) + " of E=" + std::to_string(c.experts) +
                   " was not rejected before any work");
      }
    }
  }
}

// ---- the weight-only quantized linear

// A quantized matrix in the storage of mote_ternary.h, with its integers kept for the reference.
struct QuantCase {
  int64_t rows, k, group;
  int bits;
  std::vector<int> q;          // [rows, K]
  std::vector<uint8_t> data;   // packed
  std::vector<float> scale, bias;
  QuantizedMatrix w() const { return QuantizedMatrix{data.data(), scale.data(), rows, k, group, bits}; }
};

// Random integers over the whole range (the extremes -8/7 and -128/127 included), about one row in eight all zero
// (such a row must give exactly its bias), scales of either sign.
QuantCase random_quantized(Rng& rng, int64_t rows, int64_t k, int64_t group, int bits) {
  QuantCase c{rows, k, group, bits, {}, {}, {}, {}};
  const int lo = bits == 4 ? -8 : -128, levels = bits == 4 ? 16 : 256;
  c.q.resize(rows * k);
  for (int64_t r = 0; r < rows; ++r) {
    const bool zero_row = rng.below(8) == 0;
    for (int64_t i = 0; i < k; ++i) c.q[r * k + i] = zero_row ? 0 : lo + static_cast<int>(rng.below(levels));
  }
  if (bits == 8) {
    for (int v : c.q) c.data.push_back(static_cast<uint8_t>(static_cast<int8_t>(v)));
  } else {  // spans of 32: byte i holds value i (low nibble) and value 16 + i (high nibble), each + 8
    c.data.assign(rows * k / 2, 0);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t i = 0; i < k; ++i) {
        const int64_t span = i / 32, j = i % 32;
        const auto nibble = static_cast<uint8_t>(c.q[r * k + i] + 8);
        c.data[r * k / 2 + span * 16 + j % 16] |= static_cast<uint8_t>(j < 16 ? nibble : nibble << 4);
      }
    }
  }
  c.scale.resize(rows * (k / group));
  for (float& v : c.scale) v = rng.uniform(0.001f, 0.05f) * (rng.below(8) == 0 ? -1.0f : 1.0f);
  c.bias.resize(rows);
  for (float& v : c.bias) v = rng.uniform(-1.0f, 1.0f);
  return c;
}

// The spec's y in double (W[r, k] = (float)q * scale rounded to float as the spec says, then the products, exact in
// double, summed in double) and, per output, the scale of its rounding: |bias| + sum_k |x * W|.
void ref_quantized(const QuantCase& c, const float* x, int64_t n, bool bias, std::vector<double>& y,
                   std::vector<double>& magnitude) {
  y.assign(n * c.rows, 0.0);
  magnitude.assign(n * c.rows, 0.0);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t r = 0; r < c.rows; ++r) {
      double sum = bias ? c.bias[r] : 0.0, mag = bias ? std::fabs(c.bias[r]) : 0.0;
      for (int64_t i = 0; i < c.k; ++i) {
        const float w = static_cast<float>(c.q[r * c.k + i]) * c.scale[r * (c.k / c.group) + i / c.group];
        sum += static_cast<double>(w) * x[t * c.k + i];
        mag += std::fabs(static_cast<double>(w) * x[t * c.k + i]);
      }
      y[t * c.rows + r] = sum;
      magnitude[t * c.rows + r] = mag;
    }
  }
}

// quantized_linear against the double reference: every output within kQuantTolerance of its own |bias| + sum |x W|
// (a row of zeros must give its bias exactly). fp32 sums of K products in the kernels' orders came within 2.4e-7 of
// that sum (K up to 2048); a wrong nibble, group or scale is off by a whole term of it, ~1/K at K = 2048 (5e-4).
constexpr double kQuantTolerance = 2e-6;

// The shapes the brief names: K of one span up to several prefill tiles (256 inputs) with a partial last one (896),
// groups of 32, 64, 128 and K; int8 also groups that are no multiple of a vector. Tokens: decode (1), a
// partial token tile (3), 12 (int8: the most the direct path takes; int4: the tiled path), the tiled path with
// uneven token tiles (17) and more tokens than one of its chunks (40).
struct QuantShape {
  int bits;
  int64_t k, group;
};
std::vector<QuantShape> quant_shapes() {
  std::vector<QuantShape> shapes;
  for (int bits : {4, 8}) {
    for (int64_t k : {32, 96, 896, 2048}) {
      for (int64_t group : {int64_t{32}, int64_t{64}, int64_t{128}, k}) {
        if (k % group != 0) continue;
        bool seen = false;
        for (const QuantShape& s : shapes) seen = seen || (s.bits == bits && s.k == k && s.group == group);
        if (!seen) shapes.push_back({bits, k, group});
      }
    }
  }
  for (const QuantShape& s : std::vector<QuantShape>{{8, 100, 100}, {8, 100, 20}, {8, 1000, 5}, {8, 37, 37}}) {
    shapes.push_back(s);
  }
  return shapes;
}

void check_quantized(Rng& rng, const std::vector<Mode>& modes, const QuantShape& shape, int64_t rows, int64_t n,
                     bool with_bias, Checker& check, double& worst) {
  const QuantCase c = random_quantized(rng, rows, shape.k, shape.group, shape.bits);
  const std::vector<float> x = random_tokens(rng, n, shape.k);
  std::vector<double> want, magnitude;
  ref_quantized(c, x.data(), n, with_bias, want, magnitude);
  const std::string what = "quantized_linear int" + std::to_string(shape.bits) + " [" + std::to_string(rows) + " x " +
                           std::to_string(shape.k) + "] group " + std::to_string(shape.group) +
                           " n=" + std::to_string(n) + (with_bias ? " bias" : "");
  const QuantizedMatrix w = c.w();
  for (const Mode& m : modes) {
    Workspace ws(quantized_linear_workspace(n, w));
    std::vector<float> y(n * rows, NAN);
    const char* error = quantized_linear(m.isa, x.data(), n, w, with_bias ? c.bias.data() : nullptr, y.data(),
                                         ws.data(), m.parallel);
    if (error) check.fail(describe_isa(m) + " " + what + ": unexpected error: " + error);
    if (!ws.canary_intact()) check.fail(describe_isa(m) + " " + what + ": wrote past its workspace");
    for (int64_t i = 0; i < n * rows && !check.failed(); ++i) {
      const double diff = std::fabs(y[i] - want[i]);
      const double err = magnitude[i] > 0.0 ? diff / magnitude[i] : (diff == 0.0 ? 0.0 : INFINITY);
      worst = std::max(worst, err);
      if (!(err <= kQuantTolerance)) {
        char buf[200];
        std::snprintf(buf, sizeof buf, ": token %lld output %lld is %.9g, the reference %.9g (%.2g of |x||W|)",
                      static_cast<long long>(i / rows), static_cast<long long>(i % rows), y[i], want[i], err);
        check.fail(describe_isa(m) + " " + what + buf);
      }
    }
  }
}

// Matrices outside the storage's rules return a message before any work: y keeps its contents.
void check_bad_quantized(const std::vector<Mode>& modes, Checker& check) {
  const std::vector<uint8_t> data(4096, 0x88);
  const std::vector<float> scale(4096, 1.0f), x(4 * 128, 1.0f);
  struct Bad {
    int64_t k, group;
    int bits;
  };
  const Bad bad[] = {{64, 32, 5}, {64, 32, 2}, {48, 48, 4}, {64, 16, 4}, {100, 30, 8}, {64, 0, 8}, {0, 32, 4},
                     {64, 128, 8}};
  for (const Bad& b : bad) {
    const QuantizedMatrix w{data.data(), scale.data(), 3, b.k, b.group, b.bits};
    for (const Mode& m : modes) {
      for (int64_t n : {int64_t{1}, 4 * 128 / std::max<int64_t>(b.k, 1)}) {
        std::vector<float> y(n * 3, 7.0f);
        const char* error = quantized_linear(m.isa, x.data(), n, w, nullptr, y.data(), nullptr, m.parallel);
        if (!error || !std::all_of(y.begin(), y.end(), [](float v) { return v == 7.0f; })) {
          check.fail(describe_isa(m) + " quantized_linear with bits " + std::to_string(b.bits) + ", K " +
                     std::to_string(b.k) + ", group " + std::to_string(b.group) + " was not rejected");
        }
      }
    }
  }
}

// Every shape x {1, 3, 12, 17, 40 (K <= 96)} tokens x {no bias, bias}, 37 rows (partial row tiles, panels and work
// items; 1 row at n=3 with bias); returns the count.
int check_quantized_all(Rng& rng, const std::vector<Mode>& modes, Checker& check, double& worst) {
  int cases = 0;
  for (const QuantShape& shape : quant_shapes()) {
    for (int64_t n : {1, 3, 12, 17, 40}) {
      if (n == 40 && shape.k > 96) continue;  // keep the naive reference quick under qemu
      for (bool with_bias : {false, true}) {
        if (check.failed()) return cases;
        check_quantized(rng, modes, shape, n == 3 && with_bias ? 1 : 37, n, with_bias, check, worst);
        ++cases;
      }
    }
  }
  check_bad_quantized(modes, check);
  return cases;
}

int run_check() {
  const auto start = std::chrono::steady_clock::now();
  ThreadPool pool(3);  // more threads than this machine's cores: chunks really interleave
  Checker check;
  for (Isa isa : supported_isas()) {
    const std::vector<Mode> modes{{isa, "serial", serial()}, {isa, "3 threads", pool.parallel_for()}};
    Rng rng(20240611);  // the same cases for every instruction set
    const int kLinear = 300, kRouted = 150, kFloat = 40;
    double worst_float = 0.0;
    for (int i = 0; i < kLinear && !check.failed(); ++i) check_linear(rng, modes, check);
    for (int i = 0; i < kRouted && !check.failed(); ++i) check_routed(rng, modes, check);
    for (int i = 0; i < kFloat && !check.failed(); ++i) check_routed_float(rng, modes, check, worst_float);
    if (!check.failed()) check_bad_ids(rng, modes, check);
    double worst_quant = 0.0;
    const int quant = check.failed() ? 0 : check_quantized_all(rng, modes, check, worst_quant);
    if (check.failed()) break;
    std::printf("%s: %d cases bit-exact (%d ternary_linear, %d routed_experts; serial and 3 threads), "
                "%d routed_experts_float within %.0e (worst %.1e), out-of-range ids rejected; "
                "%d quantized_linear within %.0e of |x||W| (worst %.1e), invalid matrices rejected\n",
                isa_name(isa), kLinear + kRouted, kLinear, kRouted, kFloat, kFloatTolerance, worst_float, quant,
                kQuantTolerance, worst_quant);
  }
  if (check.failed()) {
    std::printf("FAILED: %s\n", check.failure().c_str());
    return 1;
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("detected: %s; %.1f s\nselftest passed\n", isa_name(detect_isa()), seconds);
  return 0;
}

// ---- the benchmark

double now_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Median time of fn(i) over calls i = 0, 1, ... after a warm-up: at least 5 calls, at most `max_calls`, and no more
// than about `budget_ms` in all.
template <class Fn>
double median_ms(Fn fn, int max_calls = 2000, double budget_ms = 250.0) {
  fn(0);
  std::vector<double> times;
  const double start = now_ms();
  for (int i = 1; i <= max_calls && (times.size() < 5 || now_ms() - start < budget_ms); ++i) {
    const double t0 = now_ms();
    fn(i);
    times.push_back(now_ms() - t0);
  }
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return times[times.size() / 2];
}

void fill_bytes(Rng& rng, std::vector<uint8_t>& v) {
  for (uint8_t& b : v) b = static_cast<uint8_t>(0x55 + 0x40 * rng.below(3));  // valid codes, any mix will do
}

struct BenchModel {
  int64_t d, inter, experts;
  std::vector<uint8_t> codes[3];
  std::vector<float> scales[3], weights[3];
  RoutedExperts w;
  RoutedFloatExperts fw;
};

BenchModel bench_model(Rng& rng, int64_t d, int64_t inter, int64_t experts) {
  BenchModel m{d, inter, experts, {}, {}, {}, {}, {}};
  const int64_t rows[3] = {inter, inter, d}, ks[3] = {d, d, inter};
  for (int i = 0; i < 3; ++i) {
    m.codes[i].resize(experts * rows[i] * row_bytes(ks[i]));
    fill_bytes(rng, m.codes[i]);
    m.scales[i].assign(experts * rows[i], 0.05f);
    m.weights[i].resize(experts * rows[i] * ks[i]);
    for (float& v : m.weights[i]) v = rng.uniform(-0.05f, 0.05f);
  }
  TernaryExperts t[3];
  FloatExperts f[3];
  for (int i = 0; i < 3; ++i) {
    t[i] = {m.codes[i].data(), m.scales[i].data(), experts, rows[i], ks[i], true};
    f[i] = {m.weights[i].data(), experts, rows[i], ks[i]};
  }
  m.w = {t[0], t[1], t[2]};
  m.fw = {f[0], f[1], f[2]};
  return m;
}

// Routing for `calls` calls of n tokens each: random experts, weight 1.
struct BenchRouting {
  std::vector<int64_t> top_i;
  std::vector<float> top_p;
};

BenchRouting bench_routing(Rng& rng, int64_t calls, int64_t n, int64_t experts) {
  BenchRouting r;
  random_routing(rng, calls * n, 1, experts, r.top_i, r.top_p);
  std::fill(r.top_p.begin(), r.top_p.end(), 1.0f);
  return r;
}

std::string json_times(const double (&ms)[2]) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "{\"n1\": %.4f, \"n64\": %.4f}", ms[0], ms[1]);
  return buf;
}

// Median times (ms) of one instruction set's kernels on `parallel`: the routed experts of m (E=4, top-1) and one
// ternary linear, expert 0's gate [I x d].
std::string bench_isa(Isa isa, const BenchModel& m, const ParallelFor& parallel) {
  Rng rng(7);
  constexpr int64_t kCalls = 4096;
  double linear[2], routed[2], routed_float[2];
  const int64_t ns[2] = {1, 64};
  for (int i = 0; i < 2; ++i) {
    const int64_t n = ns[i];
    const std::vector<float> x = random_tokens(rng, n, m.d);
    const BenchRouting route = bench_routing(rng, kCalls, n, m.experts);
    std::vector<float> y(n * std::max(m.inter, m.d));
    const TernaryMatrix gate0 = m.w.gate.expert(0);
    Workspace ws(std::max({ternary_linear_workspace(n, gate0), routed_experts_workspace(n, 1, m.w),
                           routed_experts_float_workspace(n, 1, m.fw)}));
    linear[i] = median_ms([&](int) { ternary_linear(isa, x.data(), n, gate0, y.data(), ws.data(), parallel); });
    routed[i] = median_ms([&](int c) {
      const int64_t* top_i = route.top_i.data() + (c % kCalls) * n;
      routed_experts(isa, x.data(), n, route.top_p.data(), top_i, 1, m.w, y.data(), ws.data(), parallel);
    });
    routed_float[i] = median_ms([&](int c) {
      const int64_t* top_i = route.top_i.data() + (c % kCalls) * n;
      routed_experts_float(isa, x.data(), n, route.top_p.data(), top_i, 1, m.fw, y.data(), ws.data(), parallel);
    });
  }
  return std::string("{\"ternary_linear_ms\": ") + json_times(linear) +
         ", \"routed_experts_ms\": " + json_times(routed) + ", \"routed_experts_float_ms\": " +
         json_times(routed_float) + "}";
}

// Read bandwidth with the threads of `parallel` (one slice each): the sum of a `bytes` float buffer, in GB/s (best
// of three passes). It prefetches 4 KiB ahead as the kernels do, which on this Xeon reads ~20% faster than the
// hardware prefetcher alone.
double read_bandwidth_gbps(const ParallelFor& parallel, int slices, size_t bytes) {
  const size_t count = bytes / sizeof(float) / (16 * slices) * (16 * slices);
  std::vector<float> buf(count);
  std::memset(buf.data(), 0x3C, count * sizeof(float));  // touch every page: untouched ones all map one zero page
  typedef float v4 __attribute__((vector_size(16)));
  double best = 1e30;
  std::vector<float> sinks(slices);
  for (int pass = 0; pass < 3; ++pass) {
    const double t0 = now_ms();
    parallel(slices, 1, [&](int64_t first, int64_t last) {
      for (int64_t slice = first; slice < last; ++slice) {
        const size_t begin = count / slices * slice, end = begin + count / slices;
        v4 acc[4] = {};
        for (size_t i = begin; i < end; i += 16) {
          __builtin_prefetch(&buf[std::min(i + 1024, count - 1)]);
          for (int j = 0; j < 4; ++j) {
            v4 v;
            std::memcpy(&v, &buf[i + 4 * j], sizeof v);
            acc[j] += v;
          }
        }
        const v4 s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        sinks[slice] += s[0] + s[1] + s[2] + s[3];
      }
    });
    best = std::min(best, now_ms() - t0);
  }
  if (std::accumulate(sinks.begin(), sinks.end(), 0.0f) == 42.0f) std::printf(" ");  // keep the sums alive
  return count * sizeof(float) / (best * 1e6);
}

// Experts whose codes total more than 1 GiB (12 MiB each at d=2048, I=8192, E=108): cycling through them, every call
// streams its expert from DRAM. Filled with memset patterns (valid codes; the kernels' speed does not depend on the
// values). --quick: a few small experts (numbers meaningless).
struct DramModel {
  int64_t dim, inter, experts;
  std::vector<uint8_t> gate, up, down;
  std::vector<float> scales;  // per row, shared by the three (only their size and traffic matter here)
  RoutedExperts w;

  DramModel(int64_t d, int64_t i, int64_t e)
      : dim(d), inter(i), experts(e),
        gate(e * i * row_bytes(d), 0x96),
        up(e * i * row_bytes(d), 0x69),
        down(e * d * row_bytes(i), 0x5A),
        scales(e * i, 0.05f),
        w{{gate.data(), scales.data(), e, i, d, true},
          {up.data(), scales.data(), e, i, d, true},
          {down.data(), scales.data(), e, d, i, true}} {}

  // What one top-1 call reads: the chosen expert's codes and scales.
  double bytes_per_call() const {
    return static_cast<double>(2 * inter * row_bytes(dim) + dim * row_bytes(inter)) +
           static_cast<double>((2 * inter + dim) * sizeof(float));
  }
};

// Median ms of routed_experts at n=1 on the DRAM-resident experts, cycling through them.
double bench_dram(Isa isa, const DramModel& m, const ParallelFor& parallel) {
  Rng rng(11);
  const std::vector<float> x = random_tokens(rng, 1, m.dim);
  std::vector<float> y(m.dim);
  Workspace ws(routed_experts_workspace(1, 1, m.w));
  const float p = 1.0f;
  return median_ms(
      [&](int c) {
        const int64_t e = c % m.experts;
        routed_experts(isa, x.data(), 1, &p, &e, 1, m.w, y.data(), ws.data(), parallel);
      },
      400, 1500.0);
}

// The DRAM run of one instruction set against the time its bytes take at `gbps`.
std::string json_dram(const DramModel& m, double ms, double gbps) {
  const double bytes = m.bytes_per_call();
  char buf[320];
  std::snprintf(buf, sizeof buf,
                "{\"shape\": \"d=%lld I=%lld E=%lld top-1 n=1, per-row scales\", \"bytes_per_call\": %.0f, "
                "\"ms_per_call\": %.4f, \"achieved_gbps\": %.2f, \"time_over_bound\": %.3f}",
                static_cast<long long>(m.dim), static_cast<long long>(m.inter),
                static_cast<long long>(m.experts), bytes, ms, bytes / (ms * 1e6),
                ms / (bytes / (gbps * 1e6)));
  return buf;
}

int run_bench(int threads, const std::string& only, bool quick) {
  ThreadPool pool(threads);
  const ParallelFor parallel = threads > 1 ? pool.parallel_for() : serial();
  std::vector<Isa> isas;
  for (Isa isa : supported_isas()) {
    if (only.empty() || only == isa_name(isa)) isas.push_back(isa);
  }
  if (isas.empty()) {
    std::fprintf(stderr, "no supported instruction set named %s\n", only.c_str());
    return 1;
  }
  Rng rng(3);
  const int64_t d = quick ? 128 : 1024, inter = quick ? 256 : 1536;
  std::string out = "{\"threads\": " + std::to_string(threads) + ", \"detected\": \"" + isa_name(detect_isa()) +
                    "\", \"shape\": \"d=" + std::to_string(d) + " I=" + std::to_string(inter) +
                    " E=4 top-1, random routing\", \"linear_shape\": \"" + std::to_string(inter) + "x" +
                    std::to_string(d) + "\", \"isa\": {";
  {
    const BenchModel m = bench_model(rng, d, inter, 4);
    for (size_t i = 0; i < isas.size(); ++i) {
      out += std::string(i ? ", " : "") + "\"" + isa_name(isas[i]) + "\": " + bench_isa(isas[i], m, parallel);
    }
  }
  // A shared machine's bandwidth drifts: it is measured before and after the DRAM runs, and the better of the two
  // is the bound (so that time_over_bound errs high, not low).
  const size_t bandwidth_bytes = quick ? size_t{16} << 20 : size_t{1} << 30;
  const double before = read_bandwidth_gbps(parallel, threads, bandwidth_bytes);
  std::vector<double> dram_ms;
  const DramModel dram = quick ? DramModel(256, 512, 4) : DramModel(2048, 8192, 108);
  for (Isa isa : isas) dram_ms.push_back(bench_dram(isa, dram, parallel));
  const double gbps = std::max(before, read_bandwidth_gbps(parallel, threads, bandwidth_bytes));
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f", gbps);
  out += std::string("}, \"read_bandwidth_gbps\": ") + buf + ", \"dram_bound\": {";
  for (size_t i = 0; i < isas.size(); ++i) {
    out += std::string(i ? ", " : "") + "\"" + isa_name(isas[i]) + "\": " + json_dram(dram, dram_ms[i], gbps);
  }
  std::printf("%s}}\n", out.c_str());
  return 0;
}

// ---- the weight-only quantized linear's benchmark (--bench-quantized)

// The [rows, K] of the product's quantized linears: attention / shared expert projections and Qwen2's lm_head.
const int64_t kQuantBenchShapes[][2] = {{4096, 1024}, {1024, 4096}, {11008, 2048}, {2048, 11008}, {151936, 896}};

// One weight format of one shape, as a pool of copies of at least `pool_bytes` in all: cycling through them, each
// call streams its weights from DRAM (a decode step reads every weight of the model once, and this Xeon's L3 is 480
// MiB). Random contents (the kernels' speed does not depend on the values), one copy generated and the rest copied.
struct QuantBenchPool {
  int bits;  // 4, 8 or 32 (fp32)
  int64_t rows, k, group, copies;
  std::vector<uint8_t> data;  // int4 / int8 values, per copy rows * row_bytes
  std::vector<float> scale;   // per copy rows * K / group
  std::vector<float> weight;  // fp32, per copy rows * K

  QuantBenchPool(Rng& rng, int bits_, int64_t rows_, int64_t k_, size_t pool_bytes)
      : bits(bits_), rows(rows_), k(k_), group(bits_ == 4 ? 32 : k_), copies(1) {
    copies = std::max<int64_t>(1, static_cast<int64_t>((pool_bytes + bytes() - 1) / bytes()));
    if (bits == 32) {
      weight.resize(copies * rows * k);
      for (int64_t i = 0; i < rows * k; ++i) weight[i] = rng.uniform(-0.05f, 0.05f);
      for (int64_t c = 1; c < copies; ++c) std::copy_n(weight.begin(), rows * k, weight.begin() + c * rows * k);
      return;
    }
    const int64_t n_data = rows * k * bits / 8, n_scale = rows * (k / group);
    data.resize(copies * n_data);
    scale.resize(copies * n_scale);
    for (int64_t i = 0; i < n_data; ++i) data[i] = static_cast<uint8_t>(rng.next());
    for (int64_t i = 0; i < n_scale; ++i) scale[i] = rng.uniform(0.001f, 0.05f);
    for (int64_t c = 1; c < copies; ++c) {
      std::copy_n(data.begin(), n_data, data.begin() + c * n_data);
      std::copy_n(scale.begin(), n_scale, scale.begin() + c * n_scale);
    }
  }

  // What one call reads: the weights (values and scales) of one copy.
  size_t bytes() const {
    if (bits == 32) return static_cast<size_t>(rows * k) * sizeof(float);
    return static_cast<size_t>(rows * k * bits / 8) + static_cast<size_t>(rows * (k / group)) * sizeof(float);
  }
  QuantizedMatrix matrix(int64_t c) const {
    const int64_t n_data = rows * k * bits / 8, n_scale = rows * (k / group);
    return QuantizedMatrix{data.data() + c * n_data, scale.data() + c * n_scale, rows, k, group, bits};
  }
  const char* name() const { return bits == 4 ? "int4" : bits == 8 ? "int8" : "fp32"; }
};

// Median ms of one call of y[n, rows] = x[n, K] W^T with `pool`'s format, cycling through its copies.
double bench_quantized_call(Isa isa, const QuantBenchPool& pool, int64_t n, const ParallelFor& parallel) {
  Rng rng(5);
  const std::vector<float> x = random_tokens(rng, n, pool.k);
  std::vector<float> y(n * pool.rows);
  Workspace ws(pool.bits == 32 ? 0 : quantized_linear_workspace(n, pool.matrix(0)));
  const double budget = n == 1 ? 400.0 : 1500.0;
  return median_ms(
      [&](int c) {
        const int64_t copy = c % pool.copies;
        if (pool.bits == 32) {
          float_linear(isa, x.data(), n, pool.weight.data() + copy * pool.rows * pool.k, pool.rows, pool.k,
                       y.data(), parallel);
        } else {
          quantized_linear(isa, x.data(), n, pool.matrix(copy), nullptr, y.data(), ws.data(), parallel);
        }
      },
      400, budget);
}

// For each shape, format (int4 in groups of 32 and int8 per output channel, the defaults of --quantize, and fp32)
// and n: the median ms per call and the weight bytes it read per second (GB/s). Prints one JSON object.
int run_bench_quantized(int threads, const std::string& only, bool quick) {
  ThreadPool pool(threads);
  const ParallelFor parallel = threads > 1 ? pool.parallel_for() : serial();
  Isa isa = detect_isa();
  for (Isa i : supported_isas()) {
    if (only == isa_name(i)) isa = i;
  }
  if (!only.empty() && only != isa_name(isa)) {
    std::fprintf(stderr, "no supported instruction set named %s\n", only.c_str());
    return 1;
  }
  const size_t pool_bytes = quick ? size_t{8} << 20 : size_t{1} << 30;
  const int64_t ns[] = {1, 16, 64};  // decode, and the prefill path at both ends of its range
  Rng rng(13);
  std::string out = "{\"threads\": " + std::to_string(threads) + ", \"isa\": \"" + isa_name(isa) +
                    "\", \"shapes\": {";
  bool first_shape = true;
  for (const auto& shape : kQuantBenchShapes) {
    const int64_t rows = quick ? shape[0] / 16 : shape[0], k = quick ? std::max<int64_t>(64, shape[1] / 16) : shape[1];
    out += std::string(first_shape ? "" : ", ") + "\"" + std::to_string(rows) + "x" + std::to_string(k) + "\": {";
    first_shape = false;
    bool first_format = true;
    for (int bits : {4, 8, 32}) {
      const QuantBenchPool p(rng, bits, rows, k, pool_bytes);
      out += std::string(first_format ? "" : ", ") + "\"" + p.name() + "\": {";
      first_format = false;
      for (size_t i = 0; i < sizeof(ns) / sizeof(ns[0]); ++i) {
        const double ms = bench_quantized_call(isa, p, ns[i], parallel);
        char buf[96];
        std::snprintf(buf, sizeof buf, "%s\"n%lld\": {\"ms\": %.4f, \"gbps\": %.2f}", i ? ", " : "",
                      static_cast<long long>(ns[i]), ms, static_cast<double>(p.bytes()) / (ms * 1e6));
        out += buf;
      }
      out += "}";
      std::fflush(stdout);
    }
    out += "}";
  }
  const double gbps = read_bandwidth_gbps(parallel, threads, quick ? size_t{16} << 20 : size_t{1} << 30);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f", gbps);
  std::printf("%s}, \"read_bandwidth_gbps\": %s}\n", out.c_str(), buf);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  bool bench = false, bench_quantized = false, quick = false;
  int threads = 1;
  std::string only;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--bench") {
      bench = true;
    } else if (arg == "--bench-quantized") {
      bench_quantized = true;
    } else if (arg == "--quick") {
      quick = true;
    } else if (arg == "--threads" && i + 1 < argc) {
      threads = std::max(1, std::atoi(argv[++i]));
    } else if (arg == "--isa" && i + 1 < argc) {
      only = argv[++i];
    } else {
      std::fprintf(stderr, "usage: %s [--bench | --bench-quantized [--threads N] [--isa NAME] [--quick]]\n",
                   argv[0]);
      return 2;
    }
  }
  if (bench_quantized) return run_bench_quantized(threads, only, quick);
  return bench ? run_bench(threads, only, quick) : run_check();
}
