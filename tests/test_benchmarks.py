"""The GPU benchmark's own code, run through on the CPU: `bench_gpu.py` with `emulated_cupy` in
CuPy's place and transformers on the CPU in place of CUDA. It checks that the script measures,
summarises and writes its table without failing, so that a lent GPU's minutes go to measuring;
none of the figures it prints here means anything.
"""

from pathlib import Path

import emulated_cupy
from tiny_checkpoints import save_tiny

TESTS = Path(__file__).resolve().parent
BENCHMARKS = TESTS.parent / "benchmarks"

# What benchmarks/common.run_worker starts: worker.py, with minphi3 on the stand-in and
# transformers moved to the CPU (which has no device memory figure: its host peak stands in).
WORKER_ON_THE_STAND_IN = f"""
import sys
sys.path[:0] = [{str(TESTS)!r}, {str(BENCHMARKS)!r}]
args = sys.argv[1:]
if args[args.index("--framework") + 1] == "minphi3":
    from _pytest.monkeypatch import MonkeyPatch
    import emulated_cupy
    emulated_cupy.install(MonkeyPatch())
else:
    args = ["numpy" if a == "cupy" else a for a in args]
import worker
on_cuda = worker.RUNS["transformers"]
def on_the_cpu(a):
    report = on_cuda(a)
    report.setdefault("device_peak_bytes", report["load_peak_rss"])
    return report
worker.RUNS["transformers"] = on_the_cpu
worker.main(args)
"""


def test_the_gpu_benchmark_runs_through_on_the_stand_in(tmp_path, monkeypatch, capsys):
    folder = save_tiny(tmp_path / "m", num_key_value_heads=2)
    script = tmp_path / "worker.py"
    script.write_text(WORKER_ON_THE_STAND_IN)
    emulated_cupy.install(monkeypatch)
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_gpu
    import common

    monkeypatch.setattr(common, "WORKER", script)
    monkeypatch.setattr(bench_gpu, "models", lambda names: {"tiny": folder})
    limits = bench_gpu.device_limits
    monkeypatch.setattr(bench_gpu, "device_limits", lambda: limits(nbytes=1 << 20, repeats=2))
    written = {}

    def write_results(name, data):
        written[name] = data
        return tmp_path / f"{name}.json"

    monkeypatch.setattr(bench_gpu, "write_results", write_results)
    bench_gpu.main(["--rounds", "1", "--repeats", "1", "--prompt-tokens", "12", "--new-tokens", "6"])
    captured = capsys.readouterr()
    printed = captured.out
    assert "FAILED" not in captured.err, captured.err
    table = written["gpu"]["table"]
    assert [row["framework"] for row in table] == ["minphi3", "minphi3, no CUDA graph", "transformers"]
    assert "tiny: recorded decode step" in printed and "kernels)" in printed
    (report,) = written["gpu"]["models"]["tiny"]["runs"]["minphi3"]
    assert "error" not in report, report
    assert report["decode_path"]["graph_error"] is None and report["decode_path"]["graph_launches"] > 0
    breakdown = report["decode_breakdown"]
    assert breakdown["graph_kernels"] > 0
    # the products alone are timed as a recorded graph too, not as Python launching them
    assert breakdown["weight_products_graph_error"] is None and breakdown["weight_products_device_ms"] > 0
    # the decode graph's private pool is counted, on top of the default pool that holds the weights
    assert report["device_peak_bytes"] > breakdown["graph_pool_bytes"] > 0
    assert report["eager"]["tokens"] == report["tokens"]  # the graph and the kernel-by-kernel steps agree


def test_the_kernel_count_counts_per_layer_and_puts_cupy_back(capsys, monkeypatch):
    import re
    import sys

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import kernel_count

    before = sys.modules.get("cupy")
    kernel_count.main(["--dtype", "float32", "--by-line"])
    printed = capsys.readouterr().out
    per_layer, fixed, phi3_mini = map(int, re.search(r"(\d+) kernels per layer \+ (\d+) .*: (\d+)\)", printed).groups())
    assert per_layer >= 6 and fixed > 0 and phi3_mini == 32 * per_layer + fixed  # six products a layer at least
    assert "_direct_matmul" in printed and "rms_norm" in printed  # the by-line list names the source
    assert sys.modules.get("cupy") is before
