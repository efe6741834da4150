"""A stop signal (SIGTERM from SLURM or a spot reclaim, SIGUSR1 as a warning) costs no trained
step: the trainer finishes the step, writes a checkpoint and exits non-zero; resuming from it
ends where an uninterrupted run ends (this is also the single-process exact-resume test)."""

import glob
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from flux_rl.preemption import StopRequest
from tests.launch import launch, tiny_args

# As tests/test_train_direct_align.py's lora_run, whose final weights the resumed run must reach.
LORA_RUN_FLAGS = ["--num_injections", "2", "--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--rank", "4",
                  "--lora_alpha", "8", "--max_train_steps", "5"]


def test_signals_are_noted_and_the_previous_handlers_are_back_afterwards():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda number, frame: seen.append(number))
    try:
        stop = StopRequest()
        with stop.listening():
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.signal_number == signal.SIGUSR1 and seen == []  # noted, nothing else
            # Again, as a torchrun worker under SLURM gets SIGTERM from both: noted, the process lives on.
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signal_number == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGUSR1)
        assert seen == [signal.SIGUSR1]  # the handler from before is back
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_ctrl_c_stops_after_the_step_and_twice_at_once(capfd):
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever the test runner set
    try:
        stop = StopRequest()
        with stop.listening():
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal_number == signal.SIGINT  # noted: no KeyboardInterrupt mid-step
            assert "Ctrl-C: stopping after this step, with a checkpoint to resume from" in capfd.readouterr().err
            os.kill(os.getpid(), signal.SIGTERM)  # as torchrun passes it on to its workers after a Ctrl-C
            assert stop.signal_number == signal.SIGTERM
            with pytest.raises(KeyboardInterrupt):  # Ctrl-C again
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        with pytest.raises(KeyboardInterrupt):  # outside training, Ctrl-C is Python's own again
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_mid_step_saves_that_step_and_resume_matches(lora_run, tiny_models, tmp_path):
    output_dir = str(tmp_path / "stopped")
    result = launch("tests/signal_probe.py", ["train_direct_align", "SIGTERM", "2", "0"] + tiny_args(
        tiny_models, output_dir, *LORA_RUN_FLAGS, "--checkpointing_steps", "100"), expect_nonzero_exit=True)
    assert "SIGTERM received: stopped after step 3 of 5" in result.stderr
    assert "exit status 143" in result.stderr  # 128 + SIGTERM, passed up by accelerate's launcher
    assert [os.path.basename(p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*"))] == ["checkpoint-3"]
    assert not os.path.exists(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))  # not a finished run
    stopped = load_file(os.path.join(output_dir, "checkpoint-3", "pytorch_lora_weights.safetensors"))
    regular = load_file(os.path.join(lora_run, "checkpoint-3", "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(stopped[key], regular[key]) for key in regular)  # the signal changed nothing in step 3

    launch("train_direct_align.py", tiny_args(tiny_models, output_dir, *LORA_RUN_FLAGS, "--resume_from_checkpoint", "latest",
                                              "--validation_prompt", "a cat"))
    # A resumed run renders no step-0 image (that was the untrained model), only its final one.
    assert os.listdir(os.path.join(output_dir, "validation")) == ["step-000005.png"]
    uninterrupted = load_file(os.path.join(lora_run, "pytorch_lora_weights.safetensors"))
    resumed = load_file(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
    assert uninterrupted.keys() == resumed.keys()
    assert any(not torch.equal(stopped[key], uninterrupted[key]) for key in uninterrupted)  # steps 4-5 moved it on
    for key in uninterrupted:
        assert torch.allclose(uninterrupted[key], resumed[key], atol=1e-7), key


def test_signal_to_one_process_stops_both_after_the_same_step(tiny_models, tmp_path):
    """SIGUSR1 to rank 1 only: rank 0 learns of it through the step's all-reduce, and both take
    part in the checkpoint (each rank's RNG state is in it)."""
    output_dir = str(tmp_path / "ddp-stopped")
    result = launch("tests/signal_probe.py", ["train_srpo_flux", "SIGUSR1", "0", "1"] + tiny_args(
        tiny_models, output_dir, "--max_train_steps", "3", "--rank", "4", "--checkpointing_steps", "100"),
        num_processes=2, expect_nonzero_exit=True)
    assert "SIGUSR1 received: stopped after step 1 of 3" in result.stderr
    checkpoint = os.path.join(output_dir, "checkpoint-1")
    assert [os.path.basename(p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*"))] == ["checkpoint-1"]
    assert {"random_states_0.pkl", "random_states_1.pkl", "training_state.json"} <= set(os.listdir(checkpoint))
    assert not os.path.exists(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))


def test_ctrl_c_mid_step_saves_that_step(tiny_models, tmp_path):
    output_dir = str(tmp_path / "interrupted")
    result = launch("tests/signal_probe.py", ["train_direct_align", "SIGINT", "1", "0"] + tiny_args(
        tiny_models, output_dir, "--rank", "4", "--max_train_steps", "3", "--checkpointing_steps", "100"), expect_nonzero_exit=True)
    assert "Ctrl-C: stopping after this step, with a checkpoint to resume from" in result.stderr
    assert "SIGINT received: stopped after step 2 of 3" in result.stderr
    assert "exit status 130" in result.stderr  # 128 + SIGINT, as a shell reports a Ctrl-C
    assert os.listdir(output_dir).count("checkpoint-2") == 1 and not os.path.exists(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))


def test_sigterm_to_the_script_started_workers_stops_them_with_a_checkpoint(tiny_models, tmp_path):
    """`python train_srpo_flux.py --num_processes 2` as a scheduler stops it: SIGTERM to the process it started
    is passed on to both workers, which finish their step, write a checkpoint and exit; the run's status is 143."""
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import REPO_ROOT
    from tests.launch import LAUNCH_TIMEOUT, free_port

    output_dir = tmp_path / "stopped"
    command = [sys.executable, "train_srpo_flux.py", *tiny_args(tiny_models, str(output_dir), "--max_train_steps", "100000",
                                                                  "--rank", "4", "--checkpointing_steps", "1",
                                                                  "--checkpoints_total_limit", "1", "--report_to", "none"),
               "--num_processes", "2", "--main_process_port", str(free_port())]
    run = subprocess.Popen(command, cwd=REPO_ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.time()
    while not glob.glob(str(output_dir / "checkpoint-*")):  # training is under way: the handlers are in place
        assert run.poll() is None and time.time() - started < LAUNCH_TIMEOUT, run.communicate()[1][-3000:]
        time.sleep(0.2)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=LAUNCH_TIMEOUT)
    assert run.returncode == 143, stderr[-3000:]
    assert "SIGTERM received: stopped after step" in stderr
    (checkpoint,) = glob.glob(str(output_dir / "checkpoint-*"))
    assert {"random_states_0.pkl", "random_states_1.pkl", "training_state.json"} <= set(os.listdir(checkpoint))


def test_a_signal_passed_on_keeps_every_workers_output(tmp_path, capfd):
    """The script-started launcher (flux_rl.launcher.run_workers) passes SIGTERM on; a worker's 143 is then no failure,
    so the output of a worker that exits later is kept: rank 0 says where the run stopped, and rank 1 may be out first.
    (Before, the first worker out counted as the failed one and only its output was relayed.)"""
    import signal
    import sys
    import threading
    import time

    from flux_rl import launcher

    worker = tmp_path / "worker.py"
    worker.write_text(
        "import os, signal, sys, time\n"
        "def stop(number, frame):\n"
        "    if os.environ['RANK'] == '0':  # the main process finishes its step and checkpoint later\n"
        "        time.sleep(0.5)\n"
        "        print('rank 0: SIGTERM received: stopped after step 7', file=sys.stderr, flush=True)\n"
        "    sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, stop)\n"
        "open(os.path.join(sys.argv[1], 'ready-' + os.environ['RANK']), 'w').close()\n"
        "time.sleep(60)\n")

    def signal_once_both_are_ready():
        while not all((tmp_path / f"ready-{rank}").exists() for rank in range(2)):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # handled in the main thread, by run_workers' handler

    threading.Thread(target=signal_once_both_are_ready, daemon=True).start()
    started = time.monotonic()
    status = launcher.run_workers(dict(os.environ), 2, [str(worker), str(tmp_path)])
    assert status == 143 and time.monotonic() - started < 30
    assert "rank 0: SIGTERM received: stopped after step 7" in capfd.readouterr().err
