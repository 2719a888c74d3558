"""``histosurv import``: a checkpoint file as the reference repository saves it, through the CLI,
export and the runtime, gives the risk the reference code computed (tests/golden)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from histosurv.cli import main
from histosurv.errors import InputError
from histosurv.export.models import build_model, risk_from_logits
from histosurv.export.models.checkpoints import load_reference_checkpoint, read_checkpoint
from histosurv.export.run import load_run
from histosurv.runtime.predict import FusionPredictor
from histosurv.data.features import Bag

from .golden import TOLERANCE, load_golden, seeded_bag, seeded_state_dict


def _reference_checkpoint(tmp_path, name: str, wrap: bool = False):
    golden = load_golden(name)
    state = seeded_state_dict(golden["shapes"], golden["seed"])
    path = tmp_path / f"s_0_{name}_checkpoint.pt"
    # MCAT's trainer saves model.state_dict(); DataParallel adds 'module.'; others wrap it in a dict
    torch.save({"model_state_dict": {f"module.{k}": v for k, v in state.items()}} if wrap else state, path)
    return golden, path


def test_mcat_checkpoint_through_import_export_and_runtime_gives_the_reference_risk(tmp_path, capsys):
    golden, ckpt = _reference_checkpoint(tmp_path, "mcat", wrap=True)
    n_genes = sum(golden["histosurv_config"]["omic_sizes"])
    (tmp_path / "genes.txt").write_text("\n".join(f"gene{i}" for i in range(n_genes)))
    run, repo = tmp_path / "run", tmp_path / "repo"
    # no --omic-sizes or --feature-dim: they are read from the checkpoint's tensor shapes
    assert main(["import", str(ckpt), "--architecture", "mcat", "--gene-list", str(tmp_path / "genes.txt"), "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["omic_sizes"] == golden["histosurv_config"]["omic_sizes"]
    assert config["imported_from"]["commit"] == golden["commit"]
    assert main(["export", "--run", str(run), "--repo", str(repo), "--name", "mcat", "--artifacts", "none"]) == 0
    predictor = FusionPredictor.from_repository(repo, "mcat", engine="onnxruntime")
    for n in ("50", "300"):
        features, genes = seeded_bag(int(n), 1024, n_genes, 0)
        bag = Bag(features.numpy(), np.zeros((int(n), 2), np.int64), source=f"bag{n}")
        risk = predictor.slide(bag, genes.numpy()).risk
        assert abs(risk - golden["cases"][n]["risk"]) <= 10 * TOLERANCE, n  # ONNX Runtime, not torch: fp32 reordering


def test_gene_list_must_match_the_checkpoint(tmp_path, capsys):
    _, ckpt = _reference_checkpoint(tmp_path, "mcat")
    (tmp_path / "genes.txt").write_text("\n".join(f"gene{i}" for i in range(10)))
    code = main(["import", str(ckpt), "--architecture", "mcat", "--gene-list", str(tmp_path / "genes.txt"), "--out", str(tmp_path / "run")])
    assert code == 2
    assert "the checkpoint takes 149 genes, the gene list has 10" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_image_only_checkpoint_needs_no_gene_list(tmp_path):
    golden, ckpt = _reference_checkpoint(tmp_path, "abmil")
    assert main(["import", str(ckpt), "--architecture", "abmil", "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["genes"] == []


def test_checkpoint_of_another_architecture_is_refused_naming_tensors(tmp_path, capsys):
    _, ckpt = _reference_checkpoint(tmp_path, "abmil")
    model = build_model("snn", dict(n_genes=80))
    with pytest.raises(InputError, match="not a models.model_genomic.SNN checkpoint.*missing.*fc_omic"):
        load_reference_checkpoint(model, ckpt)


def test_pickled_code_is_never_executed(tmp_path):
    class Payload:
        def __reduce__(self):
            return (exec, ("open('/tmp/histosurv_pwned', 'w')",))

    path = tmp_path / "evil.pt"
    torch.save({"classifier.weight": torch.zeros(1), "x": Payload()}, path)
    with pytest.raises(InputError, match="not a weights-only PyTorch checkpoint"):
        read_checkpoint(path)


def test_mome_tokens_outside_the_state_dict_come_from_an_extra_file(tmp_path, capsys):
    golden, ckpt = _reference_checkpoint(tmp_path, "mome")  # as MoME's trainer saves it: no bottleneck, no cls token
    n_genes = sum(golden["kwargs"]["omic_sizes"])
    (tmp_path / "genes.txt").write_text("\n".join(f"g{i}" for i in range(n_genes)))
    args = ["import", str(ckpt), "--architecture", "mome", "--gene-list", str(tmp_path / "genes.txt")]
    assert main(args + ["--out", str(tmp_path / "refused")]) == 2
    assert "does not save" in capsys.readouterr().err and not (tmp_path / "refused").exists()

    # the tokens, as `MoMETransformer.extras_from_reference(model)` pulls them from the training process
    torch.save(seeded_state_dict(golden["not_saved_shapes"], golden["seed"]), tmp_path / "extra.pt")
    assert main(args + ["--extra", str(tmp_path / "extra.pt"), "--out", str(tmp_path / "run")]) == 0
    model, _ = load_run(tmp_path / "run")
    for run in golden["runs"]:
        if "risk" not in run:
            continue
        features, genes = seeded_bag(run["n"], golden["feature_dim"], n_genes, golden["seed"])
        with torch.no_grad():
            risk = float(risk_from_logits(model(features[None], None, genes[None]), "discrete"))
        assert abs(risk - run["risk"]) <= TOLERANCE, run["n"]
