"""The signal families of ``histosurv synth``: each plants a known log-hazard of its own kind.

Every family must give an informative oracle (its true log-hazard ranks the outcomes), a usual share
of censored patients, and the property it exists for: linear in mean-pooled features and genes
(linear), invisible to mean pooling (spatial, and the image half of interaction), a gene risk that
needs two genes (contrast). The default (share) must keep writing the files it always wrote.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from histosurv.cli import main
from histosurv.data.features import read_bag
from histosurv.data.synth import SIGNALS, SynthConfig, _Biology, write_synthetic_cohort
from histosurv.export.concordance import concordance_index

SMALL = dict(n_genes=24, n_signal_genes=4, feature_dim=32, min_patches=16, max_patches=32)


def _small(signal: str, n: int = 300, **kw) -> SynthConfig:
    return SynthConfig(n_patients=n, signal=signal, **{**SMALL, **kw})


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {s: write_synthetic_cohort(root / s, _small(s)) for s in SIGNALS}


def _read(d):
    truth = pd.read_csv(d / "truth.csv")
    clinical = pd.read_csv(d / "clinical.csv")
    per_case = clinical.drop_duplicates("case_id").set_index("case_id").loc[truth.case_id]
    genes = pd.read_csv(d / "genes.csv").set_index("case_id").loc[truth.case_id]
    return truth, clinical, per_case, genes


def _bags(d, clinical):
    bags = {}
    for row in clinical.itertuples():
        bags.setdefault(row.case_id, []).append(read_bag(d / "features" / (row.slide_id.removesuffix(".svs") + ".h5")))
    return bags


def _mean_features(d, truth, clinical):
    bags = _bags(d, clinical)
    return np.stack([np.concatenate([b.features for b in bags[c]]).mean(0) for c in truth.case_id])


def _fit_corr(x, y, held_out=False):
    """Correlation of y with its least-squares fit on x: in-sample, or fitted on one half, read on the other."""
    x = np.c_[np.ones(len(x)), (x - x.mean(0)) / (x.std(0) + 1e-9)]
    fit, test = (slice(0, len(y) // 2), slice(len(y) // 2, None)) if held_out else (slice(None), slice(None))
    coef = np.linalg.lstsq(x[fit], y[fit], rcond=None)[0]
    return float(np.corrcoef(x[test] @ coef, y[test])[0, 1])


@pytest.mark.parametrize("signal", SIGNALS)
def test_every_family_has_an_informative_oracle_and_usual_censoring(cohorts, signal):
    truth, _, per_case, _ = _read(cohorts[signal])
    assert list(truth.columns) == ["case_id", "r_image", "r_genes", "log_hazard", "aggressive_share"]
    event = per_case.censorship.to_numpy() == 0
    oracle = concordance_index(per_case.survival_months, event, truth.log_hazard).c_index
    censored = 1 - event.mean()
    print(f"{signal}: oracle c-index {oracle:.3f}, censored {censored:.2f}")
    assert oracle > 0.65
    assert 0.15 <= censored <= 0.45


@pytest.mark.parametrize("signal", SIGNALS)
def test_same_seed_same_files(tmp_path, signal):
    cfg = _small(signal, n=30)
    a, b = write_synthetic_cohort(tmp_path / "a", cfg), write_synthetic_cohort(tmp_path / "b", cfg)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    other = write_synthetic_cohort(tmp_path / "c", SynthConfig(**{**cfg.__dict__, "seed": 1}))
    assert (other / "truth.csv").read_bytes() != (a / "truth.csv").read_bytes()


# clinical.csv and genes.csv of this cohort as written before the families existed: the default
# family keeps its random draws in the same order (a numpy change of random streams would break it).
GOLDEN_SHARE = {
    "clinical.csv": "4d175609b2f84c5d645b34998ee9c7201e54eb266303c40c8940a4a2639fc4b6",
    "genes.csv": "b7fd3f4aa5d97ee9f91807af1320d160f4e489c0f0a51ee8b9452c3ed3718279",
}


def test_share_is_the_historical_default(cohorts, tmp_path):
    assert SynthConfig().signal == "share" and not SynthConfig().clinical
    d = write_synthetic_cohort(tmp_path / "tiny", SynthConfig(n_patients=60, **{**SMALL, "min_patches": 8, "max_patches": 24}))
    for name, digest in GOLDEN_SHARE.items():
        assert hashlib.sha256((d / name).read_bytes()).hexdigest() == digest, name
    truth, *_ = _read(cohorts["share"])
    np.testing.assert_allclose(truth.log_hazard, 1.0 * (truth.r_image + truth.r_genes), rtol=0, atol=1e-12)
    assert 0.15 < truth.aggressive_share.std()  # the share is the image signal


def test_linear_is_linear_in_mean_features_and_genes(cohorts):
    d = cohorts["linear"]
    truth, clinical, _, genes = _read(d)
    x = np.c_[_mean_features(d, truth, clinical), genes.to_numpy()]
    assert _fit_corr(x, truth.log_hazard.to_numpy()) > 0.9
    assert _fit_corr(x, truth.log_hazard.to_numpy(), held_out=True) > 0.9


def test_spatial_signal_is_in_the_layout_not_the_share(cohorts):
    d = cohorts["spatial"]
    truth, clinical, _, _ = _read(d)
    assert truth.aggressive_share.std() < 0.02  # rounding a quarter of 16-32 patches; share: about 0.2
    assert abs(truth.aggressive_share.mean() - 0.25) < 0.01
    # mean pooling sees nothing of the image risk
    assert abs(_fit_corr(_mean_features(d, truth, clinical), truth.r_image.to_numpy(), held_out=True)) < 0.3
    # the layout does: recognise aggressive patches by their nearest prototype, measure how often an
    # aggressive patch's grid neighbours are aggressive too
    cfg = _small("spatial")
    prototypes = _Biology(np.random.default_rng([cfg.biology_seed, 1]), cfg).prototypes
    bags = _bags(d, clinical)
    clustering = []
    for case in truth.case_id:
        same = total = 0
        for bag in bags[case]:
            kind = np.argmin(((bag.features[:, None] - prototypes[None]) ** 2).sum(-1), 1)
            cells = {tuple(c): k == 0 for c, k in zip(bag.coords // cfg.patch_size, kind)}
            for (x, y), aggressive in cells.items():
                if aggressive:
                    near = [cells[n] for n in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)) if n in cells]
                    same, total = same + sum(near), total + len(near)
        clustering.append(same / max(total, 1))
    assert np.corrcoef(clustering, truth.r_image)[0, 1] > 0.5


def test_interaction_is_not_additive_and_its_image_factor_is_not_in_the_mean(cohorts):
    d = cohorts["interaction"]
    truth, clinical, _, _ = _read(d)
    additive = _fit_corr(truth[["r_image", "r_genes"]].to_numpy(), truth.log_hazard.to_numpy())
    assert additive**2 < 0.6
    assert abs(_fit_corr(_mean_features(d, truth, clinical), truth.r_image.to_numpy(), held_out=True)) < 0.3
    assert np.corrcoef(truth.aggressive_share, truth.r_image)[0, 1] > 0.8  # a share a patch classifier can measure


def test_contrast_needs_both_genes(cohorts):
    truth, _, _, genes = _read(cohorts["contrast"])
    r = truth.r_genes.to_numpy()
    assert _fit_corr(genes.to_numpy(), r) > 0.99
    assert max(abs(np.corrcoef(genes[c], r)[0, 1]) for c in genes) < 0.5


def test_clinical_covariates(tmp_path):
    plain = write_synthetic_cohort(tmp_path / "plain", _small("share", n=200))
    d = write_synthetic_cohort(tmp_path / "clin", _small("share", n=200, clinical=True))
    clinical = pd.read_csv(d / "clinical.csv")
    assert list(clinical.columns[-3:]) == ["age", "sex", "stage"]
    assert pd.api.types.is_numeric_dtype(clinical.age) and clinical.age.between(20, 95).all()
    assert set(clinical.sex) == {"F", "M"} and set(clinical.stage) == {"I", "II", "III", "IV"}
    assert (clinical.groupby("case_id")[["age", "sex", "stage"]].nunique() == 1).all().all()
    # the same patients, genes and slides; only the outcomes feel the covariates
    assert (d / "genes.csv").read_bytes() == (plain / "genes.csv").read_bytes()
    for f in (plain / "features").iterdir():
        assert (d / "features" / f.name).read_bytes() == f.read_bytes()
    truth = pd.read_csv(d / "truth.csv")
    np.testing.assert_allclose(truth.log_hazard - truth.r_clinical, truth.r_image + truth.r_genes, atol=1e-12)
    per_case = clinical.drop_duplicates("case_id").set_index("case_id").loc[truth.case_id]
    by_stage = truth.r_clinical.groupby(per_case.stage.to_numpy()).mean()
    assert list(by_stage.index) == ["I", "II", "III", "IV"] and by_stage.is_monotonic_increasing


def test_a_thousand_patients(tmp_path):
    cfg = SynthConfig(n_patients=1000, signal="linear", n_genes=8, n_signal_genes=2, feature_dim=8,
                      min_patches=8, max_patches=8, multi_slide_fraction=0.0)
    truth = pd.read_csv(write_synthetic_cohort(tmp_path / "big", cfg) / "truth.csv")
    assert len(truth) == 1000 and truth.case_id.is_unique and np.isfinite(truth.log_hazard).all()


def test_unknown_family_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="linear, share, contrast, interaction, spatial"):
        SynthConfig(signal="nonlinear")
    with pytest.raises(SystemExit) as exit:
        main(["synth", "--out", str(tmp_path / "x"), "--signal", "nonlinear"])
    assert exit.value.code == 2 and "'interaction'" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "y"), "--signal", "contrast", "--n-signal-genes", "1"]) == 2
    assert "n_signal_genes >= 2" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_cli_writes_a_family_with_clinical_columns(tmp_path, capsys):
    out = tmp_path / "lin"
    args = ["synth", "--out", str(out), "--signal", "linear", "--n-patients", "150", "--clinical", "--feature-dim", "16",
            "--n-genes", "12", "--n-signal-genes", "3", "--min-patches", "8", "--max-patches", "12"]
    assert main(args) == 0
    assert "150 patients (linear signal)" in capsys.readouterr().out
    assert {"age", "sex", "stage"} <= set(pd.read_csv(out / "clinical.csv").columns)
    assert "r_clinical" in pd.read_csv(out / "truth.csv").columns
