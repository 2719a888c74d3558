// ONNX Runtime custom-op library for the CUDA execution provider (domain "com.histosurv"):
//   FewQueryAttention(q, k, v, key_mask?) -> out            attribute: scale (float, default 1/sqrt(d))
//   GatedAttentionPool(h, wa, ba, wb, bb, wc, bc) -> (pooled, weights)
// Shapes and semantics as in hs_kernels.h. Each op is registered for float, float16 and bfloat16.
//
// Load it with SessionOptions.register_custom_ops_library(path) (Python) or
// RegisterCustomOpsLibrary_V2 (C API). It uses only the C API (onnxruntime_c_api.h), through the
// OrtApi table ONNX Runtime hands to RegisterCustomOps, so it links against no ONNX Runtime library and
// works with any runtime whose API version is at least the header's. Scratch memory is taken
// stream-ordered with cudaMallocAsync / cudaFreeAsync on the session's compute stream.
#include <onnxruntime_c_api.h>

#include <cuda_runtime_api.h>

#include <cmath>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "hs_kernels.h"

namespace {

const OrtApi* g_api = nullptr;

void ort_check(OrtStatus* status) {
  if (status == nullptr) return;
  const std::string msg = g_api->GetErrorMessage(status);
  g_api->ReleaseStatus(status);
  throw std::runtime_error("histosurv ORT op: " + msg);
}

void cuda_check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string("histosurv ORT op: ") + what + ": " + cudaGetErrorString(err));
}

struct TensorView {
  const OrtValue* value = nullptr;
  std::vector<int64_t> shape;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  void* data = nullptr;
};

TensorView input(OrtKernelContext* ctx, size_t index) {
  TensorView t;
  ort_check(g_api->KernelContext_GetInput(ctx, index, &t.value));
  if (t.value == nullptr) return t;  // an absent optional input
  OrtTensorTypeAndShapeInfo* info = nullptr;
  ort_check(g_api->GetTensorTypeAndShape(t.value, &info));
  size_t rank = 0;
  ort_check(g_api->GetDimensionsCount(info, &rank));
  t.shape.resize(rank);
  ort_check(g_api->GetDimensions(info, t.shape.data(), rank));
  ort_check(g_api->GetTensorElementType(info, &t.type));
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  ort_check(g_api->GetTensorMutableData(const_cast<OrtValue*>(t.value), &t.data));
  return t;
}

void* output(OrtKernelContext* ctx, size_t index, const std::vector<int64_t>& shape) {
  OrtValue* value = nullptr;
  ort_check(g_api->KernelContext_GetOutput(ctx, index, shape.data(), shape.size(), &value));
  void* data = nullptr;
  ort_check(g_api->GetTensorMutableData(value, &data));
  return data;
}

cudaStream_t compute_stream(OrtKernelContext* ctx) {
  void* stream = nullptr;
  ort_check(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
  return static_cast<cudaStream_t>(stream);
}

hs_dtype kernel_dtype(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return HS_FLOAT32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return HS_FLOAT16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16: return HS_BFLOAT16;
    default: throw std::runtime_error("histosurv ORT op: inputs must be float, float16 or bfloat16");
  }
}

// Run `launch(workspace, stream)` with `bytes` of stream-ordered scratch.
template <typename F> void with_scratch(size_t bytes, cudaStream_t stream, F launch) {
  void* ws = nullptr;
  cuda_check(cudaMallocAsync(&ws, bytes < 16 ? 16 : bytes, stream), "cudaMallocAsync");
  const cudaError_t err = launch(ws, stream);
  cuda_check(cudaFreeAsync(ws, stream), "cudaFreeAsync");
  cuda_check(err, "kernel launch (cudaErrorInvalidValue: a shape the kernel does not take)");
}

struct FewQueryKernel {
  float scale = NAN;  // NAN: 1 / sqrt(d)

  void Compute(OrtKernelContext* ctx) const {
    const TensorView q = input(ctx, 0), k = input(ctx, 1), v = input(ctx, 2), mask = input(ctx, 3);
    if (q.shape.size() != 4 || k.shape.size() != 4 || v.shape != k.shape)
      throw std::runtime_error("histosurv FewQueryAttention: q must be (B, H, M, d), k and v (B, H, N, d)");
    if (q.shape[0] != k.shape[0] || q.shape[1] != k.shape[1] || q.shape[3] != k.shape[3])
      throw std::runtime_error("histosurv FewQueryAttention: q and k must agree on B, H and d");
    if (mask.value != nullptr && (mask.shape.size() != 2 || mask.shape[0] != k.shape[0] || mask.shape[1] != k.shape[2]))
      throw std::runtime_error("histosurv FewQueryAttention: key_mask must be (B, N) bool");
    hs_fqa_params p{};
    p.q = q.data;
    p.k = k.data;
    p.v = v.data;
    p.key_mask = static_cast<const uint8_t*>(mask.data);
    p.out = output(ctx, 0, q.shape);
    p.batch = q.shape[0];
    p.heads = q.shape[1];
    p.queries = q.shape[2];
    p.keys = k.shape[2];
    p.head_dim = q.shape[3];
    const int64_t qs[3] = {p.heads * p.queries * p.head_dim, p.queries * p.head_dim, p.head_dim};
    const int64_t ks[3] = {p.heads * p.keys * p.head_dim, p.keys * p.head_dim, p.head_dim};
    for (int i = 0; i < 3; ++i) {
      p.q_stride[i] = qs[i];
      p.k_stride[i] = ks[i];
      p.v_stride[i] = ks[i];
    }
    p.mask_stride[0] = p.keys;
    p.mask_stride[1] = 1;
    p.scale = std::isnan(scale) ? 1.f / std::sqrt(static_cast<float>(p.head_dim)) : scale;
    p.dtype = kernel_dtype(q.type);
    if (p.batch * p.heads * p.queries == 0) return;
    const int splits = hs_fqa_num_splits(&p);
    with_scratch(hs_fqa_workspace_bytes(&p, splits), compute_stream(ctx),
                 [&](void* ws, cudaStream_t s) { return hs_few_query_attention(&p, splits, ws, s); });
  }
};

struct GatedPoolKernel {
  void Compute(OrtKernelContext* ctx) const {
    TensorView t[7];
    for (size_t i = 0; i < 7; ++i) t[i] = input(ctx, i);
    const TensorView& h = t[0];
    if (h.shape.size() != 3 || t[1].shape.size() != 2 || t[1].shape[1] != h.shape[2] || t[3].shape != t[1].shape)
      throw std::runtime_error("histosurv GatedAttentionPool: h must be (B, N, L), wa and wb (A, L)");
    hs_gap_params p{};
    p.h = h.data;
    p.wa = t[1].data;
    p.ba = t[2].data;
    p.wb = t[3].data;
    p.bb = t[4].data;
    p.wc = t[5].data;
    p.bc = t[6].data;
    p.batch = h.shape[0];
    p.patches = h.shape[1];
    p.features = h.shape[2];
    p.hidden = t[1].shape[0];
    p.h_stride[0] = p.patches * p.features;
    p.h_stride[1] = p.features;
    p.dtype = kernel_dtype(h.type);
    p.pooled = output(ctx, 0, {p.batch, p.features});
    p.weights = output(ctx, 1, {p.batch, p.patches});
    if (p.batch == 0) return;
    const int splits = hs_gap_num_splits(&p);
    with_scratch(hs_gap_workspace_bytes(&p, splits), compute_stream(ctx),
                 [&](void* ws, cudaStream_t s) { return hs_gated_attention_pool(&p, splits, ws, s); });
  }
};

// One OrtCustomOp per (op, element type); the function table is filled by hand so that the library
// builds against any onnxruntime_c_api.h (fields a newer header adds stay null = defaults).
template <typename Kernel> struct CustomOp : OrtCustomOp {
  const char* name;
  ONNXTensorElementDataType type;
  size_t n_in, n_out, optional_from;  // inputs at index >= optional_from are optional

  CustomOp(const char* name_, ONNXTensorElementDataType type_, size_t n_in_, size_t n_out_, size_t optional_from_)
      : OrtCustomOp{}, name(name_), type(type_), n_in(n_in_), n_out(n_out_), optional_from(optional_from_) {
    // The fields set here exist since API version 8; declaring an older table than the header's keeps
    // newer runtimes from calling the (null) callbacks that later versions added.
    version = ORT_API_VERSION < 12 ? ORT_API_VERSION : 12;
    CreateKernel = [](const OrtCustomOp*, const OrtApi* api, const OrtKernelInfo* info) -> void* {
      auto* kernel = new Kernel();
      set_attributes(kernel, api, info);
      return kernel;
    };
    GetName = [](const OrtCustomOp* op) { return self(op)->name; };
    GetExecutionProviderType = [](const OrtCustomOp*) -> const char* { return "CUDAExecutionProvider"; };
    GetInputType = [](const OrtCustomOp* op, size_t i) {
      return (std::is_same<Kernel, FewQueryKernel>::value && i == 3) ? ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL : self(op)->type;
    };
    GetInputTypeCount = [](const OrtCustomOp* op) { return self(op)->n_in; };
    GetOutputType = [](const OrtCustomOp* op, size_t) { return self(op)->type; };
    GetOutputTypeCount = [](const OrtCustomOp* op) { return self(op)->n_out; };
    KernelCompute = [](void* kernel, OrtKernelContext* ctx) { static_cast<Kernel*>(kernel)->Compute(ctx); };
    KernelDestroy = [](void* kernel) { delete static_cast<Kernel*>(kernel); };
    GetInputCharacteristic = [](const OrtCustomOp* op, size_t i) {
      return i >= self(op)->optional_from ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
  }

  static const CustomOp* self(const OrtCustomOp* op) { return static_cast<const CustomOp*>(op); }

  static void set_attributes(FewQueryKernel* kernel, const OrtApi* api, const OrtKernelInfo* info) {
    float scale = 0.f;
    OrtStatus* status = api->KernelInfoGetAttribute_float(info, "scale", &scale);
    if (status == nullptr) {
      kernel->scale = scale;
    } else {
      api->ReleaseStatus(status);  // absent: the default 1/sqrt(d)
    }
  }
  static void set_attributes(GatedPoolKernel*, const OrtApi*, const OrtKernelInfo*) {}
};

constexpr ONNXTensorElementDataType kTypes[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
                                                ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16};

}  // namespace

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options,
                                                                                          const OrtApiBase* api_base) {
  g_api = api_base->GetApi(ORT_API_VERSION);
  if (g_api == nullptr) return nullptr;  // a runtime older than this header: nothing can be reported through it
  // Ops and the domain must outlive every session that uses them: they live as long as the process.
  static std::vector<OrtCustomOp*> ops = [] {
    std::vector<OrtCustomOp*> v;
    for (ONNXTensorElementDataType t : kTypes) {
      v.push_back(new CustomOp<FewQueryKernel>("FewQueryAttention", t, 4, 1, 3));
      v.push_back(new CustomOp<GatedPoolKernel>("GatedAttentionPool", t, 7, 2, 7));
    }
    return v;
  }();
  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* status = g_api->CreateCustomOpDomain("com.histosurv", &domain)) return status;
  for (OrtCustomOp* op : ops)
    if (OrtStatus* status = g_api->CustomOpDomain_Add(domain, op)) return status;
  return g_api->AddCustomOpDomain(options, domain);
}
