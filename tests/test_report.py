"""histosurv report: one self-contained HTML page per case, from the real SVS and a real model repository,
checked for its content, for the absence of any URL, and in a real headless browser."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from html import escape
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histosurv.data.tables import GeneTable
from histosurv.runtime.pipeline import SlideConfig, featurize_slide, open_encoder
from histosurv.runtime.predict import FusionPredictor
from histosurv.runtime.report import CaseReport, SlideView, render_html

from .conftest import run_cli

CHROMIUM = "/usr/bin/chromium"
DATA_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
TOP_K = 4


@pytest.fixture(scope="module")
def report(slide_repo, cmu_svs, tmp_path_factory):
    """(the HTML of the case's report, the case's PatientRisk as predict --slide's code computes it, the model version)."""
    repo, cohort_dir, case = slide_repo
    out = tmp_path_factory.mktemp("report") / "case.html"
    done = run_cli("report", "--repo", repo, "--slide", cmu_svs, "--genes", cohort_dir / "genes.csv",
                   "--case-id", case, "--out", out, "--top-k", str(TOP_K))
    assert done.returncode == 0, done.stderr
    predictor = FusionPredictor.from_repository(repo)
    encoder, _ = open_encoder(repo, predictor.version)
    bag = featurize_slide(cmu_svs, encoder, SlideConfig()).bag
    expected = predictor.patient(case, [bag], predictor.genes_for(GeneTable.read(cohort_dir / "genes.csv"), case))
    return out, out.read_text(encoding="utf-8"), expected, predictor.version


def test_the_report_shows_the_cases_risk_group_and_survival(report):
    _, html, expected, version = report
    head = version.info.survival
    assert f'<div class="risk">{expected.risk:.4f}</div>' in html
    assert escape(head.risk_definition) in html
    if head.has_curves:  # a version exported with survival outputs: S(t) and the group are shown, not excused
        assert f"{head.groups[expected.risk_group]} risk</span>" in html
        for t, s in zip(head.times, expected.survival):
            assert f"<th>{t:g} mo</th>" in html and f"<td>{100 * s:.1f}%</td>" in html
        assert "S(t) of this case: not available" not in html
    assert "<h2>Gene attributions</h2><figure>" in html  # the chart itself, not its excuse
    assert "resnet18_encoder v1" in html and version.label in html
    n = expected.slides[0].n_patches  # the data-quality table's row, and the QC caption
    assert f"<td>{n}</td>" in html and f"the {n} patches scored" in html


def test_the_report_is_self_contained(report):
    _, html, _, _ = report
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(//|[a-z]+:(?!image/png;base64))""", html, re.I)
    assert "<script" not in html.lower() and "<link" not in html.lower()
    images = DATA_URI.findall(html)
    assert len(images) == 4 + TOP_K  # survival, QC, heatmap, genes, then the crops
    for data in images:
        with Image.open(io.BytesIO(base64.b64decode(data))) as image:
            assert image.format == "PNG" and min(image.size) > 8
            image.verify()


def _slide_view(**overrides) -> SlideView:
    rng = np.random.default_rng(0)
    values = dict(
        name="slide.svs", risk=0.5, thumbnail=rng.integers(0, 255, (60, 80, 3), dtype=np.uint8), scale=(0.1, 0.1),
        mask=np.pad(np.ones((4, 6), bool), 1), mask_downsample=100.0, coords=np.array([[100, 100], [356, 100]]),
        patch_size_level0=256, tissue_fraction=0.5, mpp=0.5, slide_mpp=0.25, level=0, dimensions=(800, 600),
        reader="openslide",
    )
    return SlideView(**{**values, **overrides})


def test_what_a_model_version_cannot_give_is_said_and_all_text_is_escaped():
    """A version without survival outputs, attention or gene attributions: each part says so; case ids,
    slide names and notes come from users' files and are never markup."""
    case = CaseReport(case_id="<img src=//evil.example/x>", risk=1.25, risk_definition="Cox & co",
                      slides=[_slide_view(name='"><script>x</script>')], notes=["override: <b>mpp</b>"],
                      provenance={"Model": "m v1"})
    html = render_html(case)
    assert "<script>" not in html and "<b>mpp</b>" not in html and "<img src=//evil" not in html
    assert "&lt;img src=//evil.example/x&gt;" in html and "Cox &amp; co" in html
    assert "risk group not available for this model version" in html
    assert "S(t) of this case: not available for this model version" in html
    assert "Gene attributions: not available for this model version" in html
    assert "top patches: not available" in html
    assert len(DATA_URI.findall(html)) == 1  # the QC thumbnail only: no curve, heatmap, chart or crops


def test_report_refuses_an_output_that_is_not_html(slide_repo, cmu_svs, tmp_path):
    repo, _, _ = slide_repo
    done = run_cli("report", "--repo", repo, "--slide", cmu_svs, "--out", tmp_path / "case.pdf")
    assert done.returncode == 2 and "--out" in done.stderr and ".html" in done.stderr
    assert not (tmp_path / "case.pdf").exists()


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")
def test_the_report_renders_in_headless_chromium(report, tmp_path):
    """Opened from disk by a real browser with no network: the screenshot shows the page, not a blank one."""
    path = report[0]
    shot = tmp_path / "shot.png"
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
               path.resolve().as_uri()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 1600)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000  # slide thumbnails and plots, not a blank page
    header = pixels[5:40, 5:400]  # the dark-blue case header bar at the top (#1b2a49)
    assert np.abs(header.reshape(-1, 3).mean(0) - (27, 42, 73)).max() < 25
