"""configs/accelerate/fsdp.yaml with two real processes over gloo (tests/fsdp_on_cpu.py lets
accelerate use FSDP without a GPU): the same result as DDP, both ranks hold the same weights,
each saw different prompts, checkpoints are sharded and resume exactly."""

import json
import os
import shutil

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from tests.launch import launch, tiny_args


def test_fsdp_full_finetune_matches_ddp(tiny_models, tmp_path):
    common = ["--max_train_steps", "3", "--full_finetune", "--gradient_accumulation_steps", "2", "--checkpointing_steps", "2",
              "--validation_prompt", "a cat", "--validation_steps", "2", "--gradient_checkpointing",  # recompute inside FSDP units
              "--no_batch_rollout_modulations"]  # off by itself under FSDP: DDP's rollout the same way, for the same sums
    fsdp_dir, ddp_dir = str(tmp_path / "fsdp"), str(tmp_path / "ddp")
    launch("tests/ddp_probe.py", ["train_srpo_flux"] + tiny_args(tiny_models, fsdp_dir, *common), num_processes=2, fsdp=True)
    launch("train_srpo_flux.py", tiny_args(tiny_models, ddp_dir, *common), num_processes=2)

    ranks = [json.load(open(os.path.join(fsdp_dir, f"rank{i}.json"))) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(a != b for a, b in zip(ranks[0]["prompts"], ranks[1]["prompts"])), "both ranks drew the same prompt in a micro-step"
    weights = [torch.load(os.path.join(fsdp_dir, f"rank{i}_weights.pt")) for i in range(2)]
    assert weights[0].keys() == weights[1].keys() and weights[0]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key

    # The gathered final model is a diffusers folder, equal to what DDP trained (up to reduction order).
    fsdp_model = FluxTransformer2DModel.from_pretrained(os.path.join(fsdp_dir, "transformer")).state_dict()
    ddp_model = FluxTransformer2DModel.from_pretrained(os.path.join(ddp_dir, "transformer")).state_dict()
    base = FluxTransformer2DModel.from_pretrained(os.path.join(tiny_models, "flux", "transformer")).state_dict()
    assert fsdp_model.keys() == ddp_model.keys()
    for key in fsdp_model:
        assert torch.allclose(fsdp_model[key], ddp_model[key], atol=1e-6), key
        assert torch.allclose(fsdp_model[key], weights[0][key]), key
    assert any(not torch.equal(fsdp_model[k], base[k]) for k in base), "training changed nothing"
    assert sorted(os.listdir(os.path.join(fsdp_dir, "validation"))) == ["step-000000.png", "step-000002.png", "step-000003.png"]
    checkpoint = os.listdir(os.path.join(fsdp_dir, "checkpoint-2"))
    assert "pytorch_model_fsdp_0" in checkpoint and "optimizer_0" in checkpoint, checkpoint  # each rank wrote its shard


def test_fsdp_lora_resume_matches_uninterrupted(tiny_models, tmp_path):
    """In bf16, as on GPUs: weights gathered in bf16, gradients reduced in fp32."""
    common = ["--rank", "4", "--max_train_steps", "4", "--checkpointing_steps", "2", "--mixed_precision", "bf16"]
    full_dir, resumed_dir = str(tmp_path / "full"), str(tmp_path / "resumed")
    launch("tests/ddp_probe.py", ["train_srpo_flux"] + tiny_args(tiny_models, full_dir, *common), num_processes=2, fsdp=True)
    rank = json.load(open(os.path.join(full_dir, "rank0.json")))
    assert (rank["fsdp_param_dtype"], rank["fsdp_reduce_dtype"]) == ("torch.bfloat16", "torch.float32")
    os.makedirs(resumed_dir)
    shutil.copytree(os.path.join(full_dir, "checkpoint-2"), os.path.join(resumed_dir, "checkpoint-2"))
    launch("train_srpo_flux.py", tiny_args(tiny_models, resumed_dir, *common, "--resume_from_checkpoint", "latest"),
           num_processes=2, fsdp=True)
    expected = load_file(os.path.join(full_dir, "pytorch_lora_weights.safetensors"))
    got = load_file(os.path.join(resumed_dir, "pytorch_lora_weights.safetensors"))
    assert expected.keys() == got.keys() and len(expected) > 0
    assert {v.dtype for v in got.values()} == {torch.bfloat16}  # saved in the training precision (fp32 in the checkpoints)
    for key in expected:
        assert torch.allclose(expected[key], got[key], atol=1e-7), key


def test_fsdp_reduces_every_backward():
    """Gradient accumulation skips DDP's all-reduce until the last backward, but never FSDP's
    reduce-scatter (that would hold unsharded gradients)."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from flux_rl.training import Run

    skipped = []
    for kind in (DistributedType.MULTI_GPU, DistributedType.FSDP):
        accelerator = SimpleNamespace(num_processes=2, distributed_type=kind, no_sync=lambda model, kind=kind: skipped.append(kind))
        run = SimpleNamespace(accelerator=accelerator, transformer=None)
        Run.sync_gradients(run, last=False)
        Run.sync_gradients(run, last=True)
    assert skipped == [DistributedType.MULTI_GPU]
