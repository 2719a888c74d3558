"""Export a fusion model as an AOTInductor package (``model.pt2``): compiled, no Python source needed.

``torch.export`` traces the serving signature with a dynamic bag size; AOTInductor compiles it into
a shared library packaged with the weights, which ``torch._inductor.aoti_load_package`` runs without
histosurv's model code. The package is tied to its device type (a CPU build cannot run on a GPU and
the reverse), to the GPU architecture for CUDA builds, and to the torch release, so the manifest
records all three and the runtime refuses a package built elsewhere.

Attention stays fused: Inductor keeps every ``scaled_dot_product_attention`` as a call into a fused
kernel (flash attention on the CPU; flash or memory-efficient on CUDA) instead of an N x N matrix.
The export counts those calls in the generated wrapper and refuses a package where one is missing.

With ``kernels`` ("triton" or "cuda", CUDA packages only) the trace runs inside
:func:`histosurv.kernels.routing.use_kernels`: the few-query attentions and the gated attention
pooling over the bag become calls of histosurv's kernel ops. Triton kernels are compiled into the
package; the CUDA C++ ops are called by name, so ``libhistosurv_kernels.so`` must be loaded where the
package runs (the torch engine does that when the manifest entry says ``kernels: cuda``).

Patch encoders get packages too (:func:`export_encoder_pt2`, ``--add-engine torch`` on an encoder): the
GPU encoder of a box whose ONNX Runtime has no CUDA provider, in FP32 or FP16, dynamic batch.
"""

from __future__ import annotations

import collections
import copy
import os
import re
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..data.atomic import atomic_path
from ..errors import InputError
from ..runtime.manifest import BuiltFor, EngineEntry
from ..kernels.backends import KERNELS
from ..kernels.routing import kernel_calls, use_kernels
from .onnx_export import EXAMPLE_N, FusedAttentionMissing, SingleBag, _quiet_exporter, example_inputs

__all__ = ["export_pt2", "export_encoder_pt2", "cuda_capability", "PT2_FILE"]

PT2_FILE = "model.pt2"
ENCODER_MAX_BATCH = 4096
EXAMPLE_BATCH_ENCODER = 3  # any batch >= 2 (torch.export specialises sizes 0 and 1)
ENCODER_SMOKE_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 5e-2}  # gross-error guards; verify measures properly
# the precisions an encoder package may compute in, per device: FP16 kernels on a CPU mostly convert back
# and forth, while BF16 runs natively where the CPU has AVX512-BF16 or AMX (about 2x FP32 on a ViT)
ENCODER_PRECISIONS = {"cpu": ("fp32", "bf16"), "cuda": ("fp32", "fp16", "bf16")}
# a call through the C shim, e.g. aoti_torch_cpu__scaled_dot_product_flash_attention_for_cpu(...)
_FUSED_SDPA = re.compile(r"aoti_torch_(?:cpu|cuda)_(_scaled_dot_product_(?:flash|efficient|cudnn)_attention\w*)\(")


def cuda_capability(device: str | torch.device = "cuda") -> str:
    major, minor = torch.cuda.get_device_capability(torch.device(device))
    return f"{major}.{minor}"


def export_pt2(
    model: nn.Module, path: str | os.PathLike, device: str = "cpu", max_bag: int = 1 << 20, kernels: str | None = None
) -> EngineEntry:
    """Compiles ``model``'s serving signature for ``device`` into ``path`` (atomically); returns the
    manifest entry. Takes tens of seconds: Inductor generates and compiles C++ (and Triton on CUDA).
    ``kernels``: None (SDPA and torch pooling), "triton" or "cuda" (histosurv's kernels; CUDA only)."""
    device = torch.device(device)
    if kernels is not None and kernels not in KERNELS:
        raise InputError(f"kernels must be one of {', '.join(KERNELS)} or None, got {kernels!r}")
    if kernels and device.type != "cuda":
        raise InputError(
            f"kernels={kernels!r}: histosurv's kernels run on CUDA GPUs; a {device.type} package uses SDPA and torch "
            "pooling (build it without kernels, or on a machine with a GPU)"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("an AOTInductor package for CUDA must be compiled on a machine with a CUDA GPU")
    with _quiet_exporter(), torch.no_grad():
        program, calls = trace_serving(model, device, max_bag, kernels)
        sdpa = _sdpa_calls(program.graph)
        routed = sum(n for op, n in calls.items() if op.endswith("few_query_attention"))
        if sdpa + routed < model.attention_ops:
            raise FusedAttentionMissing(
                f"the exported graph has {sdpa} SDPA calls and {routed} kernel attentions, fewer than the model's "
                f"{model.attention_ops} attentions; one was decomposed into an N x N matrix"
            )
        with atomic_path(path, suffix=".pt2") as tmp:
            _compile_package(program, tmp)
            fused, searched = _attention_kernels(tmp)
            if sum(fused.values()) < sdpa:
                raise FusedAttentionMissing(
                    f"the compiled package calls fused attention kernels {dict(fused)} fewer times than the "
                    f"exported graph's {sdpa} SDPA calls; one was decomposed into an N x N matrix "
                    f"(generated sources searched: {searched or 'none: no *wrapper.cpp in the package'})"
                )
    capability = cuda_capability(device) if device.type == "cuda" else None
    return EngineEntry(
        Path(path).name,
        "torch",
        "fp32",
        device=device.type,
        built_for=BuiltFor(torch=torch.__version__, compute_capability=capability),
        kernels=kernels,
        details={"format": "aotinductor", "attention_kernels": dict(fused), "kernel_calls": dict(calls), "max_bag": max_bag},
    )


def export_encoder_pt2(
    model: nn.Module, path: str | os.PathLike, patch_size: int, device: str = "cpu", precision: str = "fp32",
    max_batch: int = ENCODER_MAX_BATCH,
) -> EngineEntry:
    """The patch encoder as an AOTInductor package at ``path`` (atomically): uint8 ``patches`` [B, H, W, 3]
    with a dynamic B, FP32 ``features`` [B, D] whatever it computes in. ``precision="fp16"`` runs the
    encoder in half precision (CUDA only), preprocessing included. The package is run at batch 1 and 3
    against the FP32 model before it is kept (torch.export treats sizes 0 and 1 specially)."""
    device = torch.device(device)
    allowed = ENCODER_PRECISIONS.get(device.type, ("fp32",))
    if precision not in allowed:
        hint = " (FP16 is for GPUs: CPU kernels mostly convert it back and forth; bf16 runs natively)" if precision == "fp16" else ""
        raise InputError(f"an encoder package for {device.type} computes in {' or '.join(allowed)}, not {precision!r}{hint}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("an AOTInductor package for CUDA must be compiled on a machine with a CUDA GPU")
    from .encoder_export import example_patches  # it imports the artifact registry, which imports this module

    wrapper = _FeaturesFP32(_in_precision(copy.deepcopy(model).eval(), precision)).to(device)
    example = example_patches(EXAMPLE_BATCH_ENCODER, patch_size).to(device)
    batch = torch.export.Dim("B", min=1, max=max_batch)
    with _quiet_exporter(), torch.no_grad():
        # by name, as the torch engine calls every package
        program = torch.export.export(wrapper, (), kwargs={"patches": example}, dynamic_shapes={"patches": {0: batch}}, strict=False)
        with atomic_path(path, suffix=".pt2") as tmp:
            check = lambda package: _check_encoder_package(package, model, patch_size, device, ENCODER_SMOKE_TOLERANCE[precision])  # noqa: E731
            worst = _compile_package(program, tmp, check)
            # a ViT's attentions must stay fused kernels in the compiled code, as in the survival packages
            fused, searched = _attention_kernels(tmp)
            attentions = getattr(model, "attention_ops", 0)
            if sum(fused.values()) < attentions:
                raise FusedAttentionMissing(
                    f"the compiled encoder calls fused attention kernels {dict(fused)} fewer times than its {attentions} "
                    f"attentions (generated sources searched: {searched or 'none: no *wrapper.cpp in the package'})"
                )
    return EngineEntry(
        Path(path).name,
        "torch",
        precision,
        device=device.type,
        built_for=BuiltFor(torch=torch.__version__, compute_capability=cuda_capability(device) if device.type == "cuda" else None),
        details={"format": "aotinductor", "max_batch": max_batch, "smoke_features_rel": worst,
                 "attention_kernels": dict(fused)},
    )


def _in_precision(encoder: nn.Module, precision: str) -> nn.Module:
    """The encoder computing in ``precision``. A BF16 encoder keeps its preprocessing (``preprocess``:
    /255, resize, mean/std) in FP32 and casts the normalised image: BF16's 8-bit mantissa would round
    the pixels before the network sees them. (The FP16 encoder is half throughout, as built before.)"""
    if precision == "fp16":
        return encoder.half()
    if precision != "bf16":
        return encoder
    encoder.to(torch.bfloat16)
    preprocess = getattr(encoder, "preprocess", None)
    if preprocess is not None:
        preprocess.float()
        preprocess.register_forward_hook(lambda _module, _args, out: out.to(torch.bfloat16))
    return encoder


class _FeaturesFP32(nn.Module):
    """The served contract: FP32 features, also from an encoder computing in FP16, as a tuple of outputs
    like every package the torch engine runs."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.encoder(patches).float(),)


def _check_encoder_package(path: Path, model: nn.Module, patch_size: int, device: torch.device, tolerance: float) -> float:
    """Largest relative feature difference of the package against the FP32 model, at batch 1 and 3."""
    from .encoder_export import EncoderExportError, example_patches

    package = torch._inductor.aoti_load_package(str(path), device_index=torch.cuda.current_device() if device.type == "cuda" else -1)
    reference = copy.deepcopy(model).float().eval().cpu()
    worst = 0.0
    for batch in (1, 3):
        patches = example_patches(batch, patch_size, seed=200 + batch)
        with torch.inference_mode():
            got, want = package(patches=patches.to(device))[0].cpu(), reference(patches)
        if got.shape != want.shape:
            raise EncoderExportError(f"{path.name}: features of shape {tuple(got.shape)} at batch {batch}, expected {tuple(want.shape)}")
        rel = float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))
        if not rel <= tolerance:  # also catches NaN
            raise EncoderExportError(f"the compiled encoder's features differ from PyTorch's by {rel:.2e} (relative) at batch {batch}")
        worst = max(worst, rel)
    return worst


def _compile_package(program, path: Path, check=None):
    """AOTInductor's package written to ``path``, which the caller made atomic; ``check(package)`` runs
    on it first (a package loads only from a name ending in .pt2) and its result is returned."""
    # AOTInductor insists on a name ending in .pt2; atomic_path's ends in .tmp
    staged = path.with_name(path.name[: -len(".tmp")])
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(staged))
        result = check(staged) if check is not None else None
        os.replace(staged, path)
    finally:
        staged.unlink(missing_ok=True)
    return result


def trace_serving(model: nn.Module, device: torch.device, max_bag: int = 1 << 20, kernels: str | None = None):
    """``torch.export`` of the serving signature (one bag, dynamic N) on ``device``, with the kernel ops
    of ``kernels`` in place of SDPA and torch pooling where they apply. Returns the program and its
    kernel calls by op; refuses ``kernels`` for a model that has nothing they take."""
    device = torch.device(device)
    kwargs = {k: v.to(device) for k, v in example_inputs(model, n=EXAMPLE_N).items()}
    wrapper = SingleBag(copy.deepcopy(model).eval()).eval().to(device)  # the caller's model stays where it is
    bag = torch.export.Dim("N", min=1, max=max_bag)
    dynamic = {name: ({0: bag} if name in ("features", "coords") else None) for name in kwargs}
    with use_kernels(kernels), torch.no_grad():  # inference: the kernel ops have no backward
        program = torch.export.export(wrapper, (), kwargs=kwargs, dynamic_shapes=dynamic, strict=False)
    calls = kernel_calls(program.graph)
    if kernels and not calls:
        raise InputError(
            f"kernels={kernels!r}: {type(model).__name__} has no attention of a few queries over the bag and no gated "
            "attention pooling, which is what the kernels compute; build its engine without kernels"
        )
    return program, calls


def _sdpa_calls(graph: torch.fx.Graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and "scaled_dot_product" in str(n.target))


def _attention_kernels(package: Path) -> tuple[collections.Counter, list[str]]:
    """Fused-SDPA call sites in the package's generated wrapper source, by kernel, and the files read
    (named in the error if a torch release renames them: the count would then be zero)."""
    found, searched = collections.Counter(), []
    with zipfile.ZipFile(package) as z:
        for name in z.namelist():
            if name.endswith("wrapper.cpp"):
                searched.append(name)
                found.update(m.group(1) for m in _FUSED_SDPA.finditer(z.read(name).decode("utf-8", "replace")))
    return found, searched
