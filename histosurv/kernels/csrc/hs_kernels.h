// histosurv CUDA kernels: a plain C interface with no PyTorch dependency.
//
// The kernels (few_query_attention.cu, gated_pool.cu) compile with nvcc alone. Three front ends call
// them through this header: the PyTorch custom ops (ops.cpp), the ONNX Runtime custom-op library
// (ort_custom_op.cc) and the TensorRT IPluginV3 plugin (trt_plugin.cpp). Each front end owns the
// memory: it asks for the workspace size, allocates it, and passes its CUDA stream.
#ifndef HISTOSURV_KERNELS_H
#define HISTOSURV_KERNELS_H

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum hs_dtype { HS_FLOAT32 = 0, HS_FLOAT16 = 1, HS_BFLOAT16 = 2 } hs_dtype;

#define HS_MAX_HEAD_DIM 512

// ---------------------------------------------------------------------------------------------
// Few-query attention, split over the keys (flash-decoding):
//   out[b, h, m, :] = softmax_n(q[b, h, m, :] . k[b, h, n, :] * scale) v[b, h, n, :]
// q (B, H, M, d), k and v (B, H, N, d) with any strides whose last one is 1 (element strides below);
// key_mask (B, N) bytes, nonzero = attend, or NULL; out (B, H, M, d) contiguous, in the input dtype.
// 1 <= d <= 512. A query whose keys are all masked gets zeros.
typedef struct hs_fqa_params {
  const void* q;
  const void* k;
  const void* v;
  const uint8_t* key_mask;
  void* out;
  int64_t batch, heads, queries, keys, head_dim;
  int64_t q_stride[3];  // (b, h, m)
  int64_t k_stride[3];  // (b, h, n)
  int64_t v_stride[3];  // (b, h, n)
  int64_t mask_stride[2];  // (b, n)
  float scale;
  hs_dtype dtype;
} hs_fqa_params;

// Number of key splits for the current device (fills the SMs; 1 <= splits <= 1024).
int hs_fqa_num_splits(const hs_fqa_params* p);
// Scratch bytes the launch needs for that many splits (FP32 partial outputs, maxima and sums).
size_t hs_fqa_workspace_bytes(const hs_fqa_params* p, int num_splits);
// Enqueue the split kernel and the merge kernel on `stream`. Returns cudaErrorInvalidValue for
// shapes it does not take (d > 512, M too large for shared memory, null pointers).
cudaError_t hs_few_query_attention(const hs_fqa_params* p, int num_splits, void* workspace, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Gated attention pooling (ABMIL, Ilse et al. 2018) in one pass over h:
//   s_n = wc . (tanh(Wa h_n + ba) * sigmoid(Wb h_n + bb)) + bc,  a = softmax_n(s),  pooled = sum_n a_n h_n
// h (B, N, L) with rows of L contiguous (element strides below); wa, wb (A, L) and ba, bb, wc (A),
// bc (1), all contiguous and in the dtype of h; pooled (B, L) and weights (B, N) contiguous, same dtype.
typedef struct hs_gap_params {
  const void* h;
  const void* wa;
  const void* ba;
  const void* wb;
  const void* bb;
  const void* wc;
  const void* bc;
  void* pooled;
  void* weights;
  int64_t batch, patches, features, hidden;  // B, N, L, A
  int64_t h_stride[2];  // (b, n)
  hs_dtype dtype;
} hs_gap_params;

int hs_gap_num_splits(const hs_gap_params* p);
size_t hs_gap_workspace_bytes(const hs_gap_params* p, int num_splits);
cudaError_t hs_gated_attention_pool(const hs_gap_params* p, int num_splits, void* workspace, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // HISTOSURV_KERNELS_H
