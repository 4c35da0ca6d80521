"""The array-module switch: names, dtypes, host copies, and clear errors for what is missing."""

import numpy as np
import pytest

import minphi3
from minphi3.backend import (
    array_module,
    backend_name,
    compute_dtype,
    cupy_available,
    get_array_module,
    resolve_dtype,
    to_numpy,
)


def test_numpy_backend_and_array_module():
    assert get_array_module("numpy") is np
    assert array_module(np.zeros(3)) is np
    assert array_module([1, 2]) is np
    assert backend_name(np) == "numpy"


def test_unknown_backend_and_dtype_are_named():
    with pytest.raises(minphi3.BackendError, match="'tpu'"):
        get_array_module("tpu")
    with pytest.raises(minphi3.BackendError, match="bfloat16"):
        resolve_dtype("bfloat16")
    with pytest.raises(minphi3.BackendError, match="int32"):
        resolve_dtype(np.int32)


def test_dtypes_and_reduction_precision():
    assert resolve_dtype("float16") == np.float16
    assert resolve_dtype(np.float64) == np.float64
    assert compute_dtype(np.float16) == np.float32
    assert compute_dtype(np.float32) == np.float32
    assert compute_dtype(np.float64) == np.float64


def test_to_numpy_copies_containers_and_keeps_none():
    converted = to_numpy((np.ones(2), None, [np.zeros(1)]))
    assert isinstance(converted, tuple) and converted[1] is None
    assert isinstance(converted[0], np.ndarray) and isinstance(converted[2][0], np.ndarray)


def test_cupy_request_without_a_gpu_is_a_clear_error(tmp_path):
    """Where CuPy or a GPU is missing (CI), asking for it names what to install; with a GPU it works."""
    if cupy_available():
        assert backend_name(get_array_module("cupy")) == "cupy"
        return
    with pytest.raises(minphi3.BackendError, match="cupy|CuPy|GPU"):
        get_array_module("cupy")
    with pytest.raises(minphi3.BackendError):
        minphi3.load(tmp_path, backend="cupy")
