"""One benchmark measurement in its own process: load a checkpoint, then generate, timed.

    python benchmarks/worker.py --framework minphi3|transformers --model FOLDER [options]

Prints one JSON line: load seconds, prefill and decode seconds of each repetition, the ids
generated, and the process's peak resident memory (VmHWM) after loading and at the end. The
minphi3 worker never imports torch, so its memory is NumPy's alone.

Timing is the same for both frameworks: a callback that sees every new token (minphi3's
streamer, a transformers StoppingCriteria) records the time. Prefill = from the call to the first
token (the prompt's forward pass and the first pick); decode = from the first token to the last,
over new_tokens - 1 tokens. Generation is greedy and never stops early (no end-of-sequence id).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status ("VmHWM", "VmRSS"), in bytes."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    return status_bytes("VmHWM")


def anon_huge_pages_bytes() -> int:
    """Bytes of this process's memory on 2 MB transparent huge pages (AnonHugePages). Weights on
    4 KB pages stream measurably slower, and whether the kernel finds huge pages depends on how
    fragmented memory is: this tells a slow run from a slow program."""
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def prompt_ids(vocab_size: int, length: int, seed: int = 0) -> np.ndarray:
    """The benchmark prompt: `length` ids drawn with a fixed seed (ids below 3 are left out). -> [1, length]"""
    return np.random.default_rng(seed).integers(3, min(vocab_size, 32000), size=(1, length), dtype=np.int64)


class Clock:
    """Records the time each time a new token arrives."""

    def __init__(self, synchronize=None):
        self.times: list[float] = []
        self.synchronize = synchronize

    def __call__(self, *_args, **_kwargs):
        if self.synchronize is not None:
            self.synchronize()
        self.times.append(time.perf_counter())


# ---- minphi3 -----------------------------------------------------------------------------------
PAIRS = 8  # decode steps paired with a pass of the weight stream (`paired_decode_fraction`)


def decode_matrices(model) -> list:
    """Every matrix a decode step reads, in the model's order: each layer's projections, then the
    head (the embedding when tied)."""
    head = "model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"
    return [w for layer in model.layers for w in layer.values() if w.ndim == 2] + [model.params[head]]


def stream_seconds(matrices) -> float:
    """Seconds of one pass of the pure weight stream: `x @ W.T` (x: [1, in]) over `matrices`, the
    products a decode step runs, with nothing in between: the bound of that step."""
    inputs = {w.shape[1]: np.ones((1, w.shape[1]), dtype=w.dtype) for w in matrices}
    start = time.perf_counter()
    for weight in matrices:
        inputs[weight.shape[1]] @ weight.T
    return time.perf_counter() - start


def paired_decode_fraction(minphi3, model, sequence, cache, pairs: int = PAIRS) -> dict:
    """decode/bound measured so that the machine's changing bandwidth cancels out.

    `pairs` times, back to back: one greedy decode step (`generate` for one token, reusing the
    cache), then one pass of the pure weight stream. On a shared virtual machine the memory
    bandwidth moves by tens of percent within seconds, so a bound measured minutes (or even
    seconds) away from the decode it bounds is not one; two measurements a fraction of a second
    apart see the same machine. -> {"decode_fraction": median of stream / step seconds,
    "weights_stream_gbs": median GB/s of the stream passes}
    sequence: [1, length] ids whose first length - 1 are in `cache`.
    """
    matrices = decode_matrices(model)
    stream_seconds(matrices)  # warm-up
    fractions, rates = [], []
    for _ in range(pairs):
        start = time.perf_counter()
        sequence = minphi3.generate(model, sequence, max_new_tokens=1, eos_token_id=[], cache=cache)
        step = time.perf_counter() - start
        stream = stream_seconds(matrices)
        fractions.append(stream / step)
        rates.append(sum(w.nbytes for w in matrices) / stream / 1e9)
    return {"decode_fraction": float(np.median(fractions)), "weights_stream_gbs": float(np.median(rates))}


def gpu_decode_breakdown(model, sequence, cache, launches: int = 20) -> dict:
    """Where a GPU decode step's time goes: the recorded step's device time per launch and its
    kernel count, against the device time of its weight products alone (`x @ W.T` over
    `decode_matrices`, one after another, recorded as a graph too, so that neither figure holds
    Python's launch time). sequence: [1, length], all but its last id in `cache`.
    graph_pool_bytes: the device memory the step's graph holds in its private pool."""
    import cupy  # noqa: PLC0415

    from minphi3.backend import StepReplay, matmul  # noqa: PLC0415
    from minphi3.decode import FixedDecodeStep  # noqa: PLC0415

    def device_ms(function) -> float:
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        function()  # warm-up
        start.record()
        for _ in range(launches):
            function()
        stop.record()
        stop.synchronize()
        return cupy.cuda.get_elapsed_time(start, stop) / launches

    length = sequence.shape[1]
    step = FixedDecodeStep(model, cache, length + 4, length - 1)
    for _ in range(3):  # eager, recorded, first launch (each writes the next cache slot)
        step(sequence[0, -1:], np.array([cache.length]), cache.length)
    replay = step.replay
    kernels = None
    if replay.graph is not None:
        try:
            kernels = replay.graph.debug_dot_str().count("KERNEL")
        except Exception:  # noqa: BLE001 - a diagnostic only
            kernels = None
    matrices = decode_matrices(model)
    inputs = {w.shape[1]: cupy.ones((1, w.shape[1]), dtype=w.dtype) for w in matrices}
    products = StepReplay(lambda: [matmul(inputs[w.shape[1]], w.T) for w in matrices], cupy)
    products()  # eager; the next call records it
    return {
        "graph_error": replay.graph_error,
        "graph_kernels": kernels,
        "graph_pool_bytes": replay.graph_pool_bytes,
        "step_device_ms": device_ms(replay),  # rewrites the same slot each time: timing only
        "weight_products_device_ms": device_ms(products),
        "weight_products_graph_error": products.graph_error,
        "weights_bytes": int(sum(w.nbytes for w in matrices)),
    }


def run_minphi3(args) -> dict:
    import minphi3  # noqa: PLC0415

    start = time.perf_counter()
    model = minphi3.load(args.model, backend=args.backend, dtype=args.dtype)
    load_seconds = time.perf_counter() - start
    load_peak = peak_rss_bytes()
    ids = prompt_ids(model.config.vocab_size, args.prompt_tokens)

    last = {}  # the last generation's output, cache and stats; `paired_decode_fraction` goes on from them

    def generate(prompt, new_tokens, cuda_graph=None):
        clock = Clock()
        cache = model.new_cache(1, prompt.shape[1] + new_tokens + PAIRS)
        stats = minphi3.GenerationStats()
        start = time.perf_counter()
        out = minphi3.generate(model, prompt, max_new_tokens=new_tokens, eos_token_id=[], streamer=clock, cache=cache,
                               stats=stats, cuda_graph=cuda_graph)  # fmt: skip
        last.update(sequence=out, cache=cache, stats=stats)
        return start, clock.times, out[0, prompt.shape[1]:]

    report = {"load_seconds": load_seconds, "load_peak_rss": load_peak, "huge_pages_bytes": anon_huge_pages_bytes()}
    report.update(_timed_runs(generate, ids, args))
    stats = last["stats"]
    report["decode_path"] = {"fixed_steps": stats.fixed_steps, "graph_launches": stats.graph_launches,
                             "graph_error": stats.graph_error}  # fmt: skip
    if args.backend == "cupy":
        report["decode_breakdown"] = gpu_decode_breakdown(model, last["sequence"], last["cache"])
    if args.backend == "cupy" and args.compare_eager:
        # The same generations with every one-token step launched kernel by kernel: what the graph saves.
        report["eager"] = _timed_runs(lambda prompt, new_tokens: generate(prompt, new_tokens, cuda_graph=False), ids, args)
    if args.backend == "numpy":
        report.update(paired_decode_fraction(minphi3, model, last["sequence"], last["cache"]))
    if args.profile:
        _profile(lambda: generate(ids, args.new_tokens), args.profile)
    if args.backend == "cupy":
        import cupy  # noqa: PLC0415

        # CuPy's pool keeps what it once reserved, so what it holds at the end is its peak; a
        # decode graph's private pool is freed with its generation, so the breakdown's step,
        # recorded at the same shapes, stands in for it.
        graph_pool = report.get("decode_breakdown", {}).get("graph_pool_bytes", 0)
        report["device_peak_bytes"] = int(cupy.get_default_memory_pool().total_bytes()) + graph_pool
    if "torch" in sys.modules:
        report["warning"] = "torch was imported by the minphi3 worker: its memory figure includes torch"
    return report


# ---- transformers ------------------------------------------------------------------------------
def run_transformers(args) -> dict:
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    torch.set_num_threads(args.threads)
    device = "cuda" if args.backend == "cupy" else "cpu"
    dtype = getattr(torch, args.dtype)
    synchronize = torch.cuda.synchronize if device == "cuda" else None
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype, attn_implementation="eager", device_map=device
    ).eval()
    if synchronize:
        synchronize()
    load_seconds = time.perf_counter() - start
    load_peak = peak_rss_bytes()
    model.generation_config.eos_token_id = None  # never stop early: always new_tokens tokens
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids = prompt_ids(model.config.vocab_size, args.prompt_tokens)

    class ClockCriterion(transformers.StoppingCriteria):
        def __init__(self):
            self.clock = Clock(synchronize)

        def __call__(self, input_ids, scores, **kwargs):
            self.clock()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def generate(prompt, new_tokens):
        criterion = ClockCriterion()
        tensor = torch.as_tensor(prompt, device=device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                tensor,
                attention_mask=torch.ones_like(tensor),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
                stopping_criteria=transformers.StoppingCriteriaList([criterion]),
            )
        return start, criterion.clock.times, out[0, prompt.shape[1]:].cpu().numpy()

    report = {"load_seconds": load_seconds, "load_peak_rss": load_peak, "torch_threads": torch.get_num_threads()}
    report.update(_timed_runs(generate, ids, args))
    if device == "cuda":
        # Reserved, as CuPy's pool figure is: allocated alone would flatter transformers.
        report["device_peak_bytes"] = int(torch.cuda.max_memory_reserved())
        report["device_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
    return report


# ---- the machine's limits, and a sliding-window model's memory ----------------------------------
def run_limits(args) -> dict:
    """float32 matrix-vector bandwidth and matrix-matrix throughput, measured with NumPy here."""
    from common import blas_kernel, matmul_throughput, matvec_bandwidth  # noqa: PLC0415

    bandwidth = matvec_bandwidth()
    return {"bandwidth_gbs": bandwidth["best"], "bandwidth_by_shape": bandwidth["by_shape"],
            "bandwidth_huge_pages": bandwidth["huge_pages"],
            "matmul_gflops": matmul_throughput(), "blas_kernel": blas_kernel()}


def run_window_check(args) -> dict:
    """Generate far past a small sliding window; record cache.nbytes and resident memory.

    A random Phi-3 model with a window of 128 keys generates 4096 tokens from a 16-token prompt;
    the cache (a rolling buffer of W slots) and the process's memory must stay flat after W.
    """
    import minphi3  # noqa: PLC0415
    from minphi3.config import config_from_dict  # noqa: PLC0415
    from minphi3.loading import model_from_parameters  # noqa: PLC0415
    from minphi3.model import parameter_shapes  # noqa: PLC0415

    window, new_tokens = 128, 4096
    config = config_from_dict({
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 512, "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 4,
        "max_position_embeddings": 8192, "original_max_position_embeddings": 8192, "sliding_window": window,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    })  # fmt: skip
    rng = np.random.default_rng(0)
    params = {name: rng.standard_normal(shape, dtype=np.float32) * 0.2 for name, shape in parameter_shapes(config).items()}
    model = model_from_parameters(config, params)
    ids = prompt_ids(config.vocab_size, 16)
    cache = model.new_cache(1, window)
    samples = []

    def record(_ids):
        samples.append((cache.length, cache.nbytes, current_rss_bytes()))

    minphi3.generate(model, ids, max_new_tokens=new_tokens, eos_token_id=[], streamer=record, cache=cache)
    after_window = [s for s in samples if s[0] >= 2 * window]
    return {
        "window": window,
        "generated": new_tokens,
        "cache_nbytes_at_window": next(s[1] for s in samples if s[0] >= window),
        "cache_nbytes_max_after": max(s[1] for s in after_window),
        "cache_nbytes_min_after": min(s[1] for s in after_window),
        "rss_at_2w": after_window[0][2],
        "rss_max_after": max(s[2] for s in after_window),
        "rss_end": samples[-1][2],
    }


def current_rss_bytes() -> int:
    """The process's resident memory now (VmRSS), in bytes."""
    return status_bytes("VmRSS")


# ---- shared ------------------------------------------------------------------------------------
def _timed_runs(generate, ids: np.ndarray, args) -> dict:
    """A short warm-up, then `repeats` timed generations. -> prefill/decode seconds and the ids."""
    generate(ids[:, :8], 2)  # warm-up: thread pools, first-call code paths
    prefill, decode, tokens = [], [], None
    for _ in range(args.repeats):
        start, times, new_ids = generate(ids, args.new_tokens)
        if len(times) != args.new_tokens:
            raise RuntimeError(f"expected {args.new_tokens} new tokens, timed {len(times)}")
        prefill.append(times[0] - start)
        decode.append(times[-1] - times[0])
        tokens = [int(t) for t in new_ids]
    return {
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": args.new_tokens,
        "prefill_seconds": prefill,
        "decode_seconds": decode,  # for new_tokens - 1 tokens each
        "tokens": tokens,
    }


def _profile(function, path: str) -> None:
    import cProfile  # noqa: PLC0415

    profiler = cProfile.Profile()
    profiler.enable()
    function()
    profiler.disable()
    profiler.dump_stats(path)


RUNS = {"minphi3": run_minphi3, "transformers": run_transformers, "limits": run_limits, "window": run_window_check}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=tuple(RUNS), required=True,
                        help="limits: the machine's bandwidth and GFLOP/s; window: sliding-window memory check")
    parser.add_argument("--model", help="checkpoint folder")
    parser.add_argument("--backend", default="numpy", choices=("numpy", "cupy"), help="cupy: GPU (transformers on cuda)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed generations in this process")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", help="minphi3: write a cProfile of one more generation here")
    parser.add_argument("--compare-eager", action="store_true",
                        help="minphi3 on cupy: also time the generations without a CUDA graph")
    args = parser.parse_args(argv)
    report = RUNS[args.framework](args)
    report.update(framework=args.framework, model=args.model, dtype=args.dtype, backend=args.backend,
                  threads=args.threads, peak_rss=peak_rss_bytes())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
