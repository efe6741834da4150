"""No training step makes the host wait for the GPU in its middle, and no random draw mixes devices.

A blocking host-to-device copy (`torch.as_tensor(sigma, device="cuda")`, `tokens.to("cuda")`)
returns only once the GPU has finished everything queued before it: mid-step, the GPU then runs
dry while the host launches the next kernels. A read back (`.item()`, `float(t)`) does the same.
And `torch.randn(..., generator=<CPU generator>, device="cuda")` is an error on the GPU only, as is
most of a call that mixes devices (which the meta device lets through for some ops, e.g. F.linear).

There is no GPU here, so each trainer's step runs on the meta device (shapes only, as the
benchmark's FLOP count does) under a TorchFunctionMode that records those four patterns.
"""

import os
import traceback

import pytest
import torch
from accelerate import Accelerator
from torch.overrides import TorchFunctionMode

import rewards
from benchmarks import benchmark_trainers

READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__bool__,
         torch.Tensor.cpu, torch.Tensor.numpy}
HERE = os.path.abspath(__file__)


def _on_host(device) -> bool:
    return torch.device(device).type == "cpu"


def _caller() -> str:
    """The innermost frame outside torch and this file: the line that asked for the transfer."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename != HERE and f"{os.sep}torch{os.sep}" not in frame.filename:
            return f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}"
    return "?"


def _tensor_arguments(args, kwargs):
    """The tensors among a call's arguments, one level into lists and tuples."""
    for value in (*args, *kwargs.values()):
        for item in (value if isinstance(value, (list, tuple)) else (value,)):
            if isinstance(item, torch.Tensor):
                yield item


class TransferAudit(TorchFunctionMode):
    """Records blocking uploads, read backs, calls that mix devices and generators on another device than their tensor."""

    def __init__(self):
        super().__init__()
        self.problems = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        problem = self._problem(func, args, kwargs)
        if problem:
            self.problems.append(f"{problem} at {_caller()}")
        return func(*args, **kwargs)

    @staticmethod
    def _problem(func, args, kwargs):
        if func is torch.Tensor.to:
            device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            source = args[0].device
            if device is not None and _on_host(source) and not _on_host(device) and not non_blocking:
                return "blocking upload (.to)"
            if device is not None and not _on_host(source) and _on_host(device):
                return "read back (.to cpu)"
        if func is torch.Tensor.copy_:
            non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
            if _on_host(args[1].device) and not _on_host(args[0].device) and not non_blocking:
                return "blocking upload (copy_)"
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None and not _on_host(kwargs["device"]):
            data = args[0]
            if not (isinstance(data, torch.Tensor) and not _on_host(data.device)):
                return f"blocking upload (torch.{func.__name__} on the device)"
        if func in READS and isinstance(args[0], torch.Tensor) and not _on_host(args[0].device):
            return f"read back ({func.__name__})"
        if func not in (torch.Tensor.to, torch.Tensor.copy_):
            devices = {t.device.type for t in _tensor_arguments(args, kwargs) if t.ndim > 0}
            if len(devices) > 1:  # CUDA refuses most such ops; those it takes (an index on the CPU) copy and wait
                return f"tensors on {' and '.join(sorted(devices))} in one call ({getattr(func, '__name__', func)})"
        generator = kwargs.get("generator")
        if generator is not None:
            if "device" in kwargs or not (args and isinstance(args[0], torch.Tensor)):
                target = torch.device(kwargs.get("device") or "cpu")  # a factory function
            else:
                target = args[0].device  # an in-place draw (normal_, uniform_) into args[0]
            if target.type != generator.device.type:
                return f"{generator.device.type} generator drawing a {target.type} tensor ({func.__name__})"
        return None


def test_the_audit_catches_each_pattern():
    """The patterns this file rules out are seen (the old trainers had each of the first three)."""
    cases = [
        lambda: torch.as_tensor(0.5, device="meta"),
        lambda: torch.tensor([0.5, 0.7], device="meta"),
        lambda: torch.ones(3).to("meta"),
        lambda: torch.randn(3, generator=torch.Generator(), device="meta"),
        lambda: torch.empty(3, device="meta").copy_(torch.ones(3)),
        lambda: torch.nn.functional.linear(torch.ones(2, 3, device="meta"), torch.ones(4, 3)),  # meta would not complain
    ]
    for case in cases:
        with TransferAudit() as audit:
            case()
        assert len(audit.problems) == 1, audit.problems
    with TransferAudit() as audit:  # what the trainers do instead
        torch.full((1,), 0.5, device="meta")
        rewards.base.host_to_device(torch.randn(3, generator=torch.Generator()), "meta")
        torch.ones(3, device="meta").to("meta")
    assert audit.problems == []


# Every reward kind (CLIP-like, PickScore, the cross-attention ImageReward, the image-only aesthetic
# scorer with its noised relative form) in one SRPO spec.
ALL_REWARDS = "hpsv2:1,pickscore:0.05,imagereward:0.5,aesthetic:0.1,hpsv3:0.1"


@pytest.mark.parametrize("trainer,mode,flags", [
    ("srpo", "lora", ["--monitor_steps", "1"]),  # the drift monitor too (the benchmark's runs leave it out)
    ("srpo", "lora", ["--batch_branches", "--batch_rollout_modulations"]),
    ("srpo", "full_bf16", ["--batch_branches", "--batch_rollout_modulations"]),
    ("direct_align", "lora", []),
    ("refl", "lora", []),
    ("draft_lv", "lora", []),
])
def test_a_training_step_never_waits_for_the_device(tiny_rewards, trainer, mode, flags):
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    module, trainer_flags = benchmark_trainers.TRAINERS[trainer]
    run = benchmark_trainers.build_run(module, trainer_flags + flags, "tiny", mode, 64, 3, False, torch.device("meta"), accelerator)
    if trainer == "srpo":
        run.reward = rewards.load_combined_reward(ALL_REWARDS, tiny_rewards, torch.device("meta"), torch.bfloat16)
    with TransferAudit() as audit:
        benchmark_trainers.one_step(module, run, 0)  # rollout, branches, rewards, backward, optimizer step
    assert audit.problems == [], "\n".join(dict.fromkeys(audit.problems))


def test_an_offline_srpo_step_never_waits_for_the_device():
    """Offline SRPO (--train_data_dir): real images, VAE-encoded, replace the rollout."""
    from PIL import Image

    from flux_rl import data

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    module, flags = benchmark_trainers.TRAINERS["srpo"]
    run = benchmark_trainers.build_run(module, flags, "tiny", "lora", 64, 3, False, torch.device("meta"), accelerator)
    run.image_dataset = [{"image": Image.new("RGB", (80, 64), (40 * i, 90, 200)), "prompt": f"photo {i}"} for i in range(4)]
    run.batches = data.BatchSchedule(list(range(4)), 1, 0)
    with TransferAudit() as audit:
        benchmark_trainers.one_step(module, run, 0)
    assert audit.problems == [], "\n".join(dict.fromkeys(audit.problems))
