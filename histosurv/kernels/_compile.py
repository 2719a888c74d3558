"""Compile the Triton kernels for a GPU that is not here: the checks a CPU-only machine can still make.

``TRITON_INTERPRET=1`` runs the kernels' maths on the CPU but never compiles them, so it misses what
only the compiler sees: a Python global read inside a kernel, a tile that spills registers, loads that
do not vectorise or pipeline. :func:`compile_launch` compiles one planned :class:`~._triton.Launch`
specialised exactly as launching it would (Triton's own rules: 16-byte-aligned pointers and integers
divisible by 16 are marked, integers equal to 1 become constants) for an architecture such as sm_90,
runs the ptxas that the triton wheel bundles, and returns what ptxas reports. No GPU or driver needed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

from ._triton import Launch

__all__ = ["compile_launch"]


def compile_launch(launch: Launch, arch: int) -> dict:
    """Compile ``launch`` for sm_<arch>; returns shared memory, registers, spills and notable PTX
    instructions (tensor-core MMA, cp.async pipelining, vector loads)."""
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # a cache hit would skip ptxas and its report
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel
    signature, constexprs, attrs = _specialise(fn, launch.args, launch.meta)
    options = {k: launch.meta[k] for k in ("num_warps", "num_stages") if k in launch.meta}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # Triton prints the ptxas log
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32), options=options)
    ptx, text = kernel.asm["ptx"], log.getvalue()
    return {
        "kernel": fn.__name__,
        "arch": f"sm_{arch}",
        "shared_bytes": kernel.metadata.shared,
        "registers": _number(r"Used (\d+) registers", text),
        "spill_bytes": _number(r"(\d+) bytes spill stores", text),
        "ptx": [op for op in ("wgmma", "mma.sync", "cp.async", "ld.global.v4", "ld.global.v2") if op in ptx],
    }


def _specialise(fn, args: tuple, meta: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as JITFunction.run would build them for these arguments."""
    from triton._C.libtriton import native_specialize_impl  # internal, but it is what a launch calls
    from triton.backends.compiler import BaseBackend

    constexprs = {k: v for k, v in meta.items() if k in fn.arg_names}
    runtime = [name for name in fn.arg_names if name not in constexprs]
    signature, attrs = {}, {}
    for name, arg in zip(runtime, args, strict=True):
        kind, spec = native_specialize_impl(BaseBackend, arg, False, True, True)
        if kind == "constexpr":  # integers equal to 1
            constexprs[name] = arg
        elif spec == "D":  # divisible by 16 (integers) or 16-byte aligned (pointers)
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
        signature[name] = kind
    signature.update({name: "constexpr" for name in constexprs})
    return {name: signature[name] for name in fn.arg_names}, constexprs, attrs


def _number(pattern: str, text: str) -> int | None:
    found = re.findall(pattern, text)
    return max(int(x) for x in found) if found else None
