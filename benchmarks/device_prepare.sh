#!/usr/bin/env bash
# Fill the ignored folders that `benchmarks/device_check.sh` needs on a lent GPU machine (no
# network there): .device1 = the gguf wheel and the first half of the demo model's GGUF,
# .device2 = its second half. Run here, from the repository root, after `make demo` (which puts
# the GGUF in the cache). Then, with the device tool:
#   run(command="bash benchmarks/device_check.sh first",  carry=[".device1"])
#   run(command="bash benchmarks/device_check.sh second", carry=[".device2"])
set -euo pipefail
cache=${MINPHI3_CACHE:-$HOME/.cache/minphi3}
gguf=$cache/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || { echo "device_prepare.sh: $gguf is missing: run 'make demo' first" >&2; exit 1; }
grep -qx '/.device1/' .git/info/exclude 2>/dev/null || printf '/.device1/\n/.device2/\n' >> .git/info/exclude
rm -rf .device1 .device2
mkdir -p .device1/wheels .device2
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
head -c "$half" "$gguf" > .device1/gguf.part1
tail -c +"$((half + 1))" "$gguf" > .device2/gguf.part2
gguf_version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('gguf'))")
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: -d .device1/wheels "gguf==$gguf_version"
du -sh .device1 .device2
