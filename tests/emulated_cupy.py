"""A strict stand-in for CuPy on NumPy, so the GPU tests' code paths run on a machine without a GPU.

It is no GPU and gives no GPU figure. What it checks is what breaks only on a GPU:
- host and device arrays never mix: a NumPy array where a CuPy array belongs is a TypeError, as
  in CuPy, and `numpy.asarray(device_array)` is refused ("Implicit conversion to a NumPy array");
- a recorded step (a CUDA graph) reads nothing back to the host and copies nothing from it:
  `int(x)`, `bool(x)`, `x.item()`, `x.get()`, boolean-mask indexing, `nonzero` and host-to-device
  copies raise while a stream captures, and invalidate the capture, as CUDA does;
- a recorded graph replays as CUDA replays one: every kernel of the recording runs again, in
  order, on the memory it was recorded with, and a Python value read at recording time stays
  what it was. Here each recorded kernel is the NumPy call that made it, re-run on the same
  arrays, its result written into the buffer the recording allocated;
- the decode step's direct cuBLAS calls (`minphi3.backend._cublas`) are computed from their
  arguments alone (pointers' memory, leading dimensions, strides), as cuBLAS reads them.

`install(monkeypatch)` puts it in `sys.modules["cupy"]` for one test. Only the functions minphi3
uses (and that CuPy has) are there: a missing name is an AttributeError, so a function CuPy lacks
shows up here first.
"""

from __future__ import annotations

import contextlib
import sys
import types

import numpy as np

# NumPy functions that CuPy has under the same name (checked against cupy-cuda13x 14.2's namespace).
FUNCTIONS = """
abs absolute add all amax amin any arange argmax argmin argsort ascontiguousarray
broadcast_arrays broadcast_to clip concatenate copyto cos cumsum divide dot einsum empty empty_like
equal exp expand_dims flip full full_like greater greater_equal isfinite isinf isnan less less_equal
log log1p logical_and logical_not logical_or matmul max maximum mean min minimum moveaxis multiply
negative nonzero not_equal ones ones_like power prod ravel reciprocal reshape sign sin sort sqrt
square squeeze stack subtract sum swapaxes take take_along_axis tanh transpose tril triu true_divide
where zeros zeros_like
""".split()
# Names that are not functions of arrays: dtypes and constants, the same objects as NumPy's.
PASSED_THROUGH = """
bool_ dtype e float16 float32 float64 inf int8 int16 int32 int64 nan newaxis pi uint8 uint16 uint32
uint64 integer floating
""".split()


class CUDARuntimeError(RuntimeError):
    """What CUDA answers when a capture meets an operation it cannot record."""


class _State:
    def __init__(self):
        self.current = [Stream.null]
        self.pools = [_DEFAULT_POOL]  # the pool new arrays are counted in (`using_allocator`)

    @property
    def stream(self):
        return self.current[-1]


_STATE: _State | None = None


def _state() -> _State:
    global _STATE
    if _STATE is None:
        _STATE = _State()
    return _STATE


def _capturing_stream():
    stream = _state().stream
    return stream if stream.capturing else None


def _refuse_during_capture(transfer: str, what: str) -> None:
    """A copy between host and device ("D2H" or "H2D"): CuPy refuses it while a stream captures
    (cupy/_core/core.pyx, "the current stream is capturing"); the capture itself stays valid."""
    if _capturing_stream() is not None:
        raise RuntimeError(f"the current stream is capturing, so {transfer} transfers are disallowed ({what})")


def _refuse_cublas_during_capture(operands) -> None:
    """CuPy's own products call cuBLAS, which CuPy refuses while a stream captures (cupy#6290)."""
    if _capturing_stream() is not None and any(
        isinstance(a, ndarray) and a.dtype.kind in "fc" for a in operands
    ):  # fmt: skip
        raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")


def _invalidate_capture(what: str) -> None:
    """A synchronisation while a stream captures: CUDA fails it and invalidates the capture."""
    stream = _capturing_stream()
    if stream is not None:
        stream.invalidated = True
        raise CUDARuntimeError(f"cudaErrorStreamCaptureUnsupported: {what} while a stream is capturing")


# ---- arrays -------------------------------------------------------------------------------------
def _unwrap(value):
    """Operands as NumPy objects; a host NumPy array among them is refused, as CuPy refuses it."""
    if isinstance(value, ndarray):
        return value._data
    if isinstance(value, np.ndarray):
        raise TypeError(f"Unsupported type {type(value)}: a NumPy array where a CuPy array is expected")
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(item) for item in value)
    if isinstance(value, dict):
        return {key: _unwrap(item) for key, item in value.items()}
    return value


def _wrap(value):
    if isinstance(value, np.ndarray):
        return ndarray(value)
    if isinstance(value, np.generic):  # CuPy reductions give 0-d device arrays, never host scalars
        return ndarray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(item) for item in value)
    if isinstance(value, list):
        return [_wrap(item) for item in value]
    return value


def _arrays_in(value):
    if isinstance(value, np.ndarray):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _arrays_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _arrays_in(item)


def _run(function, args=(), kwargs=None, in_place=False):
    """Run `function` on the NumPy data of device operands, as one recorded kernel.

    in_place: the function writes into an operand (setitem, out=, copyto): a replay calls it
    again. Otherwise its result is new device memory (a replay writes into that same memory)
    unless it is a view of an operand (no kernel: nothing to replay)."""
    kwargs = kwargs or {}
    np_args, np_kwargs = _unwrap(args), _unwrap(kwargs)
    result = function(*np_args, **np_kwargs)
    if isinstance(result, np.generic):
        result = np.asarray(result)
    stream = _capturing_stream()
    if stream is not None:
        if in_place or "out" in np_kwargs:
            stream.record(lambda: function(*np_args, **np_kwargs))
        else:
            operands = list(_arrays_in((np_args, np_kwargs)))
            results = result if isinstance(result, tuple) else (result,)
            for position, buffer in enumerate(results):
                if not isinstance(buffer, np.ndarray) or any(np.may_share_memory(buffer, o) for o in operands):
                    continue  # a view: the same memory, nothing computed
                stream.record(_rerun_into(buffer, position if isinstance(result, tuple) else None,
                                          function, np_args, np_kwargs))  # fmt: skip
    return result


def _rerun_into(buffer, position, function, args, kwargs):
    """The kernel a replay runs: the call again, on the operands' memory as it is then, its
    result (element `position` of a tuple result) written into the buffer it first made."""

    def kernel():
        fresh = function(*args, **kwargs)
        buffer[...] = fresh if position is None else fresh[position]

    return kernel


def _float16_product(function):
    """cuBLAS multiplies float16 matrices with float32 accumulation (CuPy's default compute type)."""

    def product(a, b, **kwargs):
        if np.result_type(a, b) == np.float16:
            return function(a.astype(np.float32), b.astype(np.float32), **kwargs).astype(np.float16)
        return function(a, b, **kwargs)

    return product


_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "truediv": np.true_divide,
    "floordiv": np.floor_divide, "mod": np.remainder, "pow": np.power, "and": np.bitwise_and,
    "or": np.bitwise_or, "xor": np.bitwise_xor, "lshift": np.left_shift, "rshift": np.right_shift,
}  # fmt: skip
_COMPARE = {"lt": np.less, "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
            "eq": np.equal, "ne": np.not_equal}  # fmt: skip


class _Memory:
    def __init__(self, data):
        self.ptr = data.ctypes.data


class ndarray:
    """A device array: NumPy data that only device operations may touch."""

    __module__ = "cupy._core.core"  # what minphi3.backend.array_module takes for CuPy
    __array_priority__ = 100

    def __init__(self, data):
        self._data = data
        if data.base is None:  # new memory, not a view
            _state().pools[-1]._count(data.nbytes)

    # what an array is
    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    ndim = property(lambda self: self._data.ndim)
    size = property(lambda self: self._data.size)
    strides = property(lambda self: self._data.strides)
    itemsize = property(lambda self: self._data.itemsize)
    nbytes = property(lambda self: self._data.nbytes)
    flags = property(lambda self: self._data.flags)
    data = property(lambda self: _Memory(self._data))
    T = property(lambda self: ndarray(self._data.T))

    def __len__(self):
        return len(self._data)

    def __repr__(self):
        return f"emulated_cupy.ndarray(shape={self.shape}, dtype={self.dtype})"

    # what CuPy refuses or makes a synchronising copy
    def __array__(self, *args, **kwargs):
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array explicitly."
        )

    def get(self, stream=None, order="C", out=None, blocking=True):
        _refuse_during_capture("D2H", "get")
        return np.array(self._data, order=order)

    def set(self, array, stream=None):
        _refuse_during_capture("H2D", "set")
        if not isinstance(array, np.ndarray) or array.shape != self.shape:
            raise ValueError("set needs a NumPy array of the same shape")
        self._data[...] = array

    def item(self, *args):
        if args:
            raise TypeError("CuPy's item() takes no arguments")
        _refuse_during_capture("D2H", "item")
        return self._data.item()

    def tolist(self):
        _refuse_during_capture("D2H", "tolist")
        return self._data.tolist()

    def __int__(self):
        _refuse_during_capture("D2H", "int")
        return int(self._data)

    def __float__(self):
        _refuse_during_capture("D2H", "float")
        return float(self._data)

    def __bool__(self):
        _refuse_during_capture("D2H", "bool")
        return bool(self._data)

    # NumPy's functions on device arrays dispatch to CuPy's, as CuPy arranges
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        name = ufunc.__name__
        if name not in FUNCTIONS and name not in {u.__name__ for u in (*_BINARY.values(), *_COMPARE.values())}:
            return NotImplemented
        _check_ufunc_keywords(name, kwargs)
        function = getattr(ufunc, method) if method != "__call__" else ufunc
        if name == "matmul":
            _refuse_cublas_during_capture(inputs)
            function = _float16_product(function)
        return _wrap(_run(function, inputs, kwargs))

    def __array_function__(self, func, types_, args, kwargs):
        if func.__name__ not in FUNCTIONS:
            return NotImplemented
        return getattr(_MODULE, func.__name__)(*args, **kwargs)

    # indexing
    def __getitem__(self, key):
        if _needs_count(key):
            _refuse_during_capture("D2H", "boolean-mask indexing reads the count")
        key = _index_key(key)
        return _wrap(_run(lambda data, key: data[key], (self, key)))

    def __setitem__(self, key, value):
        if _needs_count(key):
            _refuse_during_capture("D2H", "boolean-mask indexing reads the count")
        if isinstance(value, np.ndarray):  # CuPy copies a host value in first
            _refuse_during_capture("H2D", "setitem")
            value = ndarray(value.copy())
        _run(_assign, (self, _index_key(key), value), in_place=True)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    # arithmetic
    def __matmul__(self, other):
        _refuse_cublas_during_capture((self, other))
        return _wrap(_run(_float16_product(np.matmul), (self, other)))

    def __rmatmul__(self, other):
        _refuse_cublas_during_capture((self, other))
        return _wrap(_run(_float16_product(np.matmul), (other, self)))

    def __neg__(self):
        return _wrap(_run(np.negative, (self,)))

    def __abs__(self):
        return _wrap(_run(np.absolute, (self,)))

    def __invert__(self):
        return _wrap(_run(np.invert, (self,)))

    # methods (the ones CuPy's ndarray has)
    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if casting is not None or subok is not None:
            raise TypeError("astype: casting and subok are not supported by CuPy")
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        return _wrap(_run(lambda data: data.astype(dtype, order=order), (self,)))

    def copy(self, order="C"):
        return _wrap(_run(lambda data: data.copy(order=order), (self,)))

    def reshape(self, *shape, order="C"):
        return _wrap(_run(lambda data: data.reshape(*shape, order=order), (self,)))

    def view(self, dtype=None):
        return ndarray(self._data.view() if dtype is None else self._data.view(dtype))

    def fill(self, value):
        _run(lambda data: data.fill(value), (self,), in_place=True)

    def _method(name):
        def method(self, *args, **kwargs):
            _check_keywords(name, kwargs)
            return _wrap(_run(lambda data, *a, **k: getattr(data, name)(*a, **k), (self, *args), kwargs))

        method.__name__ = name
        return method

    transpose = _method("transpose")
    swapaxes = _method("swapaxes")
    squeeze = _method("squeeze")
    ravel = _method("ravel")
    sum = _method("sum")
    mean = _method("mean")
    max = _method("max")
    min = _method("min")
    any = _method("any")
    all = _method("all")
    argmax = _method("argmax")
    argmin = _method("argmin")
    cumsum = _method("cumsum")
    prod = _method("prod")
    take = _method("take")
    clip = _method("clip")
    del _method


def _operator(function, reflected=False, in_place=False):
    def method(self, other):
        if function in _COMPARE.values() and isinstance(other, np.ndarray) and other.ndim == 0:
            other = other.item()  # CuPy's comparisons read a 0-d host array as a scalar
        if in_place:
            _run(function, (self, other), {"out": self})
            return self
        operands = (other, self) if reflected else (self, other)
        return _wrap(_run(function, operands))

    return method


for _name, _function in {**_BINARY, **_COMPARE}.items():
    setattr(ndarray, f"__{_name}__", _operator(_function))
    if _name in _BINARY:
        setattr(ndarray, f"__r{_name}__", _operator(_function, reflected=True))
        setattr(ndarray, f"__i{_name}__", _operator(_function, in_place=True))


# Keywords NumPy takes and CuPy 14.2 does not (its signatures)
_REFUSED_KEYWORDS = {
    "sum": {"initial", "where"}, "prod": {"initial", "where"}, "max": {"initial", "where"},
    "min": {"initial", "where"}, "amax": {"initial", "where"}, "amin": {"initial", "where"},
    "mean": {"where"}, "any": {"where"}, "all": {"where"}, "take": {"mode"},
    "sort": {"order", "stable"}, "argsort": {"order", "stable"},
    "zeros": {"like", "device"}, "empty": {"like", "device"}, "arange": {"like", "device"},
    "full": {"like", "device"}, "zeros_like": {"device"}, "empty_like": {"device"},
}  # fmt: skip
_UFUNC_NAMES = {name for name in FUNCTIONS if isinstance(getattr(np, name, None), np.ufunc)}


def _check_keywords(name: str, kwargs: dict) -> None:
    refused = _REFUSED_KEYWORDS.get(name, set()) & set(kwargs)
    if refused:
        raise TypeError(f"CuPy's {name} takes no {', '.join(sorted(refused))}")
    if name in ("sort", "argsort") and kwargs.get("kind") not in (None, "stable"):
        raise ValueError(f"CuPy's {name} sorts stably only: kind={kwargs['kind']!r}")


def _check_ufunc_keywords(name: str, kwargs: dict) -> None:
    """CuPy's ufuncs take out, dtype and casting, nothing else."""
    refused = set(kwargs) - {"out", "dtype", "casting"}
    if refused and name != "matmul":
        raise TypeError(f"Wrong arguments {sorted(refused)} for CuPy's ufunc {name}")


def _assign(data, key, value):
    data[key] = value


def _needs_count(key) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, ndarray) and k.dtype == np.bool_ for k in keys)


def _index_key(key):
    """CuPy takes host index arrays too, copying them to the device first."""
    keys = key if isinstance(key, tuple) else (key,)
    if any(isinstance(k, np.ndarray) for k in keys):
        _refuse_during_capture("H2D", "a host index array")
        keys = tuple(ndarray(k.copy()) if isinstance(k, np.ndarray) else k for k in keys)
        return keys if isinstance(key, tuple) else keys[0]
    return key


# ---- the module ---------------------------------------------------------------------------------
def _function(name):
    numpy_function = getattr(np, name)
    if name == "matmul":
        numpy_function = _float16_product(numpy_function)
    if name == "nonzero":

        def nonzero(a):
            _refuse_during_capture("D2H", "nonzero reads the count")
            return _wrap(_run(np.nonzero, (a,)))

        return nonzero
    if name == "copyto":

        def copyto(dst, src, casting="same_kind", where=True):
            if isinstance(src, np.ndarray):
                if src.size != 1:
                    raise ValueError("non-scalar numpy.ndarray cannot be used for copyto")
                src = src.item()
            _run(lambda d, s, w: np.copyto(d, s, casting=casting, where=w), (dst, src, where), in_place=True)

        return copyto

    if name in ("empty", "empty_like"):

        def allocate(*args, **kwargs):  # memory only: no kernel to record, its contents undefined
            _check_keywords(name, kwargs)
            return ndarray(numpy_function(*_unwrap(args), **_unwrap(kwargs)))

        return allocate

    def function(*args, **kwargs):
        _check_keywords(name, kwargs)
        if name in _UFUNC_NAMES:
            _check_ufunc_keywords(name, kwargs)
        if name in ("matmul", "dot", "einsum", "tensordot"):
            _refuse_cublas_during_capture(args)
        if name == "take_along_axis" and len(args) < 3 and "axis" not in kwargs:
            raise TypeError("cupy.take_along_axis needs axis")
        if name == "argmax" and len(args) > 2:
            raise TypeError("cupy.argmax's third positional argument is dtype, not out: pass keywords")
        return _wrap(_run(numpy_function, args, kwargs))

    function.__name__ = name
    return function


def asarray(a, dtype=None, order=None, *, blocking=False):
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    host = np.array(a, dtype=dtype, order=order or "K", copy=True)
    if host.ndim:  # CuPy copies a 0-d value or a scalar in as a kernel argument, even while capturing
        _refuse_during_capture("H2D", "asarray")
    return ndarray(host)


def array(obj, dtype=None, copy=True, order="K", ndmin=0, *, blocking=False):
    if isinstance(obj, ndarray):
        return obj.astype(dtype or obj.dtype, copy=copy)
    return asarray(np.array(obj, dtype=dtype, ndmin=ndmin), order=order)


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    return a.get(order=order) if isinstance(a, ndarray) else np.asarray(a, order=order)


def get_array_module(*args):
    return _MODULE if any(isinstance(a, ndarray) for a in args) else np


# ---- streams, graphs, memory --------------------------------------------------------------------
class Graph:
    """A recorded stream: its kernels, replayed in order by `launch`."""

    def __init__(self, kernels):
        self.kernels = kernels

    def launch(self, stream=None):
        if _capturing_stream() is not None:
            raise CUDARuntimeError("emulated_cupy: launching a graph inside a capture is not emulated")
        for kernel in self.kernels:
            kernel()

    def upload(self, stream=None):
        pass

    def debug_dot_str(self, flags=0):
        """The graph in Graphviz's language, one KERNEL node per recorded kernel (as CUDA writes it)."""
        nodes = "\n".join(f'node{i} [label="KERNEL {i}"];' for i in range(len(self.kernels)))
        return f"digraph emulated {{\n{nodes}\n}}"


class Stream:
    null = None  # set below

    def __init__(self, null=False, non_blocking=False, ptr=None, priority=None):
        self.is_null = null
        self.ptr = 0 if null else id(self)
        self.capturing = False
        self.invalidated = False
        self._kernels = []

    def __enter__(self):
        _state().current.append(self)
        return self

    def __exit__(self, *exc):
        _state().current.pop()

    def use(self):
        _state().current[-1:] = [self]
        return self

    def synchronize(self):
        _invalidate_capture("a stream synchronisation")

    def begin_capture(self, mode=None):
        if self.is_null:
            raise CUDARuntimeError("cudaErrorStreamCaptureUnsupported: the null stream cannot capture")
        if self is not _state().stream:
            raise CUDARuntimeError("emulated_cupy: capture a stream that is the current one")
        self.capturing, self.invalidated, self._kernels = True, False, []

    def end_capture(self):
        if not self.capturing:
            raise CUDARuntimeError("cudaErrorIllegalState: the stream is not capturing")
        self.capturing = False
        if self.invalidated:
            raise CUDARuntimeError("cudaErrorStreamCaptureInvalidated: the capture was invalidated")
        return Graph(self._kernels)

    def is_capturing(self):
        return self.capturing

    def record(self, kernel):
        self._kernels.append(kernel)


Stream.null = Stream(null=True)


def get_current_stream(device_id=None):
    return _state().stream


class Event:
    """A point in a stream's work: here the host clock when it is recorded (work runs at once)."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        self.seconds = None

    def record(self, stream=None):
        import time

        self.seconds = time.perf_counter()

    def synchronize(self):
        _invalidate_capture("an event synchronisation")


def get_elapsed_time(start_event, end_event):
    """Milliseconds between two recorded events."""
    return (end_event.seconds - start_event.seconds) * 1e3


class MemoryPool:
    """The pool's interface. The memory itself is NumPy's; `total_bytes` counts the bytes of every
    array made while this pool was the allocator, never reusing any, so it only bounds CuPy's
    figure from above: enough to tell which pool a step's memory went to."""

    def __init__(self):
        self._bytes = 0

    def _count(self, nbytes: int) -> None:
        self._bytes += int(nbytes)

    def malloc(self, size):
        raise NotImplementedError("emulated_cupy allocates through NumPy")

    def used_bytes(self):
        return self._bytes

    def total_bytes(self):
        return self._bytes

    def free_all_blocks(self):
        pass


class _NoPool(MemoryPool):
    """`using_allocator(None)` or a foreign allocator: nothing is counted."""

    def _count(self, nbytes: int) -> None:
        pass


_DEFAULT_POOL = MemoryPool()


@contextlib.contextmanager
def using_allocator(allocator=None):
    pool = getattr(allocator, "__self__", None)
    _state().pools.append(pool if isinstance(pool, MemoryPool) else _NoPool())
    try:
        yield
    finally:
        _state().pools.pop()


class Device:
    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        self.cublas_handle = 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def use(self):
        pass

    def synchronize(self):
        _invalidate_capture("a device synchronisation")


def _memory_info():
    from minphi3.backend import available_memory

    free, _ = available_memory(np)
    return (free or 1 << 34), 1 << 37


class EmulatedCublas:
    """`backend._CublasForCapture` with cublasGemmStridedBatchedEx computed on the arrays' memory."""

    def gemm(self, plan, first, second, out, dtype):
        def call(a, b, c):
            cublas_gemm_strided_batched(plan, a, b, c)

        _run(call, (first, second, out), in_place=True)


def reachable_memory(x: np.ndarray) -> np.ndarray:
    """The elements from x's first element to its last, as one flat copy (strides are >= 0 here)."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.strides, strict=True)) // x.itemsize
    return np.lib.stride_tricks.as_strided(x, shape=(span,), strides=(x.itemsize,)).copy()


def cublas_gemm_strided_batched(plan, first: np.ndarray, second: np.ndarray, out: np.ndarray) -> None:
    """What cublasGemmStridedBatchedEx computes, by its documented definition, on the memory of
    three NumPy arrays: for each batch i, C_i = op(A_i) op(B_i) (alpha 1, beta 0) where a
    column-major matrix's element (r, c) sits at i * stride + r + c * ld. Reading or writing
    outside an array's memory raises IndexError. float16 accumulates in float32, as minphi3 asks."""
    m, n, k = plan["m"], plan["n"], plan["k"]
    a_memory, b_memory = reachable_memory(first), reachable_memory(second)
    if a_memory.dtype == np.float16:
        a_memory, b_memory = a_memory.astype(np.float32), b_memory.astype(np.float32)
    c_memory = out.reshape(-1)  # out is contiguous
    if not np.shares_memory(c_memory, out):
        raise ValueError("the output of a GEMM must be contiguous")

    def offsets(start, rows, cols, ld):
        return start + np.arange(rows)[:, None] + ld * np.arange(cols)[None, :]

    a_rows, a_cols = (m, k) if plan["transa"] == "N" else (k, m)
    b_rows, b_cols = (k, n) if plan["transb"] == "N" else (n, k)
    assert plan["lda"] >= max(1, a_rows) and plan["ldb"] >= max(1, b_rows) and plan["ldc"] >= max(1, m)
    for i in range(plan["batch"]):
        a = a_memory.take(offsets(i * plan["stride_a"], a_rows, a_cols, plan["lda"]), mode="raise")
        b = b_memory.take(offsets(i * plan["stride_b"], b_rows, b_cols, plan["ldb"]), mode="raise")
        op_a = a if plan["transa"] == "N" else a.T
        op_b = b if plan["transb"] == "N" else b.T
        np.put(c_memory, offsets(i * plan["stride_c"], m, n, plan["ldc"]), op_a @ op_b, mode="raise")


def _build_module():
    module = types.ModuleType("cupy", __doc__)
    module.__version__ = "emulated"
    module.ndarray = ndarray
    for name in FUNCTIONS:
        setattr(module, name, _function(name))
    for name in PASSED_THROUGH:
        setattr(module, name, getattr(np, name))
    module.asarray, module.array, module.asnumpy = asarray, array, asnumpy
    module.get_array_module = get_array_module
    module.get_default_memory_pool = lambda: _DEFAULT_POOL
    cuda = types.ModuleType("cupy.cuda")
    cuda.Stream, cuda.Device, cuda.MemoryPool, cuda.Graph, cuda.Event = Stream, Device, MemoryPool, Graph, Event
    cuda.get_current_stream, cuda.using_allocator = get_current_stream, using_allocator
    cuda.get_elapsed_time = get_elapsed_time
    cuda.runtime = types.SimpleNamespace(
        getDeviceCount=lambda: 1, memGetInfo=_memory_info, CUDARuntimeError=CUDARuntimeError,
        runtimeGetVersion=lambda: 13000,
        getDeviceProperties=lambda device: {"name": b"emulated_cupy (NumPy)", "totalGlobalMem": 1 << 34},
    )
    module.cuda = cuda
    return module


_MODULE = _build_module()


def install(monkeypatch):
    """Make `import cupy` give this stand-in, and the decode step's direct cuBLAS calls run on it."""
    import minphi3.backend as backend

    global _STATE
    _STATE = _State()
    _DEFAULT_POOL._bytes = 0
    monkeypatch.setitem(sys.modules, "cupy", _MODULE)
    monkeypatch.setitem(sys.modules, "cupy.cuda", _MODULE.cuda)
    monkeypatch.setattr(backend, "_cublas", EmulatedCublas)
    return _MODULE
