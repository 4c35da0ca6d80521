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
    """Bytes the backend can still allocate, and where: free device memory for CuPy; for NumPy the
    host's MemAvailable, lowered to what this process may still take under its container's memory
    limit (cgroup) and its address-space limit (`ulimit -v`), past which it would be killed or get
    a MemoryError. None when nothing can be read."""
    if xp is not np:
        free, _total = xp.cuda.runtime.memGetInfo()
        return int(free), "the GPU has"
    host = _proc_field("/proc/meminfo", "MemAvailable:")
    limits = [room for room in (_cgroup_room(), _address_space_room()) if room is not None]
    if limits and (host is None or min(limits) < host):
        return min(limits), "this process's memory limit leaves"
    return host, "this machine has"


def _proc_field(path: str, name: str) -> int | None:
    """A "Name:   123 kB" line of a /proc file, in bytes."""
    try:
        with open(path, encoding="ascii") as handle:
            for line in handle:
                if line.startswith(name):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _address_space_room() -> int | None:
    """RLIMIT_AS (`ulimit -v`) minus the address space already mapped; None when unlimited."""
    try:
        import resource  # noqa: PLC0415 - POSIX only

        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return None
    if soft == resource.RLIM_INFINITY:
        return None
    mapped = _proc_field("/proc/self/status", "VmSize:") or 0
    return max(soft - mapped, 0)


def _cgroup_room(root: str = "/sys/fs/cgroup", own: str = "/proc/self/cgroup") -> int | None:
    """The memory limit of this process's cgroup (and its parents) minus what they use, not
    counting inactive page cache (which the kernel reclaims before it kills); None without a limit.

    cgroup v2: memory.max, memory.current and memory.stat's inactive_file in each directory from
    the process's own cgroup up to the root. v1: memory.limit_in_bytes (memory.stat's
    hierarchical_memory_limit covers the parents), memory.usage_in_bytes, total_inactive_file.
    """
    from pathlib import Path  # noqa: PLC0415

    def number(path: Path) -> int | None:
        try:
            text = path.read_text(encoding="ascii").strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None  # "max" (v2) means no limit

    def stat(path: Path, key: str) -> int:
        try:
            for line in path.read_text(encoding="ascii").splitlines():
                name, _, value = line.partition(" ")
                if name == key and value.isdigit():
                    return int(value)
        except OSError:
            pass
        return 0

    try:
        lines = Path(own).read_text(encoding="ascii").splitlines()
    except OSError:
        lines = []
    paths = dict(line.split(":", 2)[1:] for line in lines if line.count(":") >= 2)
    rooms = []
    if "" in paths:  # v2: "0::/path"
        folder = Path(root) / paths[""].lstrip("/")
        for directory in [folder, *folder.parents]:
            limit, used = number(directory / "memory.max"), number(directory / "memory.current")
            if limit is not None and used is not None:
                rooms.append(limit - max(used - stat(directory / "memory.stat", "inactive_file"), 0))
            if directory == Path(root):
                break
    memory = next((value for key, value in paths.items() if "memory" in key.split(",")), None)
    if memory is not None:  # v1: "4:memory:/path"
        directory = Path(root) / "memory" / memory.lstrip("/")
        limit = stat(directory / "memory.stat", "hierarchical_memory_limit") or number(directory / "memory.limit_in_bytes")
        used = number(directory / "memory.usage_in_bytes")
        if limit is not None and used is not None and limit < 2**60:  # v1 writes "no limit" as ~2^63
            rooms.append(limit - max(used - stat(directory / "memory.stat", "total_inactive_file"), 0))
    return max(min(rooms), 0) if rooms else None


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


def is_host_array(x) -> bool:
    """True when `x` lives in host memory (NumPy), so a file reader may fill it in place."""
    return array_module(x) is np
