"""Native CPU kernels of the layers' hot steps, compiled on first use.

- ``native.cpp``: :func:`~contextnorm.functional.context_batch_norm`,
  :func:`~contextnorm.functional.context_affine` and
  :func:`~contextnorm.functional.learned_context_affine` (CN, CN-X, CN-E with known ids), each
  one C++ autograd node. On small inputs the PyTorch implementation of a context layer is bound
  by the fixed cost of its ~40 tensor operations and its Python autograd node, not by
  arithmetic: on (32, 16, 8, 8) it takes two to three times BatchNorm's time.
- ``native_mixture.cpp``: the passes over the activations of the mixture transform
  (:func:`~contextnorm.functional.batch_mixture_norm`: ACN and MixNorm in training), which
  compute ``x - reference`` on the fly instead of materialising it and its square for a dozen
  batched matrix products; the autograd function and its small algebra stay in Python.

They are built by :func:`torch.utils.cpp_extension.load` the first time a layer needs them
(about 30 s with the system's C++ compiler, once per machine, torch version and source; the
build is kept in ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``, and later
processes import it directly) and
used for eager calls on the CPU in float32 or float64 with contiguous activations. Everything
else (CUDA, half precision, channel-last layouts, several processes for the mixture
transform, ``torch.compile``, export) runs the PyTorch implementation, which is the reference
the native kernels are tested against (``tests/test_native.py``).

``CONTEXTNORM_NATIVE=0`` in the environment turns the native kernels off. A failed build
(no C++ compiler, say) warns once, naming the cause, and the layers use the PyTorch
implementation.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["ENVIRONMENT_SWITCH", "enabled", "kernels", "kernels_for"]

ENVIRONMENT_SWITCH = "CONTEXTNORM_NATIVE"
_SOURCES = tuple(Path(__file__).with_name(name) for name in ("native.cpp", "native_mixture.cpp"))
_FLAGS = ("-O3", "-fopenmp-simd")
# Wider vectors where the CPU has them (torch reports what it dispatches to); the flags are part
# of the build's name, so machines sharing a cache directory never load each other's build.
_VECTOR_FLAGS = {"AVX2": ("-mavx2", "-mfma"), "AVX512": ("-mavx2", "-mfma")}
_LOG = logging.getLogger(__name__)


def enabled() -> bool:
    """Whether the environment allows the native kernels (``CONTEXTNORM_NATIVE`` is not ``0``)."""
    return os.environ.get(ENVIRONMENT_SWITCH, "1").strip() != "0"


def _cache_root() -> Path:
    """Where builds are kept: ``TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions``."""
    configured = os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "torch_extensions"


def _import_built(name: str, directory: Path) -> ModuleType | None:
    """The finished build of this exact source and configuration, imported without asking the
    build system (which checks every source's path and time, ~1.5 s, and rebuilds for a
    checkout elsewhere); ``None`` when there is none or it does not load."""
    library = directory / f"{name}{importlib.machinery.EXTENSION_SUFFIXES[-1]}"
    if not library.exists():
        library = directory / f"{name}.so"
    if not library.exists():
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, library)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError, AssertionError):
        return None  # an interrupted or foreign build: build it again
    return module


def kernels() -> ModuleType | None:
    """The compiled kernels, building them on the first call; ``None`` when turned off (read on
    every call) or when the build failed (with a warning naming the cause)."""
    return _build() if enabled() else None


def kernels_for(x: torch.Tensor, *tensors: torch.Tensor | None) -> ModuleType | None:
    """:func:`kernels` when they apply to a call on ``x``: eager (not compiled or traced), ``x``
    a plain (not fake or subclass) contiguous CPU tensor in float32 or float64, and every other
    tensor of its dtype (the kernels check that they are on the CPU too); else ``None``."""
    dtype = x.dtype
    if (
        type(x) is not torch.Tensor
        or x.device.type != "cpu"
        or dtype not in (torch.float32, torch.float64)
        or not x.is_contiguous()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
    ):
        return None
    if any(tensor is not None and tensor.dtype != dtype for tensor in tensors):
        return None
    return kernels()


@functools.cache
def _build() -> ModuleType | None:
    flags = (*_FLAGS, *_VECTOR_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ()))
    # The name changes with the source, the flags, the Python and the torch version, so that a
    # cached build is never loaded against other code, another CPU's instructions or another
    # ABI; and it does not depend on where the sources lie, so checkouts share a build.
    digest = hashlib.sha256(
        " ".join((*flags, torch.__version__, sys.implementation.cache_tag, sys.platform)).encode()
    )
    for source in _SOURCES:
        digest.update(source.read_bytes())
    name = f"contextnorm_native_{digest.hexdigest()[:16]}"
    directory = _cache_root() / name
    built = _import_built(name, directory)
    if built is not None:
        return built
    _LOG.info("building contextnorm's native CPU kernels (once per machine and version, ~30 s)")
    try:
        from torch.utils.cpp_extension import load

        directory.mkdir(parents=True, exist_ok=True)
        return load(
            name=name,
            sources=[str(source) for source in _SOURCES],
            extra_cflags=list(flags),
            build_directory=str(directory),
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 - any build failure falls back, with its cause
        # A compiler's output is long: its error lines say what went wrong.
        lines = str(error).splitlines()
        cause = " ".join(line for line in lines if "error:" in line) or " ".join(lines)
        cause = " ".join(cause.split())[:500]
        warnings.warn(
            f"contextnorm's native CPU kernels could not be built ({type(error).__name__}: "
            f"{cause}); the context layers use their PyTorch implementation, which gives the same "
            f"results but is up to ~3x slower on small inputs. Install a C++ compiler (g++) to "
            f"build them, or set {ENVIRONMENT_SWITCH}=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
