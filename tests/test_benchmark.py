"""The full-size benchmark runs end to end on the tiny models on the CPU."""

import math
import os

import pytest

from benchmarks import benchmark_trainers


def table(lines):
    """The markdown table's rows as dicts keyed by its header."""
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| ")]
    return [dict(zip(cells[0], row)) for row in cells[1:]]


def test_benchmark_table_on_tiny_models(tmp_path):
    output = tmp_path / "results.md"
    common = ["--size", "tiny", "--resolutions", "64", "--rollout_steps", "3", "--steps", "1", "--warmup", "1",
              "--compile_backend", "aot_eager", "--output", str(output)]
    # Every trainer eager with LoRA; SRPO's three modes eager and compiled (compilation wraps the same blocks for every
    # trainer, and the modes differ in the model and optimizer only, which every trainer builds alike).
    lines = benchmark_trainers.main(common + ["--compile_modes", "eager", "--modes", "lora"])
    assert output.read_text().count("\n") == len(lines)
    rows = table(lines) + table(benchmark_trainers.main(common + ["--compile_modes", "eager", "--trainers", "srpo",
                                                                    "--modes", "full,full_bf16"]))
    rows += table(benchmark_trainers.main(common + ["--compile_modes", "compiled", "--trainers", "srpo"]))
    assert len(rows) == len(benchmark_trainers.TRAINERS) + 2 + 3
    assert {row["trainer"] for row in rows} == set(benchmark_trainers.TRAINERS)
    for row in rows:
        seconds, tflop, rollout = float(row["s/step"]), float(row["TFLOP/step"]), float(row["rollout s"])
        assert seconds > 0 and math.isfinite(tflop) and tflop > 0
        assert 0 < rollout < seconds  # the rollout is part of the step
        assert float(row["rollout TFLOP/s"]) > 0
        assert float(row["first step s"]) > 0
    # the first compiled configuration's first step compiles the blocks (later ones reuse the graphs)
    first_compiled = next(row for row in rows if row["compile"] == "compiled")
    assert float(first_compiled["first step s"]) > 5 * float(first_compiled["s/step"])
    # Compiled configurations count their FLOPs on their own (an eager step under force_eager):
    # the same count as the eager configuration's.
    eager = {(row["trainer"], row["mode"]): row["TFLOP/step"] for row in rows if row["compile"] == "eager"}
    compiled = {(row["trainer"], row["mode"]): row["TFLOP/step"] for row in rows if row["compile"] == "compiled"}
    assert compiled == {key: value for key, value in eager.items() if key[0] == "srpo"} and len(compiled) == 3


def test_meta_device_counts_the_flops_the_cpu_step_does():
    """--device meta runs the same step on shapes alone: every operation the CPU step counts is
    counted the same. The meta step also counts the transformer's attention (it decomposes to bmm
    there), which the CPU's fused attention kernel hides from FlopCounterMode (GPU kernels are
    counted); the VAE's attention is bmm on both (--vae_attention math)."""
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
        attention = counts["meta"].pop("aten.bmm") - counts["cpu"].pop("aten.bmm")
        assert counts["meta"] == counts["cpu"] and attention > 0, trainer


def test_meta_device_table(tmp_path):
    lines = benchmark_trainers.main([
        "--size", "tiny", "--resolutions", "64", "--rollout_steps", "3", "--trainers", "srpo", "--modes", "lora,full",
        "--compile_modes", "eager", "--device", "meta", "--peak_tflops", "100",
    ])
    rows = table(lines)
    assert len(rows) == 2
    for row in rows:
        assert {row[k] for k in ("s/step", "peak GiB", "TFLOP/s", "rollout s", "rollout TFLOP/s", "first step s")} == {"-"}
        tflop = float(row["TFLOP/step"])
        assert tflop > 0 and math.isclose(float(row["s/step at 100 TFLOP/s"]), tflop / 100, rel_tol=0.01, abs_tol=0.006)


def test_profile_checkpointing_and_variants(tmp_path):
    """--profile appends one op table per configuration with the forward phases as named ranges;
    --checkpointing on,off and --variant multiply the configurations; off builds the models
    without gradient checkpointing."""
    import torch
    from accelerate import Accelerator

    profile = tmp_path / "profile.txt"
    lines = benchmark_trainers.main([
        "--size", "tiny", "--resolutions", "64", "--rollout_steps", "2", "--steps", "1", "--warmup", "0",
        "--trainers", "srpo", "--modes", "lora", "--compile_modes", "eager", "--checkpointing", "on,off",
        "--trainer_flags=--merge_lora_in_rollout", "--variant=", "--variant=--num_injections 2", "--profile", str(profile),
    ])
    assert "gradient checkpointing (transformer and VAE) on,off" in lines[0] and "--merge_lora_in_rollout" in lines[0]
    rows = table(lines)
    assert [(row["checkpointing"], row["variant"]) for row in rows] == [
        ("on", "-"), ("on", "--num_injections 2"), ("off", "-"), ("off", "--num_injections 2")]
    for row in rows:
        assert 0 < float(row["optimizer s"]) < float(row["s/step"])
    text = profile.read_text()
    assert text.count("## srpo ") == 4 and "## srpo lora 64 eager no-checkpointing --num_injections 2" in text
    for phase in ("rollout", "vae_decode", "reward_image_features_hpsv2"):
        assert phase in text, phase
    # the variant's flags reached the run: SRPO decodes its 2 branch images in one call per injection (--batch_branches,
    # the default; the drift monitor is left out)
    decode_calls = [line.split()[-1] for line in text.splitlines() if line.split()[:1] == ["vae_decode"]]
    assert decode_calls == ["1", "2", "1", "2"]

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    module, flags = benchmark_trainers.TRAINERS["srpo"]
    for checkpointing in (True, False):
        run = benchmark_trainers.build_run(module, flags, "tiny", "lora", 64, 2, False, torch.device("cpu"), accelerator,
                                           checkpointing=checkpointing)
        assert run.transformer.is_gradient_checkpointing == checkpointing
        assert run.vae.is_gradient_checkpointing == checkpointing


def test_reuse_flops_counts_once_per_configuration(capsys):
    """--reuse_flops: variants that only change how the step runs share the first variant's count,
    which is what counting gives them anyway (here: the branches one at a time and in one batch)."""
    common = ["--size", "tiny", "--resolutions", "64", "--rollout_steps", "2", "--steps", "1", "--warmup", "0",
              "--trainers", "srpo", "--modes", "lora", "--compile_modes", "eager", "--variant=--no_batch_branches", "--variant="]
    counted = table(benchmark_trainers.main(common))
    assert capsys.readouterr().err.count("FLOPs counted") == 2
    reused = table(benchmark_trainers.main(common + ["--reuse_flops"]))
    err = capsys.readouterr().err
    assert err.count("FLOPs counted") == 1 and err.count("FLOPs reused") == 1
    assert [row["TFLOP/step"] for row in reused] == [row["TFLOP/step"] for row in counted]
    assert len({row["TFLOP/step"] for row in reused}) == 1
    # --no_flops: nothing counted, the FLOP columns empty, the times there
    uncounted = table(benchmark_trainers.main(common + ["--no_flops"]))
    err = capsys.readouterr().err
    assert "FLOPs counted" not in err and err.count("FLOPs not counted") == 2
    assert all(row["TFLOP/step"] == row["TFLOP/s"] == row["rollout TFLOP/s"] == "-" for row in uncounted)
    assert all(float(row["s/step"]) > 0 for row in uncounted)


def test_host_waits_are_counted_from_cuda_sync_warnings(monkeypatch, capsys):
    """On CUDA the counted step runs under torch.cuda.set_sync_debug_mode("warn"): each warning it
    raises is one host wait. Here the warnings are raised by hand (no GPU on this machine)."""
    import warnings

    import torch

    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)

    def step_with_two_waits():
        for _ in range(2):
            warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("an unrelated warning")

    assert benchmark_trainers.count_host_waits(step_with_two_waits, torch.device("cuda")) == 2
    assert modes == ["warn", "default"]  # switched back after the step
    assert "test_benchmark.py" in capsys.readouterr().err  # where each wait came from
    assert math.isnan(benchmark_trainers.count_host_waits(lambda: None, torch.device("cpu")))


def test_a_failing_configuration_does_not_stop_the_table(capsys):
    """A variant that fails (here a flag value the trainer refuses; on a GPU, a kernel the card lacks)
    gets a 'failed' row with its error, and the next variant is still measured."""
    lines = benchmark_trainers.main([
        "--size", "tiny", "--resolutions", "64", "--rollout_steps", "2", "--steps", "1", "--warmup", "0", "--trainers", "srpo",
        "--modes", "lora", "--compile_modes", "eager", "--no_flops",
        "--variant=--gradient_checkpointing_ratio 2", "--variant=--gradient_checkpointing_ratio 0.5",
    ])
    failed, measured = table(lines)
    assert failed["s/step"].startswith("failed: ConfigurationError: --gradient_checkpointing_ratio must lie in [0, 1]")
    assert float(measured["s/step"]) > 0
    assert "Traceback" in capsys.readouterr().err


def test_a_4bit_base_is_built_on_the_host_and_quantized_on_the_device(capsys):
    """--variant="--quantize_base nf4" (the device script's 24 GB group): the transformer is built on the host and its
    blocks quantized as they move to the run's device, as the trainers load it; the row is measured."""
    import torch
    from accelerate import Accelerator

    from flux_rl import quantization

    module, flags = benchmark_trainers.TRAINERS["srpo"]
    run = benchmark_trainers.build_run(module, flags + ["--quantize_base", "nf4"], "tiny", "lora", 64, 2, False,
                                       torch.device("cpu"), Accelerator(mixed_precision="bf16", cpu=True))
    assert quantization.is_quantized(run.transformer) and not run.args.merge_lora_in_rollout
    (row,) = table(benchmark_trainers.main([
        "--size", "tiny", "--resolutions", "64", "--rollout_steps", "2", "--steps", "1", "--warmup", "0", "--trainers", "srpo",
        "--modes", "lora", "--compile_modes", "eager", "--no_flops", "--variant=--quantize_base nf4"]))
    assert row["variant"] == "--quantize_base nf4" and float(row["s/step"]) > 0


def test_device_script_passes_only_flags_the_trainer_takes(monkeypatch):
    """Every trainer flag benchmarks/run_on_device.sh passes (each --variant, the smoke run's command
    line) parses: a typo there would cost part of a GPU lease. The script's syntax too."""
    import re
    import shlex
    import subprocess

    import torch

    import train_srpo_flux

    path = os.path.join(os.path.dirname(benchmark_trainers.__file__), "run_on_device.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    script = open(path).read()
    variants = re.findall(r'--variant="([^"]*)"', script)
    smoke = re.search(r"train_srpo_flux\.py (.*?) --output_dir", script, re.S).group(1).replace("\\\n", " ")
    smoke_flags = shlex.split(smoke)
    for option in ("--pretrained_model_name_or_path", "--reward_models_dir"):  # folders that exist on the device only
        index = smoke_flags.index(option)
        del smoke_flags[index : index + 2]
    assert len(variants) >= 2 and "--compile" in smoke_flags
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the cuDNN variant is refused without a GPU
    for variant in variants:  # as build_run passes them on a GPU, compiled
        flags = benchmark_trainers.trainer_flags(shlex.split(variant), "lora", 720, 25, True, torch.device("cuda"))
        assert train_srpo_flux.parse_args(flags), flags
    assert train_srpo_flux.parse_args(["--pretrained_model_name_or_path", "flux", *smoke_flags])


def test_text_encoder_visit_timing_on_the_cpu():
    """benchmarks/time_text_encoder_visits.py at tiny size: the table's per-prompt columns follow
    from its measured ones and PromptEncoder's look-ahead."""
    from benchmarks import time_text_encoder_visits
    from flux_rl.flux import PromptEncoder

    lines = time_text_encoder_visits.main(["--size", "tiny", "--device", "cpu", "--repeats", "1", "--t5_tokens", "64"])
    visit, one, batch, per_prompt_alone, per_prompt_ahead = (float(cell) for cell in lines[-1].strip("| ").split(" | "))
    assert min(visit, one, batch) > 0
    assert per_prompt_alone == pytest.approx(visit + one, abs=2e-3)
    ahead = PromptEncoder.LOOKAHEAD
    assert per_prompt_ahead == pytest.approx((visit + ahead / PromptEncoder.ENCODE_BATCH * batch) / ahead, abs=2e-4)


@pytest.mark.parametrize("family", ["flux2_klein", "qwen_image"])
def test_another_familys_row_on_the_cpu(family):
    """--family times FLUX.2 [klein]'s or Qwen-Image's step (tiny here) as FLUX.1's; their guidance comes in --trainer_flags."""
    rows = table(benchmark_trainers.main([
        "--size", "tiny", "--family", family, "--resolutions", "64", "--rollout_steps", "2", "--steps", "1", "--warmup", "1",
        "--trainers", "srpo", "--modes", "lora", "--compile_modes", "eager", "--trainer_flags", "--rollout_guidance 4 --train_guidance 1",
    ]))
    assert len(rows) == 1 and float(rows[0]["s/step"]) > float(rows[0]["rollout s"]) > 0 and float(rows[0]["TFLOP/step"]) > 0
