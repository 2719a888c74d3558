"""Every GPU path of histosurv, checked and measured by one command on a bare, offline GPU box.

The boxes this is for are shared, offline and bare (Python with a CUDA torch, Triton, CuPy, nvcc,
CMake, ninja, ONNX Runtime's CPU build) and come in short slots. The command installs nothing from a
network: it uses the torch it finds, and the few wheels it needs beyond the box (cuCIM, OpenSlide)
travel with the checkout in ``.gpu-bundle/`` (``make gpu-bundle`` fills it on a networked machine).

Stages, in order; each runs in a process group of its own under its own time budget, so a hang costs
that stage and nothing else:

  bundle          install the carried wheels into a scratch folder (pip --no-index), put it on PYTHONPATH
  environment     GPU, driver, torch / CUDA / Triton / CuPy / cuCIM / ONNX Runtime; torch against pyproject's floor
  build           libhistosurv_kernels.so with CMake for this GPU's architecture, into histosurv/kernels/, and loaded
  tests           pytest -m gpu over every test file that carries the marker
  kernels         bench/kernels.py, short: Triton and CUDA C++ few-query attention against SDPA, FP16
  engines         bench/engines.py --device cuda at N = 16k and 64k: AMMASurv's engines on the GPU
  kernel-engines  bench/kernel_engines.py, short: AOTInductor packages with the kernels against without
  slides          bench/slides.py --parts pipeline --device cuda: GPU decode and tissue mask, ResNet50-trunc
  encoders        bench/encoders.py --device cuda: full-size UNI compiled in FP16 against eager autocast

Budgets: each stage may use its own share of ``--budget`` (9 minutes by default) plus whatever the
stages before it left unused, never the shares of the stages after it. A stage past its time is
killed and reported as timed out, with what it printed.

A stage fails when its command fails: a test fails, a benchmark's parity figure is over its
tolerance (the benchmarks exit 1 then), the build does not load. The run keeps going after a failure,
and exits 1 if any stage failed. It writes three files into ``--out``: gpu-check.json (every figure,
every test outcome, every skip with its reason, versions, GPU), gpu-check.md (the same for reading)
and gpu-check.log (each stage's command and output).

``--dry-run`` runs only the environment probe and lists each stage with the commands it would run and
why it would skip here; CI runs it (tests/test_gpu_check.py).

    python bench/gpu_check.py --out /tmp/gpu-check          # on the GPU box (make gpu-check OUT=...)
    python bench/gpu_check.py --out /tmp/gpu-check --dry-run
    python bench/gpu_check.py --out /tmp/gpu-check --stages build,tests --budget 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
BUNDLE = ROOT / ".gpu-bundle"  # filled by bench/gpu_bundle.py; ignored by git, carried to the GPU box
DEMO_SLIDE = "cmu_small_region.svs"
LOG_BYTES_PER_STAGE = 400_000  # the log comes back from the box: keep it small
MIN_STAGE_SECONDS = 10  # a stage with less left than this is not started


@dataclasses.dataclass
class Context:
    """What the stages share: the scratch folder, the probe's facts, the children's environment."""

    scratch: Path
    dry_run: bool
    facts: dict = dataclasses.field(default_factory=dict)
    env: dict = dataclasses.field(default_factory=dict)

    def json_path(self, stage: str) -> Path:
        return self.scratch / f"{stage}.json"

    @property
    def python(self) -> str:
        return sys.executable


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    what: str
    share: float  # seconds of the default 540 s budget
    needs: tuple[str, ...]  # requirement names, see REQUIREMENTS
    commands: Callable[[Context], list[list[str]]]
    figures: Callable[[Context], dict] | None = None  # read after the commands ran (even when one failed)


# ----------------------------------------------------------------------------- requirements

def _gpu(ctx: Context) -> str | None:
    torch = ctx.facts.get("torch") or {}
    if not torch.get("version"):
        return f"torch does not import: {torch.get('error', 'not installed')}"
    if not torch.get("cuda_available"):
        build = f"CUDA {torch['cuda']}" if torch.get("cuda") else "a CPU-only build"
        return f"no CUDA GPU: torch {torch['version']} ({build}) sees no device"
    return None


def _tool(name: str) -> Callable[[Context], str | None]:
    return lambda ctx: None if shutil.which(name, path=ctx.env.get("PATH")) else f"{name} is not on PATH"


def _triton(ctx: Context) -> str | None:
    triton = ctx.facts.get("triton") or {}
    if not triton.get("version"):
        return f"triton does not import: {triton.get('error', 'not installed')}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "TRITON_INTERPRET=1 is set: kernels would be interpreted, not compiled"
    return None


def _cucim(ctx: Context) -> str | None:
    cucim, cupy = ctx.facts.get("cucim") or {}, ctx.facts.get("cupy") or {}
    if not cucim.get("version"):
        return f"cuCIM does not import ({cucim.get('error', 'not installed')}): run make gpu-bundle and carry .gpu-bundle"
    if not cupy.get("version"):
        return f"CuPy does not import: {cupy.get('error', 'not installed')}"
    return None


def _openslide(ctx: Context) -> str | None:
    info = ctx.facts.get("openslide") or {}
    return None if info.get("version") else (
        f"OpenSlide does not import ({info.get('error', 'not installed')}): the slide benchmark's serial baseline needs it")


def _bundle_fits(ctx: Context) -> str | None:
    """The carried wheels were downloaded for one Python (bench/gpu_bundle.py --python-version): say so
    here rather than let pip refuse them one by one."""
    here = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wrong = []
    for wheel in sorted((BUNDLE / "wheels").glob("*.whl")):
        python, abi = wheel.name.split("-")[-3:-1]
        if python.startswith("cp") and not (python == here or (abi == "abi3" and int(python[3:]) <= sys.version_info.minor)):
            wrong.append(f"{wheel.name.split('-')[0]} ({python})")
    if wrong:
        return (f"the wheels in .gpu-bundle/wheels are for another Python than this {here}: {', '.join(wrong)} "
                f"(bench/gpu_bundle.py --python-version {sys.version_info.major}.{sys.version_info.minor})")
    return None


REQUIREMENTS: dict[str, Callable[[Context], str | None]] = {
    "bundle_fits": _bundle_fits,
    "gpu": _gpu, "nvcc": _tool("nvcc"), "cmake": _tool("cmake"), "ninja": _tool("ninja"), "triton": _triton,
    "cucim": _cucim, "openslide": _openslide,
}


def demo_slide_path(ctx: Context) -> Path | None:
    for folder in (BUNDLE / "cache", Path(ctx.env.get("HISTOSURV_CACHE", "")) if ctx.env.get("HISTOSURV_CACHE") else None,
                   Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "histosurv"):
        if folder is not None and (folder / DEMO_SLIDE).is_file():
            return folder / DEMO_SLIDE
    return None


# ----------------------------------------------------------------------------- the stages


def bundle_commands(ctx: Context) -> list[list[str]]:
    wheels = sorted((BUNDLE / "wheels").glob("*.whl"))
    if not wheels:
        return []
    return [[ctx.python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
             "--disable-pip-version-check", "--target", str(ctx.scratch / "site"), *map(str, wheels)]]


def environment_commands(ctx: Context) -> list[list[str]]:
    return [[ctx.python, str(BENCH / "gpu_check.py"), "--probe", str(ctx.json_path("environment"))]]


def build_commands(ctx: Context) -> list[list[str]]:
    build = ROOT / "build" / "gpu-check"
    arch = (ctx.facts.get("torch") or {}).get("capability", "").replace(".", "") or "90"
    configure = ["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja", f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
                 f"-DPython3_EXECUTABLE={ctx.python}", "-DHISTOSURV_COPY_TO_PACKAGE=ON", "-DCMAKE_BUILD_TYPE=Release"]
    load = [ctx.python, "-c", "from histosurv.kernels import cuda_ops; import sys; "
            "print('loaded:', cuda_ops.library_path()) if cuda_ops.available() else sys.exit(cuda_ops.load_error())"]
    return [configure, ["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], load]


def gpu_test_files() -> list[Path]:
    """Every test file that marks a test ``gpu``: a new GPU test is run without listing it here, and
    files without one are not collected (they may import what the GPU box lacks)."""
    return sorted(p for p in (ROOT / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text())


def tests_commands(ctx: Context) -> list[list[str]]:
    return [[ctx.python, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rA",
             f"--junitxml={ctx.scratch / 'junit.xml'}", *map(str, gpu_test_files())]]


def bench_command(ctx: Context, stage: str, script: str, *args: str) -> list[list[str]]:
    return [[ctx.python, str(BENCH / script), *args, "--json", str(ctx.json_path(stage))]]


def slides_commands(ctx: Context) -> list[list[str]]:
    svs = demo_slide_path(ctx)
    # Without imagecodecs (80 MB, more than the bundle can carry) tifffile cannot write JPEG tiles
    compression = "jpeg" if (ctx.facts.get("imagecodecs") or {}).get("version") else "deflate"
    return bench_command(ctx, "slides", "slides.py", "--parts", "pipeline", "--device", "cuda", "--encoder", "resnet50_trunc",
                         "--encoder-engine", "torch_cuda_fp16",
                         "--width", "12288", "--height", "9216", "--compression", compression, "--batch-size", "64",
                         "--workers", "4", "--workdir", str(ctx.scratch / "slides"), *(["--svs", str(svs)] if svs else []))


STAGES: tuple[Stage, ...] = (
    Stage("bundle", "install the wheels carried in .gpu-bundle/wheels, offline", 20, ("bundle_fits",), bundle_commands),
    Stage("environment", "GPU, driver and versions; torch against pyproject's floor", 20, (), environment_commands),
    Stage("build", "libhistosurv_kernels.so for this GPU's architecture, into the package, and loaded", 70,
          ("gpu", "nvcc", "cmake", "ninja"), build_commands),
    Stage("tests", "pytest -m gpu: kernel parity (FP32/FP16/BF16, N up to 256k), CUDA torch packages with and "
          "without the kernels, GPU decode and tissue mask", 130, ("gpu",), tests_commands,
          lambda ctx: read_junit(ctx.scratch / "junit.xml")),
    Stage("kernels", "bench/kernels.py: few-query attention, Triton and CUDA C++ against SDPA", 35, ("gpu", "triton"),
          lambda ctx: bench_command(ctx, "kernels", "kernels.py", "--sizes", "16384,65536,262144", "--queries", "6,16",
                                    "--repeat", "20", "--warmup", "3"),
          lambda ctx: read_json(ctx.json_path("kernels"))),
    Stage("engines", "bench/engines.py --device cuda: AMMASurv's engines at N = 16k, 64k", 60, ("gpu",),
          lambda ctx: bench_command(ctx, "engines", "engines.py", "--device", "cuda", "--sizes", "16384,65536",
                                    "--repeat", "5", "--budget", "10", "--timeout", "120"),
          lambda ctx: read_json(ctx.json_path("engines"))),
    Stage("kernel-engines", "bench/kernel_engines.py: AOTInductor packages with the kernels against without", 50,
          ("gpu", "triton"),
          lambda ctx: bench_command(ctx, "kernel-engines", "kernel_engines.py", "--sizes", "16384,65536",
                                    "--repeat", "10", "--warmup", "2"),
          lambda ctx: read_json(ctx.json_path("kernel-engines"))),
    Stage("slides", "bench/slides.py: slide to features with GPU decode and mask, ResNet50-trunc in FP16 on the GPU", 55,
          ("gpu", "cucim", "openslide"), slides_commands, lambda ctx: read_json(ctx.json_path("slides"))),
    # the export and the FP16 compile of a 303 M-parameter ViT take most of this stage; the timed part is short
    Stage("encoders", "bench/encoders.py: full-size UNI, AOTInductor FP16 against eager autocast, tiles/s", 100, ("gpu",),
          lambda ctx: bench_command(ctx, "encoders", "encoders.py", "--device", "cuda", "--encoders", "uni",
                                    "--engines", "torch_cuda_fp16", "--batch", "256",
                                    "--repeat", "10", "--budget", "20"),
          lambda ctx: read_json(ctx.json_path("encoders"))),
)


# ----------------------------------------------------------------------------- the probe (a child process)


def probe(path: Path) -> int:
    """Runs in the environment stage's child: versions and the GPU, written as JSON. Importing torch
    here, not in the parent, keeps a broken CUDA install from taking the whole run down."""
    facts: dict = {"python": sys.version.split()[0], "executable": sys.executable}
    facts["torch"] = _try_import("torch", _torch_facts)
    facts["triton"] = _try_import("triton", lambda m: {"version": m.__version__})
    facts["cupy"] = _try_import("cupy", _cupy_facts)
    facts["cucim"] = _try_import("cucim", lambda m: {"version": m.__version__})
    facts["onnxruntime"] = _try_import("onnxruntime", lambda m: {
        "version": m.__version__, "providers": m.get_available_providers(), "gpu_build": _dist("onnxruntime-gpu") is not None})
    facts["tensorrt"] = _try_import("tensorrt", lambda m: {"version": m.__version__})
    facts["openslide"] = _try_import("openslide", lambda m: {"version": m.__version__, "library": m.__library_version__})
    facts["imagecodecs"] = _try_import("imagecodecs", lambda m: {"version": m.__version__})
    facts["histosurv"] = _try_import("histosurv", lambda m: {"version": m.__version__, "path": str(Path(m.__file__).parent)})
    facts["torch_floor"] = torch_floor()
    Path(path).write_text(json.dumps(facts, indent=2, default=str))
    version = (facts["torch"] or {}).get("version")
    if version is None:
        print(f"torch does not import: {facts['torch'].get('error')}")
        return 1
    if facts["torch_floor"] and _release(version) < _release(facts["torch_floor"]):
        print(f"torch {version} is older than the floor pyproject.toml declares (torch>={facts['torch_floor']})")
        return 1
    print(json.dumps({k: facts[k] for k in ("python", "torch", "triton", "cupy", "cucim", "onnxruntime")}, default=str))
    return 0


def _try_import(name: str, describe) -> dict:
    try:
        module = __import__(name)
        return describe(module)
    except Exception as exc:  # noqa: BLE001 - a probe reports whatever breaks, it never stops
        return {"version": None, "error": f"{type(exc).__name__}: {exc}"[:300]}


def _torch_facts(torch) -> dict:
    facts = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if facts["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        facts.update(device=props.name, capability=f"{props.major}.{props.minor}", devices=torch.cuda.device_count(),
                     memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count)
    return facts


def _cupy_facts(cupy) -> dict:
    facts = {"version": cupy.__version__}
    try:
        facts["devices"] = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001
        facts["devices"], facts["error"] = 0, f"{type(exc).__name__}: {exc}"[:200]
    return facts


def _dist(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_floor() -> str | None:
    """The lowest torch release pyproject.toml accepts (``torch>=X.Y`` in the train extra)."""
    found = re.search(r'"torch>=([0-9][0-9.]*)"', (ROOT / "pyproject.toml").read_text())
    return found.group(1) if found else None


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


# ----------------------------------------------------------------------------- running


def run_stage(stage: Stage, ctx: Context, seconds: float, log) -> dict:
    """The stage's commands in turn, all within ``seconds``; a failing command ends the stage."""
    result = {"stage": stage.name, "what": stage.what, "budget_s": round(seconds, 1), "commands": [], "status": "passed"}
    started = time.monotonic()
    commands = stage.commands(ctx)
    if not commands:
        result.update(status="skipped", reason="nothing to do: .gpu-bundle/wheels holds no wheels")
        return result
    for command in commands:
        left = seconds - (time.monotonic() - started)
        log.write(f"\n=== {stage.name}: {' '.join(command)}\n")
        log.flush()
        code, output = run_command(command, ctx.env, left, log)
        result["commands"].append({"command": command, "exit": code})
        if code is None:
            result.update(status="timed out", reason=f"killed after {seconds:.0f} s (its budget)", tail=output[-2000:])
            break
        if code != 0:
            result.update(status="failed", reason=f"{_short(command)} exited {code}", tail=output[-2000:])
            break
    result["seconds"] = round(time.monotonic() - started, 1)
    if stage.figures is not None:
        try:
            result["figures"] = stage.figures(ctx)
        except Exception as exc:  # noqa: BLE001 - a stage that wrote nothing still has its status
            result["figures_error"] = f"{type(exc).__name__}: {exc}"
    return result


def run_command(command: list[str], env: dict, seconds: float, log) -> tuple[int | None, str]:
    """Runs ``command`` in its own process group, its output into ``log`` (capped) and a tail kept in
    memory; kills the whole group at ``seconds``. Returns (exit code or None on timeout, output tail)."""
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    tail: list[bytes] = []
    written = [0]

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            tail.append(line)
            del tail[:-200]
            if written[0] < LOG_BYTES_PER_STAGE:
                log.write(line.decode("utf-8", "replace"))
                written[0] += len(line)
        log.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=max(seconds, 1))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        code = None
    reader.join(timeout=10)
    if written[0] >= LOG_BYTES_PER_STAGE:
        log.write(f"[... output past {LOG_BYTES_PER_STAGE} bytes left out of this log ...]\n")
    return code, b"".join(tail).decode("utf-8", "replace")


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def _short(command: list[str]) -> str:
    """The command as the summary names it: ``pip install``, ``kernels.py``, ``cmake --build``."""
    if Path(command[0]).name.startswith("python") and len(command) > 2:
        return " ".join(command[2:4]) if command[1] == "-m" else "python -c" if command[1] == "-c" else Path(command[1]).name
    return " ".join([Path(command[0]).name, *command[1:2]])


def child_env(ctx: Context) -> dict:
    """The children's environment: the checkout and the carried wheels on PYTHONPATH (nothing is
    installed into the box's Python), the demo slide's cache, unbuffered output."""
    paths = [str(ctx.scratch / "site"), str(ROOT), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "PYTHONUNBUFFERED": "1"}
    if (BUNDLE / "cache" / DEMO_SLIDE).is_file():
        env["HISTOSURV_CACHE"] = str(BUNDLE / "cache")
    env.pop("HISTOSURV_KERNELS_LIB", None)  # set once the build stage has built this GPU's library
    return env


def plan(stages: list[Stage], budget: float) -> dict[str, float]:
    """Each stage's share of ``budget``: its default share, scaled so the shares add up to the budget."""
    total = sum(s.share for s in stages)
    return {s.name: s.share * budget / total for s in stages}


def run_all(stages: list[Stage], ctx: Context, budget: float, log) -> list[dict]:
    shares = plan(stages, budget)
    deadline = time.monotonic() + budget
    results = []
    for i, stage in enumerate(stages):
        later = sum(shares[s.name] for s in stages[i + 1:])
        seconds = deadline - time.monotonic() - later  # its share plus what earlier stages left unused
        missing = [reason for need in stage.needs if (reason := REQUIREMENTS[need](ctx))]
        if missing:
            results.append({"stage": stage.name, "what": stage.what, "status": "skipped", "reason": "; ".join(missing)})
        elif seconds < MIN_STAGE_SECONDS:
            results.append({"stage": stage.name, "what": stage.what, "status": "not started",
                            "reason": f"{max(seconds, 0):.0f} s left for it of the {budget:.0f} s budget"})
        else:
            print(f"[{time.strftime('%H:%M:%S')}] {stage.name}: {stage.what} (up to {seconds:.0f} s)", flush=True)
            results.append(run_stage(stage, ctx, seconds, log))
            after_stage(stage, ctx, results[-1])
        r = results[-1]
        print(f"[{time.strftime('%H:%M:%S')}] {stage.name}: {r['status']}"
              + (f" ({r['reason']})" if r.get("reason") else "") + (f", {r['seconds']} s" if "seconds" in r else ""), flush=True)
    return results


def after_stage(stage: Stage, ctx: Context, result: dict) -> None:
    """What later stages learn from this one: the probe's facts; the library just built, which the GPU
    tests then load instead of building their own (tests/test_kernels_build.py's ops_loaded)."""
    if stage.name == "environment":
        ctx.facts = read_json(ctx.json_path("environment")) or {}
        result["figures"] = ctx.facts
    if stage.name == "build" and result["status"] == "passed":
        ctx.env["HISTOSURV_KERNELS_LIB"] = str(ROOT / "histosurv" / "kernels" / "libhistosurv_kernels.so")


def dry_run(stages: list[Stage], ctx: Context, budget: float, log) -> list[dict]:
    """The probe runs for real (it says why stages would skip here); every other stage is listed."""
    shares = plan(stages, budget)
    results = []
    for stage in stages:
        if stage.name == "environment":
            result = run_stage(stage, ctx, shares[stage.name] + 60, log)  # a cold import of torch can be slow
            after_stage(stage, ctx, result)
            results.append({**result, "budget_s": round(shares[stage.name], 1)})
            continue
        missing = [reason for need in stage.needs if (reason := REQUIREMENTS[need](ctx))]
        commands = stage.commands(ctx)
        entry = {"stage": stage.name, "what": stage.what, "budget_s": round(shares[stage.name], 1),
                 "commands": [{"command": c} for c in commands]}
        if missing:
            entry.update(status="would skip", reason="; ".join(missing))
        elif not commands:
            entry.update(status="would skip", reason="nothing to do: .gpu-bundle/wheels holds no wheels")
        else:
            entry["status"] = "would run"
        results.append(entry)
    return results


# ----------------------------------------------------------------------------- figures


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def read_junit(path: Path) -> dict | None:
    """pytest's JUnit XML as counts and lists: each failure with its message, each skip with its reason."""
    if not path.is_file():
        return None
    outcome = {"passed": [], "failed": [], "skipped": []}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped")
        if bad is not None:
            outcome["failed"].append({"test": name, "message": (bad.get("message") or bad.text or "")[:600]})
        elif skipped is not None:
            outcome["skipped"].append({"test": name, "reason": (skipped.get("message") or "")[:300]})
        else:
            outcome["passed"].append({"test": name, "seconds": round(float(case.get("time") or 0), 2)})
    return outcome


# ----------------------------------------------------------------------------- the summary


def summary(results: list[dict], ctx: Context, budget: float, started: float) -> dict:
    failed = [r["stage"] for r in results if r["status"] in ("failed", "timed out")]
    return {
        "format": "histosurv.gpu-check/1",
        "dry_run": ctx.dry_run,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "budget_s": budget,
        "seconds": round(time.monotonic() - started, 1),
        "machine": machine_facts(),
        "environment": ctx.facts,
        "failed": failed,
        "stages": results,
    }


def machine_facts() -> dict:
    facts = {"host": os.uname().nodename, "cpus": os.cpu_count()}
    smi = _first_line(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"])
    if smi:
        facts["nvidia_smi"] = smi
    nvcc = _first_line(["nvcc", "--version"], last=True)
    if nvcc:
        facts["nvcc"] = nvcc
    facts["tools"] = {name: shutil.which(name) for name in ("nvcc", "cmake", "ninja", "nvidia-smi")}
    return facts


def _first_line(command: list[str], last: bool = False) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line for line in out if line.strip()]
    return (lines[-1] if last else lines[0]) if lines else None


def markdown(report: dict) -> str:
    from _gpu_summary import render  # the tables, kept apart from the runner

    return render(report)


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for gpu-check.json, gpu-check.md and gpu-check.log (created)")
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole run, shared by the stages (default 540)")
    p.add_argument("--stages", help=f"comma-separated subset of {','.join(s.name for s in STAGES)} (in their order)")
    p.add_argument("--dry-run", action="store_true", help="probe the environment; list the rest with what would run or why not")
    p.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # the environment stage's child
    args = p.parse_args(argv)
    if args.probe is None and args.out is None:
        p.error("--out is required")
    if args.budget < MIN_STAGE_SECONDS:
        p.error(f"--budget must be at least {MIN_STAGE_SECONDS} seconds")
    return args


def select(names: str | None) -> list[Stage]:
    if not names:
        return list(STAGES)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = sorted(set(wanted) - {s.name for s in STAGES})
    if unknown:
        raise SystemExit(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(s.name for s in STAGES)}")
    chosen = [s for s in STAGES if s.name in wanted]
    if "environment" not in wanted:  # every requirement is read from its facts
        chosen.insert(1 if chosen and chosen[0].name == "bundle" else 0, STAGES[1])
    return chosen


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe is not None:
        return probe(args.probe)
    stages = select(args.stages)
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="histosurv-gpu-check-") as scratch:
        ctx = Context(scratch=Path(scratch), dry_run=args.dry_run)
        ctx.env = child_env(ctx)
        with open(args.out / "gpu-check.log", "w") as log:
            log.write(f"histosurv gpu-check {'dry run ' if args.dry_run else ''}in {ROOT}, python {sys.executable}\n")
            runner = dry_run if args.dry_run else run_all
            results = runner(stages, ctx, args.budget, log)
        report = summary(results, ctx, args.budget, started)
    write_atomically(args.out / "gpu-check.json", json.dumps(report, indent=2, default=str) + "\n")
    text = markdown(report)
    write_atomically(args.out / "gpu-check.md", text)
    print()
    print(text)
    return 1 if report["failed"] else 0


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    sys.exit(main())
