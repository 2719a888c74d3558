"""The serving side: predicts from the repository alone, checks what it is given, never imports export/."""

from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import histosurv
from histosurv.data.features import Bag, bag_path, read_bag
from histosurv.data.tables import GeneTable
from histosurv.errors import InputError
from histosurv.export.run import load_run
from histosurv.runtime.predict import FusionPredictor

RUNTIME = Path(histosurv.__file__).parent / "runtime"


# Backends that run on torch import it inside functions, only when such an engine is chosen; the
# metrics read GPU memory through torch only on a machine with a GPU and no NVML.
TORCH_BACKENDS = {"torch_engine.py", "tensorrt.py", "metrics.py"}


def test_runtime_never_imports_the_export_side():
    offenders = []
    for path in RUNTIME.rglob("*.py"):
        tree = ast.parse(path.read_text())
        top_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            lazy_torch_ok = path.name in TORCH_BACKENDS and id(node) not in top_level
            offenders += [
                f"{path.name}: {n}"
                for n in names
                if "export" in n.split(".") or (n.split(".")[0] == "torch" and not lazy_torch_ok)
            ]
    assert offenders == []


def test_predict_without_torch_or_model_code(tiny_repo, tiny_cohort_dir):
    """A fresh interpreter in which torch and histosurv.export cannot be imported still predicts."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["torch"] = None              # any 'import torch' now raises ImportError
        sys.modules["histosurv.export"] = None
        from histosurv.data.tables import GeneTable
        from histosurv.runtime.predict import FusionPredictor, score_cases
        p = FusionPredictor.from_repository({str(tiny_repo)!r}, "ammasurv")
        genes = GeneTable.read({str(tiny_cohort_dir / 'genes.csv')!r})
        r = score_cases(p, [("SYN0-0000", [{str(tiny_cohort_dir / 'features' / 'SYN0-0000-01.h5')!r}])], genes)
        print(repr(r[0].risk))
        """
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    risk = float(out.stdout.strip().splitlines()[-1])
    assert np.isfinite(risk)


def test_runtime_risk_equals_pytorch_patient_mean(tiny_repo, tiny_run, tiny_cohort, tiny_cohort_dir):
    predictor = FusionPredictor.from_repository(tiny_repo, "ammasurv")
    model, _ = load_run(tiny_run)
    patient = next(p for p in tiny_cohort.patients if len(p.slide_ids) > 1)  # a patient with two slides
    i = tiny_cohort.patients.index(patient)
    genes = predictor.genes_for(GeneTable.read(tiny_cohort_dir / "genes.csv"), patient.case_id)
    np.testing.assert_array_equal(genes, tiny_cohort.genes[i])
    bags = [read_bag(bag_path(tiny_cohort_dir / "features", s)) for s in patient.slide_ids]
    result = predictor.patient(patient.case_id, bags, genes)
    with torch.no_grad():
        slide_risks = [model.risk(torch.from_numpy(b.features)[None], torch.from_numpy(b.coords)[None],
                                  torch.from_numpy(genes)[None]).item() for b in bags]
    assert [s.risk for s in result.slides] == pytest.approx(slide_risks, rel=1e-4, abs=1e-6)
    assert result.risk == pytest.approx(np.mean(slide_risks), rel=1e-4, abs=1e-6)
    assert result.slides[0].attention.shape == (len(bags[0]),)
    assert result.slides[0].attention.sum() < 1.0  # the class token keeps some weight on itself


@pytest.fixture(scope="module")
def predictor(tiny_repo):
    return FusionPredictor.from_repository(tiny_repo, "ammasurv")


def _bag(n=10, d=32):
    rng = np.random.default_rng(0)
    return Bag(rng.random((n, d), dtype=np.float32), rng.integers(0, 10, (n, 2)) * 256, source="slide.h5")


@pytest.mark.parametrize(
    "bag, genes, message",
    [
        (_bag(d=16), np.zeros(24), "16 columns but the model expects 32"),
        (_bag(n=0), np.zeros(24), "empty bag"),
        (Bag(np.full((4, 32), np.nan, np.float32), np.zeros((4, 2), np.int64), source="x.h5"), np.zeros(24), "NaN"),
        (Bag(_bag().features, np.zeros((3, 2), np.int64), source="x.h5"), np.zeros(24), "'coords' must have shape"),
        (_bag(), np.zeros(23), "has 23 values, model 'ammasurv' expects 24"),
        (_bag(), np.r_[np.zeros(23), np.nan], "not finite for GENE0023"),
        (_bag(), None, "needs 'genes'"),
    ],
)
def test_bad_tensors_are_refused_with_the_reason(predictor, bag, genes, message):
    with pytest.raises(InputError, match=message):
        predictor.slide(bag, genes)


def test_onnx_runtime_fallback_is_caught(tiny_repo):
    from histosurv.runtime.engines import EngineUnavailable
    from histosurv.runtime.repository import ModelRepository
    from histosurv.runtime.engines.ort import OnnxRuntimeEngine

    mv = ModelRepository(tiny_repo).version("ammasurv")
    # The CPU build has no CUDA provider: asking for it must not silently run on the CPU.
    with pytest.raises(EngineUnavailable, match="CUDAExecutionProvider"):
        OnnxRuntimeEngine(mv, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.warns(RuntimeWarning, match="runs on"):
        engine = OnnxRuntimeEngine(mv, providers=["CUDAExecutionProvider", "CPUExecutionProvider"], allow_fallback=True)
    assert engine.device == "cpu" and engine.providers == ["CPUExecutionProvider"]
