// Gated attention pooling (ABMIL) in one pass over the bag h (B, N, L):
//   s_n = wc . (tanh(Wa h_n + ba) * sigmoid(Wb h_n + bb)) + bc,  a = softmax_n(s),  pooled = sum_n a_n h_n.
//
// 1. gap_pack_kernel: Wa, Wb to FP32 and transposed to (L, A), so that threads over the A hidden units
//    read them coalesced; biases and wc to FP32.
// 2. gap_split_kernel, grid (B, splits): a block takes P patches at a time into shared memory (the
//    only read of h), each thread computes both GEMVs for its hidden units over the P patches, the
//    block sums the gated terms into P scores (written raw to the scratch), then an online softmax
//    updates the block's running max, sum and unnormalised pooled vector.
// 3. gap_merge_kernel, grid (B): combines the splits and normalises pooled and the weights.
// The two GEMVs are plain FMA loops (FP32): correctness and one pass over h come first here.
#include "hs_common.cuh"

namespace hs {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

struct Work {
  float* wa_t;    // (L, A)
  float* wb_t;    // (L, A)
  float* ba;      // (A)
  float* bb;      // (A)
  float* wc;      // (A)
  float* bc;      // (1)
  float* scores;  // (B, N) raw scores
  float* acc;     // (B, splits, L) unnormalised pooled vectors
  float* m;       // (B, splits) running max
  float* l;       // (B, splits) running sum
  int splits;
  int64_t patches_per_split;  // a multiple of P
};

// Scratch layout, each region 16-byte aligned.
struct Layout {
  size_t wa_t, wb_t, ba, bb, wc, bc, scores, acc, m, l, total;
  Layout(const hs_gap_params& p, int splits) {
    const int64_t L = p.features, A = p.hidden, B = p.batch;
    size_t at = 0;
    auto take = [&at](int64_t floats) { const size_t here = at; at += align16(size_t(floats) * sizeof(float)); return here; };
    wa_t = take(L * A);
    wb_t = take(L * A);
    ba = take(A);
    bb = take(A);
    wc = take(A);
    bc = take(1);
    scores = take(B * p.patches);
    acc = take(B * splits * L);
    m = take(B * splits);
    l = take(B * splits);
    total = at;
  }
};

template <typename T>
__global__ void gap_pack_kernel(hs_gap_params p, Work w) {
  const int64_t L = p.features, A = p.hidden;
  const T* wa = static_cast<const T*>(p.wa);
  const T* wb = static_cast<const T*>(p.wb);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < L * A; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t l = i / A, r = i - l * A;  // (l, r) of the transposed copy
    w.wa_t[i] = to_float(wa[r * L + l]);
    w.wb_t[i] = to_float(wb[r * L + l]);
    if (i < A) {
      w.ba[i] = to_float(static_cast<const T*>(p.ba)[i]);
      w.bb[i] = to_float(static_cast<const T*>(p.bb)[i]);
      w.wc[i] = to_float(static_cast<const T*>(p.wc)[i]);
    }
    if (i == 0) w.bc[0] = to_float(static_cast<const T*>(p.bc)[0]);
  }
}

template <int P> size_t split_smem_bytes(int64_t L) {
  return size_t(L) * (P + 4) * sizeof(float) + size_t(L) * sizeof(float) + (kWarps * P + P + 4) * sizeof(float);
}

__device__ __forceinline__ float hs_sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

// Scores of the P patches in the shared tile ht [L][P + 4]: returns thread 0..P-1's score in red.
template <int P>
__device__ void tile_scores(const float* ht, const Work& w, int64_t L, int64_t A, float* red) {
  constexpr int HS = P + 4;
  float part[P];
#pragma unroll
  for (int q = 0; q < P; ++q) part[q] = 0.f;
  for (int64_t r = threadIdx.x; r < A; r += kThreads) {
    float xa[P], xb[P];
    const float ba = w.ba[r], bb = w.bb[r];
#pragma unroll
    for (int q = 0; q < P; ++q) {
      xa[q] = ba;
      xb[q] = bb;
    }
    for (int64_t l = 0; l < L; ++l) {
      const float wa = w.wa_t[l * A + r], wb = w.wb_t[l * A + r];
      const float4* hr = reinterpret_cast<const float4*>(ht + l * HS);
#pragma unroll
      for (int q4 = 0; q4 < P / 4; ++q4) {
        const float4 hv = hr[q4];
        xa[4 * q4 + 0] += wa * hv.x; xa[4 * q4 + 1] += wa * hv.y; xa[4 * q4 + 2] += wa * hv.z; xa[4 * q4 + 3] += wa * hv.w;
        xb[4 * q4 + 0] += wb * hv.x; xb[4 * q4 + 1] += wb * hv.y; xb[4 * q4 + 2] += wb * hv.z; xb[4 * q4 + 3] += wb * hv.w;
      }
    }
    const float wc = w.wc[r];
#pragma unroll
    for (int q = 0; q < P; ++q) part[q] += wc * tanhf(xa[q]) * hs_sigmoid(xb[q]);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int q = 0; q < P; ++q) {
    const float v = warp_sum(part[q]);
    if (lane == 0) red[warp * P + q] = v;
  }
  __syncthreads();
  if (threadIdx.x < P) {
    float s = w.bc[0];
    for (int i = 0; i < kWarps; ++i) s += red[i * P + threadIdx.x];
    red[kWarps * P + threadIdx.x] = s;
  }
}

template <typename T, int P>
__global__ void __launch_bounds__(kThreads) gap_split_kernel(hs_gap_params p, Work w) {
  constexpr int HS = P + 4;
  HS_DYNAMIC_SMEM(float, sm);
  const int64_t L = p.features, A = p.hidden, N = p.patches;
  float* ht = sm;                   // [L][P + 4] the tile of h, transposed, FP32
  float* acc = ht + L * HS;         // [L] unnormalised pooled vector
  float* red = acc + L;             // [kWarps][P] partial scores, then [P] scores / exp weights
  float* ev = red + kWarps * P;     // [P]
  float* st = ev + P;               // running max, running sum, alpha

  const int64_t b = blockIdx.x;
  const int split = blockIdx.y;
  const int64_t n_begin = split * w.patches_per_split;
  const int64_t n_end = min(N, n_begin + w.patches_per_split);
  const T* hb = static_cast<const T*>(p.h) + b * p.h_stride[0];
  for (int64_t l = threadIdx.x; l < L; l += kThreads) acc[l] = 0.f;
  if (threadIdx.x == 0) {
    st[0] = -INFINITY;
    st[1] = 0.f;
  }
  for (int64_t n0 = n_begin; n0 < n_end; n0 += P) {
    const int cnt = static_cast<int>(min(static_cast<int64_t>(P), n_end - n0));
    __syncthreads();  // the previous tile is no longer read
    const int Li = static_cast<int>(L);
    for (int i = threadIdx.x; i < P * Li; i += kThreads) {  // coalesced along l
      const int q = i / Li, l = i - q * Li;
      ht[l * HS + q] = q < cnt ? to_float(hb[(n0 + q) * p.h_stride[1] + l]) : 0.f;
    }
    __syncthreads();
    tile_scores<P>(ht, w, L, A, red);
    if (threadIdx.x < P) {
      const float s = red[kWarps * P + threadIdx.x];
      const bool ok = static_cast<int>(threadIdx.x) < cnt;
      if (ok) w.scores[b * N + n0 + threadIdx.x] = s;
      ev[threadIdx.x] = ok ? s : -INFINITY;
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // online softmax over the tile's P scores
      float mt = -INFINITY;
      for (int q = 0; q < P; ++q) mt = fmaxf(mt, ev[q]);
      const float m_new = fmaxf(st[0], mt);
      const float a = expf(st[0] - m_new);  // 0 on the first tile
      float sum = 0.f;
      for (int q = 0; q < P; ++q) {
        const float e = expf(ev[q] - m_new);
        ev[q] = e;
        sum += e;
      }
      st[0] = m_new;
      st[1] = st[1] * a + sum;
      st[2] = a;
    }
    __syncthreads();
    const float a = st[2];
    for (int64_t l = threadIdx.x; l < L; l += kThreads) {
      const float4* hr = reinterpret_cast<const float4*>(ht + l * HS);
      float s = acc[l] * a;
#pragma unroll
      for (int q4 = 0; q4 < P / 4; ++q4) {
        const float4 hv = hr[q4];
        s += ev[4 * q4] * hv.x + ev[4 * q4 + 1] * hv.y + ev[4 * q4 + 2] * hv.z + ev[4 * q4 + 3] * hv.w;
      }
      acc[l] = s;
    }
  }
  __syncthreads();
  const int64_t part = b * w.splits + split;
  for (int64_t l = threadIdx.x; l < L; l += kThreads) w.acc[part * L + l] = acc[l];
  if (threadIdx.x == 0) {
    w.m[part] = st[0];
    w.l[part] = st[1];
  }
}

// Grid (B): pooled = sum_s e^(m_s - max) acc_s / total, weights_n = e^(s_n - max) / total.
template <typename T>
__global__ void __launch_bounds__(kThreads) gap_merge_kernel(hs_gap_params p, Work w) {
  HS_DYNAMIC_SMEM(float, weight);  // [splits]
  const int64_t b = blockIdx.x, L = p.features, N = p.patches;
  const int S = w.splits;
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < S; s += kThreads) mx = fmaxf(mx, w.m[b * S + s]);
  mx = block_reduce<kThreads, true>(mx);
  float total = 0.f;
  for (int s = threadIdx.x; s < S; s += kThreads) {
    const float ws = expf(w.m[b * S + s] - mx);
    weight[s] = ws;
    total += ws * w.l[b * S + s];
  }
  total = block_reduce<kThreads, false>(total);
  const float inv = 1.f / total;
  T* pooled = static_cast<T*>(p.pooled) + b * L;
  for (int64_t l = threadIdx.x; l < L; l += kThreads) {
    float acc = 0.f;
    for (int s = 0; s < S; ++s) acc += weight[s] * w.acc[(b * S + s) * L + l];
    pooled[l] = from_float<T>(acc * inv);
  }
  T* weights = static_cast<T*>(p.weights) + b * N;
  for (int64_t n = threadIdx.x; n < N; n += kThreads) weights[n] = from_float<T>(expf(w.scores[b * N + n] - mx) * inv);
}

template <typename T, int P>
cudaError_t launch(const hs_gap_params& p, int splits, void* workspace, cudaStream_t stream) {
  const Layout lay(p, splits);
  char* base = static_cast<char*>(workspace);
  Work w;
  w.wa_t = reinterpret_cast<float*>(base + lay.wa_t);
  w.wb_t = reinterpret_cast<float*>(base + lay.wb_t);
  w.ba = reinterpret_cast<float*>(base + lay.ba);
  w.bb = reinterpret_cast<float*>(base + lay.bb);
  w.wc = reinterpret_cast<float*>(base + lay.wc);
  w.bc = reinterpret_cast<float*>(base + lay.bc);
  w.scores = reinterpret_cast<float*>(base + lay.scores);
  w.acc = reinterpret_cast<float*>(base + lay.acc);
  w.m = reinterpret_cast<float*>(base + lay.m);
  w.l = reinterpret_cast<float*>(base + lay.l);
  w.patches_per_split = ceil_div(ceil_div(p.patches, splits), P) * P;
  w.splits = static_cast<int>(ceil_div(p.patches, w.patches_per_split));

  const int64_t packed = p.features * p.hidden;
  const int pack_blocks = static_cast<int>(ceil_div(packed, kThreads) < 1024 ? ceil_div(packed, kThreads) : 1024);
  HS_LAUNCH(gap_pack_kernel<T>, pack_blocks, kThreads, 0, stream)(p, w);

  const size_t smem = split_smem_bytes<P>(p.features);
  auto split_kernel = gap_split_kernel<T, P>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  HS_LAUNCH(split_kernel, dim3(static_cast<unsigned>(p.batch), w.splits), kThreads, smem, stream)(p, w);
  HS_LAUNCH(gap_merge_kernel<T>, static_cast<unsigned>(p.batch), kThreads, w.splits * sizeof(float), stream)(p, w);
  return cudaGetLastError();
}

// 16 patches per tile when the tile fits in ~100 KB of shared memory, else 8.
template <typename T>
cudaError_t dispatch_tile(const hs_gap_params& p, int splits, void* workspace, cudaStream_t stream) {
  if (split_smem_bytes<16>(p.features) <= 100 * 1024) return launch<T, 16>(p, splits, workspace, stream);
  if (split_smem_bytes<8>(p.features) <= static_cast<size_t>(device_max_smem())) return launch<T, 8>(p, splits, workspace, stream);
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace hs

extern "C" int hs_gap_num_splits(const hs_gap_params* p) {
  using namespace hs;
  const int64_t want = ceil_div(2 * int64_t(device_sm_count()), p->batch < 1 ? 1 : p->batch);
  const int64_t most = ceil_div(p->patches, 16);
  const int64_t splits = want < most ? want : most;
  return static_cast<int>(splits < 1 ? 1 : (splits > 1024 ? 1024 : splits));
}

extern "C" size_t hs_gap_workspace_bytes(const hs_gap_params* p, int num_splits) {
  return hs::Layout(*p, num_splits).total;
}

extern "C" cudaError_t hs_gated_attention_pool(const hs_gap_params* p, int num_splits, void* workspace,
                                               cudaStream_t stream) {
  using namespace hs;
  if (p == nullptr || p->h == nullptr || p->wa == nullptr || p->ba == nullptr || p->wb == nullptr ||
      p->bb == nullptr || p->wc == nullptr || p->bc == nullptr || p->pooled == nullptr ||
      p->weights == nullptr || workspace == nullptr || num_splits < 1 || num_splits > 65535)
    return cudaErrorInvalidValue;
  if (p->batch < 1 || p->patches < 1 || p->features < 1 || p->hidden < 1 || p->batch > 2147483647)
    return cudaErrorInvalidValue;
  switch (p->dtype) {
    case HS_FLOAT32: return dispatch_tile<float>(*p, num_splits, workspace, stream);
    case HS_FLOAT16: return dispatch_tile<__half>(*p, num_splits, workspace, stream);
    case HS_BFLOAT16: return dispatch_tile<__nv_bfloat16>(*p, num_splits, workspace, stream);
  }
  return cudaErrorInvalidValue;
}
