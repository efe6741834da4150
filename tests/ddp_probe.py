"""Run a trainer's main() as it is, recording what each rank saw and ended with (DDP or FSDP).

    accelerate launch ... tests/ddp_probe.py train_srpo_flux <trainer flags>

Writes rank<i>.json (world size, prompts drawn, the prompts of each visit of the text encoders, its
own loss of each step before the logs are averaged over the ranks)
and rank<i>_weights.pt (trainable weights, the whole tensors: under FSDP each rank gathers the
shards)."""

import importlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flux_rl import flux, training  # noqa: E402

seen_prompts, encoder_visits, local_losses = [], [], []
original_next_batch = training.Run.next_batch
original_log = training.Run.log
original_encode = flux.PromptEncoder._encode
original_finish = training.finish


def recording_next_batch(self, micro_step, generator):
    batch = original_next_batch(self, micro_step, generator)
    seen_prompts.extend(batch[3])
    return batch


def recording_log(self, step, values):
    local_losses.append(float(values["loss"]))  # this rank's own, before the logs are averaged over the ranks
    return original_log(self, step, values)


def recording_encode(self, prompts):
    encoder_visits.append(list(prompts))
    return original_encode(self, prompts)


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
        json.dump({"world_size": run.accelerator.num_processes, "prompts": seen_prompts, "encoder_visits": encoder_visits,
                   "local_losses": local_losses,
                   "fsdp_reduce_dtype": str(getattr(policy, "reduce_dtype", None)),
                   "fsdp_param_dtype": str(getattr(policy, "param_dtype", None))}, f)
    original_finish(run)


training.Run.next_batch = recording_next_batch
training.Run.log = recording_log
flux.PromptEncoder._encode = recording_encode
training.finish = recording_finish
module = importlib.import_module(sys.argv[1])
module.main(module.parse_args(sys.argv[2:]))
