"""Run a script under FSDP on the CPU, as `accelerate launch --config_file configs/accelerate/fsdp.yaml`
would on GPUs:

    ACCELERATE_USE_CPU=1 accelerate launch --config_file configs/accelerate/fsdp.yaml ... tests/fsdp_on_cpu.py <script> <args>

torch's FSDP2 runs on the CPU over gloo, but accelerate (1.15) refuses: with no accelerator it
decides the run is plain multi-CPU data parallel and never wraps the model with FSDP. This lifts
that one decision, keeping everything else accelerate does under FSDP (wrapping, sharded
checkpoints, gathered state dicts), so the trainers' FSDP code paths run in CI."""

import runpy
import sys

import torch
from accelerate import state
from accelerate.utils import DistributedType

_accelerator_state_init = state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _accelerator_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Both shared states: AcceleratorState is re-created from PartialState's later on.
        for shared in (state.PartialState._shared_state, state.AcceleratorState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
            shared["device"] = torch.device("cpu")  # FSDP compares devices without the index
        if self.mixed_precision != "no":  # what accelerate does for FSDP on a GPU
            fsdp_plugin.set_mixed_precision(self.mixed_precision)
        self.fsdp_plugin = fsdp_plugin


state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    script, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
