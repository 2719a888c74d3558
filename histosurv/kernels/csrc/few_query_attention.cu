// Few-query attention split over the keys (flash-decoding), for M <= ~32 queries over N up to 256k keys.
//
// Grid (B*H, splits). Each block streams its slice of K and V once from global memory in tiles of
// kTileN rows (16-byte cp.async copies into a double-buffered shared-memory tile), and for every tile:
//   1. scores S[m, j] = q_m . k_j * scale * log2(e) for all M queries (FP32, q held in shared memory),
//   2. online softmax per query: running max and sum, P = exp2(S - max), rescale factor alpha,
//   3. O[m, :] = alpha_m * O[m, :] + sum_j P[m, j] v_j (FP32, in shared memory).
// It writes its unnormalised O, max and sum; fqa_merge_kernel combines the splits of each (b, h, m).
// Head dims 1..512 run in a kernel instantiated for the padded size (32, 64, 128, 256, 512).
#include "hs_common.cuh"

namespace hs {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 8;  // queries whose accumulators one thread keeps in registers at a time
constexpr float kLog2e = 1.4426950408889634f;

// Keys per tile: about 8 KB of K (and 8 KB of V) per stage, 8 to 64 rows.
constexpr int tile_rows(int elem_bytes, int d_pad) { return cmax(8, cmin(64, 8192 / (d_pad * elem_bytes))); }

template <typename T, int D_PAD> struct Shape {
  static constexpr int kTileN = tile_rows(sizeof(T), D_PAD);
  static constexpr int kVec = 16 / sizeof(T);   // elements per 16-byte copy
  static constexpr int kRow = D_PAD + kVec;     // shared row stride: +16 bytes keeps rows off one bank
  static constexpr int kChunks = D_PAD / 8;     // 8-element chunks per row
};

template <typename T, int D_PAD> size_t smem_bytes(int M) {
  using S = Shape<T, D_PAD>;
  const size_t kv = size_t(4) * S::kTileN * S::kRow * sizeof(T);  // 2 stages x (K, V)
  return kv + size_t(M) * (2 * D_PAD + S::kTileN + 3) * sizeof(float);  // q, O, S, max, sum, alpha
}

struct Work {
  float* o;      // (B*H, splits, M, d) unnormalised partial outputs
  float* m;      // (B*H, splits, M) running max (log2 domain)
  float* l;      // (B*H, splits, M) running sum
  int splits;
  int64_t keys_per_split;  // a multiple of the tile size
  bool vec_k, vec_v;       // 16-byte copies allowed (aligned base, strides and d)
};

// Copy `rows` rows of d elements into a shared tile; columns past d keep the zeros written at start.
template <typename T, int D_PAD>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row_stride, int rows, int d, bool vec) {
  using S = Shape<T, D_PAD>;
  if (vec) {
    const int nv = d / S::kVec;
    for (int i = threadIdx.x; i < rows * nv; i += kThreads) {
      const int r = i / nv, c = (i - r * nv) * S::kVec;
      cp_async16(dst + r * S::kRow + c, src + r * row_stride + c);
    }
  } else {
    for (int i = threadIdx.x; i < rows * d; i += kThreads) {
      const int r = i / d, c = i - r * d;
      dst[r * S::kRow + c] = src[r * row_stride + c];
    }
  }
}

// Step 1: S[m, j] for the tile, -inf for rows past the slice and masked keys. Work items are
// (key j, group of 8 queries, part of d); when few (small M or tile), d is split over up to 32
// neighbouring lanes and the partial dot products are summed with shuffles.
template <typename T, int D_PAD>
__device__ void tile_scores(const T* ks, const float* qs, float* ss, int M, int nchunks, int rows,
                            const uint8_t* mask_row, int64_t mask_stride, int64_t key0) {
  using S = Shape<T, D_PAD>;
  const int pairs = S::kTileN * ((M + kGroup - 1) / kGroup);
  int dsplit = 1;
  while (dsplit * 2 * pairs <= kThreads && dsplit * 2 <= nchunks && dsplit < 32) dsplit *= 2;
  for (int base = 0; base < pairs * dsplit; base += kThreads) {
    const int item = base + threadIdx.x;
    const int part = item % dsplit, pair = item / dsplit;
    const int j = pair % S::kTileN, g = pair / S::kTileN;
    const bool active = pair < pairs;
    const int mcount = active ? min(kGroup, M - g * kGroup) : 0;
    float acc[kGroup];
#pragma unroll
    for (int i = 0; i < kGroup; ++i) acc[i] = 0.f;
    if (active) {
      const T* krow = ks + j * S::kRow;
      const float* qg = qs + g * kGroup * D_PAD;
      for (int c = part; c < nchunks; c += dsplit) {
        float kx[8];
        load8(krow + c * 8, kx);
#pragma unroll
        for (int i = 0; i < kGroup; ++i) {
          if (i < mcount) {
            const float4 a = *reinterpret_cast<const float4*>(qg + i * D_PAD + c * 8);
            const float4 b = *reinterpret_cast<const float4*>(qg + i * D_PAD + c * 8 + 4);
            acc[i] += a.x * kx[0] + a.y * kx[1] + a.z * kx[2] + a.w * kx[3] +
                      b.x * kx[4] + b.y * kx[5] + b.z * kx[6] + b.w * kx[7];
          }
        }
      }
    }
    if (dsplit > 1) {  // uniform: one pass in which every thread takes part
      for (int o = dsplit >> 1; o > 0; o >>= 1) {
#pragma unroll
        for (int i = 0; i < kGroup; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
      }
    }
    if (active && part == 0) {
      const bool valid = j < rows && (mask_row == nullptr || mask_row[(key0 + j) * mask_stride] != 0);
#pragma unroll
      for (int i = 0; i < kGroup; ++i)
        if (i < mcount) ss[(g * kGroup + i) * S::kTileN + j] = valid ? acc[i] : -INFINITY;
    }
  }
}

// Step 2: one warp per query row: new running max, P = exp2(S - max) in place, running sum, alpha.
template <int TN>
__device__ void tile_softmax(float* ss, float* run_m, float* run_l, float* alpha, int M) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int m = warp; m < M; m += kWarps) {
    float* row = ss + m * TN;
    float mx = -INFINITY;
    for (int j = lane; j < TN; j += 32) mx = fmaxf(mx, row[j]);
    mx = warp_max(mx);
    const float m_old = run_m[m];
    const float m_new = fmaxf(m_old, mx);
    const bool none = m_new == -INFINITY;  // every key so far masked: keep zeros, avoid inf - inf
    const float a = none ? 1.f : exp2f(m_old - m_new);
    float sum = 0.f;
    for (int j = lane; j < TN; j += 32) {
      const float pj = none ? 0.f : exp2f(row[j] - m_new);
      row[j] = pj;
      sum += pj;
    }
    sum = warp_sum(sum);
    if (lane == 0) {
      run_m[m] = m_new;
      run_l[m] = run_l[m] * a + sum;
      alpha[m] = a;
    }
  }
}

// Step 3: thread = (8-column chunk of d, query slot); it updates up to 8 queries' chunks at a time.
template <typename T, int D_PAD>
__device__ void tile_accumulate(const T* vs, const float* ss, const float* alpha, float* os, int M,
                                int nchunks, int rows) {
  using S = Shape<T, D_PAD>;
  constexpr int kSlots = kThreads / S::kChunks;
  const int c = threadIdx.x % S::kChunks, slot = threadIdx.x / S::kChunks;
  if (c >= nchunks) return;
  for (int m0 = slot; m0 < M; m0 += kSlots * kGroup) {
    float acc[kGroup][8];
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      const int m = m0 + i * kSlots;
      const float a = m < M ? alpha[m] : 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[i][e] = m < M ? os[m * D_PAD + c * 8 + e] * a : 0.f;
    }
#pragma unroll 4
    for (int j = 0; j < rows; ++j) {  // unrolled so that several V rows' loads are in flight
      float vx[8];
      load8(vs + j * S::kRow + c * 8, vx);
#pragma unroll
      for (int i = 0; i < kGroup; ++i) {
        const int m = m0 + i * kSlots;
        if (m < M) {
          const float pj = ss[m * S::kTileN + j];
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[i][e] += pj * vx[e];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      const int m = m0 + i * kSlots;
      if (m < M) {
#pragma unroll
        for (int e = 0; e < 8; ++e) os[m * D_PAD + c * 8 + e] = acc[i][e];
      }
    }
  }
}

template <typename T, int D_PAD>
__global__ void __launch_bounds__(kThreads) fqa_split_kernel(hs_fqa_params p, Work w) {
  using S = Shape<T, D_PAD>;
  constexpr int TN = S::kTileN;
  HS_DYNAMIC_SMEM(unsigned char, smem_raw);
  const int M = static_cast<int>(p.queries), d = static_cast<int>(p.head_dim);
  T* kv = reinterpret_cast<T*>(smem_raw);                        // [stage][K, V][TN][kRow]
  float* qs = reinterpret_cast<float*>(kv + 4 * TN * S::kRow);    // [M][D_PAD], pre-scaled
  float* os = qs + M * D_PAD;                                     // [M][D_PAD]
  float* ss = os + M * D_PAD;                                     // [M][TN]
  float* run_m = ss + M * TN;
  float* run_l = run_m + M;
  float* alpha = run_l + M;

  const int64_t bh = blockIdx.x, b = bh / p.heads, h = bh % p.heads;
  const int split = blockIdx.y;
  const int64_t key_begin = split * w.keys_per_split;
  const int64_t key_end = min(p.keys, key_begin + w.keys_per_split);
  const T* q = static_cast<const T*>(p.q) + b * p.q_stride[0] + h * p.q_stride[1];
  const T* k = static_cast<const T*>(p.k) + b * p.k_stride[0] + h * p.k_stride[1];
  const T* v = static_cast<const T*>(p.v) + b * p.v_stride[0] + h * p.v_stride[1];
  const uint8_t* mask_row = p.key_mask ? p.key_mask + b * p.mask_stride[0] : nullptr;

  const float qscale = p.scale * kLog2e;  // exp2 in the softmax
  for (int i = threadIdx.x; i < M * D_PAD; i += kThreads) {
    const int m = i / D_PAD, c = i - m * D_PAD;
    qs[i] = c < d ? to_float(q[m * p.q_stride[2] + c]) * qscale : 0.f;
    os[i] = 0.f;
  }
  for (int m = threadIdx.x; m < M; m += kThreads) {
    run_m[m] = -INFINITY;
    run_l[m] = 0.f;
  }
  for (int i = threadIdx.x; i < 4 * TN * S::kRow; i += kThreads) kv[i] = from_float<T>(0.f);
  __syncthreads();

  const int nchunks = (d + 7) / 8;
  const int n_tiles = static_cast<int>((key_end - key_begin + TN - 1) / TN);
  auto issue = [&](int t) {
    const int64_t key0 = key_begin + int64_t(t) * TN;
    const int rows = static_cast<int>(min(static_cast<int64_t>(TN), key_end - key0));
    T* kdst = kv + (t & 1) * 2 * TN * S::kRow;
    load_tile<T, D_PAD>(kdst, k + key0 * p.k_stride[2], p.k_stride[2], rows, d, w.vec_k);
    load_tile<T, D_PAD>(kdst + TN * S::kRow, v + key0 * p.v_stride[2], p.v_stride[2], rows, d, w.vec_v);
    cp_async_commit();
  };
  issue(0);
  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) {  // prefetch the next tile into the other stage while this one is used
      issue(t + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int64_t key0 = key_begin + int64_t(t) * TN;
    const int rows = static_cast<int>(min(static_cast<int64_t>(TN), key_end - key0));
    const T* ks = kv + (t & 1) * 2 * TN * S::kRow;
    tile_scores<T, D_PAD>(ks, qs, ss, M, nchunks, rows, mask_row, p.mask_stride[1], key0);
    __syncthreads();
    tile_softmax<TN>(ss, run_m, run_l, alpha, M);
    __syncthreads();
    tile_accumulate<T, D_PAD>(ks + TN * S::kRow, ss, alpha, os, M, nchunks, rows);
    __syncthreads();
  }

  const int64_t part = bh * w.splits + split;
  float* wo = w.o + part * M * d;
  for (int i = threadIdx.x; i < M * d; i += kThreads) {
    const int m = i / d, c = i - m * d;
    wo[i] = os[m * D_PAD + c];
  }
  for (int m = threadIdx.x; m < M; m += kThreads) {
    w.m[part * M + m] = run_m[m];
    w.l[part * M + m] = run_l[m];
  }
}

// Grid (B*H, M): out = sum_s 2^(m_s - max) O_s / sum_s 2^(m_s - max) l_s; zeros if every key is masked.
template <typename T>
__global__ void __launch_bounds__(kThreads) fqa_merge_kernel(hs_fqa_params p, Work w) {
  HS_DYNAMIC_SMEM(float, weight);  // [splits]
  const int M = static_cast<int>(p.queries), d = static_cast<int>(p.head_dim), S = w.splits;
  const int64_t bh = blockIdx.x;
  const int m = blockIdx.y;
  float mx = -INFINITY;
  for (int s = threadIdx.x; s < S; s += kThreads) mx = fmaxf(mx, w.m[(bh * S + s) * M + m]);
  mx = block_reduce<kThreads, true>(mx);
  float total = 0.f;
  for (int s = threadIdx.x; s < S; s += kThreads) {
    const float ms = w.m[(bh * S + s) * M + m];
    const float ws = ms == -INFINITY ? 0.f : exp2f(ms - mx);
    weight[s] = ws;
    total += ws * w.l[(bh * S + s) * M + m];
  }
  total = block_reduce<kThreads, false>(total);  // also makes `weight` visible to every thread
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* out = static_cast<T*>(p.out) + (bh * M + m) * d;
  for (int c = threadIdx.x; c < d; c += kThreads) {
    float acc = 0.f;
    for (int s = 0; s < S; ++s) acc += weight[s] * w.o[((bh * S + s) * M + m) * d + c];
    out[c] = from_float<T>(acc * inv);
  }
}

// 16-byte copies need the base, every stride of a dimension longer than 1, and d to be 16-byte multiples.
bool vectorizable(const void* ptr, const int64_t* stride, const int64_t* sizes, int64_t d, int elem) {
  const int64_t vec = 16 / elem;
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0 || d % vec != 0) return false;
  for (int i = 0; i < 3; ++i)
    if (sizes[i] > 1 && stride[i] % vec != 0) return false;
  return true;
}

template <typename T, int D_PAD>
cudaError_t launch(const hs_fqa_params& p, int splits, void* workspace, cudaStream_t stream) {
  using S = Shape<T, D_PAD>;
  const int M = static_cast<int>(p.queries);
  const size_t smem = smem_bytes<T, D_PAD>(M);
  if (smem > static_cast<size_t>(device_max_smem())) return cudaErrorInvalidValue;
  const int64_t bh = p.batch * p.heads;
  Work w;
  w.keys_per_split = ceil_div(ceil_div(p.keys, splits), S::kTileN) * S::kTileN;
  w.splits = static_cast<int>(ceil_div(p.keys, w.keys_per_split));  // <= splits
  w.o = static_cast<float*>(workspace);
  w.m = w.o + bh * splits * M * p.head_dim;
  w.l = w.m + bh * splits * M;
  const int64_t k_sizes[3] = {p.batch, p.heads, p.keys};
  w.vec_k = vectorizable(p.k, p.k_stride, k_sizes, p.head_dim, sizeof(T));
  w.vec_v = vectorizable(p.v, p.v_stride, k_sizes, p.head_dim, sizeof(T));

  auto split_kernel = fqa_split_kernel<T, D_PAD>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(split_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  HS_LAUNCH(split_kernel, dim3(static_cast<unsigned>(bh), w.splits), kThreads, smem, stream)(p, w);
  HS_LAUNCH(fqa_merge_kernel<T>, dim3(static_cast<unsigned>(bh), M), kThreads, w.splits * sizeof(float), stream)(p, w);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_dim(const hs_fqa_params& p, int splits, void* workspace, cudaStream_t stream) {
  const int64_t d = p.head_dim;
  if (d <= 32) return launch<T, 32>(p, splits, workspace, stream);
  if (d <= 64) return launch<T, 64>(p, splits, workspace, stream);
  if (d <= 128) return launch<T, 128>(p, splits, workspace, stream);
  if (d <= 256) return launch<T, 256>(p, splits, workspace, stream);
  return launch<T, 512>(p, splits, workspace, stream);
}

int padded_dim(int64_t d) {
  int pad = 32;
  while (pad < d) pad *= 2;
  return pad;
}

}  // namespace
}  // namespace hs

extern "C" int hs_fqa_num_splits(const hs_fqa_params* p) {
  using namespace hs;
  const int tn = tile_rows(elem_size(p->dtype), padded_dim(p->head_dim));
  const int64_t bh = cmax(1, static_cast<int>(p->batch * p->heads));
  const int64_t want = ceil_div(4 * int64_t(device_sm_count()), bh);  // ~4 blocks per SM
  const int64_t most = ceil_div(p->keys, 4 * int64_t(tn));            // at least 4 tiles per split
  int64_t splits = want < most ? want : most;
  return static_cast<int>(splits < 1 ? 1 : (splits > 1024 ? 1024 : splits));
}

extern "C" size_t hs_fqa_workspace_bytes(const hs_fqa_params* p, int num_splits) {
  const int64_t rows = p->batch * p->heads * int64_t(num_splits) * p->queries;
  return hs::align16(size_t(rows) * size_t(p->head_dim + 2) * sizeof(float));
}

extern "C" cudaError_t hs_few_query_attention(const hs_fqa_params* p, int num_splits, void* workspace,
                                              cudaStream_t stream) {
  using namespace hs;
  if (p == nullptr || p->q == nullptr || p->k == nullptr || p->v == nullptr || p->out == nullptr ||
      workspace == nullptr || num_splits < 1 || num_splits > 65535)
    return cudaErrorInvalidValue;
  if (p->head_dim < 1 || p->head_dim > HS_MAX_HEAD_DIM || p->queries < 1 || p->queries > 65535 ||
      p->keys < 1 || p->batch * p->heads < 1)
    return cudaErrorInvalidValue;
  switch (p->dtype) {
    case HS_FLOAT32: return dispatch_dim<float>(*p, num_splits, workspace, stream);
    case HS_FLOAT16: return dispatch_dim<__half>(*p, num_splits, workspace, stream);
    case HS_BFLOAT16: return dispatch_dim<__nv_bfloat16>(*p, num_splits, workspace, stream);
  }
  return cudaErrorInvalidValue;
}
