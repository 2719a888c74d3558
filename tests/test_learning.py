"""The recipe still learns: the small version of ``bench/learning.py`` that CI runs.

AMMASurv and coxnet train with their recipes on 200 patients of a population that none of the
recipes were chosen on (biology seed 3, not the demo's 0), and are scored on an external cohort of
600 patients of the same population, where the c-index's sampling error is about 0.015. A recipe that
stops learning (a learning rate of zero, a schedule that never leaves warm-up, a loss that no longer
reaches the model) falls to about 0.5 and fails the 0.62 floor; the oracle is printed beside the
figures.
"""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from histosurv.data.cohort import load_cohort
from histosurv.data.synth import SynthConfig, write_synthetic_cohort
from histosurv.export.concordance import concordance_index
from histosurv.export.cross_validation import baseline_config
from histosurv.export.models.ammasurv import AMMASurvConfig
from histosurv.export.training import Splits, predict_patients, recipe, train

from .conftest import THREADS

FLOOR = 0.62


def _cohort(root, n, seed, signal):
    cfg = SynthConfig(n_patients=n, seed=seed, biology_seed=3, signal=signal, n_genes=60)
    d = write_synthetic_cohort(root / f"{signal}{seed}", cfg)
    cohort = load_cohort(d / "clinical.csv", d / "genes.csv", d / "features")
    truth = pd.read_csv(d / "truth.csv").set_index("case_id")
    return cohort, truth.loc[[p.case_id for p in cohort.patients], "log_hazard"].to_numpy()


@pytest.mark.slow
def test_ammasurv_and_coxnet_learn_at_200_patients(tmp_path, capsys):
    torch.set_num_threads(THREADS)  # the share of the cores this test process has (see conftest)
    cohort, _ = _cohort(tmp_path, 200, seed=0, signal="share")
    external, oracle_risk = _cohort(tmp_path, 600, seed=100, signal="share")
    everyone = list(range(len(external.patients)))
    t, e = external.times_events(everyone)
    all_patients = Splits(tuple(range(len(cohort.patients))), (), ())

    model_cfg = AMMASurvConfig(n_genes=60, feature_dim=cohort.feature_dim)
    ammasurv = train(cohort, "ammasurv", model_cfg, recipe("ammasurv", seed=0, baseline=False), splits=all_patients)
    coxnet = train(cohort, "coxnet", baseline_config("ammasurv", model_cfg, cohort), recipe("coxnet"), splits=all_patients)
    scores = {name: concordance_index(t, e, predict_patients(r.model, external, everyone)).c_index
              for name, r in (("ammasurv", ammasurv), ("coxnet", coxnet))}
    oracle = concordance_index(t, e, oracle_risk).c_index
    with capsys.disabled():
        print(f"\nexternal c-index (600 patients) after training on 200: ammasurv {scores['ammasurv']:.4f}, "
              f"coxnet {scores['coxnet']:.4f}, oracle {oracle:.4f}")
    assert scores["ammasurv"] >= FLOOR
    assert scores["coxnet"] >= FLOOR
