"""The CuPy backend against the NumPy one (issue 9): on a real NVIDIA GPU, and on the CPU against
a strict stand-in for CuPy.

float32: the project's usual logits tolerance; float16: relative error under 1e-2 on the logits
and equal greedy tokens over 32 steps on the demo model; generation equal token for token.
On the GPU, `generate` runs one-token steps as a recorded CUDA graph by default: the tests check
that the graph was recorded and replayed (GenerationStats), and that its products, recorded
through cuBLAS directly (backend._direct_matmul), equal CuPy's own.

Each test runs twice. [cuda] is the GPU run, marked `gpu` and skipped without CuPy and a GPU.
[emulated] runs everywhere on `emulated_cupy`: NumPy that refuses what CuPy and CUDA graphs
refuse (host arrays among device ones, values read back or copied in while a graph records) and
replays a recorded graph as CUDA does. It finds, without a GPU, the faults that only a GPU
showed before; it proves nothing about CUDA itself, and no GPU figure comes from it.
"""

import emulated_cupy
import numpy as np
import pytest
from tiny_checkpoints import longrope_scaling, matmul_layouts, random_ids, save_tiny, save_tiny_tokenizer

import minphi3
from minphi3 import cli
from minphi3.backend import StepReplay, cupy_available, matmul
from minphi3.generate import GenerationStats


@pytest.fixture(params=[pytest.param("cuda", marks=pytest.mark.gpu), "emulated"], autouse=True)
def device(request, monkeypatch):
    """"cuda": CuPy on a GPU, skipped without one; "emulated": `emulated_cupy` in CuPy's place."""
    if request.param == "cuda":
        if not cupy_available():
            pytest.skip("needs CuPy and an NVIDIA GPU")
        return request.param
    emulated_cupy.install(monkeypatch)
    return request.param

CASES = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "window": dict(sliding_window=5),
    "longrope": dict(max_position_embeddings=128, original_max_position_embeddings=16, rope_scaling=longrope_scaling(8)),
    "partial_tied": dict(partial_rotary_factor=0.75, tie_word_embeddings=True, num_key_value_heads=2),
    # phi-2's layout: LayerNorm, one norm for a parallel attention and MLP, biases, gelu_new,
    # separate q, k, v projections, partial rotary, LayerNorm'd q and k (phi-1.5's option)
    "phi2": dict(architecture="PhiForCausalLM", partial_rotary_factor=0.5, num_key_value_heads=2, qk_layernorm=True),
}


def max_relative(ours, reference):
    return float(np.abs(ours - reference).max() / max(1.0, np.abs(reference).max()))


@pytest.mark.parametrize("name", list(CASES))
def test_cupy_logits_equal_numpy_float32(tmp_path, name):
    folder = save_tiny(tmp_path / name, **CASES[name])
    ids = random_ids(2, 24)
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    cpu = minphi3.load(folder)(ids, attention_mask=mask, output_hidden_states=True)
    gpu = minphi3.load(folder, backend="cupy")(ids, attention_mask=mask, output_hidden_states=True)
    assert max_relative(minphi3.to_numpy(gpu.logits)[0], cpu.logits[0]) <= 1e-4
    assert max_relative(minphi3.to_numpy(gpu.logits)[1, 5:], cpu.logits[1, 5:]) <= 1e-4
    for ours, theirs in zip(gpu.hidden_states, cpu.hidden_states, strict=True):
        assert max_relative(minphi3.to_numpy(ours)[0], theirs[0]) <= 1e-4


@pytest.mark.parametrize("architecture", ["Phi3ForSequenceClassification", "Phi3ForTokenClassification"])
def test_classification_heads_on_the_gpu_equal_numpy(tmp_path, architecture):
    """The sequence head pools the last token that is not padding (pad_token_id in the ids)."""
    folder = save_tiny(tmp_path / "m", architecture=architecture, num_labels=3, pad_token_id=0)
    ids = random_ids(2, 12)
    ids[1, 8:] = 0  # right padding: row 1 is pooled at position 7
    cpu = minphi3.load(folder)(ids).logits
    gpu = minphi3.to_numpy(minphi3.load(folder, backend="cupy")(ids).logits)
    assert gpu.shape == cpu.shape and max_relative(gpu, cpu) <= 1e-4


def assert_graph_replayed(stats: GenerationStats):
    """Every one-token step after the first of each fixed step was a graph launch."""
    assert stats.graph_error is None, stats.graph_error
    assert stats.fixed_steps > 0 and stats.graph_launches >= stats.fixed_steps - 2


@pytest.mark.parametrize("name", list(CASES))
def test_cupy_generation_equals_numpy(tmp_path, name):
    folder = save_tiny(tmp_path / name, **CASES[name])
    ids = random_ids(2, 8)
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    cpu = minphi3.generate(minphi3.load(folder), ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[])
    gpu_model = minphi3.load(folder, backend="cupy")
    stats = GenerationStats()
    graph = minphi3.generate(gpu_model, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], stats=stats)
    np.testing.assert_array_equal(graph, cpu)
    assert_graph_replayed(stats)
    eager = minphi3.generate(gpu_model, ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[], cuda_graph=False)
    np.testing.assert_array_equal(eager, cpu)


def test_products_recorded_in_a_cuda_graph_equal_cupys():
    import cupy

    rng = np.random.default_rng(0)
    for dtype, tolerance in (("float64", 1e-12), ("float32", 1e-5), ("float16", 2e-3)):
        for name, a, b in matmul_layouts(rng, cupy, dtype):
            expected = minphi3.to_numpy(a @ b).astype(np.float64)
            replay = StepReplay(lambda a=a, b=b: matmul(a, b), cupy)
            replay()  # the first call runs eagerly
            recorded = minphi3.to_numpy(replay()).astype(np.float64)
            assert replay.replaying, (name, replay.graph_error)
            np.testing.assert_allclose(recorded, expected, rtol=tolerance, atol=tolerance, err_msg=f"{name} {dtype}")
            a += 1  # the graph reads the arrays where they are: a replay sees new values
            np.testing.assert_allclose(minphi3.to_numpy(replay()), minphi3.to_numpy(a @ b), rtol=tolerance,
                                       atol=tolerance * 10, err_msg=f"{name} {dtype} after an update")  # fmt: skip


@pytest.mark.parametrize("overrides", [{}, dict(sliding_window=20)], ids=["plain", "window_wider_than_the_cache"])
def test_chat_turns_reuse_the_cache_with_the_graph(tmp_path, overrides):
    """The caches start at 8 slots: the graph's cache must grow to the window first (a window of
    20 is passed by the third turn), as the CPU's ordinary steps make it grow."""
    folder = save_tiny(tmp_path / "m", **overrides)
    ids = random_ids(1, 8)
    gpu, cpu = minphi3.load(folder, backend="cupy"), minphi3.load(folder)
    caches = {"gpu": gpu.new_cache(1, 8), "cpu": cpu.new_cache(1, 8)}
    sequences = {"gpu": ids, "cpu": ids}
    for turn in range(3):
        for side, model in (("gpu", gpu), ("cpu", cpu)):
            prompt = np.concatenate([sequences[side], random_ids(1, 4, seed=turn)], axis=1)
            sequences[side] = minphi3.generate(model, prompt, max_new_tokens=10, eos_token_id=[], cache=caches[side])
        np.testing.assert_array_equal(sequences["gpu"], sequences["cpu"])


def test_a_minimum_length_and_a_whole_mask_over_a_cache_on_the_gpu(tmp_path):
    """min_new_tokens holds the eos ids off on the device as on the CPU, and a [batch, cached +
    seq] mask rewrites the cached keys' padding there too."""
    folder = save_tiny(tmp_path / "m")
    ids = random_ids(2, 6)
    cpu_model, gpu_model = minphi3.load(folder), minphi3.load(folder, backend="cupy")
    free = minphi3.generate(cpu_model, ids, max_new_tokens=10, eos_token_id=[])
    kwargs = dict(max_new_tokens=10, eos_token_id=[int(free[0, 7])], min_new_tokens=5)  # row 0's 2nd new token
    held = minphi3.generate(cpu_model, ids, **kwargs)
    assert held[0, 7] != free[0, 7]
    np.testing.assert_array_equal(minphi3.generate(gpu_model, ids, **kwargs), held)
    whole = np.ones((2, 8), np.int64)
    whole[1, 1:4] = 0
    logits = []
    for model in (cpu_model, gpu_model):
        cache = model.new_cache(2, 8)
        model(ids, cache=cache)
        logits.append(minphi3.to_numpy(model(free[:, 6:8], attention_mask=whole, cache=cache).logits))
    assert max_relative(logits[1], logits[0]) <= 1e-4
    assert max_relative(logits[0][1], minphi3.to_numpy(cpu_model(free[1:, :8]).logits)[0, 6:]) > 1e-3  # the mask mattered


def test_seeded_sampling_on_the_gpu_repeats_and_matches_the_cpu(tmp_path):
    folder = save_tiny(tmp_path / "m")
    ids = random_ids(2, 6)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_p=0.9, seed=7, eos_token_id=[])
    gpu_model = minphi3.load(folder, backend="cupy")
    first = minphi3.generate(gpu_model, ids, **kwargs)
    np.testing.assert_array_equal(first, minphi3.generate(gpu_model, ids, **kwargs))
    np.testing.assert_array_equal(first, minphi3.generate(minphi3.load(folder), ids, **kwargs))


def test_a_bfloat16_checkpoint_runs_in_float16_and_float32_on_the_gpu(tmp_path):
    """Sharded bfloat16 weights, streamed tensor by tensor to the device in the dtype asked for."""
    folder = save_tiny(tmp_path / "m", num_key_value_heads=2, storage_dtype="bfloat16", max_shard_size="20KB")
    ids = random_ids(2, 16)
    reference = minphi3.load(folder)(ids).logits
    for dtype, tolerance in (("float32", 1e-4), ("float16", 1e-2)):
        model = minphi3.load(folder, backend="cupy", dtype=dtype)
        weight = model.params["model.embed_tokens.weight"]
        assert minphi3.backend.backend_name(minphi3.backend.array_module(weight)) == "cupy" and weight.dtype == dtype
        assert max_relative(minphi3.to_numpy(model(ids).logits).astype(np.float32), reference) < tolerance, dtype


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_the_command_line_on_the_gpu_prints_what_the_cpu_prints(tmp_path, capsys, command):
    folder = save_tiny_tokenizer(save_tiny(tmp_path / "m", vocab_size=300, max_position_embeddings=256), 300)
    if command == "generate":
        arguments = ["generate", "The quick brown", "--seed", "1", "--temperature", "0.8"]
    else:
        arguments = ["chat", "--prompt", "What is the capital of France?"]
    printed = {}
    for backend in ("numpy", "cupy"):
        assert cli.main([*arguments, "--model", str(folder), "--max-new-tokens", "12", "--backend", backend]) == 0
        printed[backend] = capsys.readouterr().out
    assert printed["cupy"] == printed["numpy"] and printed["cupy"].strip()


@pytest.fixture(scope="module")
def demo_folder():
    from minphi3.demo import demo_model_path

    return demo_model_path()


def test_demo_model_float16_on_the_gpu(demo_folder):
    tokenizer = minphi3.load_tokenizer(demo_folder)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=True)
    cpu_model = minphi3.load(demo_folder)
    gpu16 = minphi3.load(demo_folder, backend="cupy", dtype="float16")
    reference = cpu_model([ids]).logits
    half = minphi3.to_numpy(gpu16([ids]).logits).astype(np.float32)
    assert max_relative(half, reference) < 1e-2
    greedy_cpu = minphi3.generate(cpu_model, [ids], max_new_tokens=32, eos_token_id=[])
    stats = GenerationStats()
    greedy_gpu = minphi3.generate(gpu16, [ids], max_new_tokens=32, eos_token_id=[], stats=stats)
    np.testing.assert_array_equal(greedy_gpu, greedy_cpu)
    assert_graph_replayed(stats)
    np.testing.assert_array_equal(minphi3.generate(gpu16, [ids], max_new_tokens=32, eos_token_id=[], cuda_graph=False),
                                  greedy_cpu)  # fmt: skip


def test_demo_model_float32_on_the_gpu(demo_folder):
    from minphi3.demo import fetch_demo_gguf

    cpu = minphi3.load(demo_folder)
    gpu = minphi3.load(demo_folder, backend="cupy")
    ids = random_ids(1, 32, vocab=cpu.config.vocab_size)
    reference = cpu(ids).logits
    assert max_relative(minphi3.to_numpy(gpu(ids).logits), reference) <= 1e-4
    from_gguf = minphi3.load(fetch_demo_gguf(), backend="cupy")  # dequantized on the host, uploaded tensor by tensor
    assert max_relative(minphi3.to_numpy(from_gguf(ids).logits), reference) <= 1e-4
    del from_gguf
    np.testing.assert_array_equal(
        minphi3.generate(gpu, ids, max_new_tokens=16, eos_token_id=[]),
        minphi3.generate(cpu, ids, max_new_tokens=16, eos_token_id=[]),
    )
