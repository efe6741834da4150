"""The full-size benchmark runs end to end on the tiny models on the CPU."""

import math

from benchmarks import benchmark_trainers


def test_benchmark_table_on_tiny_models(tmp_path):
    output = tmp_path / "results.md"
    lines = benchmark_trainers.main([
        "--size", "tiny", "--resolutions", "64", "--rollout_steps", "3", "--steps", "1", "--warmup", "0",
        "--compile_modes", "eager,compiled", "--compile_backend", "aot_eager", "--output", str(output),
    ])
    rows = [line.strip("|").split("|") for line in lines if line.startswith("| ") and "trainer" not in line]
    assert len(rows) == len(benchmark_trainers.TRAINERS) * 3 * 2
    assert {row[0].strip() for row in rows} == set(benchmark_trainers.TRAINERS)
    for row in rows:
        seconds, tflop = float(row[4]), float(row[6])
        assert seconds > 0 and math.isfinite(tflop) and tflop > 0
    assert output.read_text().count("\n") == len(lines)
