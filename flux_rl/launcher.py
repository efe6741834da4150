"""`python train_srpo_flux.py --num_processes 8 ...`: the script starts its own worker processes,
as `accelerate launch` (torchrun) would on one machine, after its flags were checked in this one
process. A mistake is then one line and exit status 2 whatever the process count: under
`accelerate launch` each worker finds it and the launcher adds a traceback of its own
(CalledProcessError, or torch's ChildFailedError banner with the whole command line).

The workers' environment is accelerate's own (its config file, e.g. configs/accelerate/fsdp.yaml,
and its defaults), built by accelerate's launch code; the processes are started here, so that
their exit statuses and their error lines reach the user unchanged and once."""

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

# Set in the workers: they run the script, they do not launch it again.
WORKER_MARK = "FLUX_RL_WORKER"
# How long workers still running get to finish (a checkpoint on SIGTERM) once another one failed.
GRACE_SECONDS = 30


def add_launch_args(parser: argparse.ArgumentParser):
    a = parser.add_argument
    a("--num_processes", type=int, default=None,
      help="Start this many worker processes (one per GPU) from this one, after the flags are checked here: "
           "`python train_srpo_flux.py --num_processes 8 ...` is `accelerate launch --num_processes 8 train_srpo_flux.py ...` "
           "with one-line errors. Default: one process, or what --accelerate_config says.")
    a("--accelerate_config", type=str, default=None,
      help="accelerate config file for the workers (e.g. configs/accelerate/fsdp.yaml, configs/accelerate/ddp.yaml), "
           "read by accelerate's own launch code. Several machines: use `accelerate launch` on each.")
    a("--main_process_port", type=int, default=None, help="Port of the workers' rendezvous (default: a free one).")
    return parser


def launch_request(argv: list[str]) -> argparse.Namespace | None:
    """The launch flags of a command line, read before anything else (so that the workers'
    environment, FSDP or not, is in place when the other flags are checked); None when this
    process runs the script itself: no launch flag, or a worker already."""
    if os.environ.get(WORKER_MARK) or "LOCAL_RANK" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ:
        return None  # started by this launcher, or by accelerate launch / torchrun, whose flags decide
    parser = add_launch_args(argparse.ArgumentParser(add_help=False))
    parser.add_argument("--mixed_precision", default=None)
    request, _ = parser.parse_known_args(argv)
    if request.num_processes is None and request.accelerate_config is None:
        return None
    return request


def worker_environment(request: argparse.Namespace) -> tuple[dict[str, str], int]:
    """accelerate's environment for the workers (ACCELERATE_*, FSDP_*, master port) and their count.
    Raises ValueError (a one-line error) for what this launcher does not do."""
    import torch
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    if request.num_processes is not None and request.num_processes < 1:
        raise ValueError(f"--num_processes must be at least 1, got {request.num_processes}")
    if request.accelerate_config is not None and not os.path.isfile(request.accelerate_config):
        raise ValueError(f"--accelerate_config {request.accelerate_config}: no such file (e.g. configs/accelerate/ddp.yaml)")
    flags = ["--main_process_port", str(request.main_process_port or 0)]
    if request.accelerate_config:
        flags += ["--config_file", request.accelerate_config]
    else:  # every value given, so accelerate prints no "values were not passed" notice
        flags += ["--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", request.mixed_precision or "no"]
    if request.num_processes is not None:
        flags += ["--num_processes", str(request.num_processes)]
    if request.accelerate_config is None and (request.num_processes or 1) > 1:
        flags += ["--multi_gpu"]
    try:
        launch_args, _, _ = _validate_launch_command(launch_command_parser().parse_args([*flags, "script.py"]))
    except (ValueError, OSError, TypeError, KeyError) as error:
        raise ValueError(f"--accelerate_config {request.accelerate_config}: accelerate does not read it ({error})") from None
    if launch_args.num_machines > 1:
        raise ValueError(f"--accelerate_config {request.accelerate_config} spans {launch_args.num_machines} machines; "
                         "start each machine's share with `accelerate launch` instead")
    if launch_args.use_deepspeed:
        raise ValueError(f"--accelerate_config {request.accelerate_config} asks for DeepSpeed, which these trainers do not use; "
                         "use configs/accelerate/ddp.yaml or fsdp.yaml")
    count = launch_args.num_processes or 1
    launch_args.mixed_precision = launch_args.mixed_precision or "no"
    if count > 1 or launch_args.use_fsdp:
        environment = prepare_multi_gpu_env(launch_args)
        environment["MASTER_PORT"] = str(launch_args.main_process_port)
    else:
        _, environment = prepare_simple_launcher_cmd_env(launch_args)
    if not torch.cuda.is_available():  # accelerate's `--cpu` runs one process: this runs `count` over gloo
        environment["ACCELERATE_USE_CPU"] = "1"
    if count > 1 and "OMP_NUM_THREADS" not in os.environ:  # as torchrun: the workers share the cores
        environment["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // count))
    return environment, count


def run_workers(environment: dict[str, str], count: int, argv: list[str]) -> int:
    """Runs `python <argv>` in `count` processes (RANK, LOCAL_RANK, WORLD_SIZE as torchrun sets them)
    and returns the exit status of the run: 0, or the status of the worker that failed first. Their
    output is passed on a second late; once a worker fails, only its own output is, not the others'
    tracebacks about a peer that went away, so a mistake reads as the failing worker's one line.
    SIGTERM and SIGUSR1 are passed on (the workers checkpoint and stop); Ctrl-C reaches them from
    the terminal itself."""
    workers = []
    for rank in range(count):
        worker_env = dict(environment, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(count), LOCAL_WORLD_SIZE=str(count),
                          GROUP_RANK="0", MASTER_ADDR=environment.get("MASTER_ADDR", "127.0.0.1"), **{WORKER_MARK: "1"})
        worker_env.setdefault("MASTER_PORT", "29500")
        piped = subprocess.PIPE if count > 1 else None
        workers.append(subprocess.Popen([sys.executable, *argv], env=worker_env, stdout=piped, stderr=piped))
    relay = _DelayedRelay(workers if count > 1 else [])
    exits = []  # workers in the order they exited, each noted by its own thread the moment it did

    def note_exit(worker):
        worker.wait()
        with relay.lock:
            exits.append(worker)

    waiters = [threading.Thread(target=note_exit, args=(worker,), daemon=True) for worker in workers]
    for waiter in waiters:
        waiter.start()

    signalled = []  # signals passed on: the workers then stop one by one, each with its status, and none has failed

    def pass_on(number, frame):
        signalled.append(number)
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(number)

    previous = {number: signal.signal(number, pass_on) for number in (signal.SIGTERM, signal.SIGUSR1)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the workers take Ctrl-C and stop after their step
    try:
        failed = _wait(workers, waiters, exits, relay, signalled)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    relay.finish()
    if failed is None:
        return 0
    return failed.returncode if failed.returncode > 0 else 128 - failed.returncode


class _DelayedRelay:
    """Passes the workers' stdout and stderr on, DELAY seconds late, in the order they were read,
    until one fails; from then on only that worker's output (what the others had written in the
    second before is dropped)."""

    DELAY = 1.0

    def __init__(self, workers):
        self.pending = []  # (time read, worker, bytes, where they go)
        self.lock = threading.Lock()
        self.only = None  # the failed worker, once known
        self.readers = [threading.Thread(target=self._read, args=(worker, stream, target), daemon=True) for worker in workers
                        for stream, target in ((worker.stdout, sys.stdout), (worker.stderr, sys.stderr))]
        for reader in self.readers:
            reader.start()

    def _read(self, worker, stream, target):
        while chunk := os.read(stream.fileno(), 65536):
            with self.lock:
                self.pending.append((time.monotonic(), worker, chunk, target))

    def flush(self, failed=None, everything=False):
        with self.lock:
            if failed is not None and self.only is None:
                self.only = failed
            now, kept = time.monotonic(), []
            for entry in self.pending:
                read_at, worker, chunk, target = entry
                if self.only is not None and worker is not self.only:
                    continue
                if everything or self.only is not None or now - read_at >= self.DELAY:
                    target.flush()
                    target.buffer.write(chunk)
                    target.buffer.flush()
                else:
                    kept.append(entry)
            self.pending = kept

    def finish(self):
        for reader in self.readers:
            reader.join(timeout=5)
        self.flush(everything=True)


def _wait(workers, waiters, exits: list, relay: _DelayedRelay, signalled: list) -> subprocess.Popen | None:
    """Waits for every worker; once one fails, the others are asked to stop (SIGTERM) and killed
    GRACE_SECONDS later. Returns the first worker to exit with a failure (not one that failed
    because a peer had gone), or None. Once a signal was passed on (`signalled`), a worker's exit
    status (143 after SIGTERM) is no failure: every worker's output is kept (rank 0 says where it
    stopped, and may exit after rank 1), and the first non-zero status is the run's."""
    failed, deadline = None, None
    while any(waiter.is_alive() for waiter in waiters):
        if failed is None and not signalled:
            with relay.lock:
                failed = next((w for w in exits if w.returncode != 0), None)
            if failed is not None:
                relay.flush(failed)
                deadline = time.monotonic() + GRACE_SECONDS
                for worker in workers:
                    if worker.poll() is None:
                        worker.terminate()
        elif failed is not None and time.monotonic() > deadline:
            for worker in workers:
                if worker.poll() is None:
                    worker.kill()
        relay.flush()
        time.sleep(0.05)
    failed = failed or next((w for w in exits if w.returncode != 0), None)
    relay.flush(None if signalled else failed)
    return failed
