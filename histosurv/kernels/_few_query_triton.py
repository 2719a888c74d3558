"""Split-KV attention for a few queries over a long bag (flash-decoding), in Triton.

Two kernels. ``_split_kernel`` runs one program per (batch x head, slice of the keys): it loads the
head's M queries once, streams its slice of K and V in BLOCK_N tiles, and keeps, for all M queries at
once, an online-softmax running max, running sum and unnormalised output (so K and V are read once,
whatever M). It writes those three partials to an FP32 scratch buffer. ``_merge_kernel`` runs one
program per (batch x head, query) and rescales the partials of every split to the global max.

FlashAttention parallelises over queries; with 6 queries that is one program per head, a few dozen
programs on a 132-SM GPU. Splitting the keys instead gives each SM several programs, which is what a
bandwidth-bound read of K and V needs.

Importing this module imports triton: callers go through :mod:`histosurv.kernels.few_query`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import Launch, launch_all, next_pow2, split_bag

LOG2E = 1.4426950408889634  # scores are kept in base 2: exp2 is the native instruction


@triton.jit
def _split_kernel(
    Q, K, V, MASK, O_PART, M_PART, L_PART,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mn,
    H, M, N, D, tokens_per_split, qk_scale,
    HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, VEC: tl.constexpr,
):
    # VEC (from the wrapper) divides D, the K/V strides and the base offsets. Triton learns only "divisible
    # by 16" from the arguments themselves, so a padded head dim (AMMASurv's 68) would load K and V one
    # element at a time and never pipeline them. x // VEC * VEC is x, but tells the compiler (checked in
    # the PTX for sm_90: 8-byte cp.async for d = 68 instead of 2-byte loads); tl.multiple_of cannot
    # annotate a kernel argument.
    D = D // VEC * VEC
    stride_kb, stride_kh, stride_kn = stride_kb // VEC * VEC, stride_kh // VEC * VEC, stride_kn // VEC * VEC
    stride_vb, stride_vh, stride_vn = stride_vb // VEC * VEC, stride_vh // VEC * VEC, stride_vn // VEC * VEC
    bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = (bh // H).to(tl.int64)  # int64: b * stride_kb passes 2^31 elements on large batches
    h = (bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D  # head dims that are not a power of two are padded with masked lanes

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < M) & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    first = start.to(tl.int64)
    k_ptrs = K + b * stride_kb + h * stride_kh + (first + offs_n[:, None]) * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b * stride_vb + h * stride_vh + (first + offs_n[:, None]) * stride_vn + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the base-2 scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running sum of exp2(score - m_i) * v
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        keep = cols < end
        k = tl.load(k_ptrs, mask=keep[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(v_ptrs, mask=keep[:, None] & d_ok[None, :], other=0.0)
        if HAS_MASK:
            key_ok = tl.load(MASK + b * stride_mb + cols * stride_mn, mask=keep, other=0)
            keep = keep & (key_ok != 0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with no kept key yet has m_new = -inf: shift by 0 so exp2 gives 0, not NaN
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_shift)
        p = tl.math.exp2(s - m_shift[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn

    row = (bh * n_splits + split) * M + offs_m  # partials laid out (B*H, splits, M[, D])
    row_ok = offs_m < M
    tl.store(M_PART + row, m_i, mask=row_ok)
    tl.store(L_PART + row, l_i, mask=row_ok)
    tl.store(O_PART + row[:, None] * D + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_kernel(O_PART, M_PART, L_PART, OUT, M, D, n_splits, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)  # one program per (batch x head, query)
    bh = pid // M
    m = pid % M
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    part = (bh * n_splits + offs_s) * M + m
    ok = offs_s < n_splits
    m_s = tl.load(M_PART + part, mask=ok, other=float("-inf"))
    m_max = tl.max(m_s, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every key masked: all weights 0
    l = tl.sum(tl.math.exp2(m_s - m_max) * tl.load(L_PART + part, mask=ok, other=0.0), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s in range(0, n_splits):  # splits one at a time: (splits x D) at once would not fit registers
        row = (bh * n_splits + s) * M + m
        w = tl.math.exp2(tl.load(M_PART + row) - m_max)
        acc += w * tl.load(O_PART + row * D + offs_d, mask=offs_d < D, other=0.0)
    out = acc / tl.where(l == 0.0, 1.0, l)  # no kept key anywhere: acc is 0, so the output is 0
    tl.store(OUT + pid * D + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < D)


def block_sizes(m: int, d: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): tl.dot wants every side >= 16; wide heads take fewer keys per tile
    so that one tile of K and V (x pipeline stages) stays within shared memory."""
    block_m, block_d = max(16, next_pow2(m)), max(16, next_pow2(d))
    block_n = 64 if block_d <= 128 else 32 if block_d <= 256 else 16
    return block_m, block_n, block_d


def vector_width(tensors, d: int) -> int:
    """The widest vector (elements, up to 16 bytes) that divides d and every K/V stride but the unit one;
    1 when d is strided. Strides may be symbolic while exporting (the batch stride is N x H x d): a
    width counts only where the division is known to hold for every N. The base addresses need no
    check: Triton assumes a pointer is aligned only when it is, and then the loads widen."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if any(t.stride(-1) != 1 for t in tensors):
        return 1
    values = [d, *(s for t in tensors for s in t.stride()[:-1])]
    width = 16 // tensors[0].element_size()
    while width > 1 and not all(statically_known_true(v % width == 0) for v in values):
        width //= 2
    return width


def stages(block_n: int, block_d: int, element_size: int) -> int:
    """Pipeline depth: as many K/V tile buffers in flight as fit in ~96 KB of shared memory, up to 3."""
    per_stage = 2 * block_n * block_d * element_size  # one tile of K and one of V
    return max(1, min(3, 96 * 1024 // per_stage))


def few_query_attention_triton(q, k, v, key_mask, scale: float) -> torch.Tensor:
    """(B, H, M, d) x (B, H, N, d) -> (B, H, M, d); inputs already checked by the public wrapper."""
    out, launches = plan(q, k, v, key_mask, scale)
    launch_all(launches)
    return out


def plan(q, k, v, key_mask, scale: float) -> tuple[torch.Tensor, list[Launch]]:
    """The output buffer and the two launches that fill it."""
    B, H, M, D = q.shape
    N = k.shape[2]
    block_m, block_n, block_d = block_sizes(M, D)
    splits, per_split, max_splits = split_bag(N, B * H, block_n, q.device)
    # partials sized for the most splits any N takes: a size that is a function of N would make
    # torch.export guard on it (== 1, != 0) and specialise the bag size
    o_part = torch.empty(B * H, max_splits, M, D, device=q.device, dtype=torch.float32)
    m_part = torch.empty(B * H, max_splits, M, device=q.device, dtype=torch.float32)
    l_part = torch.empty_like(m_part)
    out = torch.empty(B, H, M, D, device=q.device, dtype=q.dtype)
    mask = key_mask.view(torch.uint8) if key_mask is not None else q  # a bool is one byte; q: unused pointer
    mask_strides = key_mask.stride() if key_mask is not None else (0, 0)
    # FP32 inputs get true FP32 products (the default would be TF32 on tensor cores: ~1e-3 off)
    precision = "ieee" if q.dtype == torch.float32 else None
    split = Launch(_split_kernel, (B * H, splits), (
        q, k, v, mask, o_part, m_part, l_part, *q.stride(), *k.stride(), *v.stride(), *mask_strides,
        H, M, N, D, per_split, scale * LOG2E,
    ), dict(
        HAS_MASK=key_mask is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PRECISION=precision,
        VEC=vector_width((k, v), D), num_warps=4 if block_d <= 128 else 8, num_stages=stages(block_n, block_d, q.element_size()),
    ))
    merge = Launch(_merge_kernel, (B * H * M,), (o_part, m_part, l_part, out, M, D, splits), dict(
        BLOCK_S=max(16, next_pow2(max_splits)), BLOCK_D=block_d, num_warps=4,
    ))
    return out, [split, merge]
