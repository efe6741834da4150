#!/usr/bin/env bash
# Download the wheels of benchmarks/device_wheels.txt into .whl/ (ignored by git) for Python 3.12 x86_64,
# the GPU machines' interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -v '^#' benchmarks/device_wheels.txt | while read -r requirement; do
  [ -n "$requirement" ] || continue
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d .whl "$requirement"
done
ls .whl
