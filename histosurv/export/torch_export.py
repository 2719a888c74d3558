"""Export a fusion model as an AOTInductor package (``model.pt2``): compiled, no Python source needed.

``torch.export`` traces the serving signature with a dynamic bag size; AOTInductor compiles it into
a shared library packaged with the weights, which ``torch._inductor.aoti_load_package`` runs without
histosurv's model code. The package is tied to its device type (a CPU build cannot run on a GPU and
the reverse), to the GPU architecture for CUDA builds, and to the torch release, so the manifest
records all three and the runtime refuses a package built elsewhere.

Attention stays fused: Inductor keeps every ``scaled_dot_product_attention`` as a call into a fused
kernel (flash attention on the CPU; flash or memory-efficient on CUDA) instead of an N x N matrix.
The export counts those calls in the generated wrapper and refuses a package where one is missing.
"""

from __future__ import annotations

import collections
import os
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..data.atomic import atomic_path
from .onnx_export import EXAMPLE_N, FusedAttentionMissing, SingleBag, _quiet_exporter, example_inputs

__all__ = ["export_pt2", "cuda_capability", "PT2_FILE"]

PT2_FILE = "model.pt2"
# a call through the C shim, e.g. aoti_torch_cpu__scaled_dot_product_flash_attention_for_cpu(...)
_FUSED_SDPA = re.compile(r"aoti_torch_(?:cpu|cuda)_(_scaled_dot_product_(?:flash|efficient|cudnn)_attention\w*)\(")


def cuda_capability(device: str | torch.device = "cuda") -> str:
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return f"{major}.{minor}"


def export_pt2(model: nn.Module, path: str | os.PathLike, device: str = "cpu", max_bag: int = 1 << 20) -> dict:
    """Compiles ``model``'s serving signature for ``device`` into ``path`` (atomically); returns the
    manifest entry. Takes tens of seconds: Inductor generates and compiles C++ (and Triton on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("an AOTInductor package for CUDA must be compiled on a machine with a CUDA GPU")
    wrapper = SingleBag(model.eval()).eval().to(device)
    kwargs = {k: v.to(device) for k, v in example_inputs(model, n=EXAMPLE_N).items()}
    bag = torch.export.Dim("N", min=1, max=max_bag)
    dynamic = {name: ({0: bag} if name in ("features", "coords") else None) for name in kwargs}
    with _quiet_exporter(), torch.no_grad():
        program = torch.export.export(wrapper, (), kwargs=kwargs, dynamic_shapes=dynamic, strict=False)
        with atomic_path(path, suffix=".pt2") as tmp:
            # AOTInductor insists on a name ending in .pt2; atomic_path's ends in .tmp
            staged = tmp.with_name(tmp.name[: -len(".tmp")])
            try:
                torch._inductor.aoti_compile_and_package(program, package_path=str(staged))
                os.replace(staged, tmp)
            finally:
                staged.unlink(missing_ok=True)
            kernels = _attention_kernels(tmp)
            if sum(kernels.values()) < model.attention_ops:
                raise FusedAttentionMissing(
                    f"the compiled package calls fused attention kernels {dict(kernels)} fewer times than the "
                    f"model's {model.attention_ops} attentions; one was decomposed into an N x N matrix"
                )
    return {
        "backend": "torch",
        "file": Path(path).name,
        "format": "aotinductor",
        "device": device.type,
        "compute_capability": cuda_capability(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "precision": "fp32",
        "attention_kernels": dict(kernels),
        "max_bag": max_bag,
    }


def _attention_kernels(package: Path) -> collections.Counter:
    """Fused-SDPA call sites in the package's generated wrapper source, by kernel."""
    found = collections.Counter()
    with zipfile.ZipFile(package) as z:
        for name in z.namelist():
            if name.endswith("wrapper.cpp"):
                found.update(m.group(1) for m in _FUSED_SDPA.finditer(z.read(name).decode("utf-8", "replace")))
    return found
