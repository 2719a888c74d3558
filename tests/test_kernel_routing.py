"""The models' attentions routed to histosurv's kernel ops, as a compiled torch engine carries them.

Inside ``use_kernels("triton")`` the few-query attentions (G-HANet's tokens over the bag, AMMASurv's
gene queries) and the gated attention pooling (ABMIL, PORPOISE, early fusion, G-HANet's gate) call
``torch.ops.histosurv_triton.*``. Checked here in the TRITON_INTERPRET=1 subprocess (see
test_kernels_triton.py for why a subprocess): the kernels run the model and give the risk and
attention of the plain model at N = 1, 17 and 300; ``torch.export`` with a dynamic bag size records
one kernel call per site, and the exported program gives the same answers at bag sizes other than
the one it was traced with (so the launch plans hold for a symbolic N). Tolerances: risk relative
1e-5, attention absolute 1e-6 (FP32 throughout). The compiled package itself needs a GPU: the
``gpu`` tests build it with ``histosurv export --add-engine torch --kernels triton`` and verify it.
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
from histosurv.export.models import build_model
from histosurv.export.models.blocks import GatedAttention
from histosurv.export.models.ghanet import TokenAttention
from histosurv.export.onnx_export import SingleBag, example_inputs
from histosurv.export.torch_export import export_pt2, trace_serving
from histosurv.kernels import triton_available, triton_unavailable_reason
from histosurv.kernels.routing import active_backend, kernel_calls, use_kernels

ROOT = Path(__file__).resolve().parents[1]
SIZES = (1, 17, 300)
RISK_REL, ATTENTION_ABS = 1e-5, 1e-6

CONFIGS = {
    "abmil": dict(feature_dim=64),
    "porpoise": dict(n_genes=12, feature_dim=32, modality_dropout=0.25),
    "early_fusion": dict(n_genes=12, feature_dim=32),
    "ghanet": dict(feature_dim=32, dim=64, heads=4, ffn_mult=2, gate_hidden=16, compress_dim=16),
    "ammasurv": dict(n_genes=40, feature_dim=64, pos_dim=16, gene_groups=6, depth=2, heads=4),
}
FEW = "histosurv_triton.few_query_attention"
POOL = "histosurv_triton.gated_attention_pool"
EXPECTED_CALLS = {
    "abmil": {POOL: 1},
    "porpoise": {POOL: 1},
    "early_fusion": {POOL: 1},
    "ghanet": {FEW: 2, POOL: 1},  # CAB's first cross-attention and the token self-attention; the gate
    "ammasurv": {FEW: 2},  # the gene queries of each of the 2 layers
}


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, CONFIGS[name]).eval()
    with torch.no_grad():  # peaked softmaxes, so that a wrong attention moves the risk (seeded init is flat)
        for module in model.modules():
            if isinstance(module, TokenAttention):
                module.to_q[0].weight.mul_(4.0)
                module.to_k[0].weight.mul_(4.0)
            if isinstance(module, GatedAttention):
                module.attention_c.weight.mul_(4.0)
    if getattr(model, "genes", None) is not None:
        g = torch.Generator().manual_seed(1)
        n = model.genes.mean.numel()
        model.set_gene_scaler(torch.randn(n, generator=g), torch.rand(n, generator=g) + 0.5)
    return model


def _differences(want, got) -> dict:
    risk = float(((got[0] - want[0]).abs() / want[0].abs().clamp(min=1e-6)).max())
    out = {"risk_rel": risk}
    if len(want) > 1:
        out["attention_abs"] = float((got[1] - want[1]).abs().max())
    return out


def _interpreted_cases() -> dict:
    """Runs in the subprocess: each model plain, routed in eager, and routed through torch.export."""
    results = {}
    for name in CONFIGS:
        try:
            model = SingleBag(make_model(name)).eval()
            with torch.no_grad():
                program, calls = trace_serving(model.model, torch.device("cpu"), kernels="triton")
                rows = []
                for n in SIZES:
                    inputs = example_inputs(model.model, n=n, seed=n)
                    want = model(**inputs)
                    with use_kernels("triton"):
                        eager = model(**inputs)
                    exported = program.module()(**inputs)
                    rows.append({"n": n, "eager": _differences(want, eager), "exported": _differences(want, exported)})
            results[name] = {"error": None, "calls": dict(calls), "rows": rows}
        except Exception as exc:  # reported per model, so one failure does not hide the others
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict:
    if not triton_available():
        pytest.skip(triton_unavailable_reason())
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, __file__, "--interpreted-cases"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_routed_model_gives_the_plain_models_answers(interpreted, name):
    result = interpreted[name]
    assert result["error"] is None, result["error"]
    assert result["calls"] == EXPECTED_CALLS[name]
    assert [r["n"] for r in result["rows"]] == list(SIZES)
    for row in result["rows"]:
        for how in ("eager", "exported"):
            diff = row[how]
            assert diff["risk_rel"] <= RISK_REL, (how, row)
            assert diff.get("attention_abs", 0.0) <= ATTENTION_ABS, (how, row)


# ----------------------------------------------------------------------------- no kernels, and refusals


def test_routing_is_off_unless_asked():
    assert active_backend() is None
    model = make_model("abmil")
    program, calls = trace_serving(model, torch.device("cpu"))
    assert not calls and not kernel_calls(program.graph)
    with pytest.raises(InputError, match="backend must be one of triton, cuda, got 'cudnn'"):
        with use_kernels("cudnn"):
            pass
    assert active_backend() is None


def test_training_keeps_the_torch_path():
    if not triton_available():
        pytest.skip(triton_unavailable_reason())
    model = make_model("ghanet").train()
    features = torch.randn(1, 50, CONFIGS["ghanet"]["feature_dim"])
    with use_kernels("triton"):
        logits = model(features)  # on the CPU the ops would run torch maths anyway; dropout must not reach them
        logits.sum().backward()  # the kernel ops have no backward: reaching here means none was called
    assert model.wsi_net[0].weight.grad is not None


def test_cpu_package_with_kernels_is_refused(tmp_path):
    with pytest.raises(InputError, match="run on CUDA GPUs"):
        export_pt2(make_model("abmil"), tmp_path / "model.pt2", device="cpu", kernels="triton")
    assert not list(tmp_path.iterdir())


def test_model_without_kernel_sites_is_refused():
    if not triton_available():
        pytest.skip(triton_unavailable_reason())
    model = build_model("snn", dict(n_genes=30)).eval()
    with pytest.raises(InputError, match="no attention of a few queries"):
        trace_serving(model, torch.device("cpu"), kernels="triton")


def test_cli_refuses_kernels_outside_add_engine_torch(tmp_path, capsys):
    from histosurv.cli import main

    assert main(["export", "--encoder", "resnet18", "--repo", str(tmp_path), "--kernels", "triton"]) != 0
    assert "--kernels goes with --add-engine torch" in capsys.readouterr().err
    args = ["export", "--add-engine", "tensorrt", "--name", "m", "--repo", str(tmp_path), "--kernels", "cuda"]
    assert main(args) != 0
    assert "--kernels do not apply to tensorrt (it takes --max-bag, --precision); they go with --add-engine torch" in capsys.readouterr().err


# ----------------------------------------------------------------------------- what AOTInductor receives


class _Ops(torch.nn.Module):
    def forward(self, q, k, v, h, w_a, b_a, w_b, b_b, w_c, b_c):
        attended = torch.ops.histosurv_triton.few_query_attention(q, k, v, None, 0.125)
        pooled, weights = torch.ops.histosurv_triton.gated_attention_pool(h, w_a, b_a, w_b, b_b, w_c, b_c)
        return attended, pooled, weights


def test_ops_decompose_into_triton_kernel_calls_with_a_symbolic_bag(monkeypatch):
    """AOTInductor compiles what the ops decompose into under functionalization: user-defined Triton
    kernel calls. On the CPU the ops would take their torch maths, so the test makes them take the
    kernel path, as on a GPU; the trace needs no GPU (Triton's mutation analysis, which does, falls back
    to cloning every argument). The bag size must reach the kernels as a symbol, never a constant."""
    if not triton_available():
        pytest.skip(triton_unavailable_reason())
    from torch._functorch.aot_autograd import aot_export_module

    from histosurv.kernels import triton_ops

    monkeypatch.setattr(triton_ops, "_kernels_run_on", lambda device: True)
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 64, generator=g), torch.randn(1, 4, 300, 64, generator=g), torch.randn(1, 4, 300, 64, generator=g)
    h = torch.randn(1, 300, 32, generator=g)
    w_a, w_b, b_a, b_b, w_c = torch.randn(16, 32), torch.randn(16, 32), torch.randn(16), torch.randn(16), torch.randn(16)
    args = (q, k, v, h, w_a, b_a, w_b, b_b, w_c, torch.randn(1))
    bag = torch.export.Dim("N", min=2, max=1 << 20)
    dynamic = (None, {2: bag}, {2: bag}, {1: bag}) + (None,) * 6
    program = torch.export.export(_Ops(), args, dynamic_shapes=dynamic)
    assert dict(kernel_calls(program.graph)) == {FEW: 1, POOL: 1}
    graph, _ = aot_export_module(program.module(), list(args), trace_joint=False)

    launches = [n for n in graph.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(launches) == 4  # split + merge, for each op
    symbolic = lambda value: isinstance(value, torch.fx.Node)  # noqa: E731
    split, merge, pool_split, pool_merge = (n.kwargs for n in launches)
    assert symbolic(split["kwargs"]["N"]) and symbolic(split["grid"][0][1])  # splits of the bag: computed from N
    assert symbolic(split["kwargs"]["tokens_per_split"]) and symbolic(merge["kwargs"]["n_splits"])
    assert symbolic(pool_split["kwargs"]["N"]) and symbolic(pool_merge["grid"][0][1])
    for launch in (split, merge, pool_split, pool_merge):  # compile-time constants stay constants
        assert all(isinstance(v, int) for key, v in launch["kwargs"].items() if key.startswith("BLOCK_")), launch
    # torch keys its compile caches on the source of the kernels it finds in each op: all four
    from torch._library.triton import get_triton_kernels_for_op

    found = [get_triton_kernels_for_op(f"histosurv_triton::{op}") for op in ("few_query_attention", "gated_attention_pool")]
    assert [len(kernels) for kernels in found] == [2, 2]


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["triton", "cuda"])
@pytest.mark.parametrize("name", ["abmil", "ghanet", "ammasurv"])
def test_compiled_engine_with_kernels_verifies_on_a_gpu(tmp_path, name, kernels):
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs a CUDA GPU (kernels compiled, not interpreted)")
    if kernels == "triton" and not triton_available():
        pytest.skip(triton_unavailable_reason())
    if kernels == "cuda":
        from histosurv.kernels import cuda_ops

        if not cuda_ops.available():
            pytest.skip(f"CUDA C++ kernels not built: {cuda_ops.load_error()}")
    from histosurv.export.repository_writer import add_engine, export_model
    from histosurv.export.verify import verify_version

    model = make_model(name)
    genes = [f"g{i}" for i in range(model.cfg.n_genes)] if "genes" in model.input_names else []
    export_model(model, {"architecture": name, "model": model.cfg.to_dict(), "genes": genes}, tmp_path, name, artifacts=())
    mv, key = add_engine(tmp_path, name, "torch", kernels=kernels)
    entry = mv.info.engines[key]
    assert entry.kernels == kernels and sum(entry.details["kernel_calls"].values()) == sum(EXPECTED_CALLS[name].values())
    (report,) = verify_version(tmp_path, name, sizes=(1, 17, 1000, 65536), engines=[key])
    assert report.passed, report.rows


if __name__ == "__main__" and sys.argv[1:] == ["--interpreted-cases"]:
    print(json.dumps(_interpreted_cases()))
