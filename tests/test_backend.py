"""The array-module switch: names, dtypes, host copies, and clear errors for what is missing."""

import numpy as np
import pytest
from emulated_cupy import cublas_gemm_strided_batched
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


# ---- StepReplay on `emulated_cupy`, the CPU stand-in that records and replays as CUDA does ------
@pytest.fixture
def emulated(monkeypatch):
    import emulated_cupy

    return emulated_cupy.install(monkeypatch)


def test_a_replayed_graph_reads_its_buffers_where_they_are(emulated):
    from minphi3.backend import StepReplay, copy_from_host, matmul

    inputs = emulated.zeros(3, dtype=np.float64)
    weight = emulated.asarray(np.arange(12.0).reshape(3, 4))
    replay = StepReplay(lambda: matmul(emulated.exp(inputs[None, :]), weight), emulated)
    for step in range(4):
        copy_from_host(inputs, np.array([step, -step, 0.5]))
        expected = np.exp(np.array([[step, -step, 0.5]])) @ np.arange(12.0).reshape(3, 4)
        np.testing.assert_allclose(to_numpy(replay()), expected, rtol=1e-12)
    assert replay.replaying and replay.launches == 3 and replay.graph_error is None


def test_a_step_that_reads_a_value_back_is_never_recorded_and_still_right(emulated):
    from minphi3.backend import StepReplay, copy_from_host

    inputs = emulated.zeros(2, dtype=np.float64)
    replay = StepReplay(lambda: inputs * float(inputs.sum()), emulated)
    for step in range(3):
        copy_from_host(inputs, np.array([step, 1.0]))
        np.testing.assert_allclose(to_numpy(replay()), np.array([step, 1.0]) * (step + 1))
    assert not replay.replaying and "capturing, so D2H transfers are disallowed" in replay.graph_error


def test_a_host_value_taken_while_recording_stays_in_the_graph(emulated):
    """What makes a step unfit for a graph: a Python value (here a host counter) is baked in at
    recording time. The stand-in replays that as CUDA would, so the tests that compare a graph's
    tokens with the CPU's catch it."""
    from minphi3.backend import StepReplay

    counter = {"calls": 0}

    def step():
        counter["calls"] += 1
        return emulated.full(1, counter["calls"], dtype=np.int64)

    replay = StepReplay(step, emulated)
    assert [int(replay()[0]) for _ in range(4)] == [1, 2, 2, 2]


def test_the_stand_in_refuses_what_cupy_refuses(emulated):
    """CuPy 14.2's refusals (cupy/_core/core.pyx and friends), which the GPU tests lean on."""
    device = emulated.arange(3.0)
    with pytest.raises(TypeError, match="Unsupported type"):
        device + np.arange(3.0)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(device)
    with pytest.raises(TypeError):
        range(emulated.asarray(3))  # no __index__
    stream = emulated.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        with pytest.raises(RuntimeError, match="H2D transfers are disallowed"):
            emulated.asarray(np.arange(3.0))
        with pytest.raises(RuntimeError, match="D2H transfers are disallowed"):
            bool(device.any())
        with pytest.raises(NotImplementedError, match="cuBLAS"):
            device[None] @ device[:, None]
        emulated.asarray(np.float32(2.0))  # a scalar travels as a kernel argument
        graph = stream.end_capture()  # refused copies leave the capture valid
        stream.begin_capture()
        with pytest.raises(emulated.cuda.runtime.CUDARuntimeError):
            stream.synchronize()
        with pytest.raises(emulated.cuda.runtime.CUDARuntimeError, match="Invalidated"):
            stream.end_capture()
    graph.launch()


def test_no_collection_runs_while_a_graph_records(emulated, monkeypatch):
    """An old graph's pool freed by the cycle collector during a recording would call cudaFree,
    which synchronizes and invalidates the capture: the collector runs before, never during."""
    import gc

    from minphi3.backend import StepReplay

    events = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *args: events.append("collect") or real_collect(*args))
    stream_type = emulated.cuda.Stream
    real_begin = stream_type.begin_capture
    monkeypatch.setattr(stream_type, "begin_capture", lambda self: events.append("begin") or real_begin(self))

    def step():
        events.append(f"step, collector {'on' if gc.isenabled() else 'off'}")
        return emulated.ones(2)

    assert gc.isenabled()
    replay = StepReplay(step, emulated)
    replay(), replay(), replay()
    assert events == ["step, collector on", "collect", "begin", "step, collector off"]
    assert replay.replaying and gc.isenabled()
    gc.disable()  # a caller that keeps the collector off finds it off afterwards
    try:
        again = StepReplay(step, emulated)
        again(), again()
        assert again.replaying and not gc.isenabled()
    finally:
        gc.enable()


def test_a_recording_that_fails_or_raises_turns_the_collector_back_on(emulated, monkeypatch):
    import gc

    from minphi3.backend import StepReplay

    inputs = emulated.ones(2)
    replay = StepReplay(lambda: inputs * float(inputs.sum()), emulated)
    replay(), replay()
    assert replay.graph_error is not None and gc.isenabled()

    def no_allocator(_allocator):
        raise RuntimeError("no allocator")

    monkeypatch.setattr(emulated.cuda, "using_allocator", no_allocator)
    replay = StepReplay(lambda: inputs * 2, emulated)
    replay()
    with pytest.raises(RuntimeError, match="no allocator"):
        replay()
    assert gc.isenabled()


def test_graph_pool_bytes_are_the_recorded_steps_memory(emulated):
    from minphi3.backend import StepReplay

    inputs = emulated.ones((4, 8), dtype=np.float32)
    replay = StepReplay(lambda: emulated.exp(inputs) * 2, emulated)
    replay()
    assert replay.graph_pool_bytes == 0  # nothing recorded yet
    replay()
    assert replay.graph_pool_bytes >= 4 * 8 * 4  # at least the result it writes
