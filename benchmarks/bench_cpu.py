"""minphi3 (NumPy, float32) against transformers (PyTorch, float32, eager) on this CPU.

    python benchmarks/bench_cpu.py            # `make bench`: demo model and Phi-3-mini shapes
    python benchmarks/bench_cpu.py --quick    # demo model only, 2 rounds (a few minutes)

Same weights, same prompt (512 ids), same thread count for NumPy's BLAS and for torch, greedy
decoding of 64 new tokens. Every measurement runs in a fresh process (`worker.py`): minphi3 and
transformers one after the other, alternating which goes first, for several rounds; the table
shows medians (peak memory: the largest). Before each run the script waits for the CPUs to be
idle, and a run that other programs disturbed anyway is run again (`interference` in the JSON).

The machine's own limits are measured in the same run with NumPy: float32 matrix-vector
bandwidth (the ceiling of decoding, which reads every weight once per token) and matrix-matrix
throughput (the ceiling of prefill). A sliding-window model then generates far past its window
to show that its memory stays flat.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    machine_info,
    markdown_table,
    measure_model,
    model_figures,
    random_checkpoint,
    result_table,
    run_worker,
    summarize,
    write_results,
)


def models(names: list[str]) -> dict[str, Path]:
    """Display name -> checkpoint folder (fetched or written the first time)."""
    from minphi3.demo import demo_model_path  # noqa: PLC0415

    paths = {}
    for name in names:
        if name == "demo":
            paths["demo (SmolLM2-135M)"] = demo_model_path()
        elif name == "phi3-mini":
            paths["Phi-3-mini shape (random)"] = random_checkpoint()
        else:
            raise SystemExit(f"unknown model {name!r}: demo | phi3-mini")
    return paths


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo model only, 2 rounds")
    parser.add_argument("--models", nargs="+", help="demo and/or phi3-mini (default: both; --quick: demo)")
    parser.add_argument("--rounds", type=int, help="rounds for the demo model (default 4, --quick 2)")
    parser.add_argument("--phi3-rounds", type=int, default=4, help="rounds for the Phi-3-mini shape (default 4)")
    parser.add_argument("--repeats", type=int, default=2, help="timed generations per demo-model process")
    parser.add_argument("--threads", type=int, default=None, help="BLAS/torch threads (default: all cores)")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--idle-wait", type=float, default=300, help="most seconds to wait for idle CPUs before a run")
    parser.add_argument("--max-interference", type=float, default=0.1, help="rerun a run disturbed more than this")
    parser.add_argument("--name", default=None, help="results file name (default cpu, or cpu-quick)")
    args = parser.parse_args(argv)
    threads = args.threads or os.cpu_count()
    # An even count: each framework goes first as often as the other (the first process after
    # the other model's runs meets a cold page cache and memory the host has taken back).
    rounds = args.rounds or (2 if args.quick else 4)
    names = args.models or (["demo"] if args.quick else ["demo", "phi3-mini"])
    started = time.strftime("%Y-%m-%d %H:%M")
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
          f"{threads} threads for both frameworks", file=sys.stderr)

    limit_runs = [run_worker(["--framework", "limits"], threads, max_idle_wait=args.idle_wait)]
    measured, rows = {}, []
    for name, path in models(names).items():
        big = "Phi-3-mini" in name  # one generation per process: its load and prefill are long
        worker_args = ["--repeats", str(1 if big else args.repeats),
                       "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
        runs = measure_model(name, path, args.phi3_rounds if big else rounds, worker_args, threads,
                             idle_wait=args.idle_wait, max_interference=args.max_interference)
        measured[name] = {"path": str(path), "figures": model_figures(path, args.prompt_tokens + args.new_tokens), "runs": runs}
    limit_runs.append(run_worker(["--framework", "limits"], threads, max_idle_wait=args.idle_wait))
    # The better of the two measurements is the bound: a disturbed one would flatter the fractions.
    limits = {key: max(run[key] for run in limit_runs if key in run) for key in ("bandwidth_gbs", "matmul_gflops")}
    for name, data in measured.items():
        rows += summarize(name, data["runs"], data["figures"], limits, args.prompt_tokens, args.new_tokens)
    window = run_worker(["--framework", "window"], threads, max_idle_wait=args.idle_wait)

    header = (f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB RAM; float32, {threads} threads "
              f"each; prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens (greedy)")
    kernel = next((run["blas_kernel"] for run in limit_runs if "blas_kernel" in run), "unknown")
    bounds = (f"bounds (NumPy on this machine, {kernel}): matrix-vector {limits['bandwidth_gbs']:.1f} GB/s, "
              f"matrix-matrix {limits['matmul_gflops']:.0f} GFLOP/s")
    streams = ", ".join(f"{row['model']} {row['bounds']['decode bandwidth GB/s']:.1f} GB/s" for row in rows
                        if row["framework"] == "minphi3" and "bounds" in row)
    bounds += ("\ndecode bounds: each model's own weights streamed by NumPy, each pass right after a minphi3 "
               f"decode step (minphi3's decode/bound is the median of those pairs): {streams}")
    flat = window.get("cache_nbytes_max_after") == window.get("cache_nbytes_min_after")
    window_line = (f"sliding window of {window['window']}, {window['generated']} tokens generated: cache "
                   f"{window['cache_nbytes_max_after'] / 1e6:.2f} MB ({'flat' if flat else 'NOT flat'}) after 2W; resident "
                   f"memory {window['rss_at_2w'] / 1e6:.1f} MB at 2W, {window['rss_end'] / 1e6:.1f} MB at the end"
                   if "error" not in window else "sliding-window check failed")
    print()
    print(header)
    print(bounds)
    print(result_table(rows))
    print(window_line)
    data = {
        "benchmark": "cpu",
        "started": started,
        "command": " ".join(["python", "benchmarks/bench_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine,
        "threads": threads,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "limits": limits,
        "limit_runs": limit_runs,
        "table": rows,
        "table_markdown": "\n".join([header + "  ", bounds.replace("\n", "  \n") + "\n", markdown_table(rows), "", window_line]),
        "sliding_window_memory": window,
        "models": measured,
    }
    path = write_results(args.name or ("cpu-quick" if args.quick else "cpu"), data)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
