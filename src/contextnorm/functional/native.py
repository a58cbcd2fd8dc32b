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
build is cached in ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) and
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
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["ENVIRONMENT_SWITCH", "enabled", "kernels"]

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


def kernels() -> ModuleType | None:
    """The compiled kernels, building them on the first call; ``None`` when turned off (read on
    every call) or when the build failed (with a warning naming the cause)."""
    return _build() if enabled() else None


@functools.cache
def _build() -> ModuleType | None:
    flags = (*_FLAGS, *_VECTOR_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ()))
    # The name changes with the source, the flags and the torch version, so that a cached build
    # is never loaded against other code, another CPU's instructions or another torch's ABI.
    digest = hashlib.sha256(" ".join((*flags, torch.__version__)).encode())
    for source in _SOURCES:
        digest.update(source.read_bytes())
    _LOG.info("loading contextnorm's native CPU kernels (built once per machine, ~30 s)")
    try:
        from torch.utils.cpp_extension import load

        return load(
            name=f"contextnorm_native_{digest.hexdigest()[:16]}",
            sources=[str(source) for source in _SOURCES],
            extra_cflags=list(flags),
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
