"""The command line: the whole chain works, and bad input gets a clear message and leaves nothing behind."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest

from histosurv.cli import main
from histosurv.data.features import Bag, write_bag
from histosurv.export.models.encoders import ENCODERS

from .conftest import run_cli

TINY_MODEL_FLAGS = ["--pos-dim", "8", "--gene-groups", "4", "--heads", "4", "--head-hidden", "16"]
TINY_TRAIN_FLAGS = ["--epochs", "2", "--no-baseline", "--batch-size", "16", "--patches-per-slide", "8"]


def test_cli_chain_synth_train_export_verify_predict(tmp_path, capsys):
    cohort = tmp_path / "cohort"
    assert main(["synth", "--out", str(cohort), "--n-patients", "40", "--n-genes", "24", "--n-signal-genes", "4",
                 "--feature-dim", "32", "--min-patches", "8", "--max-patches", "16"]) == 0
    args = ["--clinical", cohort / "clinical.csv", "--genes", cohort / "genes.csv", "--features-dir", cohort / "features"]
    assert main(["train", *map(str, args), "--out", str(tmp_path / "run"), *TINY_MODEL_FLAGS, *TINY_TRAIN_FLAGS]) == 0
    assert "test c-index" in capsys.readouterr().out
    repo = str(tmp_path / "repo")
    assert main(["export", "--run", str(tmp_path / "run"), "--repo", repo, "--artifacts", "onnxruntime_fp16"]) == 0
    assert "engines onnxruntime, onnxruntime_fp16," in capsys.readouterr().out
    # the opset-23 graph (TensorRT's input) was left out; it is added to the published version when wanted
    assert main(["export", "--add-engine", "onnx_opset23", "--repo", repo, "--name", "ammasurv"]) == 0
    assert "model.opset23.onnx (onnx_opset23)" in capsys.readouterr().out
    # the compiled-torch package is built into the existing version, as on a serving machine
    assert main(["export", "--add-engine", "torch", "--repo", repo, "--name", "ammasurv"]) == 0
    assert "model.pt2 (torch)" in capsys.readouterr().out
    assert main(["verify", "--repo", repo, "--sizes", "1,17,300"]) == 0
    out = capsys.readouterr().out
    for engine in ("onnxruntime ", "onnxruntime_fp16 ", "torch "):
        assert f"PASS {engine}" in out
    assert "largest relative difference of the risk" in out
    assert main(["export", "--add-engine", "torch", "--repo", repo, "--name", "ammasurv"]) == 2
    assert "model.pt2 already exists (engine 'torch'); pass --replace" in capsys.readouterr().err

    preds = tmp_path / "preds.csv"
    assert main(["predict", "--repo", str(tmp_path / "repo"), "--clinical", str(cohort / "clinical.csv"),
                 "--features-dir", str(cohort / "features"), "--genes", str(cohort / "genes.csv"), "--out", str(preds)]) == 0
    frame = pd.read_csv(preds)
    assert len(frame) == 40 and np.isfinite(frame["risk"]).all()
    assert "c-index" in capsys.readouterr().out

    # FP16 risks agree to ~1e-3 absolute; a relative bound alone would fail for risks near 0
    for engine, rel, abs_ in (("onnxruntime", 1e-6, 0), ("torch", 1e-5, 1e-7), ("onnxruntime_fp16", 1e-2, 5e-3)):
        assert main(["predict", "--repo", repo, "--case-id", "SYN0-0003", "--engine", engine,
                     "--features", str(cohort / "features" / "SYN0-0003-01.h5"), "--genes", str(cohort / "genes.csv")]) == 0
        single = json.loads(capsys.readouterr().out.split("\n}\n")[0] + "\n}")
        assert single["case_id"] == "SYN0-0003"
        assert single["risk"] == pytest.approx(frame.set_index("case_id").loc["SYN0-0003", "risk"], rel=rel, abs=abs_)


def test_console_script_help_and_version():
    out = run_cli("--help")
    assert out.returncode == 0
    for command in ("demo", "train", "export", "verify", "tile", "predict", "synth", "serve"):
        assert command in out.stdout
    assert run_cli("--version").stdout.startswith("histosurv ")


# ---------------------------------------------------------------- bad input: predict


@pytest.fixture()
def predict_case(tiny_repo, tiny_cohort_dir, tmp_path):
    """Runs `histosurv predict` for one case on the given h5 and gene table; returns (exit, stderr, out path)."""

    def run(h5, genes=tiny_cohort_dir / "genes.csv"):
        out = tmp_path / "risk.csv"
        code = main(["predict", "--repo", str(tiny_repo), "--case-id", "SYN0-0001", "--features", str(h5),
                     "--genes", str(genes), "--out", str(out)])
        return code, out

    return run


def _write_h5(path, features, coords):
    write_bag(path, Bag(np.asarray(features, np.float32), np.asarray(coords, np.int64)))
    return path


def _expect_error(code, capsys, *fragments):
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("histosurv ") and "error:" in err
    for fragment in fragments:
        assert fragment in err, err


def test_wrong_feature_dimension(predict_case, tmp_path, capsys):
    h5 = _write_h5(tmp_path / "slide.h5", np.ones((5, 16)), np.zeros((5, 2)))
    code, out = predict_case(h5)
    _expect_error(code, capsys, "slide.h5", "16 columns but the model expects 32")
    assert not out.exists()


def test_genes_missing_from_the_table_are_named(predict_case, tiny_cohort_dir, tiny_cohort, tmp_path, capsys):
    table = pd.read_csv(tiny_cohort_dir / "genes.csv")
    table.drop(columns=["GENE0003", "GENE0017"]).to_csv(tmp_path / "genes.csv", index=False)
    code, out = predict_case(tiny_cohort_dir / "features" / "SYN0-0001-01.h5", tmp_path / "genes.csv")
    _expect_error(code, capsys, "2 of the model's 24 genes are missing", "GENE0003", "GENE0017")
    assert not out.exists()


def test_nan_in_features(predict_case, tmp_path, capsys):
    features = np.ones((6, 32))
    features[4, 7] = np.nan
    code, out = predict_case(_write_h5(tmp_path / "nan.h5", features, np.zeros((6, 2))))
    _expect_error(code, capsys, "nan.h5", "NaN or infinite", "row 4")
    assert not out.exists()


def test_empty_bag(predict_case, tmp_path, capsys):
    with h5py.File(tmp_path / "empty.h5", "w") as f:
        f["features"] = np.zeros((0, 32), np.float32)
        f["coords"] = np.zeros((0, 2), np.int64)
    code, out = predict_case(tmp_path / "empty.h5")
    _expect_error(code, capsys, "empty.h5", "empty bag")
    assert not out.exists()


@pytest.mark.parametrize("damage", ["random bytes", "cut short", "no features dataset"])
def test_corrupt_h5(predict_case, tiny_cohort_dir, tmp_path, capsys, damage):
    bad = tmp_path / "bad.h5"
    good = (tiny_cohort_dir / "features" / "SYN0-0001-01.h5").read_bytes()
    if damage == "random bytes":
        bad.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "cut short":
        bad.write_bytes(good[: len(good) // 2])
    else:
        with h5py.File(bad, "w") as f:
            f["feats"] = np.zeros((3, 32), np.float32)
    code, out = predict_case(bad)
    _expect_error(code, capsys, "bad.h5", "no 'features'" if damage == "no features dataset" else "not a readable HDF5")
    assert not out.exists()


def test_missing_slide_in_a_table_fails_before_any_output(tiny_repo, tiny_cohort_dir, tmp_path, capsys):
    clinical = pd.read_csv(tiny_cohort_dir / "clinical.csv")
    clinical.loc[5, "slide_id"] = "NOT-THERE.svs"
    clinical.to_csv(tmp_path / "clinical.csv", index=False)
    out = tmp_path / "risks.csv"
    code = main(["predict", "--repo", str(tiny_repo), "--clinical", str(tmp_path / "clinical.csv"),
                 "--features-dir", str(tiny_cohort_dir / "features"), "--genes", str(tiny_cohort_dir / "genes.csv"),
                 "--out", str(out)])
    _expect_error(code, capsys, "NOT-THERE.h5", "not found")
    assert not out.exists() and list(tmp_path.glob(".risks*")) == []


# ---------------------------------------------------------------- bad input: train


@pytest.fixture()
def train_with(tiny_cohort_dir, tmp_path):
    def run(clinical=tiny_cohort_dir / "clinical.csv", genes=tiny_cohort_dir / "genes.csv", extra=()):
        out = tmp_path / "run"
        code = main(["train", "--clinical", str(clinical), "--genes", str(genes), "--features-dir",
                     str(tiny_cohort_dir / "features"), "--out", str(out), *TINY_MODEL_FLAGS, *TINY_TRAIN_FLAGS, *extra])
        return code, out

    return run


@pytest.mark.parametrize("column", ["censorship", "survival_months", "case_id"])
def test_clinical_csv_without_a_required_column(train_with, tiny_cohort_dir, tmp_path, capsys, column):
    pd.read_csv(tiny_cohort_dir / "clinical.csv").drop(columns=[column]).to_csv(tmp_path / "c.csv", index=False)
    code, out = train_with(clinical=tmp_path / "c.csv")
    _expect_error(code, capsys, "c.csv", f"no column '{column}'")
    assert not out.exists()


def test_clinical_values_are_checked(train_with, tiny_cohort_dir, tmp_path, capsys):
    table = pd.read_csv(tiny_cohort_dir / "clinical.csv")
    table.loc[3, "censorship"] = 2
    table.to_csv(tmp_path / "c.csv", index=False)
    code, out = train_with(clinical=tmp_path / "c.csv")
    _expect_error(code, capsys, "'censorship' must be 1 (censored) or 0 (event); line 5 has 2")
    assert not out.exists()


def test_training_gene_list_names_missing_genes(train_with, tmp_path, capsys):
    (tmp_path / "genes.txt").write_text("GENE0001\nTP53\nBRCA1\n")
    code, out = train_with(extra=["--gene-list", str(tmp_path / "genes.txt")])
    _expect_error(code, capsys, "2 of the model's 3 genes are missing", "TP53", "BRCA1")
    assert not out.exists()


def test_training_refuses_a_corrupt_bag_before_training(train_with, tiny_cohort_dir, tmp_path, capsys):
    features = tmp_path / "features"
    shutil.copytree(tiny_cohort_dir / "features", features)
    (features / "SYN0-0007-01.h5").write_bytes(b"not an hdf5 file")
    out = tmp_path / "run"
    code = main(["train", "--clinical", str(tiny_cohort_dir / "clinical.csv"), "--genes",
                 str(tiny_cohort_dir / "genes.csv"), "--features-dir", str(features), "--out", str(out)])
    _expect_error(code, capsys, "SYN0-0007-01.h5", "not a readable HDF5")
    assert not out.exists()


def test_bad_model_settings_are_reported_not_raised(train_with, capsys):
    code, out = train_with(extra=["--heads", "3"])
    # in the command line's words: flags by their names, what the data decides by where it comes from
    _expect_error(code, capsys, "the token width (40: the width of the bags' features (32, in --features-dir)",
                  "plus --pos-dim 8) must be divisible by --heads 3")
    assert not out.exists()
    code, out = train_with(extra=["--architecture", "mcat", "--omic-sizes", "12,12"])
    _expect_error(code, capsys, "--gene-groups, --head-hidden, --pos-dim do not apply to --architecture mcat")


def test_model_settings_that_the_data_contradicts_name_where_the_data_comes_from(tiny_cohort_dir, tmp_path, capsys):
    code = main(["train", "--clinical", str(tiny_cohort_dir / "clinical.csv"), "--genes", str(tiny_cohort_dir / "genes.csv"),
                 "--features-dir", str(tiny_cohort_dir / "features"), "--out", str(tmp_path / "run"),
                 "--architecture", "mcat", "--omic-sizes", "10,10"])
    _expect_error(code, capsys, "the number of genes (24: columns of --genes, or lines of --gene-list) but "
                  "--omic-sizes (10, 10) sum to 20")
    assert not (tmp_path / "run").exists()


def test_every_flag_says_what_it_does_its_default_and_its_choices():
    """Help as a user reads it: no flag without help, defaults as they would be typed, choices listed."""
    import argparse

    from histosurv.cli import build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for name, command in commands.items():
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            flag = f"{name} {action.option_strings[0]}"
            assert action.help, f"{flag} has no help"
            assert "((" not in action.help and "None" not in action.help, f"{flag}: {action.help}"
            shown_default = action.default not in (None, False, argparse.SUPPRESS, []) and not isinstance(
                action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction))
            assert not shown_default or "default" in action.help.lower(), f"{flag} does not show its default"
    train = {a.dest: a for a in commands["train"]._actions}
    assert train["modality"].choices == ["both", "image", "genes"]
    assert train["survival_head"].choices == ["cox", "discrete"] and train["fusion"].choices == ["bilinear", "concat"]
    assert "snn 256,256,256,256" in train["hidden"].help and "mome 100,200,300,400,500,600" in train["omic_sizes"].help
    assert "peak AdamW learning rate (default: 0.0002)" == train["lr"].help
    serve = {a.dest: a for a in commands["serve"]._actions}
    assert serve["max_batch"].default == 64 and "default: 64" in serve["max_batch"].help  # ExecutionConfig's
    assert set(commands["export"]._option_string_actions["--encoder"].choices) == set(ENCODERS) >= {"resnet18", "uni", "virchow2"}


def test_an_environment_problem_is_not_blamed_on_the_slide(tiny_repo, tmp_path, capsys):
    from histosurv.runtime.slides.tissue import gpu_available

    if gpu_available():
        pytest.skip("this machine decodes on a GPU")
    code = main(["tile", str(tmp_path / "any.svs"), "--repo", str(tiny_repo), "--out", str(tmp_path / "h5"),
                 "--device", "cuda"])
    _expect_error(code, capsys, "--device cuda: this machine cannot decode or mask slides on a GPU", "use --device cpu")
    assert "any.svs" not in capsys.readouterr().err


def test_export_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    code = main(["export", "--run", str(tmp_path), "--repo", str(tmp_path / "repo")])
    _expect_error(code, capsys, "no config.json", "histosurv train")
    assert not (tmp_path / "repo").exists()
