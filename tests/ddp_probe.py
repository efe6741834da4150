"""Run a trainer's main() as it is, recording what each rank saw and ended with (DDP or FSDP).

    accelerate launch ... tests/ddp_probe.py train_srpo_flux <trainer flags>

Writes rank<i>.json (world size, prompts drawn) and rank<i>_weights.pt (trainable weights, the
whole tensors: under FSDP each rank gathers the shards)."""

import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flux_rl import data, training  # noqa: E402

seen_prompts = []
original_batch = data.BatchSchedule.batch
original_finish = training.finish


def recording_batch(self, micro_step):
    items = original_batch(self, micro_step)
    seen_prompts.extend(items)
    return items


def recording_finish(run):
    rank = run.accelerator.process_index
    weights = {}
    for name, parameter in run.unwrapped().named_parameters():
        if parameter.requires_grad:
            # FSDP2 parameters are DTensor shards; full_tensor() gathers them (every rank calls it, same order).
            tensor = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
            weights[name] = tensor.detach().cpu().clone()
    torch.save(weights, os.path.join(run.args.output_dir, f"rank{rank}_weights.pt"))
    with open(os.path.join(run.args.output_dir, f"rank{rank}.json"), "w") as f:
        plugin = getattr(run.accelerator.state, "fsdp_plugin", None)
        policy = getattr(plugin, "mixed_precision_policy", None)
        json.dump({"world_size": run.accelerator.num_processes, "prompts": seen_prompts,
                   "fsdp_reduce_dtype": str(getattr(policy, "reduce_dtype", None)),
                   "fsdp_param_dtype": str(getattr(policy, "param_dtype", None))}, f)
    original_finish(run)


data.BatchSchedule.batch = recording_batch
training.finish = recording_finish
module = importlib.import_module(sys.argv[1])
module.main(module.parse_args(sys.argv[2:]))
