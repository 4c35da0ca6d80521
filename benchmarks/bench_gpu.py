"""minphi3 on CuPy (float16) against transformers on PyTorch CUDA (float16, eager), same GPU.

    python benchmarks/bench_gpu.py            # `make bench-gpu`: demo model and Phi-3-mini shapes
    python benchmarks/bench_gpu.py --quick    # demo model only, fewer rounds

The same measurements and table as benchmarks/bench_cpu.py (each run a fresh process through
`worker.py --backend cupy`, alternating the two frameworks, medians), plus a row of minphi3 with
its one-token steps launched kernel by kernel (`generate(cuda_graph=False)`, timed in the same
processes), which is what the CUDA graph of the decode step saves; with the GPU's own limit
measured in the same run with CuPy: device-to-device copy bandwidth (bytes read + bytes written
per second) and float16 matrix-matrix throughput. Decode bound: bandwidth / bytes of float16
weights read per token; prefill bound: GFLOP/s / (2 x parameters of the layers' projections).

Needs CuPy and an NVIDIA GPU (pip install 'minphi3[gpu]'); it says so and stops otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu import models  # noqa: E402
from common import (  # noqa: E402
    TABLE_COLUMNS,
    machine_info,
    markdown_table,
    measure_model,
    median,
    model_figures,
    result_table,
    summarize,
    write_results,
)

FLOAT16_BYTES = 2


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


def _device_seconds(function, repeats: int) -> float:
    """Median seconds of `function` on the GPU, timed with CUDA events after one warm-up call."""
    import cupy  # noqa: PLC0415

    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    function()
    seconds = []
    for _ in range(repeats):
        start.record()
        function()
        stop.record()
        stop.synchronize()
        seconds.append(cupy.cuda.get_elapsed_time(start, stop) / 1000)
    return median(seconds)


def device_limits(nbytes: int = 2 << 30, repeats: int = 10) -> dict:
    """The GPU's own limits with CuPy: device-to-device copy bandwidth (bytes read + written per
    second, GB/s) and float16 matrix-matrix throughput ([512, 3072] x [3072, 8192], GFLOP/s)."""
    import cupy  # noqa: PLC0415

    source = cupy.ones(nbytes // 2, dtype=cupy.float16)
    target = cupy.empty_like(source)
    bandwidth = 2 * nbytes / _device_seconds(lambda: cupy.copyto(target, source), repeats) / 1e9
    x = cupy.ones((512, 3072), dtype=cupy.float16)
    weight = cupy.ones((8192, 3072), dtype=cupy.float16)
    gflops = 2 * 512 * 3072 * 8192 / _device_seconds(lambda: x @ weight.T, repeats) / 1e9
    return {"bandwidth_gbs": bandwidth, "matmul_gflops": gflops}


# Host-memory ratios say little on a GPU: device memory is the figure there.
GPU_COLUMNS = [column for column in TABLE_COLUMNS if column[0] not in ("peak/(weights+cache)", "load peak/weights")]


def eager_row(name: str, data: dict, limits: dict, args) -> dict:
    """minphi3's row for the generations timed with `cuda_graph=False` in the same processes."""
    eager = [{**report, **report["eager"]} for report in data["runs"]["minphi3"] if "eager" in report]
    runs = {"minphi3": eager or [{"error": "no eager timings"}], "transformers": data["runs"]["transformers"]}
    row = summarize(name, runs, data["figures"], limits, args.prompt_tokens, args.new_tokens,
                    memory_key="device_peak_bytes")[0]  # fmt: skip
    row["framework"] = "minphi3, no CUDA graph"
    return row


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
    limit_runs = [device_limits()]
    rounds = 2 if args.quick else args.rounds
    worker_args = ["--backend", "cupy", "--dtype", "float16", "--repeats", str(args.repeats), "--compare-eager",
                   "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]  # fmt: skip
    all_runs = {}
    for name, path in models(args.models or (["demo"] if args.quick else ["demo", "phi3-mini"])).items():
        figures = model_figures(path, args.prompt_tokens + args.new_tokens, itemsize=FLOAT16_BYTES)
        # The GPU does the work: other CPU load barely matters, so runs do not wait for idle CPUs.
        runs = measure_model(name, path, rounds, worker_args, threads=4, idle_wait=0, max_interference=1.0)
        all_runs[name] = {"figures": figures, "runs": runs}
    limit_runs.append(device_limits())
    limits = {key: max(run[key] for run in limit_runs) for key in ("bandwidth_gbs", "matmul_gflops")}
    rows = []
    for name, data in all_runs.items():
        rows += summarize(name, data["runs"], data["figures"], limits, args.prompt_tokens, args.new_tokens,
                          memory_key="device_peak_bytes")
        rows.insert(len(rows) - 1, eager_row(name, data, limits, args))
        for report in data["runs"]["minphi3"]:
            path = report.get("decode_path", {})
            if path.get("graph_error") or not path.get("graph_launches"):
                print(f"  {name}: the decode step ran without a CUDA graph: {path}", file=sys.stderr)
    print()
    print(f"{machine['gpu']} ({machine['gpu_memory_gib']} GiB); float16, eager; prompt {args.prompt_tokens}, "
          f"{args.new_tokens} new tokens (greedy)")
    print(f"bounds: device-to-device bandwidth {limits['bandwidth_gbs']:.0f} GB/s, float16 matmul "
          f"{limits['matmul_gflops']:.0f} GFLOP/s (CuPy); peak memory = device memory")
    print(result_table(rows, GPU_COLUMNS))
    for name, data in all_runs.items():
        breakdowns = [r["decode_breakdown"] for r in data["runs"]["minphi3"] if "decode_breakdown" in r]
        if breakdowns:
            step = median(b["step_device_ms"] for b in breakdowns)
            products = median(b["weight_products_device_ms"] for b in breakdowns)
            bound = breakdowns[0]["weights_bytes"] / (limits["bandwidth_gbs"] * 1e9) * 1e3
            print(f"{name}: recorded decode step {step:.2f} ms of device time ({breakdowns[0]['graph_kernels']} kernels), "
                  f"its weight products alone {products:.2f} ms, bandwidth bound {bound:.2f} ms")
    data = {
        "benchmark": "gpu",
        "started": started,
        "command": " ".join(["python", "benchmarks/bench_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "limits": limits,
        "table": rows,
        "table_markdown": markdown_table(rows, GPU_COLUMNS),
        "models": all_runs,
    }
    print(f"wrote {write_results(args.name or ('gpu-quick' if args.quick else 'gpu'), data)}")


if __name__ == "__main__":
    main()
