"""Run a trainer's main() as it is, but one process sends itself a signal during one step, as
SLURM's scancel or a spot reclaim would (tests/test_preemption.py).

    accelerate launch ... tests/signal_probe.py train_direct_align SIGTERM <step> <rank> <trainer flags>
"""

import importlib
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

module_name, signal_name, signal_step, signal_rank = sys.argv[1:5]
module = importlib.import_module(module_name)
original_step = module.training_step


def training_step_with_signal(run, step, logs):
    if step == int(signal_step) and run.accelerator.process_index == int(signal_rank):
        os.kill(os.getpid(), getattr(signal, signal_name))  # arrives mid-step; the handler only takes note
    original_step(run, step, logs)


module.training_step = training_step_with_signal
module.main(module.parse_args(sys.argv[5:]))
