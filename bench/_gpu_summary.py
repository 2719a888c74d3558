"""gpu-check.md: bench/gpu_check.py's report as Markdown, one table per stage that has figures.

Every figure is also in gpu-check.json; this file is what a person reads first, and what the README
quotes. Only the standard library: it runs in the parent, which never imports torch.
"""

from __future__ import annotations

from typing import Callable, Sequence

__all__ = ["render"]

Column = tuple[str, Callable[[dict], str]]


def render(report: dict) -> str:
    lines = [f"# histosurv gpu-check{' (dry run)' if report['dry_run'] else ''}", ""]
    lines += [_versions(report), ""]
    if report["dry_run"]:
        lines.append("Dry run: only the environment probe ran; each stage says what it would run and why it would skip here.")
    elif report["failed"]:
        lines.append(f"**Failed: {', '.join(report['failed'])}.**")
    else:
        lines.append("**Every stage that ran passed.**")
    lines.append(f"Took {report['seconds']:.0f} s of a {report['budget_s']:.0f} s budget.")
    lines += ["", "## Stages", ""]
    lines += _table(report["stages"], [
        ("stage", lambda r: r["stage"]),
        ("status", lambda r: r["status"]),
        ("seconds", lambda r: f"{r['seconds']:.0f}" if "seconds" in r else "-"),
        ("budget s", lambda r: f"{r['budget_s']:.0f}" if "budget_s" in r else "-"),
        ("why / what", lambda r: r.get("reason") or r["what"]),
    ])
    for stage in report["stages"]:
        section = SECTIONS.get(stage["stage"])
        body = section(stage) if section and stage.get("figures") else []
        if stage.get("tail") and stage["status"] in ("failed", "timed out"):
            body += ["", "Last lines of its output:", "", "```", *stage["tail"].strip().splitlines()[-30:], "```"]
        if report["dry_run"] and stage.get("commands"):
            body += ["```", *(" ".join(c["command"]) for c in stage["commands"]), "```"]
        if body:
            lines += ["", f"## {stage['stage']}", "", *body]
    return "\n".join(lines).rstrip() + "\n"


def _versions(report: dict) -> str:
    env, machine = report.get("environment") or {}, report.get("machine") or {}
    torch = env.get("torch") or {}
    gpu = torch.get("device") or "no CUDA GPU"
    if torch.get("capability"):
        gpu += f" (compute capability {torch['capability']}, {torch.get('memory_bytes', 0) / 2**30:.0f} GiB)"
    parts = [f"GPU: {gpu}"]
    if machine.get("nvidia_smi"):
        parts.append(f"nvidia-smi: {machine['nvidia_smi']}")
    parts.append(f"python {env.get('python', '?')}, torch {torch.get('version') or 'missing'}"
                 + (f" (CUDA {torch['cuda']})" if torch.get("cuda") else "") + f", floor {env.get('torch_floor') or '?'}")
    for name in ("triton", "cupy", "cucim", "onnxruntime", "tensorrt", "openslide"):
        info = env.get(name) or {}
        parts.append(f"{name} {info.get('version') or 'missing'}")
    ort = env.get("onnxruntime") or {}
    if ort.get("providers"):
        parts.append(f"ORT providers {', '.join(ort['providers'])}")
    if machine.get("nvcc"):
        parts.append(f"nvcc: {machine['nvcc']}")
    parts.append(f"{machine.get('cpus', '?')} CPUs")
    return "; ".join(parts) + "."


def _table(rows: Sequence[dict], columns: Sequence[Column]) -> list[str]:
    out = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        out.append("| " + " | ".join(_cell(fn, row) for _, fn in columns) + " |")
    return out


def _cell(fn: Callable[[dict], str], row: dict) -> str:
    try:
        return str(fn(row)).replace("|", "/").replace("\n", " ")
    except (KeyError, TypeError, ValueError):
        return "-"


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


# ----------------------------------------------------------------------------- per stage


def _tests(stage: dict) -> list[str]:
    t = stage["figures"]
    lines = [f"{len(t['passed'])} passed, {len(t['failed'])} failed, {len(t['skipped'])} skipped."]
    for key, label, detail in (("failed", "Failed", "message"), ("skipped", "Skipped", "reason")):
        if t[key]:
            lines += ["", f"{label}:", ""] + [f"- `{x['test']}`: {x[detail].splitlines()[0] if x[detail] else ''}" for x in t[key]]
    return lines


def _kernels(stage: dict) -> list[str]:
    data = stage["figures"]
    facts = data.get("facts", {})
    head = [f"{facts.get('device', '?')}; CUDA C++ op: {'loaded' if facts.get('cuda_op') else 'not loaded'}; "
            f"FP16, one bag; µs = median with L2 flushed; × = SDPA time / kernel time; max |diff| against SDPA "
            f"(tolerance {data.get('tolerance', '?')}).", ""]

    def kernel(name: str, what: str) -> Callable[[dict], str]:
        def cell(r: dict) -> str:
            k = r.get(name)
            if k is None:
                return "-"
            if "error" in k:
                return "error"
            return {"us": f"{k['us']:.1f}", "x": f"{k['speedup']:.2f}", "diff": f"{k['max_abs_diff']:.1e}"}[what]
        return cell

    return head + _table(data.get("rows", []), [
        ("heads x d", lambda r: f"{r['heads']}x{r['head_dim']}"),
        ("M", lambda r: str(r["queries"])),
        ("N", lambda r: str(r["keys"])),
        ("SDPA", lambda r: r["sdpa"]["backend"]),
        ("SDPA µs", lambda r: f"{r['sdpa']['us']:.1f}"),
        ("Triton µs", kernel("triton", "us")),
        ("Triton ×", kernel("triton", "x")),
        ("Triton diff", kernel("triton", "diff")),
        ("CUDA µs", kernel("cuda", "us")),
        ("CUDA ×", kernel("cuda", "x")),
        ("CUDA diff", kernel("cuda", "diff")),
        ("CUDA % peak BW", lambda r: _num(r.get("cuda", {}).get("peak_fraction") and 100 * r["cuda"]["peak_fraction"], ".0f")),
    ])


def _engines(stage: dict) -> list[str]:
    rows = stage["figures"].get("rows", [])
    return _table(rows, [
        ("N", lambda r: str(r["n"])),
        ("engine", lambda r: r["engine"]),
        ("status", lambda r: r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('detail', '')[:80]}"),
        ("device", lambda r: r.get("device", "-")),
        ("median ms", lambda r: _num(r.get("median_ms"), ".2f")),
        ("GPU MB", lambda r: _num(r.get("gpu_extra_bytes") and r["gpu_extra_bytes"] / 1e6, ".0f")),
        ("speed-up", lambda r: _num(r.get("speedup"), ".2f")),
        ("vs sdpa", lambda r: _num(r.get("vs_sdpa"), ".2f")),
        ("baseline", lambda r: r.get("baseline", "-")),
    ])


def _kernel_engines(stage: dict) -> list[str]:
    data = stage["figures"]
    rows = data.get("rows", [])
    kinds = [k for k in ("triton", "cuda") if any(f"{k}_ms" in r for r in rows)]
    columns: list[Column] = [("model", lambda r: r["model"]), ("N", lambda r: str(r["n"])),
                             ("plain ms", lambda r: f"{r['plain_ms']:.3f}")]
    for k in kinds:
        columns += [(f"{k} ms", lambda r, k=k: f"{r[f'{k}_ms']:.3f}"), (f"{k} ×", lambda r, k=k: f"{r[f'{k}_speedup']:.2f}"),
                    (f"{k} risk rel", lambda r, k=k: f"{r[f'{k}_risk_rel']:.1e}")]
    return [f"{data.get('device', '?')}; risk rel = largest relative risk difference against the plain package "
            f"(tolerance {data.get('tolerance', '?')}).", ""] + _table(rows, columns)


def _slides(stage: dict) -> list[str]:
    data = stage["figures"]
    rows = [r for r in data.get("rows", []) if r.get("part") == "pipeline"]
    encoder = (data.get("facts") or {}).get("encoder_engine") or {}
    head = [f"Patch encoder {data.get('args', {}).get('encoder', '?')}: engine {encoder.get('engine', '?')} "
            f"({encoder.get('backend', '?')}, {encoder.get('precision', '?')}) on {encoder.get('device', '?')}"
            + (f", providers {', '.join(encoder['providers'])}" if encoder.get("providers") else "")
            + "; decode and tissue mask on the GPU in the rows marked (cuda).", ""]
    return head + _table(rows, [
        ("slide", lambda r: r["slide"]),
        ("method", lambda r: r["method"]),
        ("patches", lambda r: str(r["patches"])),
        ("total s", lambda r: f"{r['total_s']:.2f}"),
        ("patches/s", lambda r: f"{r['patches_per_s']:.0f}"),
        ("vs serial", lambda r: f"{r['vs_baseline']:.2f}"),
        ("same features", lambda r: "yes" if r["same_features"] else f"no, max |diff| {_num(r.get('max_feature_diff'), '.2g')}"),
    ])


def _encoders(stage: dict) -> list[str]:
    data = stage["figures"]
    rows = data.get("rows", [])
    return ["Patches per second at the batch shown; vs eager = against the model as TRIDENT runs it (eager, "
            "autocast) in the same run; cosine = smallest per-patch cosine against the eager FP32 features.", ""] + _table(rows, [
        ("encoder", lambda r: r["encoder"]),
        ("engine", lambda r: r["engine"] if r.get("status") == "ok" else f"{r['engine']} ({r.get('status')}: {r.get('detail', '')[:60]})"),
        ("precision", lambda r: r.get("precision", "-")),
        ("batch", lambda r: str(r["batch"])),
        ("patches/s", lambda r: _num(r.get("patches_per_s"), ".0f")),
        ("vs eager", lambda r: _num(r.get("vs_eager"), ".2f")),
        ("GPU MB", lambda r: _num(r["gpu_extra_bytes"] / 1e6 if "gpu_extra_bytes" in r else None, ".0f")),
        ("max rel", lambda r: _num(r.get("max_rel"), ".1e")),
        ("cosine", lambda r: _num(r.get("min_cosine"), ".5f")),
    ])


def _environment(stage: dict) -> list[str]:
    torch = stage["figures"].get("torch") or {}
    if torch.get("error"):
        return [f"torch: {torch['error']}"]
    return []


SECTIONS: dict[str, Callable[[dict], list[str]]] = {
    "environment": _environment, "tests": _tests, "kernels": _kernels, "engines": _engines,
    "kernel-engines": _kernel_engines, "slides": _slides, "encoders": _encoders,
}
