"""bench/gpu_check.py, the one command for GPU boxes, checked where there is no GPU: the dry run lists
every stage, a hung stage is killed at its budget and the run goes on, a failing stage fails the run,
pytest's outcomes are read back, and a parity figure over its tolerance fails a benchmark."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402


def test_dry_run_lists_every_stage_with_its_commands_and_why_it_would_skip(tmp_path):
    done = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert list(stages) == [s.name for s in gpu_check.STAGES] and report["dry_run"] and report["failed"] == []
    assert stages["environment"]["status"] == "passed"  # the probe runs for real, even in a dry run
    assert report["environment"]["torch"]["version"] == torch.__version__
    assert report["environment"]["torch_floor"] == gpu_check.torch_floor()
    for name, stage in stages.items():
        if name != "environment":
            assert stage["status"] in ("would run", "would skip") and (stage["status"] == "would run") == ("reason" not in stage)
    if not torch.cuda.is_available():
        for name in ("build", "tests", "kernels", "engines", "kernel-engines", "slides"):
            assert stages[name]["status"] == "would skip" and "no CUDA GPU" in stages[name]["reason"], stages[name]
    # the GPU tests: every file with a gpu-marked test, pytest -m gpu, outcomes written as JUnit XML
    (command,) = [c["command"] for c in stages["tests"]["commands"]]
    files = {Path(a).name for a in command if a.endswith(".py")}
    assert {"test_kernels_build.py", "test_kernel_routing.py", "test_kernels_triton.py", "test_tissue.py",
            "test_engines.py", "test_slides.py"} <= files and "test_cli.py" not in files
    assert command[command.index("-m", 3) + 1] == "gpu" and any(a.startswith("--junitxml=") for a in command)
    (configure, _, _) = [c["command"] for c in stages["build"]["commands"]]
    assert "-DHISTOSURV_COPY_TO_PACKAGE=ON" in configure  # built into the package, where the tests load it from
    assert all("--json" in c["command"] for s in ("kernels", "engines", "kernel-engines", "slides") for c in stages[s]["commands"])
    text = (tmp_path / "gpu-check.md").read_text()
    assert text.startswith("# histosurv gpu-check (dry run)") and all(f"| {name} |" in text for name in stages)
    assert (tmp_path / "gpu-check.log").is_file()


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _stage(name: str, share: float, code: str) -> gpu_check.Stage:
    return gpu_check.Stage(name, f"test stage {name}", share, (), lambda ctx: [_python(code)])


def test_a_hung_stage_is_killed_at_its_budget_with_its_children_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_STAGE_SECONDS", 1)
    marker = f"histosurv-gpu-check-test-{time.time_ns()}"
    # the hung stage leaves a grandchild that must die with it (a hang in a benchmark's worker process)
    hang = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)', '{marker}']); print('started', flush=True); time.sleep(120)"
    stages = [_stage("hang", 3, hang), _stage("broken", 3, "import sys; print('bad figure'); sys.exit(3)"),
              _stage("after", 3, "print('still ran')")]
    ctx = gpu_check.Context(scratch=tmp_path, dry_run=False)
    ctx.env = gpu_check.child_env(ctx)
    started = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        results = gpu_check.run_all(stages, ctx, budget=9, log=log)
    assert time.monotonic() - started < 25
    hung, broken, after = results
    assert hung["status"] == "timed out" and "budget" in hung["reason"] and "started" in hung["tail"]
    assert broken["status"] == "failed" and broken["reason"] == "python -c exited 3" and "bad figure" in broken["tail"]
    assert after["status"] == "passed"
    time.sleep(0.5)
    assert not [p for p in psutil.process_iter(["cmdline"]) if marker in (p.info["cmdline"] or [])]
    report = gpu_check.summary(results, ctx, 9, started)
    assert report["failed"] == ["hang", "broken"]
    assert "python -c exited 3" in gpu_check.markdown(report)


def test_budget_shares_are_scaled_and_unused_time_passes_to_the_next_stage(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "MIN_STAGE_SECONDS", 1)
    stages = [_stage("quick", 10, "pass"), _stage("second", 10, "pass"), _stage("third", 20, "pass")]
    assert gpu_check.plan(stages, 80) == {"quick": 20, "second": 20, "third": 40}
    ctx = gpu_check.Context(scratch=tmp_path, dry_run=False)
    ctx.env = gpu_check.child_env(ctx)
    with open(tmp_path / "log", "w") as log:
        quick, second, third = gpu_check.run_all(stages, ctx, budget=80, log=log)
    assert quick["budget_s"] == pytest.approx(20, abs=1)
    assert second["budget_s"] > 20 + 20 - quick["seconds"] - 2  # the first stage's unused share carried over
    assert third["budget_s"] <= 80 - quick["seconds"] - second["seconds"] + 1


def test_pytest_outcomes_are_read_back_with_reasons(tmp_path):
    (tmp_path / "test_sample.py").write_text(textwrap.dedent("""
        import pytest

        def test_good():
            assert True

        def test_bad():
            assert 1 == 2, "one is not two"

        def test_skipped():
            pytest.skip("needs a CUDA GPU")
    """))
    junit = tmp_path / "junit.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                    str(tmp_path / "test_sample.py")], cwd=tmp_path, capture_output=True, timeout=120)
    outcome = gpu_check.read_junit(junit)
    assert [t["test"] for t in outcome["passed"]] == ["test_sample::test_good"]
    assert [t["test"] for t in outcome["failed"]] == ["test_sample::test_bad"] and "one is not two" in outcome["failed"][0]["message"]
    assert outcome["skipped"] == [{"test": "test_sample::test_skipped", "reason": "needs a CUDA GPU"}]


def test_a_parity_figure_over_its_tolerance_fails_the_kernel_benchmarks():
    import kernel_engines
    import kernels

    ok = {"us": 10.0, "speedup": 2.0, "max_abs_diff": 4e-4}
    rows = [{"triton": ok, "cuda": ok}, {"triton": {**ok, "max_abs_diff": 2e-3}, "cuda": {"error": "RuntimeError: boom"}},
            {"triton": {**ok, "max_abs_diff": math.nan}}]
    assert kernels.parity_problems(rows[:1]) == {}
    assert kernels.parity_problems(rows) == {"triton over 0.001": 2, "cuda failed": 1}
    engine_rows = [{"triton_risk_rel": 3e-5, "cuda_risk_rel": 2e-4}, {"triton_risk_rel": math.nan, "cuda_risk_rel": 0.0}]
    assert kernel_engines.parity_problems(engine_rows, ["plain", "triton", "cuda"]) == {"cuda over 0.0001": 1, "triton over 0.0001": 1}


def test_the_kernel_benchmark_runs_through_the_interpreter_and_its_figures_render(tmp_path):
    out = tmp_path / "kernels.json"
    done = subprocess.run([sys.executable, str(BENCH / "kernels.py"), "--interpret", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip().endswith("errors: 0"), done.stdout[-2000:] + done.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["tolerance"] == 1e-3 and figures["problems"] == {} and len(figures["rows"]) == 2
    report = {"dry_run": False, "failed": [], "seconds": 1.0, "budget_s": 480, "environment": {}, "machine": {},
              "stages": [{"stage": "kernels", "what": "w", "status": "passed", "seconds": 1.0, "budget_s": 35, "figures": figures}]}
    text = gpu_check.markdown(report)
    assert "| 2x64 | 6 | 257 |" in text and "| 2x68 | 6 | 257 |" in text


def test_the_gpu_tests_load_the_library_the_build_stage_made(tmp_path):
    ctx = gpu_check.Context(scratch=tmp_path, dry_run=False)
    ctx.env = gpu_check.child_env(ctx)
    build = next(s for s in gpu_check.STAGES if s.name == "build")
    assert "HISTOSURV_KERNELS_LIB" not in ctx.env
    gpu_check.after_stage(build, ctx, {"status": "failed"})
    assert "HISTOSURV_KERNELS_LIB" not in ctx.env  # a failed build: the tests build their own, or skip
    gpu_check.after_stage(build, ctx, {"status": "passed"})
    assert ctx.env["HISTOSURV_KERNELS_LIB"] == str(ROOT / "histosurv" / "kernels" / "libhistosurv_kernels.so")
