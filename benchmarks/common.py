"""What the CPU and GPU benchmarks share: the models, the worker runs, the machine, the table.

- `PHI3_MINI_CONFIG` and `random_checkpoint`: a random-weight checkpoint with Phi-3-mini's exact
  shapes (3.8B parameters), written once as a sharded bf16 safetensors folder in the cache
  (outside the repository), tensor by tensor with NumPy so memory stays low.
- `run_worker`: one measurement in a fresh subprocess (`benchmarks/worker.py`), so each
  framework's peak memory is its own; the worker prints one JSON line.
- `machine_info`, `matvec_bandwidth`, `matmul_throughput`: the machine and its own limits.
- `result_table`, `write_results`: the one table format (CPU and GPU), printed and saved as JSON.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
WORKER = HERE / "worker.py"

# microsoft/Phi-3-mini-4k-instruct's config.json (the shapes; the weights here are random).
PHI3_MINI_CONFIG = {
    "architectures": ["Phi3ForCausalLM"],
    "model_type": "phi3",
    "vocab_size": 32064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "sliding_window": 2047,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 32000,
    "pad_token_id": 32000,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "embd_pdrop": 0.0,
    "resid_pdrop": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}
SHARD_BYTES = 2 * 1024**3  # about 2 GiB per shard, as Hugging Face shards its checkpoints


def cache_root() -> Path:
    """Where benchmark checkpoints live: $MINPHI3_CACHE/bench, else ~/.cache/minphi3/bench."""
    configured = os.environ.get("MINPHI3_CACHE")
    base = Path(configured).expanduser() if configured else Path.home() / ".cache" / "minphi3"
    return base / "bench"


# ---- the random Phi-3-mini checkpoint ------------------------------------------------------------
def phi3_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Phi3ForCausalLM checkpoint with its shape, in the checkpoint's order."""
    h, inter, heads, kv = (config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"))
    d = h // heads
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.qkv_proj.weight"] = ((heads + 2 * kv) * d, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, heads * d)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    return shapes


def random_bf16(name: str, shape: tuple[int, ...], std: float = 0.02) -> np.ndarray:
    """Random weights for one tensor as bf16 words (uint16), seeded by the tensor's name.

    Norm gains are 1 + N(0, std); every other tensor is N(0, std). bf16 is the top half of a
    float32 (rounded to nearest even here).
    """
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= std
    if "norm" in name:
        values += 1.0
    bits = values.view(np.uint32)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))  # round to nearest even before truncation
    return (rounded >> 16).astype(np.uint16)


def _shard_plan(shapes: dict[str, tuple[int, ...]], shard_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    return shards


def write_random_checkpoint(folder: Path, config: dict, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write a sharded bf16 safetensors checkpoint of random weights; one tensor in memory at a time."""
    shapes = phi3_shapes(config)
    needed = sum(2 * math.prod(s) for s in shapes.values())
    folder.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder.parent).free
    if free < needed * 1.1:
        raise SystemExit(f"{folder.parent}: {free / 1e9:.1f} GB free, the checkpoint needs {needed / 1e9:.1f} GB")
    folder.mkdir(parents=True, exist_ok=True)
    plan = _shard_plan(shapes, shard_bytes)
    weight_map = {}
    for number, names in enumerate(plan, start=1):
        shard = f"model-{number:05d}-of-{len(plan):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names:
            nbytes = 2 * math.prod(shapes[name])
            header[name] = {"dtype": "BF16", "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = shard
        header_bytes = json.dumps(header).encode()
        header_bytes += b" " * (-len(header_bytes) % 8)  # keep the data 8-byte aligned
        with open(folder / shard, "wb") as out:
            out.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
            for name in names:
                out.write(random_bf16(name, shapes[name]).tobytes())
        print(f"  wrote {shard}", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": needed}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "COMPLETE").write_text("written by benchmarks/common.py\n")
    return folder


def random_checkpoint(name: str = "phi3-mini-random", config: dict = PHI3_MINI_CONFIG) -> Path:
    """The random checkpoint's folder, written the first time (about 7.6 GB for Phi-3-mini)."""
    folder = cache_root() / name
    if not (folder / "COMPLETE").is_file():
        print(f"writing a random {name} checkpoint (bf16, sharded) to {folder} (once)", file=sys.stderr, flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        write_random_checkpoint(folder, config)
    return folder


# ---- a quiet machine ---------------------------------------------------------------------------
def cpu_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as handle:
        fields = [float(v) for v in handle.readline().split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields) - idle) / ticks, sum(fields) / ticks


def wait_for_idle(max_wait: float = 300, busy_below: float = 0.1, window: float = 2.0) -> float:
    """Wait (up to max_wait seconds) until the machine's CPUs are busy less than `busy_below` of a
    `window`, so other programs do not steal the cores being measured. -> seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        busy0, total0 = cpu_times()
        time.sleep(window)
        busy1, total1 = cpu_times()
        if (busy1 - busy0) <= busy_below * max(total1 - total0, 1e-9):
            break
    return time.perf_counter() - start


# ---- workers -----------------------------------------------------------------------------------
# Set on some machines to steer an old OpenBLAS away from kernels that once crashed or computed
# wrongly on new processors. They pin NumPy's BLAS to an older kernel (on an AVX-512 machine
# "Haswell", AVX2: about 0.6x the matrix-matrix throughput) and leave torch's MKL untouched, so
# they would compare the frameworks on unequal terms; the workers run without them unless
# KEEP_BLAS_OVERRIDES is set. The kernel NumPy then uses is recorded (`blas_kernel`).
BLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def worker_environment(threads: int) -> dict:
    """The environment of a worker: `threads` threads for every BLAS and OpenMP pool, and
    without BLAS_OVERRIDES (see above) unless the environment variable KEEP_BLAS_OVERRIDES=1."""
    env = dict(os.environ)
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[variable] = str(threads)
    if os.environ.get("KEEP_BLAS_OVERRIDES") != "1":
        for variable in BLAS_OVERRIDES:
            env.pop(variable, None)
    return env


def blas_kernel() -> str:
    """The BLAS library and the CPU kernel NumPy uses in this process (threadpoolctl)."""
    try:
        import threadpoolctl  # noqa: PLC0415
    except ImportError:
        return "unknown (threadpoolctl not installed)"
    pools = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
    return ", ".join(f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')}" for p in pools) or "none"


def run_worker(args: list[str], threads: int, timeout: float = 3600, max_idle_wait: float = 300) -> dict:
    """Run `benchmarks/worker.py args` in a fresh process with `threads` BLAS/torch threads.

    -> the JSON object the worker prints last, plus `interference`: the CPU seconds other
    programs used while it ran, as a fraction of the worker's wall time x cores (0 on a quiet
    machine). Each run is a new process, so its peak resident memory (VmHWM) belongs to one
    framework and one model only.
    """
    env = worker_environment(threads)
    command = [sys.executable, str(WORKER), *args, "--threads", str(threads)]
    waited = wait_for_idle(max_idle_wait) if max_idle_wait > 0 else 0.0
    own_before = os.times()
    busy_before, total_before = cpu_times()
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    wall = time.perf_counter() - start
    busy_after, total_after = cpu_times()
    own_after = os.times()
    if result.returncode != 0:
        # Recorded, not raised: one run killed for memory (say) should not lose the others.
        print(f"worker {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-2000:]}", file=sys.stderr)
        return {"error": f"exit status {result.returncode}: {result.stderr[-500:]}", "wall_s": wall}
    report = json.loads(result.stdout.strip().splitlines()[-1])
    own = (own_after.children_user + own_after.children_system) - (own_before.children_user + own_before.children_system)
    others = max(0.0, (busy_after - busy_before) - own)
    report["interference"] = others / max(total_after - total_before, 1e-9)
    report["waited_for_idle_s"] = waited
    report["wall_s"] = wall
    return report


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


# ---- the machine ---------------------------------------------------------------------------------
def machine_info() -> dict:
    """CPU model, cores, memory, library versions: what the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    flags = set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            flags = next((set(line.split(":", 1)[1].split()) for line in handle if line.startswith("flags")), set())
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    memory = int(line.split()[1]) * 1024
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cpu_features": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "hypervisor"}),
        "memory_gib": round(memory / 1024**3, 1) if memory else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": _blas_name(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    for package in ("torch", "transformers"):
        try:
            info[package] = importlib.metadata.version(package)  # without importing it here
        except importlib.metadata.PackageNotFoundError:
            info[package] = None
    return info


def _blas_name() -> str:
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001 - older NumPy: no dict mode
        return "unknown"


def _median_seconds(function, repeats: int) -> float:
    function()  # warm up: first-touch of the pages, thread start-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# Matrix shapes of the benchmarked models' projections ([out, in]): Phi-3-mini's qkv, o, gate_up
# and down, the demo model's gate_up and down, and one tall matrix.
MATVEC_SHAPES = ((9216, 3072), (3072, 3072), (16384, 3072), (3072, 8192), (3072, 576), (576, 1536), (262144, 4096))


def matvec_bandwidth(nbytes: int = 1 << 30, shapes=MATVEC_SHAPES, repeats: int = 5) -> dict:
    """float32 matrix-vector bandwidth in GB/s, the ceiling of batch-1 decoding. -> {"best": GB/s,
    "by_shape": {"RxC": GB/s}, "huge_pages": fraction of the buffer on 2 MB pages}

    For each shape, `x @ W.T` (x: [1, C]) runs over a set of [R, C] matrices that together hold
    about `nbytes` (1 GiB, far beyond any cache), one after the other, as a decode step runs
    through a model's layers; each matrix is read once per product. The matrices are views into
    one buffer, allocated once, as `minphi3.load` lays out a model's weights (so both get the
    same kind of pages). The best shape is the bound: a model whose matrices stream more slowly
    than that loses the difference to its shapes.
    """
    buffer = np.full(nbytes // 4 + max(r * c for r, c in shapes), 0.01, dtype=np.float32)  # every page touched
    huge = _huge_page_fraction(buffer)
    by_shape = {}
    for rows, columns in shapes:
        size = rows * columns
        weights = [buffer[start : start + size].reshape(rows, columns) for start in range(0, max(nbytes // 4 - size, 0) + 1, size)]
        x = np.ones((1, columns), dtype=np.float32)

        def stream(weights=weights, x=x):
            for weight in weights:
                x @ weight.T

        by_shape[f"{rows}x{columns}"] = 4 * size * len(weights) / _median_seconds(stream, repeats) / 1e9
    return {"best": max(by_shape.values()), "by_shape": by_shape, "huge_pages": huge}


def _huge_page_fraction(array) -> float:
    """The fraction of this process's anonymous memory on 2 MB transparent huge pages, measured
    right after `array` was allocated (so mostly its pages): 4 KB pages stream more slowly."""
    fields = {}
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as handle:
            for line in handle:
                name, _, rest = line.partition(":")
                if name in ("Anonymous", "AnonHugePages"):
                    fields[name] = int(rest.split()[0]) * 1024
    except OSError:
        return float("nan")
    return fields.get("AnonHugePages", 0) / max(fields.get("Anonymous", 0), 1)


def matmul_throughput(tokens: int = 512, width: int = 3072, out: int = 8192, repeats: int = 5) -> float:
    """float32 matrix-matrix throughput in GFLOP/s: [tokens, width] @ [out, width]^T, the shape of
    a prefill projection (2 * tokens * width * out floating-point operations)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((tokens, width), dtype=np.float32)
    weight = rng.standard_normal((out, width), dtype=np.float32)
    seconds = _median_seconds(lambda: x @ weight.T, repeats)
    return 2 * tokens * width * out / seconds / 1e9


# ---- one model: alternating rounds, medians, bounds ----------------------------------------------
FRAMEWORKS = ("minphi3", "transformers")


def model_figures(path: Path, tokens: int, itemsize: int = 4) -> dict:
    """Parameter counts and bytes that the bounds need, from the checkpoint's config.json.

    decode_bytes: bytes of the weights read per decoded token at `itemsize` bytes per weight
    (every projection and the head; of the embedding only one row, unless it is tied to the
    head). prefill_params: parameters multiplied per prompt token (the layers' projections; the
    head runs on the last token only). cache_bytes: the KV cache for `tokens` tokens.
    """
    from minphi3.config import load_config  # noqa: PLC0415
    from minphi3.model import parameter_shapes  # noqa: PLC0415

    config = load_config(path)
    sizes = {name: math.prod(shape) for name, shape in parameter_shapes(config).items()}
    total = sum(sizes.values())
    read = total - (0 if config.tie_word_embeddings else sizes["model.embed_tokens.weight"])
    layers = sum(n for name, n in sizes.items() if name.startswith("model.layers.") and name.endswith("proj.weight"))
    cache = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * tokens * itemsize
    return {
        "parameters": total,
        "weights_bytes": itemsize * total,
        "decode_bytes": itemsize * read,
        "prefill_params": layers,
        "cache_bytes": cache,
    }


def measure_model(name: str, path: Path, rounds: int, worker_args: list[str], threads: int,
                  idle_wait: float = 300, max_interference: float = 0.1, tries: int = 3) -> dict:
    """`rounds` rounds; each runs every framework in a fresh process, alternating which goes first.

    A run during which other programs took more than `max_interference` of the CPUs is run again
    (up to `tries` times; the least disturbed one is kept). -> {framework: [worker reports]}
    """
    runs = {framework: [] for framework in FRAMEWORKS}
    for number in range(rounds):
        order = FRAMEWORKS if number % 2 == 0 else FRAMEWORKS[::-1]
        for framework in order:
            attempts = []
            for _ in range(tries):
                report = run_worker(["--framework", framework, "--model", str(path), *worker_args], threads, max_idle_wait=idle_wait)
                attempts.append(report)
                if "error" in report or report["interference"] <= max_interference:
                    break
            report = min(attempts, key=lambda r: r.get("interference", 0.0))
            report["attempts"] = len(attempts)
            runs[framework].append(report)
            if "error" in report:
                print(f"  {name} round {number + 1}/{rounds} {framework}: FAILED", file=sys.stderr, flush=True)
                continue
            print(
                f"  {name} round {number + 1}/{rounds} {framework}: load {report['load_seconds']:.2f}s, "
                f"prefill {median(report['prefill_seconds']):.2f}s, decode {median(report['decode_seconds']):.2f}s, "
                f"peak {report['peak_rss'] / 1e9:.2f} GB, interference {report['interference']:.0%}",
                file=sys.stderr,
                flush=True,
            )
    return runs


def summarize(name: str, runs: dict, figures: dict, limits: dict, prompt_tokens: int, new_tokens: int,
              memory_key: str = "peak_rss") -> list[dict]:
    """One table row per framework: medians over every timed generation of every round, peak
    memory (the largest), fractions of the bounds, and minphi3's ratios to transformers.

    limits: {"bandwidth_gbs", "matmul_gflops"}. Bounds: decode tok/s <= bandwidth / decode_bytes;
    prefill tok/s <= GFLOP/s / (2 x prefill_params). On a shared virtual machine the memory
    bandwidth moves by tens of percent within seconds, so where the minphi3 workers measured it
    (`paired_decode_fraction`: decode steps each followed at once by a pass of the pure weight
    stream) minphi3's decode/bound is the median of those pairs, and the decode bound in tok/s
    uses the median bandwidth of their streams (`weights_stream_gbs`); transformers' decode/bound
    is its decode tok/s over that bound. Without them, the machine's `bandwidth_gbs`.
    """
    streams = [r["weights_stream_gbs"] for r in runs["minphi3"] if "weights_stream_gbs" in r]
    bandwidth_gbs = median(streams) if streams else limits["bandwidth_gbs"]
    decode_bound = bandwidth_gbs * 1e9 / figures["decode_bytes"]
    prefill_bound = limits["matmul_gflops"] * 1e9 / (2 * figures["prefill_params"])
    rows = {}
    for framework, reports in runs.items():
        reports = [r for r in reports if "error" not in r]
        if not reports:
            rows[framework] = {"model": name, "framework": framework, "failed runs": len(runs[framework])}
            continue
        prefill = median(prompt_tokens / s for r in reports for s in r["prefill_seconds"])
        decode = median((new_tokens - 1) / s for r in reports for s in r["decode_seconds"])
        peak = max(r[memory_key] for r in reports)
        rows[framework] = {
            "model": name,
            "framework": framework,
            "load s": median(r["load_seconds"] for r in reports),
            "prefill tok/s": prefill,
            "decode tok/s": decode,
            "peak memory GB": peak / 1e9,
            "prefill/bound": prefill / prefill_bound,
            "decode/bound": _decode_fraction(reports, decode, decode_bound),
            "peak/(weights+cache)": peak / (figures["weights_bytes"] + figures["cache_bytes"]),
            # Loading alone (the peak right after `load`), against the float32 weights it produced.
            "load peak/weights": max(r["load_peak_rss"] for r in reports) / figures["weights_bytes"],
            "runs": len(reports),
            "interference (max)": max(r["interference"] for r in reports),
            "bounds": {"decode tok/s": decode_bound, "prefill tok/s": prefill_bound, "decode bandwidth GB/s": bandwidth_gbs},
        }
    ours, theirs = rows["minphi3"], rows["transformers"]
    if "prefill tok/s" in ours and "prefill tok/s" in theirs:
        ours["prefill x"] = ours["prefill tok/s"] / theirs["prefill tok/s"]
        ours["decode x"] = ours["decode tok/s"] / theirs["decode tok/s"]
        ours["load x"] = theirs["load s"] / ours["load s"]
        mine = next(r["tokens"] for r in runs["minphi3"] if "tokens" in r)
        other = next(r["tokens"] for r in runs["transformers"] if "tokens" in r)
        same = next((i for i, (a, b) in enumerate(zip(mine, other, strict=False)) if a != b), len(mine))
        ours["greedy tokens equal to transformers"] = f"{same}/{len(mine)}"
    return [ours, theirs]


def _decode_fraction(reports, decode: float, decode_bound: float) -> float:
    """The median of the runs' paired decode fractions (minphi3), else decode tok/s over the bound."""
    fractions = [r["decode_fraction"] for r in reports if "decode_fraction" in r]
    return median(fractions) if fractions else decode / decode_bound


# ---- the table -----------------------------------------------------------------------------------
TABLE_COLUMNS = [
    ("model", "{}"),
    ("framework", "{}"),
    ("load s", "{:.2f}"),
    ("load x", "{:.2f}x"),
    ("prefill tok/s", "{:.1f}"),
    ("prefill x", "{:.2f}x"),
    ("prefill/bound", "{:.0%}"),
    ("decode tok/s", "{:.2f}"),
    ("decode x", "{:.2f}x"),
    ("decode/bound", "{:.0%}"),
    ("peak memory GB", "{:.2f}"),
    ("load peak/weights", "{:.2f}"),
    ("peak/(weights+cache)", "{:.2f}"),
]


def result_table(rows: list[dict], columns=TABLE_COLUMNS) -> str:
    """A plain-text table, one row per (model, framework); missing figures print as '-'.

    rows: dicts keyed by the column titles. Ratios ("x") compare minphi3 with transformers
    (above 1: minphi3 is faster); "/bound" is the fraction of the machine's own limit.
    """
    cells = [[title for title, _ in columns]]
    for row in rows:
        line = []
        for title, form in columns:
            value = row.get(title)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                line.append("-")
            else:
                line.append(form.format(value))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    text = []
    for number, line in enumerate(cells):
        text.append("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True))))
        if number == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


def markdown_table(rows: list[dict], columns=TABLE_COLUMNS) -> str:
    """The same table in Markdown, for a README."""
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        values = []
        for title, form in columns:
            value = row.get(title)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            values.append("-" if missing else form.format(value))
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def write_results(name: str, data: dict) -> Path:
    """Save a benchmark's figures as benchmarks/results/<name>.json; -> the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    return path
