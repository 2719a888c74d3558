// PyTorch custom ops over the plain-CUDA kernels of hs_kernels.h:
//   torch.ops.histosurv.few_query_attention(q, k, v, key_mask=None, scale=None) -> out
//   torch.ops.histosurv.gated_attention_pool(h, wa, ba, wb, bb, wc, bc) -> (pooled, weights)
// Only a CUDA implementation is registered here; the Meta ("fake") ones that torch.export and
// torch.compile trace with are registered in Python (histosurv/kernels/cuda_ops.py).
//
// This file needs PyTorch's headers and libtorch/libc10 only, not libtorch_cuda or libc10_cuda: the
// current stream comes through c10's device-generic guard interface, which the CUDA build of torch
// fills in at run time. The same source therefore builds against torch's CPU wheel.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

#include "hs_kernels.h"

namespace {

cudaStream_t current_stream(const at::Tensor& t) {
  const c10::impl::DeviceGuardImplInterface* impl = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl->getStream(t.device()).native_handle());
}

hs_dtype kernel_dtype(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return HS_FLOAT32;
    case at::kHalf: return HS_FLOAT16;
    case at::kBFloat16: return HS_BFLOAT16;
    default: TORCH_CHECK(false, op, ": ", name, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
  return HS_FLOAT32;
}

void check_cuda_tensor(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but the first input is on ", ref.device());
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": kernel launch failed: ", cudaGetErrorString(err),
              " (cudaErrorInvalidValue here usually means a shape the kernel does not take)");
}

at::Tensor scratch(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(std::max<size_t>(bytes, 16))}, like.options().dtype(at::kByte));
}

// Rows may have any strides, but the last dimension must be contiguous.
at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

at::Tensor few_query_attention(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                               const std::optional<at::Tensor>& key_mask, std::optional<double> scale) {
  constexpr const char* op = "histosurv::few_query_attention";
  TORCH_CHECK(q_in.dim() == 4, op, ": q must be (B, H, M, d), got shape ", q_in.sizes());
  TORCH_CHECK(k_in.dim() == 4, op, ": k must be (B, H, N, d), got shape ", k_in.sizes());
  TORCH_CHECK(v_in.sizes() == k_in.sizes(), op, ": v must have k's shape ", k_in.sizes(), ", got ", v_in.sizes());
  TORCH_CHECK(q_in.size(0) == k_in.size(0) && q_in.size(1) == k_in.size(1) && q_in.size(3) == k_in.size(3), op,
              ": q ", q_in.sizes(), " and k ", k_in.sizes(), " must agree on B, H and d");
  TORCH_CHECK(k_in.size(2) >= 1, op, ": k has no keys (N = 0)");
  TORCH_CHECK(q_in.size(3) >= 1 && q_in.size(3) <= HS_MAX_HEAD_DIM, op, ": head dim d must be in 1..",
              HS_MAX_HEAD_DIM, ", got ", q_in.size(3));
  const hs_dtype dtype = kernel_dtype(q_in, op, "q");
  TORCH_CHECK(k_in.scalar_type() == q_in.scalar_type() && v_in.scalar_type() == q_in.scalar_type(), op,
              ": q, k and v must share a dtype, got ", q_in.scalar_type(), ", ", k_in.scalar_type(), ", ", v_in.scalar_type());
  check_cuda_tensor(q_in, q_in, op, "q");
  check_cuda_tensor(k_in, q_in, op, "k");
  check_cuda_tensor(v_in, q_in, op, "v");
  at::Tensor mask;
  if (key_mask.has_value()) {
    mask = *key_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": key_mask must be bool (True = attend), got ", mask.scalar_type());
    TORCH_CHECK(mask.dim() == 2 && mask.size(0) == k_in.size(0) && mask.size(1) == k_in.size(2), op,
                ": key_mask must be (B, N) = (", k_in.size(0), ", ", k_in.size(2), "), got ", mask.sizes());
    check_cuda_tensor(mask, q_in, op, "key_mask");
  }

  const c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());  // (B, H, M, d) contiguous
  if (out.numel() == 0) return out;

  hs_fqa_params p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.key_mask = mask.defined() ? static_cast<const uint8_t*>(mask.data_ptr()) : nullptr;
  p.out = out.data_ptr();
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.queries = q.size(2);
  p.keys = k.size(2);
  p.head_dim = q.size(3);
  for (int i = 0; i < 3; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  if (mask.defined()) {
    p.mask_stride[0] = mask.stride(0);
    p.mask_stride[1] = mask.stride(1);
  }
  p.scale = static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(p.head_dim)));
  p.dtype = dtype;

  const int splits = hs_fqa_num_splits(&p);
  at::Tensor ws = scratch(hs_fqa_workspace_bytes(&p, splits), q);
  check_launch(hs_few_query_attention(&p, splits, ws.data_ptr(), current_stream(q)), op);
  return out;
}

// A weight as a contiguous tensor of h's dtype with `numel` elements (nn.Linear's (out, in) layout).
at::Tensor weight(const at::Tensor& w, const at::Tensor& h, int64_t numel, const char* name) {
  constexpr const char* op = "histosurv::gated_attention_pool";
  check_cuda_tensor(w, h, op, name);
  TORCH_CHECK(w.numel() == numel, op, ": ", name, " must have ", numel, " elements, got shape ", w.sizes());
  return w.to(h.scalar_type()).contiguous();
}

std::tuple<at::Tensor, at::Tensor> gated_attention_pool(const at::Tensor& h_in, const at::Tensor& wa, const at::Tensor& ba,
                                                        const at::Tensor& wb, const at::Tensor& bb, const at::Tensor& wc,
                                                        const at::Tensor& bc) {
  constexpr const char* op = "histosurv::gated_attention_pool";
  TORCH_CHECK(h_in.dim() == 3, op, ": h must be (B, N, L), got shape ", h_in.sizes());
  TORCH_CHECK(h_in.size(1) >= 1 && h_in.size(2) >= 1, op, ": h must have N >= 1 patches and L >= 1 features, got ", h_in.sizes());
  TORCH_CHECK(wa.dim() == 2 && wa.size(1) == h_in.size(2), op, ": wa must be (A, L) with L = ", h_in.size(2), ", got ", wa.sizes());
  TORCH_CHECK(wb.sizes() == wa.sizes(), op, ": wb must have wa's shape ", wa.sizes(), ", got ", wb.sizes());
  const hs_dtype dtype = kernel_dtype(h_in, op, "h");
  check_cuda_tensor(h_in, h_in, op, "h");
  const int64_t A = wa.size(0), L = h_in.size(2);

  const c10::DeviceGuard guard(h_in.device());
  const at::Tensor h = last_dim_contiguous(h_in);
  const at::Tensor wa_c = weight(wa, h, A * L, "wa"), wb_c = weight(wb, h, A * L, "wb");
  const at::Tensor ba_c = weight(ba, h, A, "ba"), bb_c = weight(bb, h, A, "bb");
  const at::Tensor wc_c = weight(wc, h, A, "wc (one score: shape (1, A) or (A,))");
  const at::Tensor bc_c = weight(bc, h, 1, "bc");
  at::Tensor pooled = at::empty({h.size(0), L}, h.options());
  at::Tensor weights = at::empty({h.size(0), h.size(1)}, h.options());
  if (h.size(0) == 0) return {pooled, weights};

  hs_gap_params p{};
  p.h = h.data_ptr();
  p.wa = wa_c.data_ptr();
  p.ba = ba_c.data_ptr();
  p.wb = wb_c.data_ptr();
  p.bb = bb_c.data_ptr();
  p.wc = wc_c.data_ptr();
  p.bc = bc_c.data_ptr();
  p.pooled = pooled.data_ptr();
  p.weights = weights.data_ptr();
  p.batch = h.size(0);
  p.patches = h.size(1);
  p.features = L;
  p.hidden = A;
  p.h_stride[0] = h.stride(0);
  p.h_stride[1] = h.stride(1);
  p.dtype = dtype;

  const int splits = hs_gap_num_splits(&p);
  at::Tensor ws = scratch(hs_gap_workspace_bytes(&p, splits), h);
  check_launch(hs_gated_attention_pool(&p, splits, ws.data_ptr(), current_stream(h)), op);
  return {pooled, weights};
}

}  // namespace

TORCH_LIBRARY(histosurv, m) {
  m.def("few_query_attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask=None, float? scale=None) -> Tensor");
  m.def("gated_attention_pool(Tensor h, Tensor wa, Tensor ba, Tensor wb, Tensor bb, Tensor wc, Tensor bc) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(histosurv, CUDA, m) {
  m.impl("few_query_attention", &few_query_attention);
  m.impl("gated_attention_pool", &gated_attention_pool);
}
