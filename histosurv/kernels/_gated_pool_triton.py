"""Gated attention pooling (ABMIL's ``Attn_Net_Gated`` + softmax + weighted sum) in one pass, in Triton.

``_pool_split_kernel`` runs one program per (bag, slice of the N tokens). For each tile of BLOCK_N
tokens it loads h once, computes the scores s = w_c . (tanh(W_a h + b_a) * sigmoid(W_b h + b_b)) + b_c
in chunks of BLOCK_DH hidden units, writes them raw (base 2) to the (B, N) score buffer, and folds the
tile into an online softmax: running max, running sum and running sum of exp(s - max) * h. The
weights need the global max and sum, so ``_pool_merge_kernel`` normalises the raw scores and merges
the pooled partials; h itself is read once.

Importing this module imports triton: callers go through :mod:`histosurv.kernels.gated_pool`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import Launch, cdiv, launch_all, next_pow2, split_bag

LOG2E = tl.constexpr(1.4426950408889634)  # a jit function reads globals only when they are constexpr


@triton.jit
def _tanh(x):
    # tanh(x) = 2 sigmoid(2x) - 1: the interpreter and every backend have sigmoid
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _pool_split_kernel(
    H, WA, BA, WB, BB, WC, BC, SCORES, ACC_PART, M_PART, L_PART,
    stride_hb, stride_hn, stride_hl,
    N, L, DH, tokens_per_split,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DH: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    offs_j = tl.arange(0, BLOCK_DH)
    l_ok = offs_l < L  # feature widths that are not a power of two are padded with masked lanes

    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    h_ptrs = H + b * stride_hb + (start.to(tl.int64) + offs_n[:, None]) * stride_hn + offs_l[None, :] * stride_hl
    b_c = tl.load(BC).to(tl.float32)

    m_i = tl.full([1], float("-inf"), tl.float32)  # running max of the base-2 scores
    l_i = tl.zeros([1], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_L], tl.float32)  # running sum of exp2(s - m_i) * h
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + offs_n
        keep = rows < end
        h = tl.load(h_ptrs, mask=keep[:, None] & l_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_L)
        s = tl.zeros([BLOCK_N], tl.float32)
        for j0 in range(0, DH, BLOCK_DH):  # hidden units in chunks: W_a, W_b are (DH, L), too big at once
            js = j0 + offs_j
            j_ok = js < DH
            w_offs = js[:, None] * L + offs_l[None, :]  # weights made contiguous by the wrapper
            w_ok = j_ok[:, None] & l_ok[None, :]
            wa = tl.load(WA + w_offs, mask=w_ok, other=0.0)  # (BLOCK_DH, BLOCK_L)
            wb = tl.load(WB + w_offs, mask=w_ok, other=0.0)
            a = tl.dot(h, tl.trans(wa), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_DH)
            g = tl.dot(h, tl.trans(wb), input_precision=DOT_PRECISION)
            a += tl.load(BA + js, mask=j_ok, other=0.0).to(tl.float32)[None, :]
            g += tl.load(BB + js, mask=j_ok, other=0.0).to(tl.float32)[None, :]
            w_c = tl.load(WC + js, mask=j_ok, other=0.0).to(tl.float32)  # padded units: w_c = 0
            s += tl.sum(_tanh(a) * tl.sigmoid(g) * w_c[None, :], 1)
        s = (s + b_c) * LOG2E
        tl.store(SCORES + b * N + rows, s, mask=keep)  # raw: normalised by the merge
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))  # finite: every tile holds at least one token
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new)  # (BLOCK_N,)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * h.to(tl.float32), 0)
        m_i = m_new
        h_ptrs += BLOCK_N * stride_hn

    part = b * n_splits + split  # partials laid out (B, splits[, L])
    one = tl.arange(0, 1)
    tl.store(M_PART + part + one, m_i)
    tl.store(L_PART + part + one, l_i)
    tl.store(ACC_PART + part * L + offs_l, acc, mask=l_ok)


@triton.jit
def _pool_merge_kernel(
    SCORES, ACC_PART, M_PART, L_PART, WEIGHTS, POOLED, N, L, n_splits,
    BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)  # this program normalises scores [blk * BLOCK_W, (blk + 1) * BLOCK_W)
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < n_splits
    m_s = tl.load(M_PART + b * n_splits + offs_s, mask=s_ok, other=float("-inf"))
    m_max = tl.max(m_s, 0)  # finite: N >= 1 and no split is empty
    l = tl.sum(tl.math.exp2(m_s - m_max) * tl.load(L_PART + b * n_splits + offs_s, mask=s_ok, other=0.0), 0)

    rows = blk * BLOCK_W + tl.arange(0, BLOCK_W)
    s = tl.load(SCORES + b * N + rows, mask=rows < N, other=float("-inf"))
    tl.store(WEIGHTS + b * N + rows, (tl.math.exp2(s - m_max) / l).to(WEIGHTS.dtype.element_ty), mask=rows < N)

    if blk == 0:  # one program per bag also merges the pooled vector
        offs_l = tl.arange(0, BLOCK_L)
        acc = tl.zeros([BLOCK_L], tl.float32)
        for sp in range(0, n_splits):
            w = tl.math.exp2(tl.load(M_PART + b * n_splits + sp) - m_max)
            acc += w * tl.load(ACC_PART + (b * n_splits + sp) * L + offs_l, mask=offs_l < L, other=0.0)
        tl.store(POOLED + b * L + offs_l, (acc / l).to(POOLED.dtype.element_ty), mask=offs_l < L)


def block_sizes(l: int, element_size: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_L, BLOCK_DH): 16 tokens x the whole (padded) L per tile, so h is read once, and 32
    hidden units per weight chunk in 16-bit (16 in FP32). Chosen by compiling ahead of time for sm_80 and
    sm_90 with ptxas: at L = 512 (ABMIL) the 16-bit kernel uses ~180 registers and spills nothing; larger
    tiles spill. tl.dot wants every side >= 16."""
    return 16, max(16, next_pow2(l)), (32 if element_size <= 2 else 16)


def gated_attention_pool_triton(h, w_a, b_a, w_b, b_b, w_c, b_c) -> tuple[torch.Tensor, torch.Tensor]:
    """h (B, N, L); W_a, W_b (DH, L) contiguous in h's dtype; b_a, b_b, w_c (DH,); b_c (1,).
    Returns pooled (B, L) and weights (B, N), both in h's dtype."""
    pooled, weights, launches = plan(h, w_a, b_a, w_b, b_b, w_c, b_c)
    launch_all(launches)
    return pooled, weights


def plan(h, w_a, b_a, w_b, b_b, w_c, b_c) -> tuple[torch.Tensor, torch.Tensor, list[Launch]]:
    """The two output buffers and the two launches that fill them."""
    B, N, L = h.shape
    DH = w_a.shape[0]
    block_n, block_l, block_dh = block_sizes(L, h.element_size())
    splits, per_split, max_splits = split_bag(N, B, block_n, h.device)
    f32 = dict(device=h.device, dtype=torch.float32)
    scores = torch.empty(B, N, **f32)
    # partials sized for the most splits any N takes (a size in N would make torch.export specialise N)
    acc_part = torch.empty(B, max_splits, L, **f32)
    m_part, l_part = torch.empty(B, max_splits, **f32), torch.empty(B, max_splits, **f32)
    weights = torch.empty(B, N, device=h.device, dtype=h.dtype)
    pooled = torch.empty(B, L, device=h.device, dtype=h.dtype)
    precision = "ieee" if h.dtype == torch.float32 else None  # FP32: no TF32 rounding of the scores
    split = Launch(_pool_split_kernel, (B, splits), (
        h, w_a, b_a, w_b, b_b, w_c, b_c, scores, acc_part, m_part, l_part, *h.stride(), N, L, DH, per_split,
    ), dict(BLOCK_N=block_n, BLOCK_L=block_l, BLOCK_DH=block_dh, DOT_PRECISION=precision, num_warps=8, num_stages=1))
    block_w = 1024
    merge = Launch(_pool_merge_kernel, (B, cdiv(N, block_w)), (
        scores, acc_part, m_part, l_part, weights, pooled, N, L, splits,
    ), dict(BLOCK_S=max(16, next_pow2(max_splits)), BLOCK_W=block_w, BLOCK_L=block_l, num_warps=4))
    return pooled, weights, [split, merge]
