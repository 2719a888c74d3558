"""The CUDA C++ kernels (histosurv/kernels/csrc): they compile with nvcc, the CMake build produces the
torch custom-op library, the ops trace with their fake implementations, the kernels' logic matches a
naive torch reference under a CPU emulation of CUDA (g++), and on a GPU the ops match it too.

The build tests need nvcc, cmake and ninja (not a GPU) and skip without them; the parity tests on the
device are marked ``gpu`` and skip without a CUDA device.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from histosurv.kernels import cuda_ops

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "histosurv" / "kernels" / "csrc"
NVCC = shutil.which("nvcc")
CMAKE = shutil.which("cmake")
NINJA = shutil.which("ninja")
ARCH = "90"  # one architecture (H100) keeps the build short; CMakeLists.txt defaults to 80;90

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA compiler) is not installed")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def nvcc_errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.search(r"\berror\b", line, re.IGNORECASE)]


@needs_nvcc
@pytest.mark.parametrize("source", sorted(CSRC.glob("*.cu")), ids=lambda p: p.name)
def test_cu_file_compiles_alone(source, tmp_path):
    obj = tmp_path / f"{source.stem}.o"
    cmd = [NVCC, "-c", "--std=c++17", "-arch=sm_90", f"-I{CSRC}", str(source), "-o", str(obj)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and not nvcc_errors(output), output
    assert obj.stat().st_size > 0


@pytest.fixture(scope="module")
def cmake_build(tmp_path_factory):
    """Configure and build into a temporary directory (Ninja, sm_90 only); returns (build dir, configure
    log, build log)."""
    if NVCC is None or CMAKE is None or NINJA is None:
        pytest.skip("nvcc, cmake and ninja are needed for the CMake build")
    build = tmp_path_factory.mktemp("cmake-build")
    configure = [CMAKE, "-S", str(ROOT), "-B", str(build), "-G", "Ninja", f"-DCMAKE_CUDA_ARCHITECTURES={ARCH}",
                 f"-DCMAKE_CUDA_COMPILER={NVCC}", f"-DPython3_EXECUTABLE={sys.executable}", "-DHISTOSURV_COPY_TO_PACKAGE=OFF"]
    configured = run_logged(configure)
    return build, configured, run_logged([CMAKE, "--build", str(build), "-j", str(os.cpu_count() or 2)])


def run_logged(cmd: list[str]) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{output[-6000:]}"
    return output


def test_cmake_builds_the_kernels_and_the_torch_ops(cmake_build):
    build, configured, built = cmake_build
    assert not nvcc_errors(built), built[-6000:]
    objects = list(build.rglob("few_query_attention.cu.o")) + list(build.rglob("gated_pool.cu.o"))
    assert len(objects) == 2 and all(o.stat().st_size > 0 for o in objects), built[-3000:]
    library = build / cuda_ops.LIBRARY_NAME
    assert library.is_file(), f"torch ops library missing; configure said:\n{configured[-4000:]}"


@pytest.fixture(scope="module")
def ops_loaded(request):
    """The freshly built library, loaded into this process through cuda_ops: the one
    ``$HISTOSURV_KERNELS_LIB`` names when it exists (bench/gpu_check.py builds it moments before the GPU
    tests, for this GPU's architecture), else this module's own CMake build."""
    given = os.environ.get("HISTOSURV_KERNELS_LIB")
    library = Path(given) if given and Path(given).is_file() else request.getfixturevalue("cmake_build")[0] / cuda_ops.LIBRARY_NAME
    os.environ["HISTOSURV_KERNELS_LIB"] = str(library)
    cuda_ops._state.update(loaded=False, error=None, tried=False)
    try:
        if not cuda_ops._load():
            pytest.fail(f"the built library did not load: {cuda_ops.load_error()}")
        yield
    finally:
        if given is None:
            os.environ.pop("HISTOSURV_KERNELS_LIB", None)
        else:
            os.environ["HISTOSURV_KERNELS_LIB"] = given


def test_ops_are_registered_with_fakes(ops_loaded):
    schema = str(torch.ops.histosurv.few_query_attention.default._schema)
    assert "Tensor? key_mask=None" in schema and "float? scale=None" in schema
    q, k = torch.empty(2, 4, 6, 64, device="meta"), torch.empty(2, 4, 1000, 64, device="meta")
    assert torch.ops.histosurv.few_query_attention(q, k, k, None, None).shape == (2, 4, 6, 64)
    h, w = torch.empty(3, 77, 32, device="meta"), torch.empty(16, 32, device="meta")
    b = torch.empty(16, device="meta")
    pooled, weights = torch.ops.histosurv.gated_attention_pool(h, w, b, w, b, torch.empty(1, 16, device="meta"), torch.empty(1, device="meta"))
    assert pooled.shape == (3, 32) and weights.shape == (3, 77)


def test_ops_trace_with_torch_export(ops_loaded):
    class Attend(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.ops.histosurv.few_query_attention(q, k, v, None, 0.125) * 2

    q, k = torch.randn(1, 2, 6, 32), torch.randn(1, 2, 50, 32)
    program = torch.export.export(Attend(), (q, k, k))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert any("histosurv.few_query_attention" in t for t in targets), targets


def test_models_trace_with_the_cuda_ops_in_place_of_sdpa_and_pooling(ops_loaded):
    """What ``histosurv export --add-engine torch --kernels cuda`` compiles (on a GPU): G-HANet's serving
    graph with a dynamic bag size calls the CUDA C++ ops at its three kernel sites."""
    from histosurv.export.models import build_model
    from histosurv.export.torch_export import trace_serving

    config = dict(feature_dim=32, dim=64, heads=4, ffn_mult=2, gate_hidden=16, compress_dim=16)
    program, calls = trace_serving(build_model("ghanet", config).eval(), torch.device("cpu"), kernels="cuda")
    assert calls == {"histosurv.few_query_attention": 2, "histosurv.gated_attention_pool": 1}
    assert len(program.range_constraints) == 1  # the bag size N stayed symbolic through the ops' fakes


def test_op_has_no_cpu_kernel(ops_loaded):
    x = torch.randn(1, 1, 2, 8)
    with pytest.raises(NotImplementedError, match="CPU"):
        torch.ops.histosurv.few_query_attention(x, x, x, None, None)


# --- the kernels' logic on the CPU, through the emulation in csrc/emu -------------------------------
# The .cu sources compile unchanged as C++ against a small CPU stand-in for the CUDA features they use
# (threads per block, barriers, warp shuffles, shared memory; see csrc/emu/cuda_emu.h). The C entry
# points of hs_kernels.h then run on CPU tensors through ctypes, tiles, splits, masks and merges included.

GXX = shutil.which("g++")
I64, F32, PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
HS_DTYPE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class FqaParams(ctypes.Structure):
    _fields_ = [("q", PTR), ("k", PTR), ("v", PTR), ("key_mask", PTR), ("out", PTR), ("batch", I64), ("heads", I64),
                ("queries", I64), ("keys", I64), ("head_dim", I64), ("q_stride", I64 * 3), ("k_stride", I64 * 3),
                ("v_stride", I64 * 3), ("mask_stride", I64 * 2), ("scale", F32), ("dtype", ctypes.c_int)]


class GapParams(ctypes.Structure):
    _fields_ = [(name, PTR) for name in ("h", "wa", "ba", "wb", "bb", "wc", "bc", "pooled", "weights")] + [
        ("batch", I64), ("patches", I64), ("features", I64), ("hidden", I64), ("h_stride", I64 * 2), ("dtype", ctypes.c_int)]


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The kernels built for the CPU emulation (g++), as a ctypes library."""
    if GXX is None:
        pytest.skip("g++ is needed to build the CPU emulation of the kernels")
    lib = tmp_path_factory.mktemp("emu") / "libhs_emu.so"
    cmd = [GXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-DHS_CPU_EMULATION", f"-I{CSRC / 'emu'}", f"-I{CSRC}",
           "-x", "c++", str(CSRC / "few_query_attention.cu"), str(CSRC / "gated_pool.cu"), "-o", str(lib)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    so = ctypes.CDLL(str(lib))
    for prefix, params in (("hs_fqa", FqaParams), ("hs_gap", GapParams)):
        getattr(so, f"{prefix}_num_splits").argtypes = [ctypes.POINTER(params)]
        getattr(so, f"{prefix}_workspace_bytes").argtypes = [ctypes.POINTER(params), ctypes.c_int]
        getattr(so, f"{prefix}_workspace_bytes").restype = ctypes.c_size_t
    so.hs_few_query_attention.argtypes = [ctypes.POINTER(FqaParams), ctypes.c_int, PTR, PTR]
    so.hs_gated_attention_pool.argtypes = [ctypes.POINTER(GapParams), ctypes.c_int, PTR, PTR]
    return so


def emulated_attention(so, q, k, v, mask=None, scale=None):
    out = torch.empty(q.shape, dtype=q.dtype)  # (B, H, M, d) contiguous
    p = FqaParams(q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), key_mask=mask.data_ptr() if mask is not None else None,
                  out=out.data_ptr(), batch=q.shape[0], heads=q.shape[1], queries=q.shape[2], keys=k.shape[2],
                  head_dim=q.shape[3], scale=q.shape[-1] ** -0.5 if scale is None else scale, dtype=HS_DTYPE[q.dtype])
    p.q_stride[:], p.k_stride[:], p.v_stride[:] = q.stride()[:3], k.stride()[:3], v.stride()[:3]
    if mask is not None:
        p.mask_stride[:] = mask.stride()
    splits = so.hs_fqa_num_splits(p)
    workspace = torch.empty(so.hs_fqa_workspace_bytes(p, splits), dtype=torch.uint8)
    assert so.hs_few_query_attention(p, splits, workspace.data_ptr(), None) == 0
    return out, splits


def emulated_pool(so, h, wa, ba, wb, bb, wc, bc):
    B, N, L = h.shape
    pooled, weights = torch.empty(B, L, dtype=h.dtype), torch.empty(B, N, dtype=h.dtype)
    tensors = dict(h=h, wa=wa, ba=ba, wb=wb, bb=bb, wc=wc, bc=bc, pooled=pooled, weights=weights)
    p = GapParams(**{name: t.data_ptr() for name, t in tensors.items()}, batch=B, patches=N, features=L,
                  hidden=wa.shape[0], dtype=HS_DTYPE[h.dtype])
    p.h_stride[:] = h.stride()[:2]
    splits = so.hs_gap_num_splits(p)
    workspace = torch.empty(so.hs_gap_workspace_bytes(p, splits), dtype=torch.uint8)
    assert so.hs_gated_attention_pool(p, splits, workspace.data_ptr(), None) == 0
    return pooled, weights, splits


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("b,h,m,n,d", [(1, 2, 6, 1, 64), (2, 2, 6, 37, 32), (1, 2, 9, 300, 40), (1, 1, 3, 70, 20),
                                       (1, 1, 2, 40, 512)])
def test_emulated_few_query_attention_matches_naive(emulated, dtype, b, h, m, n, d):
    gen = torch.Generator().manual_seed(n + d)
    q = torch.randn(b, h, m, d, generator=gen).to(dtype)
    kv = torch.randn(b, n, h, 2 * d, generator=gen).to(dtype)
    k, v = kv[..., :d].transpose(1, 2), kv[..., d:].transpose(1, 2)  # strided (B, H, N, d) views
    out, _ = emulated_attention(emulated, q, k, v)
    torch.testing.assert_close(out.float(), naive_attention(q, k, v), atol=TOL[dtype], rtol=TOL[dtype])


def test_emulated_attention_mask_scale_and_splits(emulated):
    q, k, v = torch.randn(2, 2, 5, 64), torch.randn(2, 2, 1000, 64), torch.randn(2, 2, 1000, 64)
    mask = torch.rand(2, 1000) > 0.5
    mask[1] = False  # every key masked: zeros
    out, splits = emulated_attention(emulated, q, k, v, mask, 0.3)
    assert splits > 1  # the merge of several key splits is exercised
    torch.testing.assert_close(out, naive_attention(q, k, v, mask, 0.3), atol=1e-5, rtol=1e-5)
    assert out[1].abs().max().item() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("n,features,hidden", [(1, 48, 24), (37, 48, 24), (100, 20, 300)])
def test_emulated_gated_attention_pool_matches_naive(emulated, dtype, n, features, hidden):
    gen = torch.Generator().manual_seed(n)

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=gen) * s).to(dtype)

    h = rand(2, n, features)
    wa, wb = rand(hidden, features, s=features**-0.5), rand(hidden, features, s=features**-0.5)
    ba, bb, wc, bc = rand(hidden, s=0.1), rand(hidden, s=0.1), rand(1, hidden, s=hidden**-0.5), rand(1, s=0.1)
    pooled, weights, _ = emulated_pool(emulated, h, wa, ba, wb, bb, wc, bc)
    ref_pooled, ref_weights = naive_pool(h, wa, ba, wb, bb, wc, bc)
    torch.testing.assert_close(weights.float(), ref_weights, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(pooled.float(), ref_pooled, atol=TOL[dtype], rtol=TOL[dtype])


# --- parity on a GPU ------------------------------------------------------------------------------


def naive_attention(q, k, v, mask=None, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhmd,bhnd->bhmn", q.float(), k.float()) * scale  # (B, H, M, N)
    if mask is not None:
        s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v.float()


def naive_pool(h, wa, ba, wb, bb, wc, bc):
    hf = h.float()  # (B, N, L)
    gated = torch.tanh(hf @ wa.float().T + ba.float()) * torch.sigmoid(hf @ wb.float().T + bb.float())  # (B, N, A)
    weights = torch.softmax(gated @ wc.float().reshape(-1) + bc.float(), dim=1)  # (B, N)
    return torch.einsum("bn,bnl->bl", weights, hf), weights


TOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 37, 4097])
@pytest.mark.parametrize("m,d", [(6, 64), (1, 128), (16, 40), (32, 512)])
def test_few_query_attention_matches_naive(ops_loaded, dtype, n, m, d):
    gen = torch.Generator(device="cuda").manual_seed(n * 31 + d)
    q = torch.randn(2, 3, m, d, device="cuda", dtype=dtype, generator=gen)
    kv = torch.randn(2, n, 3, 2 * d, device="cuda", dtype=dtype, generator=gen)
    k, v = kv[..., :d].transpose(1, 2), kv[..., d:].transpose(1, 2)  # (B, H, N, d) strided views
    out = cuda_ops.few_query_attention(q, k, v)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), naive_attention(q, k, v), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_few_query_attention_mask_and_scale(ops_loaded, dtype):
    q = torch.randn(2, 4, 6, 128, device="cuda", dtype=dtype)
    k, v = (torch.randn(2, 4, 4097, 128, device="cuda", dtype=dtype) for _ in range(2))
    mask = torch.rand(2, 4097, device="cuda") > 0.3
    mask[1] = False  # a bag with every key masked gives zeros
    out = cuda_ops.few_query_attention(q, k, v, mask, 0.05)
    torch.testing.assert_close(out.float(), naive_attention(q, k, v, mask, 0.05), atol=TOL[dtype], rtol=TOL[dtype])
    assert out[1].abs().max().item() == 0


@pytest.mark.gpu
@needs_gpu
def test_few_query_attention_matches_sdpa_on_a_long_bag(ops_loaded):
    q = torch.randn(1, 8, 6, 64, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(1, 8, 262144, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    expected = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(cuda_ops.few_query_attention(q, k, v).float(), expected, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n", [1, 37, 4097])
def test_gated_attention_pool_matches_naive(ops_loaded, dtype, n):
    gen = torch.Generator(device="cuda").manual_seed(n)
    L, A = 512, 256

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, device="cuda", generator=gen) * s).to(dtype)

    h = rand(2, n, L)
    wa, wb = rand(A, L, s=L**-0.5), rand(A, L, s=L**-0.5)
    ba, bb, wc, bc = rand(A, s=0.1), rand(A, s=0.1), rand(1, A, s=A**-0.5), rand(1, s=0.1)
    pooled, weights = cuda_ops.gated_attention_pool(h, wa, ba, wb, bb, wc, bc)
    ref_pooled, ref_weights = naive_pool(h, wa, ba, wb, bb, wc, bc)
    torch.testing.assert_close(weights.float(), ref_weights, atol=TOL[dtype], rtol=TOL[dtype])
    torch.testing.assert_close(pooled.float(), ref_pooled, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.gpu
@needs_gpu
def test_ops_name_the_bad_argument(ops_loaded):
    q, k = torch.randn(1, 2, 6, 64, device="cuda"), torch.randn(1, 2, 100, 64, device="cuda")
    with pytest.raises(RuntimeError, match="q must be"):
        cuda_ops.few_query_attention(q[0], k, k)
    with pytest.raises(RuntimeError, match="key_mask must be bool"):
        cuda_ops.few_query_attention(q, k, k, torch.ones(1, 100, device="cuda"))
    with pytest.raises(RuntimeError, match="share a dtype"):
        cuda_ops.few_query_attention(q, k.half(), k)
    h, w, b = torch.randn(1, 10, 32, device="cuda"), torch.randn(8, 16, device="cuda"), torch.randn(8, device="cuda")
    with pytest.raises(RuntimeError, match="wa must be"):
        cuda_ops.gated_attention_pool(h, w, b, w, b, b, b[:1])
