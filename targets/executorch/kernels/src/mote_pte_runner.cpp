// libmote_pte_runner.so: a C API over ExecuTorch's Module for runners that have no libtorch (the device runner,
// targets/executorch/device_runner.py, drives it with ctypes and numpy on an emulated or real aarch64 device).
// It needs only the executorch wheel's torch-free lib/: the runtime, the optimized/portable and quantized kernels and
// the XNNPACK backend register themselves when loaded; our kernel library must be loaded before a method that calls
// `mote::` ops is (the caller's job: it checks the library's version against the .pte's).
//
// Inputs are the caller's buffers wrapped as ExecuTorch tensors without copy (the .pte's inputs are not memory
// planned, so the method reads them in place); the outputs stay in the handle (in the method's planned memory)
// until the next call on it. Every call returns an error message instead of aborting.
#include <executorch/extension/module/module.h>
#include <executorch/runtime/core/evalue.h>
#include <executorch/runtime/core/portable_type/tensor_impl.h>

#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

// The wheel ships no threadpool.h: the two members used here, as declared by ExecuTorch's threadpool.h (1.5.1).
namespace executorch::extension::threadpool {
class ThreadPool final {
 public:
  size_t get_thread_count() const;
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace {

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::runtime::EValue;
using executorch::runtime::Error;
using executorch::runtime::TensorShapeDynamism;
using executorch::runtime::etensor::TensorImpl;

constexpr int kMaxDims = 8;

// One input tensor: TensorImpl points at these arrays, so they live as long as the handle's last call.
struct Input {
  TensorImpl::SizesType sizes[kMaxDims];
  TensorImpl::DimOrderType dim_order[kMaxDims];
  TensorImpl::StridesType strides[kMaxDims];
  std::unique_ptr<TensorImpl> impl;
};

struct Runner {
  std::string path;
  std::unique_ptr<Module> module;
  std::vector<Input> inputs;
  std::vector<EValue> outputs;
  std::vector<int64_t> scalars;   // scalar outputs (constant methods) as 8 bytes each: int64, double or bool
};

void fail(char* err, size_t len, const char* fmt, ...) {
  if (err == nullptr || len == 0) return;
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(err, len, fmt, args);
  va_end(args);
}

// A new Module over the file (mmap: constants are read from disk as needed, as the host runtime does); loading the
// program now reports a bad file at open rather than at the first call.
std::unique_ptr<Module> load_module(const std::string& path, char* err, size_t len) {
  auto module = std::make_unique<Module>(path, Module::LoadMode::Mmap);
  Error e = module->load();
  if (e != Error::Ok) {
    fail(err, len, "%s: cannot load the ExecuTorch program: %s", path.c_str(), executorch::runtime::to_string(e));
    return nullptr;
  }
  return module;
}

}  // namespace

extern "C" void* mote_pte_open(const char* pte_path, char* err, size_t err_len) {
  auto runner = std::make_unique<Runner>();
  runner->path = pte_path;
  runner->module = load_module(runner->path, err, err_len);
  return runner->module ? runner.release() : nullptr;
}

extern "C" void mote_pte_close(void* h) { delete static_cast<Runner*>(h); }

// An empty KV cache: the decoder's mutable buffers live in its method's planned memory, which a loaded method keeps;
// a new Module starts from zeroed memory (what the host PteRunner gets by loading the Program again). 0 on failure.
extern "C" int mote_pte_reset(void* h, char* err, size_t err_len) {
  auto* r = static_cast<Runner*>(h);
  r->outputs.clear();
  r->module.reset();   // the old methods' memory goes before the new one is claimed
  r->module = load_module(r->path, err, err_len);
  return r->module != nullptr;
}

// Comma-separated method names into `out` (for the caller's checks); the length it needs, or -1.
extern "C" int mote_pte_method_names(void* h, char* out, size_t out_len) {
  auto* r = static_cast<Runner*>(h);
  if (!r->module) return -1;
  auto names = r->module->method_names();
  if (!names.ok()) return -1;
  std::string joined;
  for (const auto& name : *names) joined += (joined.empty() ? "" : ",") + name;
  if (out != nullptr && out_len > 0) std::snprintf(out, out_len, "%s", joined.c_str());
  return static_cast<int>(joined.size() + 1);
}

// Runs `method` on the caller's tensors (contiguous, `dtypes` as ExecuTorch ScalarType codes). 1 on success; 0 with
// a message naming the method and the step that failed (a missing kernel is Error::OperatorMissing at load).
extern "C" int mote_pte_execute(void* h, const char* method, int n_inputs, const int* dtypes, const int* ndims,
                                const int64_t* const* sizes, void* const* data, char* err, size_t err_len) {
  auto* r = static_cast<Runner*>(h);
  r->outputs.clear();
  if (!r->module) {   // a failed reset left no program
    fail(err, err_len, "%s: no program loaded (its reset failed)", r->path.c_str());
    return 0;
  }
  const std::string name = method;
  if (!r->module->is_method_loaded(name)) {
    auto names = r->module->method_names();
    if (names.ok() && names->count(name) == 0) {
      fail(err, err_len, "%s: no method '%s' in the program", r->path.c_str(), method);
      return 0;
    }
    Error e = r->module->load_method(name);
    if (e != Error::Ok) {
      fail(err, err_len, "%s: loading method '%s' failed: %s%s", r->path.c_str(), method,
           executorch::runtime::to_string(e),
           e == Error::OperatorMissing ? " (a kernel library it needs is not loaded)" : "");
      return 0;
    }
  }
  r->inputs = std::vector<Input>(n_inputs);
  std::vector<EValue> values;
  for (int i = 0; i < n_inputs; ++i) {
    Input& in = r->inputs[i];
    if (ndims[i] < 0 || ndims[i] > kMaxDims) {
      fail(err, err_len, "%s: input %d has %d dimensions (at most %d)", method, i, ndims[i], kMaxDims);
      return 0;
    }
    for (int d = ndims[i] - 1, stride = 1; d >= 0; --d) {   // contiguous: the caller passes C-order arrays
      in.sizes[d] = static_cast<TensorImpl::SizesType>(sizes[i][d]);
      in.dim_order[d] = static_cast<TensorImpl::DimOrderType>(d);
      in.strides[d] = stride;
      stride *= in.sizes[d];
    }
    in.impl = std::make_unique<TensorImpl>(static_cast<ScalarType>(dtypes[i]), ndims[i], in.sizes, data[i],
                                           in.dim_order, in.strides, TensorShapeDynamism::STATIC);
    values.emplace_back(executorch::aten::Tensor(in.impl.get()));
  }
  auto result = r->module->execute(name, values);
  if (!result.ok()) {
    fail(err, err_len, "%s: executing method '%s' failed: %s", r->path.c_str(), method,
         executorch::runtime::to_string(result.error()));
    return 0;
  }
  r->outputs = std::move(*result);
  r->scalars.assign(r->outputs.size(), 0);
  return 1;
}

extern "C" int mote_pte_num_outputs(void* h) { return static_cast<int>(static_cast<Runner*>(h)->outputs.size()); }

// Output `i` of the last call: its dtype, shape (`sizes` holds 8) and data, valid until the next call on the handle.
// Scalars (constant methods) come back as 0-d Long / Double / Bool. 0 if `i` is out of range or of another kind.
extern "C" int mote_pte_output(void* h, int i, int* dtype, int* ndim, int64_t* sizes, const void** data) {
  auto* r = static_cast<Runner*>(h);
  if (i < 0 || i >= static_cast<int>(r->outputs.size())) return 0;
  const EValue& v = r->outputs[i];
  int64_t* scalar = &r->scalars[i];
  *ndim = 0;
  if (v.isTensor()) {
    const auto& t = v.toTensor();
    *dtype = static_cast<int>(t.scalar_type());
    *ndim = static_cast<int>(t.dim());
    if (*ndim > kMaxDims) return 0;
    for (int d = 0; d < *ndim; ++d) sizes[d] = t.size(d);
    *data = t.const_data_ptr();
  } else if (v.isInt()) {
    *scalar = v.toInt();
    *dtype = static_cast<int>(ScalarType::Long);
    *data = scalar;
  } else if (v.isDouble()) {
    double x = v.toDouble();
    std::memcpy(scalar, &x, sizeof x);
    *dtype = static_cast<int>(ScalarType::Double);
    *data = scalar;
  } else if (v.isBool()) {
    *reinterpret_cast<bool*>(scalar) = v.toBool();
    *dtype = static_cast<int>(ScalarType::Bool);
    *data = scalar;
  } else {
    return 0;
  }
  return 1;
}

// Size ExecuTorch's process-wide threadpool (XNNPACK's and the kernels' parallel_for). Resizing replaces the pool
// that loaded methods may hold ("unsafe" in ExecuTorch's name), so call it before opening a program, and only when
// the count changes. Returns the thread count now in use.
extern "C" int mote_pte_set_threads(int threads) {
  auto* pool = executorch::extension::threadpool::get_threadpool();
  if (pool == nullptr) return 0;
  if (threads > 0 && pool->get_thread_count() != static_cast<size_t>(threads)) {
    pool->_unsafe_reset_threadpool(static_cast<uint32_t>(threads));
  }
  return static_cast<int>(pool->get_thread_count());
}
