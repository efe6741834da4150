"""Stopping when the job is told to, without losing the steps since the last checkpoint.

SIGTERM is what SLURM (scancel, the time limit), Kubernetes and spot-instance reclaims send;
SIGUSR1 is the early warning of `sbatch --signal=USR1@300`. The handler only notes the signal:
the trainer finishes the step it is in, writes a checkpoint like any other, and exits with
status 128 + the signal's number (143 for SIGTERM), so that a job script can tell a stop from a
finished run and start again with `--resume_from_checkpoint latest`.

A second signal is noted like the first, not taken as "end now": under SLURM a multi-GPU job's
workers get SIGTERM twice, once from SLURM and once passed on by the launcher (torchrun), within
milliseconds. Ctrl-C (SIGINT) is a stop request too (exit status 130), so that stopping a run by
hand keeps its steps; pressed a second time it interrupts at once. SIGKILL ends anything.
"""

import contextlib
import signal
import sys
import threading

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    def __init__(self):
        self.signal_number = None
        self.interrupted = False  # a Ctrl-C came (a SIGTERM from the launcher may have come since)
        self._previous = {}

    def _note(self, signal_number, frame):
        if signal_number == signal.SIGINT:
            if self.interrupted:
                raise KeyboardInterrupt  # Ctrl-C again: the user does not want to wait for the step
            self.interrupted = True
            print("\nCtrl-C: stopping after this step, with a checkpoint to resume from (Ctrl-C again: stop at once, "
                  "losing the step)", file=sys.stderr, flush=True)
        self.signal_number = signal_number

    @contextlib.contextmanager
    def listening(self):
        """Notes STOP_SIGNALS while the block runs; the previous handlers are back afterwards.
        Python takes signal handlers on the main thread only; elsewhere nothing is installed."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for number in STOP_SIGNALS:
            previous = signal.signal(number, self._note)
            self._previous[number] = signal.SIG_DFL if previous is None else previous
        try:
            yield self
        finally:
            for number, previous in self._previous.items():
                signal.signal(number, previous)

    def agreed(self, accelerator) -> int | None:
        """The signal if any process got one. Every process must stop after the same step (the
        checkpoint is a collective), and a launcher or scheduler may signal only some of them.
        One process: no collective, so no wait on the device."""
        if accelerator.num_processes == 1:
            return self.signal_number
        flag = torch.tensor([self.signal_number or 0], device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="max").item()) or None
