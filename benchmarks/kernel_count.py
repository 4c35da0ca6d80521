"""Count the kernels of the recorded decode step without a GPU, on tests/emulated_cupy.py.

    python benchmarks/kernel_count.py                 # float16, the tiny Phi-3 of the tests
    python benchmarks/kernel_count.py --dtype float32 --by-line

Each device call that the recorded step makes (one NumPy call on the stand-in, one kernel on a
GPU; allocations are none) is counted while `generate` records its decode step, for a 1-layer
and a 3-layer model: per layer = the difference / 2, and the rest is the step's fixed part.
At batch 1 on a GPU these launches, not the weights' bytes, bound the decode: this is the figure
to lower before fusing anything. No time is measured.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def recorded_kernels(layers: int, dtype: str, folder: Path) -> list[str]:
    """The minphi3 source line behind each kernel of one recorded decode step."""
    import emulated_cupy  # noqa: PLC0415
    from tiny_checkpoints import random_ids, save_tiny  # noqa: PLC0415

    import minphi3  # noqa: PLC0415

    lines: list[str] = []
    record = emulated_cupy.Stream.record

    def record_with_source(stream, kernel):
        frame = next(f for f in reversed(traceback.extract_stack()[:-1]) if "/minphi3/" in f.filename)
        lines.append(f"{Path(frame.filename).name}:{frame.lineno} {frame.name}: {frame.line}")
        record(stream, kernel)

    emulated_cupy.Stream.record = record_with_source
    try:
        model = minphi3.load(save_tiny(folder / f"layers{layers}", num_key_value_heads=2, num_hidden_layers=layers),
                             backend="cupy", dtype=dtype)  # fmt: skip
        minphi3.generate(model, random_ids(1, 8), max_new_tokens=3, eos_token_id=[])  # records one step
    finally:
        emulated_cupy.Stream.record = record
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    parser.add_argument("--by-line", action="store_true", help="also list the kernels of one layer by source line")
    args = parser.parse_args(argv)
    import emulated_cupy  # noqa: PLC0415
    from _pytest.monkeypatch import MonkeyPatch  # noqa: PLC0415

    patch = MonkeyPatch()
    emulated_cupy.install(patch)
    try:
        with tempfile.TemporaryDirectory() as folder:
            one, three = (recorded_kernels(layers, args.dtype, Path(folder)) for layers in (1, 3))
    finally:
        patch.undo()
    per_layer = (len(three) - len(one)) // 2
    print(f"recorded decode step, {args.dtype}: {per_layer} kernels per layer + {len(one) - per_layer} "
          f"(Phi-3-mini, 32 layers: {32 * per_layer + len(one) - per_layer})")  # fmt: skip
    if args.by_line:
        for line, count in collections.Counter(one).items():
            print(f"{count:3d}  {line}")


if __name__ == "__main__":
    main()
