// The ExecuTorch bindings of the ternary kernels: `mote::*.out` kernels registered in ExecuTorch's operator registry
// when this library is loaded (a static initialiser per kernel), for `.pte` files that keep the `mote::` ops.
//
//   mote::routed_experts.out(x [N, d], top_p [N, k], top_i [N, k] int64, gate_packed u8 [E, I, ceil(d/4)],
//                            gate_scale [E, 1|I], up_packed, up_scale, down_packed u8 [E, d, ceil(I/4)],
//                            down_scale [E, 1|d], *, out [N, d])
//   mote::ternary_linear.out(x [..., K], packed u8 [rows, ceil(K/4)], scale [1|rows], in_features, *, out [..., rows])
//   mote::packed_quantized_linear.out(x [..., K], packed (bits 4: u8 [rows, K/2]; bits 8: i8 [rows, K]),
//                                     scale [rows, K/group], bias [rows]?, bits, group, *, out [..., rows])
//   mote_bench::routed_experts_float.out(x, top_p, top_i, gate_w [E, I, d], up_w [E, I, d], down_w [E, d, I], *, out)
//
// The schemas are the ones targets/executorch/ops.py registers with torch; their meaning is export/semantics.py,
// restated in mote_ternary.h. Work is split over ExecuTorch's threadpool; scratch comes from the method's temp
// allocator when the runtime gives one, otherwise from a per-thread buffer that grows to the largest call once.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/core/exec_aten/util/tensor_util.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#include <atomic>
#include <cstdlib>
#include <optional>
#include <cstring>
#include <string>
#include <vector>

#include "mote_ternary.h"

namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::Error;
using executorch::runtime::KernelRuntimeContext;

constexpr mote::Isa kAllIsas[] = {mote::Isa::kScalar, mote::Isa::kAvx2, mote::Isa::kAvx512Vnni, mote::Isa::kNeon,
                                   mote::Isa::kNeonDot};

// `name` as an instruction set this CPU runs, or nullptr.
const mote::Isa* supported_isa(const char* name) {
  for (const mote::Isa& isa : kAllIsas) {
    if (name != nullptr && std::strcmp(name, mote::isa_name(isa)) == 0 && mote::isa_supported(isa)) {
      return &isa;
    }
  }
  return nullptr;
}

// The instruction set the kernels use: the best this CPU runs, or MOTE_KERNELS_ISA when this CPU runs that one
// (tests and the benchmark compare the paths inside ExecuTorch; mote_kernels_use_isa changes it).
std::atomic<mote::Isa>& chosen() {
  static std::atomic<mote::Isa> isa{[] {
    const mote::Isa* wanted = supported_isa(std::getenv("MOTE_KERNELS_ISA"));
    return wanted != nullptr ? *wanted : mote::detect_isa();
  }()};
  return isa;
}

mote::Isa chosen_isa() { return chosen().load(std::memory_order_relaxed); }

void threadpool_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  executorch::extension::parallel_for(0, n, grain, [&fn](int64_t begin, int64_t end) { fn(begin, end); });
}

const mote::ParallelFor& threadpool() {
  static const mote::ParallelFor parallel = threadpool_for;
  return parallel;
}

// `bytes` of 64-byte aligned scratch for one kernel call.
void* scratch(KernelRuntimeContext& ctx, size_t bytes) {
  if (bytes == 0) {
    return nullptr;
  }
  auto temp = ctx.allocate_temp(bytes, 64);
  if (temp.ok()) {
    return temp.get();
  }
  thread_local std::vector<unsigned char> grown;
  if (grown.size() < bytes + 64) {
    grown.resize(bytes + 64);
  }
  auto address = reinterpret_cast<uintptr_t>(grown.data());
  return reinterpret_cast<void*>((address + 63) & ~uintptr_t{63});
}

int64_t rows_of(const Tensor& x) {   // the tokens of x [..., d]
  int64_t n = 1;
  for (ssize_t i = 0; i + 1 < x.dim(); ++i) {
    n *= x.size(i);
  }
  return n;
}

int64_t packed_bytes(int64_t k) { return (k + 3) / 4; }

// The per-tensor [.., 1] or per-row [.., rows] scales of a ternary matrix or a stack of them.
bool valid_scale(const Tensor& scale, int64_t leading, int64_t rows) {
  return scale.scalar_type() == ScalarType::Float && scale.numel() >= 1 &&
         (scale.numel() == leading || scale.numel() == leading * rows);
}

bool valid_experts(const Tensor& packed, const Tensor& scale, int64_t experts, int64_t rows, int64_t k) {
  return packed.scalar_type() == ScalarType::Byte && packed.dim() == 3 && packed.size(0) == experts &&
         packed.size(1) == rows && packed.size(2) == packed_bytes(k) && valid_scale(scale, experts, rows);
}

mote::TernaryExperts experts_of(const Tensor& packed, const Tensor& scale, int64_t k) {
  const int64_t experts = packed.size(0), rows = packed.size(1);
  return {packed.const_data_ptr<uint8_t>(), scale.const_data_ptr<float>(), experts, rows, k,
          scale.numel() == experts * rows && rows != 1};
}

bool valid_routing(const Tensor& x, const Tensor& top_p, const Tensor& top_i, int64_t n) {
  return x.scalar_type() == ScalarType::Float && top_p.scalar_type() == ScalarType::Float &&
         top_i.scalar_type() == ScalarType::Long && top_p.dim() == 2 && top_i.dim() == 2 && top_p.size(0) == n &&
         top_i.size(0) == n && top_p.size(1) == top_i.size(1);
}

// out takes x's shape (dynamic T: the memory plan holds the upper bound).
bool resize_like(Tensor& out, const Tensor& x) {
  return out.scalar_type() == ScalarType::Float &&
         executorch::runtime::resize_tensor(out, x.sizes()) == Error::Ok;
}

Tensor& routed_experts_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& top_p, const Tensor& top_i,
                           const Tensor& gate_packed, const Tensor& gate_scale, const Tensor& up_packed,
                           const Tensor& up_scale, const Tensor& down_packed, const Tensor& down_scale, Tensor& out) {
  const int64_t n = rows_of(x), d = x.size(x.dim() - 1);
  ET_KERNEL_CHECK_MSG(ctx, valid_routing(x, top_p, top_i, n), InvalidArgument, out,
                      "mote::routed_experts: x must be float [N, d], top_p float and top_i int64 [N, k]");
  ET_KERNEL_CHECK_MSG(ctx, gate_packed.dim() == 3, InvalidArgument, out, "mote::routed_experts: gate codes not 3-d");
  const int64_t experts = gate_packed.size(0), width = gate_packed.size(1);
  ET_KERNEL_CHECK_MSG(ctx,
                      valid_experts(gate_packed, gate_scale, experts, width, d) &&
                          valid_experts(up_packed, up_scale, experts, width, d) &&
                          valid_experts(down_packed, down_scale, experts, d, width),
                      InvalidArgument, out, "mote::routed_experts: expert codes or scales do not match x");
  ET_KERNEL_CHECK_MSG(ctx, resize_like(out, x), InvalidArgument, out, "mote::routed_experts: cannot resize out");

  const mote::RoutedExperts weights{experts_of(gate_packed, gate_scale, d), experts_of(up_packed, up_scale, d),
                                    experts_of(down_packed, down_scale, width)};
  const int64_t top_k = top_i.size(1);
  void* workspace = scratch(ctx, mote::routed_experts_workspace(n, top_k, weights));
  const char* error = mote::routed_experts(chosen_isa(), x.const_data_ptr<float>(), n, top_p.const_data_ptr<float>(),
                                           top_i.const_data_ptr<int64_t>(), top_k, weights,
                                           out.mutable_data_ptr<float>(), workspace, threadpool());
  ET_KERNEL_CHECK_MSG(ctx, error == nullptr, InvalidArgument, out, "mote::routed_experts: %s", error);
  return out;
}

// out takes x's shape with the last dim `rows` (x [..., K] -> out [..., rows]).
bool resize_rows(Tensor& out, const Tensor& x, int64_t rows) {
  executorch::aten::SizesType sizes[16];
  if (x.dim() < 1 || x.dim() > 16 || out.scalar_type() != ScalarType::Float) {
    return false;
  }
  for (ssize_t i = 0; i < x.dim(); ++i) {
    sizes[i] = x.size(i);
  }
  sizes[x.dim() - 1] = static_cast<executorch::aten::SizesType>(rows);
  return executorch::runtime::resize_tensor(out, {sizes, size_t(x.dim())}) == Error::Ok;
}

Tensor& ternary_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& packed, const Tensor& scale,
                           int64_t in_features, Tensor& out) {
  const int64_t n = rows_of(x);
  ET_KERNEL_CHECK_MSG(ctx,
                      x.scalar_type() == ScalarType::Float && x.size(x.dim() - 1) == in_features &&
                          packed.scalar_type() == ScalarType::Byte && packed.dim() == 2 &&
                          packed.size(1) == packed_bytes(in_features) && valid_scale(scale, 1, packed.size(0)),
                      InvalidArgument, out, "mote::ternary_linear: x, codes and scale do not match");
  const int64_t rows = packed.size(0);
  ET_KERNEL_CHECK_MSG(ctx, x.dim() <= 16, InvalidArgument, out, "mote::ternary_linear: x has too many dims");
  ET_KERNEL_CHECK_MSG(ctx, resize_rows(out, x, rows), InvalidArgument, out, "mote::ternary_linear: cannot resize out");

  const mote::TernaryMatrix weights{packed.const_data_ptr<uint8_t>(), scale.const_data_ptr<float>(), rows,
                                    in_features, scale.numel() == rows && rows != 1};
  void* workspace = scratch(ctx, mote::ternary_linear_workspace(n, weights));
  mote::ternary_linear(chosen_isa(), x.const_data_ptr<float>(), n, weights, out.mutable_data_ptr<float>(), workspace,
                       threadpool());
  return out;
}

// The weight-only linear's packed values [rows, K/2] (bits 4, uint8) or [rows, K] (bits 8, int8), scales
// [rows, K/group] and bias [rows] for x [..., K]; the bit width and group rules are the kernel's (its message).
bool valid_quantized(const Tensor& x, const Tensor& packed, const Tensor& scale, const std::optional<Tensor>& bias,
                     int64_t bits, int64_t group) {
  if (x.scalar_type() != ScalarType::Float || x.dim() < 1 || packed.dim() != 2 || group <= 0) {
    return false;
  }
  const int64_t k = x.size(x.dim() - 1), rows = packed.size(0);
  const bool packed_ok = bits == 4 ? packed.scalar_type() == ScalarType::Byte && packed.size(1) * 2 == k
                                   : packed.scalar_type() == ScalarType::Char && packed.size(1) == k;
  const bool scale_ok = scale.scalar_type() == ScalarType::Float && scale.dim() == 2 && scale.size(0) == rows &&
                        k % group == 0 && scale.size(1) == k / group;
  const bool bias_ok = !bias.has_value() || (bias->scalar_type() == ScalarType::Float && bias->dim() == 1 &&
                                             bias->size(0) == rows);
  return packed_ok && scale_ok && bias_ok;
}

Tensor& packed_quantized_linear_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& packed,
                                    const Tensor& scale, const std::optional<Tensor>& bias, int64_t bits,
                                    int64_t group, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, bits == 4 || bits == 8, InvalidArgument, out,
                      "mote::packed_quantized_linear: bits must be 4 or 8, not %lld", static_cast<long long>(bits));
  ET_KERNEL_CHECK_MSG(ctx, valid_quantized(x, packed, scale, bias, bits, group), InvalidArgument, out,
                      "mote::packed_quantized_linear: x, packed values, scales and bias do not match "
                      "(int%lld, group %lld)", static_cast<long long>(bits), static_cast<long long>(group));
  const int64_t n = rows_of(x), k = x.size(x.dim() - 1), rows = packed.size(0);
  ET_KERNEL_CHECK_MSG(ctx, resize_rows(out, x, rows), InvalidArgument, out,
                      "mote::packed_quantized_linear: cannot resize out");
  const mote::QuantizedMatrix weights{static_cast<const uint8_t*>(packed.const_data_ptr()),
                                      scale.const_data_ptr<float>(), rows, k, group, static_cast<int>(bits)};
  void* workspace = scratch(ctx, mote::quantized_linear_workspace(n, weights));
  const char* error = mote::quantized_linear(chosen_isa(), x.const_data_ptr<float>(), n, weights,
                                             bias.has_value() ? bias->const_data_ptr<float>() : nullptr,
                                             out.mutable_data_ptr<float>(), workspace, threadpool());
  ET_KERNEL_CHECK_MSG(ctx, error == nullptr, InvalidArgument, out, "mote::packed_quantized_linear: %s", error);
  return out;
}

bool valid_float_experts(const Tensor& w, int64_t experts, int64_t rows, int64_t k) {
  return w.scalar_type() == ScalarType::Float && w.dim() == 3 && w.size(0) == experts && w.size(1) == rows &&
         w.size(2) == k;
}

Tensor& routed_experts_float_out(KernelRuntimeContext& ctx, const Tensor& x, const Tensor& top_p,
                                 const Tensor& top_i, const Tensor& gate_w, const Tensor& up_w, const Tensor& down_w,
                                 Tensor& out) {
  const int64_t n = rows_of(x), d = x.size(x.dim() - 1);
  ET_KERNEL_CHECK_MSG(ctx, valid_routing(x, top_p, top_i, n) && gate_w.dim() == 3, InvalidArgument, out,
                      "mote_bench::routed_experts_float: bad x, routing or weights");
  const int64_t experts = gate_w.size(0), width = gate_w.size(1);
  ET_KERNEL_CHECK_MSG(ctx,
                      valid_float_experts(gate_w, experts, width, d) && valid_float_experts(up_w, experts, width, d) &&
                          valid_float_experts(down_w, experts, d, width) && resize_like(out, x),
                      InvalidArgument, out, "mote_bench::routed_experts_float: weights do not match x");
  const mote::RoutedFloatExperts weights{{gate_w.const_data_ptr<float>(), experts, width, d},
                                         {up_w.const_data_ptr<float>(), experts, width, d},
                                         {down_w.const_data_ptr<float>(), experts, d, width}};
  const int64_t top_k = top_i.size(1);
  void* workspace = scratch(ctx, mote::routed_experts_float_workspace(n, top_k, weights));
  const char* error = mote::routed_experts_float(chosen_isa(), x.const_data_ptr<float>(), n,
                                                 top_p.const_data_ptr<float>(), top_i.const_data_ptr<int64_t>(),
                                                 top_k, weights, out.mutable_data_ptr<float>(), workspace,
                                                 threadpool());
  ET_KERNEL_CHECK_MSG(ctx, error == nullptr, InvalidArgument, out, "mote_bench::routed_experts_float: %s", error);
  return out;
}

}  // namespace

EXECUTORCH_LIBRARY(mote, "routed_experts.out", routed_experts_out);
EXECUTORCH_LIBRARY(mote, "ternary_linear.out", ternary_linear_out);
EXECUTORCH_LIBRARY(mote, "packed_quantized_linear.out", packed_quantized_linear_out);
EXECUTORCH_LIBRARY(mote_bench, "routed_experts_float.out", routed_experts_float_out);

// What a loader checks before it runs a .pte (targets/executorch/kernel_library.py): the version of the ops'
// contract this library implements, and the instruction set its kernels run.
extern "C" int mote_kernels_version() { return mote::kKernelsVersion; }
extern "C" const char* mote_kernels_isa() { return mote::isa_name(chosen_isa()); }

// Run the kernels on instruction set `name` from now on; 0 (and no change) if this CPU does not run it.
extern "C" int mote_kernels_use_isa(const char* name) {
  const mote::Isa* isa = supported_isa(name);
  if (isa != nullptr) {
    chosen().store(*isa, std::memory_order_relaxed);
  }
  return isa != nullptr;
}

// The instruction sets this CPU runs, best last, comma-separated.
extern "C" const char* mote_kernels_supported_isas() {
  static const std::string names = [] {
    std::string joined;
    for (mote::Isa isa : kAllIsas) {
      if (mote::isa_supported(isa)) {
        joined += (joined.empty() ? "" : ",") + std::string(mote::isa_name(isa));
      }
    }
    return joined;
  }();
  return names.c_str();
}
