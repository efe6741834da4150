"""Run a trainer's main() as it is, but its reward returns NaN for every image from step
`first_nan_step` on (tests/test_optim.py).

    accelerate launch ... tests/nan_reward_probe.py train_direct_align <first_nan_step> <trainer flags>
"""

import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flux_rl import args as common  # noqa: E402
from flux_rl import training  # noqa: E402

module_name, first_nan_step = sys.argv[1], int(sys.argv[2])
module = importlib.import_module(module_name)
original_setup, original_step = training.setup, module.training_step


def setup_with_nan_reward(args, method):
    run = original_setup(args, method)
    reward = run.reward

    def nan_reward(images, prompts):
        value, parts = reward(images, prompts)
        return (value * float("nan"), parts) if run.current_step >= first_nan_step else (value, parts)

    run.reward = nan_reward
    return run


def training_step_noting_the_step(run, step, logs):
    run.current_step = step
    original_step(run, step, logs)


training.setup = setup_with_nan_reward
module.training_step = training_step_noting_the_step
sys.argv = [sys.argv[0], *sys.argv[3:]]
common.run_cli(module.parse_args, module.main)  # as the script's own entry point: errors as it prints them
