"""histosurv.kernels: the Triton kernels and the torch fallbacks against their naive twins.

The Triton kernels run on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``), in one
subprocess that checks every case and reports the errors as JSON: ``triton.jit`` reads the variable
when it decorates a kernel, so setting it in this process would leave the kernels interpreted for
every later test module (a GPU run of the engine tests included). The interpreter is slow: sizes are
small, but cover N = 1, odd N, several splits with several tiles each, padded head dims (AMMASurv's
68 = 544 / 8 heads), 1, 6 and 16 queries, key masks and a fully masked bag.

Tolerances (max absolute difference, inputs ~ N(0, 1)): FP32 1e-5 against an FP32 (attention) or
FP64 (pooling) reference; FP16 2e-3 and BF16 1.6e-2 against the FP32 reference of the same rounded
inputs (the kernels round the softmax weights to the input dtype before the P V product, as
FlashAttention does, and round the output once). BF16 is checked on a GPU only: the interpreter
multiplies BF16 operands of tl.dot as their raw uint16 bits (triton 3.9, interpreter.create_dot).
The ``gpu`` test runs every case, BF16 included, on CUDA, and SDPA parity at N = 64k. The interpreter
never compiles, so one more test compiles the kernels for sm_90 with the ptxas in the triton wheel
(``bench/kernels.py --compile-only``): no GPU needed, and it catches spills and unvectorised loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from histosurv.errors import InputError
from histosurv.export.models.blocks import GatedAttention, attention_pool
from histosurv.kernels import (
    few_query_attention,
    few_query_attention_reference,
    gated_attention_pool,
    gated_attention_pool_reference,
    triton_available,
    triton_unavailable_reason,
)

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 1.6e-2}

# (id, B, H, M, N, d, dtype, mask, layout): mask None | "random" | "empty-bag" (bag 0 fully masked)
ATTENTION_CASES = [
    ("n1-m1-d32", 1, 1, 1, 1, 32, "float32", None, "contiguous"),
    ("n37-m6-d64", 2, 2, 6, 37, 64, "float32", None, "contiguous"),
    ("n257-m16-d68", 1, 2, 16, 257, 68, "float32", None, "contiguous"),
    ("n257-m6-d128-mask", 2, 2, 6, 257, 128, "float32", "random", "contiguous"),
    ("n37-m1-d32-mask", 1, 1, 1, 37, 32, "float32", "random", "contiguous"),
    ("n37-m6-d68-empty-bag", 2, 1, 6, 37, 68, "float32", "empty-bag", "contiguous"),
    ("n20-m6-d256", 1, 1, 6, 20, 256, "float32", None, "contiguous"),
    ("n20-m6-d512", 1, 1, 6, 20, 512, "float32", None, "contiguous"),
    ("n2500-m6-d32-tiles", 1, 1, 6, 2500, 32, "float32", "random", "contiguous"),
    ("n101-m6-d68-heads-view", 1, 8, 6, 101, 68, "float32", None, "heads-view"),
    ("n37-m6-d33-odd-dim", 1, 2, 6, 37, 33, "float32", "random", "contiguous"),  # no vector width divides 33
    ("n300-m6-d64-fp16", 1, 2, 6, 300, 64, "float16", "random", "contiguous"),
    ("n300-m16-d68-bf16", 1, 2, 16, 300, 68, "bfloat16", None, "contiguous"),
]
# (id, B, N, L, DH, n_scores, dtype)
POOL_CASES = [
    ("n1-l32", 1, 1, 32, 16, 1, "float32"),
    ("n37-l48-dh40", 2, 37, 48, 40, 1, "float32"),
    ("n300-l200-dh40-chunks", 1, 300, 200, 40, 1, "float32"),  # 3 chunks of 16 hidden units, 10 splits
    ("n37-l32-two-scores", 1, 37, 32, 16, 2, "float32"),
    ("n300-l32-fp16", 1, 300, 32, 16, 1, "float16"),
    ("n300-l32-bf16", 1, 300, 32, 16, 1, "bfloat16"),
]


# ----------------------------------------------------------------------------- inputs (both processes)


def attention_inputs(B, H, M, N, d, dtype, mask, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    if layout == "heads-view":  # as AMMASurv splits heads: (B, T, H*d) -> (B, H, T, d), not contiguous
        q, k, v = (torch.randn(B, T, H * d, generator=g).to(dt).unflatten(-1, (H, d)).transpose(1, 2) for T in (M, N, N))
    else:
        q, k, v = (torch.randn(B, H, T, d, generator=g).to(dt) for T in (M, N, N))
    key_mask = None
    if mask is not None:
        key_mask = torch.rand(B, N, generator=g) > 0.3
        key_mask[:, 0] = True
        if mask == "empty-bag":
            key_mask[0] = False
    return q, k, v, key_mask


def gated_module(L, DH, n_scores, seed=0):
    torch.manual_seed(seed)
    module = GatedAttention(dim=L, hidden=DH, n_scores=n_scores).eval()
    with torch.no_grad():  # scores of a few units, so the softmax is not flat
        module.attention_c.weight.mul_(4.0)
    return module


def pool_inputs(B, N, L, DH, n_scores, dtype, seed=0):
    module = gated_module(L, DH, n_scores, seed).to(getattr(torch, dtype))
    h = torch.randn(B, N, L, generator=torch.Generator().manual_seed(seed)).to(getattr(torch, dtype))
    return h, module


# ----------------------------------------------------------------------------- the interpreter subprocess


def _run_cases(device: str = "cpu") -> dict:
    """Every case through backend='triton': in the TRITON_INTERPRET=1 subprocess, or on a GPU."""
    results = {}
    for case_id, *args in ATTENTION_CASES:
        if device == "cpu" and args[5] == "bfloat16":
            continue
        q, k, v, key_mask = (t if t is None else t.to(device) for t in attention_inputs(*args))
        results[f"attention/{case_id}"] = _compare(
            lambda: few_query_attention(q, k, v, key_mask, backend="triton"),
            lambda: few_query_attention_reference(q.float(), k.float(), v.float(), key_mask),
        )
    for case_id, *args in POOL_CASES:
        if device == "cpu" and args[5] == "bfloat16":
            continue
        h, module = (t.to(device) for t in pool_inputs(*args))
        results[f"pool/{case_id}"] = _compare(
            lambda: gated_attention_pool(h, module, backend="triton"),
            lambda: gated_attention_pool_reference(h.double(), module),
        )
    return results


def _compare(kernel, reference) -> dict:
    try:
        with torch.no_grad():
            got, want = kernel(), reference()
    except Exception as exc:  # reported per case, so one failure does not hide the others
        return {"error": f"{type(exc).__name__}: {exc}"}
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    return {
        "error": None,
        "finite": all(bool(torch.isfinite(g).all()) for g in got),
        "max_abs": [float((g.double() - w.double()).abs().max()) for g, w in zip(got, want)],
    }


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if not triton_available():
        pytest.skip(triton_unavailable_reason())
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, __file__, "--interpreted-cases"], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ATTENTION_CASES, ids=[c[0] for c in ATTENTION_CASES])
def test_triton_few_query_attention_matches_the_reference(interpreted, case):
    if case[6] == "bfloat16":
        pytest.skip("Triton's interpreter multiplies bfloat16 tl.dot operands as raw bits; checked by the gpu test")
    _assert_within(interpreted[f"attention/{case[0]}"], TOLERANCE[case[6]])


@pytest.mark.parametrize("case", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_triton_gated_attention_pool_matches_the_reference(interpreted, case):
    if case[6] == "bfloat16":
        pytest.skip("Triton's interpreter multiplies bfloat16 tl.dot operands as raw bits; checked by the gpu test")
    _assert_within(interpreted[f"pool/{case[0]}"], TOLERANCE[case[6]])


def _assert_within(result: dict, tolerance: float) -> None:
    assert result["error"] is None, result["error"]
    assert result["finite"]
    assert max(result["max_abs"]) <= tolerance, result  # (output,) or (pooled, weights)


@pytest.mark.gpu
def test_triton_kernels_on_a_gpu_match_the_reference_and_sdpa():
    if not torch.cuda.is_available() or not triton_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a CUDA GPU and triton (compiled, not interpreted)")
    results = _run_cases("cuda")
    dtypes = {f"attention/{c[0]}": c[6] for c in ATTENTION_CASES} | {f"pool/{c[0]}": c[6] for c in POOL_CASES}
    failed = {key: r for key, r in results.items() if r["error"] or not r["finite"] or max(r["max_abs"]) > TOLERANCE[dtypes[key]]}
    assert not failed, failed
    q, k, v, _ = (t if t is None else t.cuda() for t in attention_inputs(1, 8, 6, 65537, 68, "float16", None, "heads-view"))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert float((few_query_attention(q, k, v) - sdpa).abs().max()) <= 1e-3  # the FP16 parity target


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,mask", [("float16", None), ("bfloat16", "random")])
def test_triton_few_query_attention_on_a_256k_bag(dtype, mask):
    """The longest bags served (N = 2^18) split into the most KV chunks the launch plan allows; the
    error is measured against the largest output, since outputs shrink as softmax spreads over N keys."""
    if not torch.cuda.is_available() or not triton_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a CUDA GPU and triton (compiled, not interpreted)")
    q, k, v, key_mask = (t if t is None else t.cuda() for t in attention_inputs(1, 8, 6, 262144, 64, dtype, mask, "contiguous"))
    got = few_query_attention(q, k, v, key_mask, backend="triton")
    want = few_query_attention_reference(q.float(), k.float(), v.float(), key_mask)
    assert got.dtype == q.dtype and torch.isfinite(got).all()
    error = float((got.float() - want).abs().max() / want.abs().max())
    assert error <= TOLERANCE[dtype], error


# ----------------------------------------------------------------------------- torch paths (no triton needed)


@pytest.mark.parametrize("mask", [None, "random", "empty-bag"])
def test_torch_fallback_few_query_attention_matches_the_reference(mask):
    q, k, v, key_mask = attention_inputs(2, 2, 6, 257, 68, "float32", mask, "heads-view")
    got = few_query_attention(q, k, v, key_mask)  # CPU tensors: "auto" takes the SDPA fallback
    want = few_query_attention_reference(q, k, v, key_mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    if mask == "empty-bag":
        assert not got[0].any() and got[1].abs().sum() > 0  # fully masked bag: zeros, documented


def test_torch_fallback_gated_attention_pool_is_attention_pool_of_the_module():
    h, module = pool_inputs(2, 300, 48, 40, 1, "float32")
    pooled, weights = gated_attention_pool(h, module)
    want_pooled, want_weights = attention_pool(module(h), h)
    torch.testing.assert_close(pooled, want_pooled, atol=0, rtol=0)
    torch.testing.assert_close(weights, want_weights, atol=0, rtol=0)
    ref_pooled, ref_weights = gated_attention_pool_reference(h, module)
    torch.testing.assert_close(pooled, ref_pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda q, k, v, m: (q[0], k, v, m), "q must be a 4-d tensor"),
        (lambda q, k, v, m: (q, k.half(), v, m), "must share one dtype"),
        (lambda q, k, v, m: (q, k, v[:, :, :-1], m), "expected k and v of shape"),
        (lambda q, k, v, m: (q, k[..., :-1], v[..., :-1], m), "expected k and v of shape"),
        (lambda q, k, v, m: (q, k, v, m.float()), "key_mask must be a bool tensor"),
        (lambda q, k, v, m: (q, k, v, m[:, :-1]), "key_mask must be a bool tensor"),
        (lambda q, k, v, m: (q.int(), k.int(), v.int(), m), "must share one dtype"),
    ],
)
def test_few_query_attention_rejects_bad_inputs_clearly(mutate, message):
    args = mutate(*attention_inputs(1, 2, 6, 37, 32, "float32", "random", "contiguous"))
    with pytest.raises(InputError, match=message):
        few_query_attention(*args)


def test_gated_attention_pool_rejects_bad_inputs_clearly():
    h, module = pool_inputs(1, 37, 32, 16, 1, "float32")
    with pytest.raises(InputError, match="L = 48 features, the module maps 32 -> 16"):
        gated_attention_pool(torch.randn(1, 37, 48), module)
    with pytest.raises(InputError, match=r"h must be \(B, N, L\)"):
        gated_attention_pool(h[0], module)
    with pytest.raises(InputError, match="expected a GatedAttention"):
        gated_attention_pool(h, torch.nn.Linear(32, 1))
    with pytest.raises(ValueError, match="backend must be one of auto, torch, triton, cuda"):
        gated_attention_pool(h, module, backend="cudnn")
    with pytest.raises(RuntimeError, match="backend='cuda' runs the CUDA C\\+\\+ kernels on CUDA tensors, got cpu"):
        gated_attention_pool(h, module, backend="cuda")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this process runs Triton's interpreter")
def test_forcing_triton_on_cpu_tensors_without_the_interpreter_says_what_is_missing():
    q, k, v, _ = attention_inputs(1, 1, 6, 37, 32, "float32", None, "contiguous")
    expected = "needs CUDA tensors" if triton_available() else "triton cannot be imported"
    with pytest.raises(RuntimeError, match=expected):
        few_query_attention(q, k, v, backend="triton")


def _python(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_importing_the_kernels_does_not_import_triton():
    proc = _python("-c", "import sys, histosurv.kernels; print('triton' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_benchmark_without_a_gpu_says_so_and_exits_0():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/kernels.py would run the real benchmark")
    proc = _python("bench/kernels.py")
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout


def test_benchmark_smoke_runs_through_the_interpreter():
    if not triton_available():
        pytest.skip(triton_unavailable_reason())
    proc = _python("bench/kernels.py", "--interpret", env={"OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "triton" in proc.stdout and "max |diff|" in proc.stdout


def test_kernels_compile_for_an_h100_without_a_gpu():
    """The interpreter never compiles: ptxas (bundled with triton) checks what only a compile shows."""
    if not triton_available():
        pytest.skip(triton_unavailable_reason())
    proc = _python("bench/kernels.py", "--compile-only", "90", "--layouts", "8x68", "--queries", "6")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    split = next(line for line in proc.stdout.splitlines() if "_split_kernel" in line)
    assert "0 B spilled" in split and "cp.async" in split, split  # AMMASurv's d = 68: vector loads, pipelined
    assert proc.stdout.count("sm_90") == 4, proc.stdout


if __name__ == "__main__" and sys.argv[1:] == ["--interpreted-cases"]:
    torch.set_num_threads(2)
    print(json.dumps(_run_cases()))
