"""The array-module abstraction: the one place where NumPy and CuPy differ.

Every numerical function in minphi3 asks its inputs which module they live in
(`xp = array_module(x)`) and then calls `xp.matmul`, `xp.exp`, ... . The same code therefore runs
on the CPU (NumPy) and on an NVIDIA GPU (CuPy) with no branches outside this file.
"""

from __future__ import annotations

import contextvars
import gc

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
            "backend 'cupy' needs CuPy: install the GPU extra (pip install 'minphi3[gpu]' for CUDA 12, "
            f"'minphi3[gpu-cuda13]' for CUDA 13) on a machine with an NVIDIA GPU ({type(exc).__name__}: {exc})"
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
    """A compute dtype from its name ("float32" | "float64" | "float16") or a NumPy dtype.

    None is refused rather than read as NumPy reads it (float64, twice the memory of the default)."""
    if dtype is None:
        raise BackendError(f"dtype is None: expected one of {', '.join(DTYPES)}")
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
    return np.dtype(DTYPES[resolved.name])  # native byte order: np.dtype(">f4") names float32 too


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

    Always a copy, NumPy arrays included: writing into it (fake-quantizing a weight, centring
    logits in place) never changes the model or its outputs. Tuples and lists are converted
    element by element; None stays None.
    """
    if x is None:
        return None
    if isinstance(x, (tuple, list)):
        return type(x)(to_numpy(item) for item in x)
    if array_module(x) is not np:
        return x.get()
    return np.array(np.asarray(x))  # asarray first: torch's __array__ takes no copy keyword (NumPy 2 warns)


def to_device(x, xp):
    """`x` (a NumPy array) as an array of module `xp`; a no-op for NumPy."""
    if xp is np:
        return np.asarray(x)
    return xp.asarray(x)


def is_host_array(x) -> bool:
    """True when `x` lives in host memory (NumPy), so a file reader may fill it in place."""
    return array_module(x) is np


# ---- matrix products that a CUDA graph can record ---------------------------------------------
# Set while `StepReplay` runs a step it will record (its eager first run and the recording), so
# that both go through the same cuBLAS call: the kernels the recording needs are loaded before it,
# the two runs round alike, and an error of the direct call shows up in the eager run.
_DIRECT_PRODUCTS = contextvars.ContextVar("minphi3_direct_products", default=False)


def matmul(a, b):
    """a @ b, on either backend. a: [..., m, k], b: [..., k, n] -> [..., m, n]

    This is `a @ b` everywhere but in one place: a step that CuPy records as a CUDA graph
    (`StepReplay`). CuPy refuses to call cuBLAS during stream capture ("calling cuBLAS API
    during stream capture is currently unsupported", cupy#6290), although cuBLAS itself
    supports it; there the product is handed to cuBLAS's strided-batched GEMM directly
    (`_direct_matmul`), the same library routine CuPy's `@` ends in.
    """
    if array_module(a) is np or not (_DIRECT_PRODUCTS.get() or _stream_is_capturing()):
        return a @ b
    return _direct_matmul(a, b)


def _stream_is_capturing() -> bool:
    import cupy  # noqa: PLC0415

    return cupy.cuda.get_current_stream().is_capturing()


# cuBLAS and CUDA enums (cublas_api.h, library_types.h)
_CUBLAS_OP = {"N": 0, "T": 1}
_CUDA_DATA_TYPE = {"float16": 2, "float32": 0, "float64": 1}
_CUBLAS_COMPUTE = {"float16": 68, "float32": 68, "float64": 70}  # 32F accumulation for float16, as CuPy
_CUBLAS_GEMM_DEFAULT = -1
_CUBLAS_POINTER_MODE_HOST = 0


def matrix_operand(rows: int, cols: int, row_stride: int, col_stride: int):
    """How cuBLAS (column-major) reads the transpose of a row-major matrix X [rows, cols] whose
    element X[i, j] sits at i * row_stride + j * col_stride (strides in elements).

    -> (op, ld) with op(Y) = X^T for the column-major matrix Y stored with leading dimension ld,
    or None when neither stride is 1 (the caller copies X into a contiguous array first).
    col_stride == 1: memory is X^T column-major (cols x rows, ld = row_stride), op "N".
    row_stride == 1: memory is X column-major (rows x cols, ld = col_stride), op "T".
    A leading dimension is only read between columns, so with a single column any ld >= the
    column's length will do (cuBLAS requires ld >= max(1, length)).
    """
    if col_stride == 1 and (row_stride >= cols or rows == 1):
        return "N", max(row_stride, cols, 1)
    if row_stride == 1 and (col_stride >= rows or cols == 1):
        return "T", max(col_stride, rows, 1)
    return None


def batch_stride(shape, strides):
    """One stride that walks every matrix of the batch dims `shape` (with `strides`, in elements)
    in row-major order, or None when they are not evenly spaced. Size-1 dims are ignored; a
    broadcast (stride 0) batch has stride 0."""
    dims = [(size, stride) for size, stride in zip(shape, strides, strict=True) if size != 1]
    if not dims:
        return 0
    for (_, outer), (inner_size, inner) in zip(dims[:-1], dims[1:], strict=True):
        if outer != inner * inner_size:
            return None
    return dims[-1][1]


def gemm_plan(a_shape, a_strides, b_shape, b_strides):
    """The cuBLAS strided-batched GEMM that computes C = a @ b into a new contiguous C.

    a_shape: (..., m, k), b_shape: (..., k, n) with batch dims already broadcast to one shape;
    strides in elements. -> dict of cuBLAS arguments, or None when an operand's layout is not one
    cuBLAS reads (then it is made contiguous and planned again).
    Row-major C [m, n] is column-major C^T [n, m] (ldc = n), so cuBLAS computes
    C^T = b^T a^T: its first operand is b^T (n x k), its second a^T (k x m).
    """
    *batch, m, k = a_shape
    n = b_shape[-1]
    first = matrix_operand(k, n, b_strides[-2], b_strides[-1])
    second = matrix_operand(m, k, a_strides[-2], a_strides[-1])
    stride_b, stride_a = batch_stride(batch, b_strides[:-2]), batch_stride(batch, a_strides[:-2])
    if first is None or second is None or stride_a is None or stride_b is None:
        return None
    return {
        "transa": first[0], "transb": second[0], "m": n, "n": m, "k": k,
        "lda": first[1], "stride_a": stride_b, "ldb": second[1], "stride_b": stride_a,
        "ldc": n, "stride_c": m * n, "batch": int(np.prod(batch, dtype=np.int64)),
    }  # fmt: skip


def prepare_gemm(a, b, xp):
    """The operands, plan and result shape of one cuBLAS call for a @ b (arrays of module xp).

    -> (first, second, plan, out_shape): cuBLAS's first operand is b, its second a (see
    `gemm_plan`). A product by one matrix (linear: x [..., k] @ W.T) is one GEMM over all rows
    of x together, so each weight is read once, not once per batch row; otherwise the batch dims
    are broadcast, and an operand whose layout cuBLAS cannot read is copied contiguous.
    """
    out_shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
    if b.ndim == 2 and a.ndim > 2:
        a = a.reshape(-1, a.shape[-1])  # a view for the usual contiguous activations
    batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = xp.broadcast_to(a, (*batch, *a.shape[-2:]))
    b = xp.broadcast_to(b, (*batch, *b.shape[-2:]))
    plan = gemm_plan(a.shape, _element_strides(a), b.shape, _element_strides(b))
    if plan is None:
        a, b = xp.ascontiguousarray(a), xp.ascontiguousarray(b)
        plan = gemm_plan(a.shape, _element_strides(a), b.shape, _element_strides(b))
    return b, a, plan, out_shape


def _direct_matmul(a, b):
    """a @ b through cuBLAS's strided-batched GEMM called directly, so that a CUDA graph records
    it (see `matmul`). Shapes as in `matmul`; float16, float32 or float64 operands."""
    import cupy  # noqa: PLC0415

    dtype = np.result_type(a.dtype, b.dtype)
    if a.ndim < 2 or b.ndim < 2 or dtype.name not in _CUDA_DATA_TYPE:
        return a @ b  # not used by minphi3: CuPy's own product (and its refusal under capture)
    first, second, plan, out_shape = prepare_gemm(a.astype(dtype, copy=False), b.astype(dtype, copy=False), cupy)
    out = cupy.empty(out_shape, dtype=dtype)
    if out.size:
        _cublas().gemm(plan, first, second, out, dtype.name)
    return out


def _element_strides(x) -> tuple[int, ...]:
    return tuple(stride // x.itemsize for stride in x.strides)


class _CublasForCapture:
    """cuBLAS's GEMM through ctypes, in the library CuPy links and on CuPy's own handle.

    The handle (one per thread and device in CuPy) is looked up at each call and set to the
    current stream, with a workspace of this device that lives as long as the process, so that
    cuBLAS allocates nothing while a graph is recorded (cuBLAS documentation, "CUDA Graphs
    Support"; cublasSetStream resets the workspace, so it is set after).
    """

    WORKSPACE_BYTES = 32 << 20

    def __init__(self):
        import ctypes  # noqa: PLC0415

        import cupy  # noqa: PLC0415

        self.ctypes = ctypes
        self.library = ctypes.CDLL(_cublas_library_path())
        with cupy.cuda.Stream.null:
            self.workspace = cupy.empty(self.WORKSPACE_BYTES, dtype=np.uint8)
        p, i, ll, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_size_t
        self.library.cublasSetStream_v2.argtypes = [p, p]
        self.library.cublasSetWorkspace_v2.argtypes = [p, p, size]
        self.library.cublasSetPointerMode_v2.argtypes = [p, i]
        self.library.cublasGemmStridedBatchedEx.argtypes = [
            p, i, i, i, i, i, p, p, i, i, ll, p, i, i, ll, p, p, i, i, ll, i, i, i,
        ]

    def _check(self, status: int, call: str) -> None:
        if status != 0:
            raise BackendError(f"cuBLAS {call} failed with status {status} (a product of a recorded decode step)")

    def gemm(self, plan: dict, first, second, out, dtype: str) -> None:
        """out = first-operand x second-operand as `plan` (from `gemm_plan`) says, on the current stream."""
        import cupy  # noqa: PLC0415

        ctypes, library = self.ctypes, self.library
        handle = cupy.cuda.Device().cublas_handle
        self._check(library.cublasSetStream_v2(handle, cupy.cuda.get_current_stream().ptr), "cublasSetStream")
        self._check(library.cublasSetWorkspace_v2(handle, self.workspace.data.ptr, self.WORKSPACE_BYTES),
                    "cublasSetWorkspace")  # fmt: skip
        self._check(library.cublasSetPointerMode_v2(handle, _CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode")
        scalar = ctypes.c_double if dtype == "float64" else ctypes.c_float
        alpha, beta = scalar(1.0), scalar(0.0)
        kind = _CUDA_DATA_TYPE[dtype]
        status = library.cublasGemmStridedBatchedEx(
            handle, _CUBLAS_OP[plan["transa"]], _CUBLAS_OP[plan["transb"]],
            plan["m"], plan["n"], plan["k"], ctypes.addressof(alpha),
            first.data.ptr, kind, plan["lda"], plan["stride_a"],
            second.data.ptr, kind, plan["ldb"], plan["stride_b"],
            ctypes.addressof(beta), out.data.ptr, kind, plan["ldc"], plan["stride_c"],
            plan["batch"], _CUBLAS_COMPUTE[dtype], _CUBLAS_GEMM_DEFAULT,
        )  # fmt: skip
        self._check(status, "cublasGemmStridedBatchedEx")


_CUBLAS: dict[int, _CublasForCapture] = {}  # by device id


def _cublas() -> _CublasForCapture:
    """The direct cuBLAS caller of the current device, made (with its workspace) on first use;
    `StepReplay` asks for it before it records, outside any capture."""
    import cupy  # noqa: PLC0415

    device = cupy.cuda.Device().id
    if device not in _CUBLAS:
        _CUBLAS[device] = _CublasForCapture()
    return _CUBLAS[device]


def _cublas_library_path() -> str:
    """CuPy's own cuBLAS wrapper module: symbols looked up through it resolve in the libcublas it
    links, not in another copy a second library (torch's) may have loaded."""
    from cupy_backends.cuda.libs import cublas  # noqa: PLC0415

    return cublas.__file__


# ---- replaying a step as a CUDA graph ----------------------------------------------------------
def records_graphs(xp) -> bool:
    """Whether the backend can record a step once and replay it (CuPy: CUDA graphs; NumPy: no,
    a call there costs no launch)."""
    return xp is not np


class StepReplay:
    """Runs `step()` once per call, and on the GPU replays it as one CUDA graph.

    `step` takes no arguments and returns an array; it must read and write only arrays that
    stay at fixed addresses between calls, and do device work alone (no value read back to the
    host, no host-to-device copy), so that what changes between calls lives in those arrays.
    NumPy: every call calls `step`. CuPy (`capture=True`): the first call runs it, which compiles
    its kernels and fills the memory pool; the second records it on a private stream into a
    private memory pool (so nothing else is ever handed the graph's scratch memory) and launches
    the graph; every later call launches the graph again: one launch instead of one per kernel.
    Each call returns the same array then, overwritten in place: read it before the next call.
    If recording fails, the step keeps running eagerly and `graph_error` says why.
    """

    def __init__(self, step, xp, capture: bool = True):
        self.step = step
        self.xp = xp
        self.capture = capture and records_graphs(xp)
        self.calls = 0
        self.launches = 0  # calls served by the recorded graph
        self.graph = None
        self.graph_error: str | None = None
        self._pool = None
        self._result = None

    @property
    def replaying(self) -> bool:
        return self.graph is not None

    @property
    def graph_pool_bytes(self) -> int:
        """Device memory the recorded graph holds in its private pool (0 when nothing is recorded)."""
        return int(self._pool.total_bytes()) if self._pool is not None else 0

    def __call__(self):
        self.calls += 1
        if self.graph is not None:
            self.graph.launch(stream=self.xp.cuda.get_current_stream())
            self.launches += 1
            return self._result
        if not self.capture or self.graph_error is not None:
            return self.step()
        if self.calls == 1:
            return self._warm_up()
        return self._record_and_launch()

    def _warm_up(self):
        """The eager first run, with the products the recording will make (see `matmul`). If
        those fail, the step runs as usual and is never recorded: it writes the same values
        to the same places, so running it twice does no harm."""
        token = _DIRECT_PRODUCTS.set(True)
        try:
            _cublas()  # the library and this device's workspace, outside any capture
            return self.step()
        except Exception as exc:  # no usable cuBLAS to call directly
            self.graph_error = f"{type(exc).__name__}: {exc}"
        finally:
            _DIRECT_PRODUCTS.reset(token)
        return self.step()

    def _record_and_launch(self):
        cupy = self.xp
        pool = cupy.cuda.MemoryPool()
        stream = cupy.cuda.Stream(non_blocking=True)
        current = cupy.cuda.get_current_stream()
        result, graph, began = None, None, False
        # An earlier graph's pool freed by the cycle collector in the middle of this recording
        # would call cudaFree, which synchronizes and so invalidates the capture: collect now,
        # and let no collection run until the recording ends.
        gc.collect()
        collector_was_on = gc.isenabled()
        gc.disable()
        try:
            with cupy.cuda.using_allocator(pool.malloc), stream:
                try:
                    stream.begin_capture()
                    began = True
                    result = self.step()
                except Exception as exc:  # a step that reads a value back, or a library that refuses capture
                    self.graph_error = f"{type(exc).__name__}: {exc}"
                finally:
                    if began:  # end it even when invalidated, so the stream leaves capture mode
                        try:
                            graph = stream.end_capture()
                        except Exception as exc:
                            self.graph_error = self.graph_error or f"{type(exc).__name__}: {exc}"
        finally:
            if collector_was_on:
                gc.enable()
        if self.graph_error is not None or graph is None:
            self.graph_error = self.graph_error or "the recording gave no graph"
            return self.step()
        self.graph, self._pool, self._result = graph, pool, result
        self.graph.launch(stream=current)
        self.launches += 1
        return self._result


def copy_from_host(target, source: np.ndarray) -> None:
    """Write host array `source` into `target` in place (same shape), keeping target's address:
    a plain assignment for NumPy, one host-to-device copy for CuPy."""
    if is_host_array(target):
        target[...] = source
    else:
        target.set(np.ascontiguousarray(source, dtype=target.dtype))


SCORES_PER_BLOCK_ON_GPU = 1 << 28  # elements: 1 GiB of float32 scores


def query_block_size(xp, scores_per_query: int, host_block: int) -> int:
    """Queries per block of `attention.attention_in_query_blocks`.

    NumPy: `host_block`, small enough that a block's scores stay in the CPU's caches and that the
    causal rule lets each block skip the keys after it. CuPy: as many queries as keep one block's
    scores (scores_per_query = batch x heads x kv_seq of them per query) under 2^28 elements,
    and never fewer than `host_block`: on the GPU each block costs two values read back to the
    host (the run of keys it sees) and a dozen launches, while the memory is there.
    """
    if xp is np:
        return host_block
    return max(host_block, SCORES_PER_BLOCK_ON_GPU // max(int(scores_per_query), 1))
