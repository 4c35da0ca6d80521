"""minphi3 on CuPy (float16) against transformers on PyTorch CUDA (float16, eager), same GPU.

    python benchmarks/bench_gpu.py            # `make bench-gpu`: demo model and Phi-3-mini shapes
    python benchmarks/bench_gpu.py --quick    # demo model only, fewer rounds

The same measurements and table as benchmarks/bench_cpu.py (each run a fresh process through
`worker.py --backend cupy`, alternating the two frameworks, medians), with the GPU's own limit
measured in the same run: device-to-device copy bandwidth with CuPy (bytes read + bytes written
per second). Decode bound: bandwidth / bytes of float16 weights read per token.

Needs CuPy and an NVIDIA GPU (pip install 'minphi3[gpu]'); it says so and stops otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu import TABLE_COLUMNS, model_figures, models  # noqa: E402
from common import machine_info, median, result_table, run_worker, write_results  # noqa: E402

FRAMEWORKS = ("minphi3", "transformers")
BYTES_PER_WEIGHT = 2  # float16


def gpu_info() -> dict:
    """The GPU's name and memory, from CuPy (which minphi3 runs on)."""
    import cupy  # noqa: PLC0415

    properties = cupy.cuda.runtime.getDeviceProperties(0)
    name = properties["name"]
    return {
        "gpu": name.decode() if isinstance(name, bytes) else str(name),
        "gpu_memory_gib": round(properties["totalGlobalMem"] / 1024**3, 1),
        "cupy": cupy.__version__,
        "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
    }


def device_bandwidth(nbytes: int = 2 << 30, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s: (read + written bytes) / seconds, median of runs."""
    import cupy  # noqa: PLC0415

    source = cupy.ones(nbytes // 2, dtype=cupy.float16)
    target = cupy.empty_like(source)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    seconds = []
    for _ in range(repeats + 1):
        start.record()
        cupy.copyto(target, source)
        stop.record()
        stop.synchronize()
        seconds.append(cupy.cuda.get_elapsed_time(start, stop) / 1000)
    return 2 * nbytes / median(seconds[1:]) / 1e9


def measure_model(name: str, path: Path, rounds: int, args) -> dict:
    runs = {framework: [] for framework in FRAMEWORKS}
    for number in range(rounds):
        order = FRAMEWORKS if number % 2 == 0 else FRAMEWORKS[::-1]
        for framework in order:
            worker_args = [
                "--framework", framework, "--model", str(path), "--backend", "cupy", "--dtype", "float16",
                "--repeats", str(args.repeats), "--prompt-tokens", str(args.prompt_tokens),
                "--new-tokens", str(args.new_tokens),
            ]  # fmt: skip
            report = run_worker(worker_args, threads=4, max_idle_wait=0)
            if "error" in report:
                raise SystemExit(f"{framework} on {name} failed: {report['error']}")
            runs[framework].append(report)
            print(f"  {name} round {number + 1}/{rounds} {framework}: prefill {median(report['prefill_seconds']):.3f}s, "
                  f"decode {median(report['decode_seconds']):.3f}s", file=sys.stderr, flush=True)
    return runs


def summarize(name: str, runs: dict, figures: dict, bandwidth_gbs: float, args) -> list[dict]:
    """Medians per framework, the decode bound, and minphi3's ratios to transformers."""
    decode_bytes = figures["decode_bytes"] // 4 * BYTES_PER_WEIGHT  # model_figures counts float32 bytes
    decode_bound = bandwidth_gbs * 1e9 / decode_bytes
    rows = {}
    for framework, reports in runs.items():
        prefill = [args.prompt_tokens / s for r in reports for s in r["prefill_seconds"]]
        decode = [(args.new_tokens - 1) / s for r in reports for s in r["decode_seconds"]]
        rows[framework] = {
            "model": name,
            "framework": framework,
            "load s": median(r["load_seconds"] for r in reports),
            "prefill tok/s": median(prefill),
            "decode tok/s": median(decode),
            "decode/bound": median(decode) / decode_bound,
            "peak RSS GB": max(r["peak_rss"] for r in reports) / 1e9,
            "device peak GB": max(r.get("device_peak_bytes", 0) for r in reports) / 1e9,
            "bounds": {"decode tok/s": decode_bound},
        }
    ours, theirs = rows["minphi3"], rows["transformers"]
    ours["prefill x"] = ours["prefill tok/s"] / theirs["prefill tok/s"]
    ours["decode x"] = ours["decode tok/s"] / theirs["decode tok/s"]
    ours["load x"] = theirs["load s"] / ours["load s"]
    return [ours, theirs]


GPU_COLUMNS = [column for column in TABLE_COLUMNS if column[0] not in ("prefill/bound", "peak/(weights+cache)")]
GPU_COLUMNS.append(("device peak GB", "{:.2f}"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo model only, 2 rounds")
    parser.add_argument("--models", nargs="+", help="demo and/or phi3-mini (default: both)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="generations per process")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--name", default=None, help="results file name (default gpu, or gpu-quick)")
    args = parser.parse_args(argv)
    from minphi3.backend import cupy_available  # noqa: PLC0415

    if not cupy_available():
        raise SystemExit("bench_gpu: needs CuPy and an NVIDIA GPU (pip install 'minphi3[gpu]'); none found here")
    started = time.strftime("%Y-%m-%d %H:%M")
    machine = {**machine_info(), **gpu_info()}
    bandwidths = [device_bandwidth()]
    rounds = 2 if args.quick else args.rounds
    all_runs = {}
    for name, path in models(args.quick, args.models).items():
        figures = model_figures(path, args.prompt_tokens + args.new_tokens)
        all_runs[name] = {"figures": figures, "runs": measure_model(name, path, rounds, args)}
    bandwidths.append(device_bandwidth())
    bandwidth = max(bandwidths)
    rows = []
    for name, data in all_runs.items():
        rows += summarize(name, data["runs"], data["figures"], bandwidth, args)
    print()
    print(f"{machine['gpu']} ({machine['gpu_memory_gib']} GiB); float16; prompt {args.prompt_tokens}, "
          f"{args.new_tokens} new tokens (greedy)")
    print(f"bound: device-to-device bandwidth {bandwidth:.0f} GB/s (CuPy copy)")
    print(result_table(rows, GPU_COLUMNS))
    data = {
        "benchmark": "gpu",
        "started": started,
        "command": " ".join(["python", "benchmarks/bench_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "bandwidth_gbs": bandwidth,
        "table": rows,
        "models": all_runs,
    }
    print(f"wrote {write_results(args.name or ('gpu-quick' if args.quick else 'gpu'), data)}")


if __name__ == "__main__":
    main()
