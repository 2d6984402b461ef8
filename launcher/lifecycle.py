"""A training job's lifecycle on a cluster, in one place: stop signals, the agreed stop, exit codes, requeue.

Slurm warns a job before its time limit (`sbatch --signal=USR1@N`) and signals it on preemption (SIGTERM, then
SIGKILL after the partition's GraceTime). A rank that receives SIGUSR1 or SIGTERM only notes it; at the next
step boundary every rank all-reduces its note (one collective), so all ranks agree to stop after the *same*
step and none is left waiting in a collective the others never enter. They save a checkpoint there and exit
with `EXIT_PREEMPTED`.

The requeue contract (used by `slurm/sft.sbatch` through `python -m launcher.lifecycle after-step <code>`):

| launcher exit code | meaning | the batch script |
|---|---|---|
| 0 (`EXIT_OK`) | the run finished | ends the job |
| 2 (`EXIT_USER_ERROR`) | a bad config or data, named on one line | ends the job (a retry would fail again) |
| 75 (`EXIT_PREEMPTED`, EX_TEMPFAIL) | stopped on a signal, checkpoint saved | `scontrol requeue`: the job runs again |
| anything else | a crash, a dead rank, a timeout | ends the job, failed |

A requeued job keeps its job id, so its run dir (`runs/slurm-<job id>`) and `train.resume=auto` find the
checkpoint; the metrics file is appended to and the wandb run continues under the id kept in the run dir.

`sft launch` (torchrun here) stops the same way on Ctrl-C, SIGTERM (a scheduler, `docker stop`) or SIGUSR1 sent to
it (`LaunchStop`): the agent runs in a session of its own, so the terminal's SIGINT reaches only the launcher, which
passes a SIGTERM to each rank: they agree on a step, save and exit with `EXIT_PREEMPTED`. A second signal ends
the ranks at once, without a checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75
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
        """Catch the stop signals (SIGUSR1's default action would kill the rank at once)."""
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


class LaunchStop:
    """`sft launch`'s side of a stop: the first SIGINT/SIGTERM/SIGUSR1 is passed on to the ranks as SIGTERM (a
    stop request, see `StopRequest`), a second kills the agent's session at once. Use as a context manager
    around waiting for the agent (started with `start_new_session=True`)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, agent: subprocess.Popen) -> None:
        self.agent = agent
        self.signame: str | None = None  # the first stop signal received
        self.forced = False  # a second one ended the ranks without a checkpoint
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> LaunchStop:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signame is None:
            self.signame = name
            ranks = child_pids(self.agent.pid)
            print(
                f"sft launch: {name}: the {len(ranks)} ranks stop after the current step and save a checkpoint "
                f"(send it again to stop at once, without one)",
                file=sys.stderr,
                flush=True,
            )
            for pid in ranks:
                _kill(pid, signal.SIGTERM)
            return
        self.forced = True
        print(f"sft launch: {name} again: ending the ranks now", file=sys.stderr, flush=True)
        try:  # the agent's session; its ranks die with it (PDEATHSIG)
            os.killpg(self.agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def child_pids(parent: int) -> list[int]:
    """The live processes whose parent is `parent` (Linux /proc): the ranks torchrun's agent started."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            # Fields after the command name (which may hold spaces and parentheses): state, ppid, ...
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                out.append(int(entry))
    return out


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def after_step(code: int, env: dict[str, str] | None = None) -> int:
    """What the batch script does once its srun step has exited with `code`; returns the job's exit code."""
    env = dict(os.environ) if env is None else env
    job = env.get("SLURM_JOB_ID")
    if code == EXIT_PREEMPTED and job:
        restarts = env.get("SLURM_RESTART_COUNT", "0")
        print(f"job {job}: stopped with a checkpoint (restart {restarts}): requeueing", flush=True)
        # The job is requeued under the same id: same run dir, and train.resume=auto picks up the checkpoint.
        # Our own process is ended by the requeue; a failure to requeue (not requeueable) fails the job.
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"job {job}: scontrol requeue failed: {proc.stderr.strip()}", file=sys.stderr, flush=True)
            return code
        return EXIT_OK
    if code == EXIT_OK:
        print(f"job {job}: the run finished", flush=True)
    elif code == EXIT_USER_ERROR:
        print(f"job {job}: a configuration or data error (above); not requeued", flush=True)
    else:
        print(f"job {job}: training failed with exit code {code}; not requeued", flush=True)
    return code


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "after-step" or not argv[1].lstrip("-").isdigit():
        print("usage: python -m launcher.lifecycle after-step <exit code>", file=sys.stderr)
        return 2
    return after_step(int(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
