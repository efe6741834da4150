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


def test_meta_device_counts_the_flops_the_cpu_step_does():
    """--device meta runs the same step on shapes alone: every operation the CPU step counts is
    counted the same. The meta step also counts attention (it decomposes to bmm there), which
    the CPU's fused attention kernel hides from FlopCounterMode (GPU kernels are counted)."""
    import torch
    from accelerate import Accelerator
    from torch.utils.flop_counter import FlopCounterMode

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    benchmark_trainers.build_reward.cache_clear()  # a fresh reward on both devices: its text cache starts empty
    for trainer, mode in [("srpo", "lora"), ("draft_lv", "full")]:
        module, flags = benchmark_trainers.TRAINERS[trainer]
        counts = {}
        for device in ("cpu", "meta"):
            run = benchmark_trainers.build_run(module, flags, "tiny", mode, 64, 3, False, torch.device(device), accelerator)
            with FlopCounterMode(display=False) as counter:
                benchmark_trainers.one_step(module, run, 0)
            counts[device] = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
        attention = counts["meta"].pop("aten.bmm")
        assert counts["meta"] == counts["cpu"] and attention > 0, trainer


def test_meta_device_table(tmp_path):
    lines = benchmark_trainers.main([
        "--size", "tiny", "--resolutions", "64", "--rollout_steps", "3", "--trainers", "srpo", "--modes", "lora,full",
        "--compile_modes", "eager", "--device", "meta", "--peak_tflops", "100",
    ])
    rows = [line.strip("|").split("|") for line in lines if line.startswith("| ") and "trainer" not in line]
    assert len(rows) == 2
    for row in rows:
        assert row[4].strip() == "-" and row[5].strip() == "-" and row[7].strip() == "-"  # nothing timed
        assert float(row[6]) > 0 and math.isclose(float(row[8]), float(row[6]) / 100, rel_tol=0.01, abs_tol=0.006)
