"""Two real processes over gloo (DDP on the CPU): both ranks end with identical weights, and
each rank trained on different prompts."""

import json
import os

import pytest
import torch

from tests.launch import LAUNCH_TIMEOUT, launch, tiny_args


def test_ddp_two_processes(tiny_models, tmp_path):
    import math

    from tests.tensorboard_logs import scalar_tags

    output_dir = str(tmp_path / "ddp")
    launch("tests/ddp_probe.py", ["train_srpo_flux"] + tiny_args(
        tiny_models, output_dir, "--max_train_steps", "3", "--rank", "4", "--gradient_accumulation_steps", "2",
        "--checkpointing_steps", "2", "--gradient_checkpointing", "--validation_prompt", "a cat", "--validation_steps", "2",
        "--scale_lr", "--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "2", "--offload_text_encoders",
    ), num_processes=2)
    # --scale_lr: 1e-3 x 2 processes x batch 1 x accumulation 2. Two cosines over the 3 steps:
    # after step s, 0.5 (1 + cos(pi ((2 s / 3) mod 1))), 0 at the end.
    expected = [4e-3 * 0.5 * (1 + math.cos(math.pi * ((2 * s / 3) % 1))) if s < 3 else 0.0 for s in (1, 2, 3)]
    assert scalar_tags(output_dir)["lr"] == pytest.approx(expected, rel=1e-6)
    ranks = [json.load(open(os.path.join(output_dir, f"rank{i}.json"))) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    prompts = [r["prompts"] for r in ranks]
    assert len(prompts[0]) == len(prompts[1]) == 3 * 2
    assert all(a != b for a, b in zip(*prompts)), "both ranks drew the same prompt in a micro-step"
    # The logged loss is the mean over the ranks (each trained on its own prompts), not rank 0's.
    local = [r["local_losses"] for r in ranks]
    assert local[0] != local[1]
    assert scalar_tags(output_dir)["loss"] == pytest.approx([(a + b) / 2 for a, b in zip(*local)], rel=1e-5)
    # --offload_text_encoders: the first visit encodes the validation prompt (step 0), the second
    # every prompt the rank will train on (its 6 micro-steps, read ahead from its own share of the schedule).
    for rank in ranks:
        assert rank["encoder_visits"] == [["a cat"], list(dict.fromkeys(rank["prompts"]))]
    weights = [torch.load(os.path.join(output_dir, f"rank{i}_weights.pt")) for i in range(2)]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    assert os.path.exists(os.path.join(output_dir, "checkpoint-2"))
    assert sorted(os.listdir(os.path.join(output_dir, "validation"))) == ["step-000000.png", "step-000002.png", "step-000003.png"]
    assert os.path.exists(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))


def test_ddp_resume_matches_uninterrupted(tiny_models, tmp_path):
    """Two processes, interrupted after a checkpoint and resumed, end where an uninterrupted run ends.
    Resumed on ONE process, the learning rate goes on from the step (it is counted in optimiser steps)."""
    import shutil

    from safetensors.torch import load_file

    from tests.tensorboard_logs import scalar_tags

    common = ["--rank", "4", "--checkpointing_steps", "2", "--train_batch_size", "1", "--lr_scheduler", "linear"]
    full_dir, resumed_dir = str(tmp_path / "full"), str(tmp_path / "resumed")
    launch("train_direct_align.py", tiny_args(tiny_models, full_dir, "--max_train_steps", "4", *common), num_processes=2)
    os.makedirs(resumed_dir)
    shutil.copytree(os.path.join(full_dir, "checkpoint-2"), os.path.join(resumed_dir, "checkpoint-2"))
    launch("train_direct_align.py", tiny_args(tiny_models, resumed_dir, "--max_train_steps", "4", "--resume_from_checkpoint",
                                              "latest", *common), num_processes=2)
    expected = load_file(os.path.join(full_dir, "pytorch_lora_weights.safetensors"))
    got = load_file(os.path.join(resumed_dir, "pytorch_lora_weights.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.allclose(expected[key], got[key], atol=1e-7), key
    linear = [1e-3 * (1 - s / 4) for s in (1, 2, 3, 4)]
    assert scalar_tags(full_dir)["lr"] == pytest.approx(linear, abs=1e-9)

    # On one process, from the checkpoint as an earlier version wrote it: its scheduler counted
    # process-steps (4 at step 2 of 2 processes); the schedule must go on from step 2, not 4.
    # With a lower --learning_rate, as after a divergence: this run's rate, not the checkpoint's.
    one_dir = str(tmp_path / "one_process")
    shutil.copytree(os.path.join(full_dir, "checkpoint-2"), os.path.join(one_dir, "checkpoint-2"))
    scheduler_file = os.path.join(one_dir, "checkpoint-2", "scheduler.bin")
    state = torch.load(scheduler_file, weights_only=False)
    assert state["last_epoch"] == 2  # counted in optimiser steps now
    torch.save({**state, "last_epoch": 4}, scheduler_file)
    launch("train_direct_align.py", tiny_args(tiny_models, one_dir, "--max_train_steps", "4", "--resume_from_checkpoint",
                                              "latest", *common, "--learning_rate", "4e-4"), num_processes=1)
    assert scalar_tags(one_dir)["lr"] == pytest.approx([4e-4 * (1 - s / 4) for s in (3, 4)], abs=1e-9)


def test_two_machines(tiny_models, tmp_path):
    """`accelerate launch --num_machines 2 --machine_rank 0|1` (one process each, on this one box
    over gloo, as two nodes of a cluster would run it on a shared filesystem): each node's process
    is local rank 0, yet the two draw different prompts and end with the same weights; both ranks'
    RNG states land in the shared checkpoint."""
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT
    from tests.launch import free_port

    output_dir = str(tmp_path / "two-machines")
    flags = tiny_args(tiny_models, output_dir, "--max_train_steps", "2", "--rank", "4", "--checkpointing_steps", "2")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT, ACCELERATE_USE_CPU="1")
    port = str(free_port())
    machines = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
         "--main_process_ip", "127.0.0.1", "--main_process_port", port, "--num_processes", "2", "--mixed_precision", "no",
         "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1", os.path.join(REPO_ROOT, "tests", "ddp_probe.py"),
         "train_srpo_flux", *flags],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for machine in machines:
        _, stderr = machine.communicate(timeout=LAUNCH_TIMEOUT)
        assert machine.returncode == 0, stderr[-6000:]
    ranks = [json.load(open(os.path.join(output_dir, f"rank{i}.json"))) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(a != b for a, b in zip(ranks[0]["prompts"], ranks[1]["prompts"])), "both machines drew the same prompts"
    weights = [torch.load(os.path.join(output_dir, f"rank{i}_weights.pt")) for i in range(2)]
    assert weights[0] and all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(os.path.join(output_dir, "checkpoint-2")))
