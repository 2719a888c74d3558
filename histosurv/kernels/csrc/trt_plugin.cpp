// TensorRT IPluginV3 plugins over the kernels of hs_kernels.h (TensorRT 10 API, IPluginV3OneCore /
// IPluginV3OneBuild / IPluginV3OneRuntime):
//   FewQueryAttention  (q, k, v[, key_mask]) -> out        field: scale (float32; absent = 1/sqrt(d))
//   GatedAttentionPool (h, wa, ba, wb, bb, wc, bc) -> (pooled, weights)
// Names, version "1" and the empty namespace match the ONNX nodes of ort_custom_op.cc (domain
// com.histosurv), so TensorRT's ONNX parser maps such nodes onto these plugins.
//
// The library exports getCreators() (and a no-op setLoggerFinder()), the entry points TensorRT looks
// for in a plugin library loaded with IPluginRegistry::loadLibrary, trtexec --dynamicPlugins or
// BuilderConfig.plugins_to_serialize; it needs TensorRT's headers only, not its libraries.
#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "hs_kernels.h"

namespace {

using namespace nvinfer1;

constexpr char const* kVersion = "1";
constexpr char const* kNamespace = "";
constexpr int64_t kMaxPartRows = 1024;  // splits are capped so that rows x splits <= max(1024, rows)

bool float_type(DataType t) { return t == DataType::kFLOAT || t == DataType::kHALF || t == DataType::kBF16; }

hs_dtype kernel_dtype(DataType t) {
  return t == DataType::kHALF ? HS_FLOAT16 : (t == DataType::kBF16 ? HS_BFLOAT16 : HS_FLOAT32);
}

int capped_splits(int splits, int64_t rows) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(splits, std::max<int64_t>(1, kMaxPartRows / std::max<int64_t>(rows, 1)))));
}

// The parts every plugin here shares: one object is the core, build and runtime capability at once.
class PluginBase : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return kNamespace; }
  int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*, int32_t) noexcept override { return 0; }
  int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*, int32_t) noexcept override { return 0; }
  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
  int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const* in, int32_t) const noexcept override {
    for (int32_t i = 0; i < nbOutputs; ++i) out[i] = in[0];
    return 0;
  }
};

class FewQueryAttentionPlugin final : public PluginBase {
 public:
  explicit FewQueryAttentionPlugin(float scale) : scale_(scale) {
    field_ = PluginField("scale", &scale_, PluginFieldType::kFLOAT32, 1);
    fc_.nbFields = 1;
    fc_.fields = &field_;
  }

  IPluginV3* clone() noexcept override { return new (std::nothrow) FewQueryAttentionPlugin(scale_); }
  char const* getPluginName() const noexcept override { return "FewQueryAttention"; }
  int32_t getNbOutputs() const noexcept override { return 1; }

  int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out, int32_t,
                          IExprBuilder&) noexcept override {
    if (nbInputs < 3 || in[0].nbDims != 4) return -1;
    out[0] = in[0];  // (B, H, M, d)
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t nbInputs, int32_t) noexcept override {
    PluginTensorDesc const& d = io[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    if (nbInputs == 4 && pos == 3) return d.type == DataType::kBOOL;
    return pos == 0 ? float_type(d.type) : d.type == io[0].desc.type;
  }

  size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*, int32_t) const noexcept override {
    hs_fqa_params p{};
    p.batch = 1;
    p.heads = 1;
    p.queries = in[0].max.d[2];
    p.head_dim = in[0].max.d[3];
    const int64_t rows = std::max<int64_t>(kMaxPartRows, in[0].max.d[0] * in[0].max.d[1]);
    return hs_fqa_workspace_bytes(&p, static_cast<int>(rows));  // bounds B*H x splits x M x (d + 2) floats
  }

  int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs, void* const* outputs,
                  void* workspace, cudaStream_t stream) noexcept override {
    Dims const& q = in[0].dims;
    Dims const& k = in[1].dims;
    hs_fqa_params p{};
    p.q = inputs[0];
    p.k = inputs[1];
    p.v = inputs[2];
    p.key_mask = mask_present_ ? static_cast<uint8_t const*>(inputs[3]) : nullptr;
    p.out = outputs[0];
    p.batch = q.d[0];
    p.heads = q.d[1];
    p.queries = q.d[2];
    p.keys = k.d[2];
    p.head_dim = q.d[3];
    const int64_t qs[3] = {p.heads * p.queries * p.head_dim, p.queries * p.head_dim, p.head_dim};
    const int64_t ks[3] = {p.heads * p.keys * p.head_dim, p.keys * p.head_dim, p.head_dim};
    std::memcpy(p.q_stride, qs, sizeof(qs));
    std::memcpy(p.k_stride, ks, sizeof(ks));
    std::memcpy(p.v_stride, ks, sizeof(ks));
    p.mask_stride[0] = p.keys;
    p.mask_stride[1] = 1;
    p.scale = std::isnan(scale_) ? 1.f / std::sqrt(static_cast<float>(p.head_dim)) : scale_;
    p.dtype = kernel_dtype(in[0].type);
    if (p.batch * p.heads * p.queries == 0) return 0;
    const int splits = capped_splits(hs_fqa_num_splits(&p), p.batch * p.heads);
    return hs_few_query_attention(&p, splits, workspace, stream) == cudaSuccess ? 0 : -1;
  }

  int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t nbInputs, DynamicPluginTensorDesc const*, int32_t) noexcept override {
    mask_present_ = nbInputs == 4;
    return 0;
  }
  int32_t onShapeChange(PluginTensorDesc const*, int32_t nbInputs, PluginTensorDesc const*, int32_t) noexcept override {
    mask_present_ = nbInputs == 4;
    return 0;
  }

  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &fc_; }

 private:
  float scale_;
  bool mask_present_ = false;
  PluginField field_;
  PluginFieldCollection fc_{};
};

class GatedAttentionPoolPlugin final : public PluginBase {
 public:
  IPluginV3* clone() noexcept override { return new (std::nothrow) GatedAttentionPoolPlugin(); }
  char const* getPluginName() const noexcept override { return "GatedAttentionPool"; }
  int32_t getNbOutputs() const noexcept override { return 2; }

  int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* out, int32_t,
                          IExprBuilder&) noexcept override {
    if (nbInputs != 7 || in[0].nbDims != 3) return -1;
    out[0].nbDims = 2;  // pooled (B, L)
    out[0].d[0] = in[0].d[0];
    out[0].d[1] = in[0].d[2];
    out[1].nbDims = 2;  // weights (B, N)
    out[1].d[0] = in[0].d[0];
    out[1].d[1] = in[0].d[1];
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override {
    PluginTensorDesc const& d = io[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    return pos == 0 ? float_type(d.type) : d.type == io[0].desc.type;
  }

  size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*, int32_t) const noexcept override {
    hs_gap_params p{};
    p.batch = std::max<int64_t>(1, in[0].max.d[0]);
    p.patches = in[0].max.d[1];
    p.features = in[0].max.d[2];
    p.hidden = in[1].max.d[0];
    const int64_t splits = (std::max<int64_t>(kMaxPartRows, p.batch) + p.batch - 1) / p.batch;
    return hs_gap_workspace_bytes(&p, static_cast<int>(splits));
  }

  int32_t enqueue(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs, void* const* outputs,
                  void* workspace, cudaStream_t stream) noexcept override {
    hs_gap_params p{};
    p.h = inputs[0];
    p.wa = inputs[1];
    p.ba = inputs[2];
    p.wb = inputs[3];
    p.bb = inputs[4];
    p.wc = inputs[5];
    p.bc = inputs[6];
    p.pooled = outputs[0];
    p.weights = outputs[1];
    p.batch = in[0].dims.d[0];
    p.patches = in[0].dims.d[1];
    p.features = in[0].dims.d[2];
    p.hidden = in[1].dims.d[0];
    p.h_stride[0] = p.patches * p.features;
    p.h_stride[1] = p.features;
    p.dtype = kernel_dtype(in[0].type);
    if (p.batch == 0) return 0;
    const int splits = capped_splits(hs_gap_num_splits(&p), p.batch);
    return hs_gated_attention_pool(&p, splits, workspace, stream) == cudaSuccess ? 0 : -1;
  }

  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &fc_; }

 private:
  PluginFieldCollection fc_{};
};

class FewQueryAttentionCreator final : public IPluginCreatorV3One {
 public:
  FewQueryAttentionCreator() {
    field_ = PluginField("scale", nullptr, PluginFieldType::kFLOAT32, 1);
    fc_.nbFields = 1;
    fc_.fields = &field_;
  }
  IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
    float scale = NAN;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
      PluginField const& f = fc->fields[i];
      if (std::strcmp(f.name, "scale") != 0 || f.data == nullptr || f.length < 1) continue;
      if (f.type == PluginFieldType::kFLOAT32) scale = *static_cast<float const*>(f.data);
      if (f.type == PluginFieldType::kFLOAT64) scale = static_cast<float>(*static_cast<double const*>(f.data));
    }
    return new (std::nothrow) FewQueryAttentionPlugin(scale);
  }
  PluginFieldCollection const* getFieldNames() noexcept override { return &fc_; }
  char const* getPluginName() const noexcept override { return "FewQueryAttention"; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return kNamespace; }

 private:
  PluginField field_;
  PluginFieldCollection fc_{};
};

class GatedAttentionPoolCreator final : public IPluginCreatorV3One {
 public:
  IPluginV3* createPlugin(char const*, PluginFieldCollection const*, TensorRTPhase) noexcept override {
    return new (std::nothrow) GatedAttentionPoolPlugin();
  }
  PluginFieldCollection const* getFieldNames() noexcept override { return &fc_; }
  char const* getPluginName() const noexcept override { return "GatedAttentionPool"; }
  char const* getPluginVersion() const noexcept override { return kVersion; }
  char const* getPluginNamespace() const noexcept override { return kNamespace; }

 private:
  PluginFieldCollection fc_{};
};

}  // namespace

extern "C" __attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder*) {}

extern "C" __attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static FewQueryAttentionCreator attention;
  static GatedAttentionPoolCreator pool;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {&attention, &pool};
  nbCreators = 2;
  return creators;
}
