"""The array-module abstraction: the one place where NumPy and CuPy differ.

Every numerical function in minphi3 asks its inputs which module they live in
(`xp = array_module(x)`) and then calls `xp.matmul`, `xp.exp`, ... . The same code therefore runs
on the CPU (NumPy) and on an NVIDIA GPU (CuPy) with no branches outside this file.
"""

from __future__ import annotations

import numpy as np

from .errors import BackendError

BACKENDS = ("numpy", "cupy")

DTYPES = {
    "float32": np.float32,
    "float64": np.float64,
    "float16": np.float16,
}


def _import_cupy():
    """Import CuPy and check that a GPU answers; raise BackendError with the reason otherwise."""
    try:
        import cupy  # noqa: PLC0415 - optional dependency, imported only when asked for
    except Exception as exc:  # ImportError, or a CUDA library error raised at import time
        raise BackendError(
            "backend 'cupy' needs CuPy: install the GPU extra (pip install 'minphi3[gpu]', "
            f"which installs cupy-cuda12x) on a machine with an NVIDIA GPU ({type(exc).__name__}: {exc})"
        ) from None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise BackendError("backend 'cupy' needs an NVIDIA GPU, but CUDA reports none")
    except BackendError:
        raise
    except Exception as exc:
        raise BackendError(f"backend 'cupy' found no usable GPU: {type(exc).__name__}: {exc}") from None
    return cupy


def get_array_module(backend: str):
    """The module (numpy or cupy) for a backend name: "numpy" | "cupy"."""
    if backend == "numpy":
        return np
    if backend == "cupy":
        return _import_cupy()
    raise BackendError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")


def cupy_available() -> bool:
    """True when CuPy imports and at least one GPU answers."""
    try:
        _import_cupy()
    except BackendError:
        return False
    return True


def array_module(x):
    """The module (numpy or cupy) that owns array `x`. NumPy for anything that is not a CuPy array."""
    module = type(x).__module__
    if module.startswith("cupy"):
        import cupy  # noqa: PLC0415

        return cupy
    return np


def resolve_dtype(dtype) -> np.dtype:
    """A compute dtype from its name ("float32" | "float64" | "float16") or a NumPy dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise BackendError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        return np.dtype(DTYPES[dtype])
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise BackendError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPES)}") from None
    if resolved.name not in DTYPES:
        raise BackendError(f"unsupported dtype {resolved.name!r}: expected one of {', '.join(DTYPES)}")
    return resolved


def compute_dtype(dtype) -> np.dtype:
    """The dtype that reductions (norms, softmax) use: at least float32, float64 stays float64."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def backend_name(xp) -> str:
    """"numpy" or "cupy" for an array module."""
    return "numpy" if xp is np else "cupy"


def available_memory(xp) -> tuple[int | None, str]:
    """Bytes the backend can still allocate, and where: host MemAvailable for NumPy, free device
    memory for CuPy. None when it cannot be read."""
    if xp is not np:
        free, _total = xp.cuda.runtime.memGetInfo()
        return int(free), "the GPU has"
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "this machine has"
    except OSError:
        pass
    return None, "this machine has"


def to_numpy(x):
    """A host NumPy copy of `x`, whatever the backend (CuPy arrays are copied off the GPU).

    Tuples and lists are converted element by element; None stays None.
    """
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(to_numpy(item) for item in x)
    if array_module(x) is not np:
        return x.get()
    return np.asarray(x)


def to_device(x, xp):
    """`x` (a NumPy array) as an array of module `xp`; a no-op for NumPy."""
    if xp is np:
        return np.asarray(x)
    return xp.asarray(x)
