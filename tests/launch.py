"""Run a training script through `accelerate launch` on the CPU, as a user would."""

import os
import socket
import subprocess
import sys

from tests.conftest import REPO_ROOT


# A launched run is killed after this long: a hung collective must not hold CI to its 90 minutes, yet a loaded
# machine (one run of the whole suite took 44 min on one) must not fail a run that is merely slow.
# FLUX_RL_TEST_TIMEOUT raises it further.
LAUNCH_TIMEOUT = float(os.environ.get("FLUX_RL_TEST_TIMEOUT", 1200))


def launch(script: str, args: list[str], num_processes: int = 1, timeout: float = LAUNCH_TIMEOUT, fsdp: bool = False,
           expect_nonzero_exit: bool = False) -> subprocess.CompletedProcess:
    """`fsdp`: launch with configs/accelerate/fsdp.yaml as shipped (bar the process count and
    precision), through tests/fsdp_on_cpu.py, which lets accelerate use FSDP without a GPU.
    `expect_nonzero_exit`: the run should end with a non-zero status, as a stopped run does
    (accelerate's launchers turn a process's own status into 1)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT)
    if fsdp:
        env["ACCELERATE_USE_CPU"] = "1"
        launcher = ["--config_file", os.path.join(REPO_ROOT, "configs", "accelerate", "fsdp.yaml"), "--num_processes", str(num_processes)]
        args = [os.path.join(REPO_ROOT, script), *args]
        script = os.path.join("tests", "fsdp_on_cpu.py")
    elif num_processes == 1:
        launcher = ["--cpu", "--num_processes", "1"]
    else:
        # `--cpu --num_processes 2` silently runs one process; this runs two over gloo.
        env["ACCELERATE_USE_CPU"] = "1"
        launcher = ["--multi_gpu", "--num_processes", str(num_processes)]
    if num_processes > 1:  # pytest-xdist's workers may launch at the same time: not both on torch's default port
        launcher += ["--main_process_port", str(free_port())]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
               os.path.join(REPO_ROOT, script), *args]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_nonzero_exit:
        assert result.returncode != 0, f"{script} should have ended with a non-zero status:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    else:
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_args(tiny_models: str, output_dir: str, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", os.path.join(tiny_models, "flux"),
        "--reward_models_dir", os.path.join(tiny_models, "rewards"),
        "--resolution", "64", "--num_inference_steps", "3", "--max_sequence_length", "32",
        "--learning_rate", "1e-3", "--max_grad_norm", "1.0", "--output_dir", output_dir, "--seed", "7", *extra,
    ]
