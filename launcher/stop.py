"""A rank's side of a stop: SIGUSR1 (Slurm's warning before the time limit) or SIGTERM (preemption, `docker
stop`, `sft launch` passing on a Ctrl-C) is noted, and at the next step boundary every rank agrees to stop
after the same step, saves a checkpoint and exits with `launcher.errors.EXIT_PREEMPTED`.

    stop = STOP.install()                       # first thing in `sft train`
    if signame := stop.agreed(device): ...      # once per step boundary, on every rank (one all-reduce)

The launcher's side (passing signals on, requeueing) is `launcher.launch.lifecycle`.
"""

from __future__ import annotations

import signal
from typing import Any

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(Exception):
    """Every rank stopped after `step` on a signal; the checkpoint of that step is complete."""

    def __init__(self, step: int, signame: str):
        super().__init__(f"stopped on {signame} after step {step}; checkpoint saved")
        self.step = step


class StopRequest:
    """Notes SIGUSR1/SIGTERM; `agreed()` tells, on every rank at once, whether any rank got one."""

    def __init__(self) -> None:
        self.signame: str | None = None

    def install(self) -> StopRequest:
        """Catch the stop signals (SIGUSR1's default action would kill the rank at once). Idempotent: `sft
        train` installs the process's `STOP` first thing, so a request during start-up is kept, not fatal."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._note)
        return self

    def _note(self, signum: int, frame: Any) -> None:
        # Quiet here: a rank that torchrun SIGTERMs because another rank failed is about to die, and its word
        # would only add a line to that failure's. Rank 0 says it once the ranks have agreed (train loop).
        if self.signame is None:
            self.signame = signal.Signals(signum).name

    def agreed(self, device: Any) -> str | None:
        """Collective, once per step boundary: the signal's name if any rank was signalled, else None."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor(
            [0 if self.signame is None else signal.Signals[self.signame].value], device=device
        )
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return signal.Signals(int(flag.item())).name if int(flag.item()) else None


STOP = StopRequest()  # this process's; `sft train` installs it before its slow imports, train() reads it
