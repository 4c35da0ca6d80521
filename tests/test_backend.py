"""The array-module switch: names, dtypes, host copies, and clear errors for what is missing."""

import numpy as np
import pytest
from tiny_checkpoints import matmul_layouts

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
    with pytest.raises(minphi3.BackendError, match="dtype is None"):
        resolve_dtype(None)  # NumPy would read it as float64: twice the memory, silently


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


def test_to_numpy_is_a_copy_on_numpy_too():
    weights = np.ones(3, dtype=np.float32)
    host = to_numpy(weights)
    host *= 0  # fake-quantizing the copy must not touch the model's array
    assert host is not weights and weights.tolist() == [1.0, 1.0, 1.0]


def test_cupy_request_without_a_gpu_is_a_clear_error(tmp_path):
    """Where CuPy or a GPU is missing (CI), asking for it names what to install; with a GPU it works."""
    if cupy_available():
        assert backend_name(get_array_module("cupy")) == "cupy"
        return
    with pytest.raises(minphi3.BackendError, match="cupy|CuPy|GPU"):
        get_array_module("cupy")
    with pytest.raises(minphi3.BackendError):
        minphi3.load(tmp_path, backend="cupy")


# ---- the GEMM plan that replaces `@` while a CUDA graph records ---------------------------------
def reachable_memory(x: np.ndarray) -> np.ndarray:
    """The elements from x's first element to its last, as one flat copy (strides are >= 0 here)."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.strides, strict=True)) // x.itemsize
    return np.lib.stride_tricks.as_strided(x, shape=(span,), strides=(x.itemsize,)).copy()


def cublas_gemm_strided_batched(plan, first: np.ndarray, second: np.ndarray, out: np.ndarray) -> None:
    """What cublasGemmStridedBatchedEx computes, by its documented definition, on the memory of
    three NumPy arrays: for each batch i, C_i = op(A_i) op(B_i) (alpha 1, beta 0) where a
    column-major matrix's element (r, c) sits at i * stride + r + c * ld. Reading or writing
    outside an array's memory raises IndexError."""
    m, n, k = plan["m"], plan["n"], plan["k"]
    a_memory, b_memory = reachable_memory(first), reachable_memory(second)
    c_memory = out.reshape(-1)  # out is contiguous

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


def planned_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b the way backend._direct_matmul does it on the GPU (`prepare_gemm`, then one cuBLAS
    call), with the call emulated on NumPy arrays."""
    from minphi3.backend import prepare_gemm

    first, second, plan, out_shape = prepare_gemm(a, b, np)
    out = np.full(out_shape, np.nan)
    cublas_gemm_strided_batched(plan, first, second, out)
    return out


def test_the_gemm_plan_computes_a_at_b_for_every_layout():
    rng = np.random.default_rng(0)
    for name, a, b in matmul_layouts(rng):
        np.testing.assert_allclose(planned_matmul(a, b), a @ b, rtol=1e-12, atol=1e-12, err_msg=name)


def test_the_gemm_plan_reads_the_cache_and_the_weights_in_place():
    """The decode step's products copy nothing: q k^T reads the key cache where it is, and a
    linear layer is one GEMM over every row of the batch that reads the weight once."""
    from minphi3.backend import prepare_gemm

    keys, q = np.zeros((2, 3, 4, 10)), np.zeros((2, 3, 1, 4))
    first, second, plan, _ = prepare_gemm(q, keys, np)
    assert np.shares_memory(first, keys) and np.shares_memory(second, q) and plan["batch"] == 6
    weight, x = np.zeros((12, 8)), np.zeros((3, 1, 8))
    first, second, plan, out_shape = prepare_gemm(x, weight.T, np)
    assert np.shares_memory(first, weight) and np.shares_memory(second, x)
    assert (plan["batch"], plan["n"], plan["transa"], plan["lda"]) == (1, 3, "T", 8) and out_shape == (3, 1, 12)


def test_matmul_on_numpy_is_the_operator():
    from minphi3.backend import matmul

    a, b = np.arange(6.0).reshape(2, 3), np.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(matmul(a, b), a @ b)


def test_query_blocks_are_small_on_the_cpu_and_bounded_by_memory_on_the_gpu():
    from minphi3.backend import SCORES_PER_BLOCK_ON_GPU, query_block_size

    assert query_block_size(np, 32 * 4096, 64) == 64

    class FakeCupy:  # only its identity matters: anything that is not numpy is a GPU module
        pass

    gpu = FakeCupy()
    assert query_block_size(gpu, 32 * 512, 64) == SCORES_PER_BLOCK_ON_GPU // (32 * 512)  # a 512 prompt: one block
    assert query_block_size(gpu, 32 * 4096, 64) * 32 * 4096 <= SCORES_PER_BLOCK_ON_GPU
    assert query_block_size(gpu, 1 << 30, 64) == 64
