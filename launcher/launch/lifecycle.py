"""A training job's lifecycle on a cluster: stop signals, the agreed stop, requeue. The ranks' side (noting a
signal, agreeing on a step) is `launcher.stop`; the exit codes are `launcher.errors`'.

Slurm warns a job before its time limit (`sbatch --signal=USR1@N`) and signals it on preemption (SIGTERM, then
SIGKILL after the partition's GraceTime). A rank that receives SIGUSR1 or SIGTERM only notes it; at the next
step boundary every rank all-reduces its note (one collective), so all ranks agree to stop after the *same*
step and none is left waiting in a collective the others never enter. They save a checkpoint there and exit
with `EXIT_PREEMPTED`.

The requeue contract (used by `slurm/sft.sbatch` through `python -m launcher.launch.lifecycle after-step <code>`):

| launcher exit code | meaning | the batch script |
|---|---|---|
| 0 (`EXIT_OK`) | the run finished | ends the job |
| 2 (`EXIT_USER`) | a bad config or data, named on one line | ends the job (a retry would fail again) |
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

from launcher.errors import EXIT_OK, EXIT_PREEMPTED, EXIT_USER


class LaunchStop:
    """`sft launch`'s side of a stop: the first SIGINT/SIGTERM/SIGUSR1 is passed on to the ranks as SIGTERM (a
    stop request, see `StopRequest`), also to ranks the agent starts later; a second signal kills the agent's
    session at once. The handlers are in place before the agent starts:

        with LaunchStop() as stop:
            code = stop.wait(subprocess.Popen(..., start_new_session=True))
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.agent: subprocess.Popen | None = None
        self.signame: str | None = None  # the first stop signal received
        self.forced = False  # a second one ended the ranks without a checkpoint
        self.asked: set[int] = set()  # ranks sent the stop request
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> LaunchStop:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def wait(self, agent: subprocess.Popen) -> int:
        """The agent's exit code; meanwhile a pending stop request reaches every rank it starts."""
        self.agent = agent
        while True:
            if self.signame and not self.forced:
                self._forward()
            try:
                return agent.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass

    def _forward(self) -> None:
        if self.agent is None:  # a signal before the agent started: wait() forwards it
            return
        for pid in child_pids(self.agent.pid):
            # Only a rank that already catches SIGTERM (its StopRequest is installed first thing): one still
            # starting would be killed by it; wait() asks it again on its next round.
            if pid not in self.asked and catches(pid, signal.SIGTERM):
                self.asked.add(pid)
                _kill(pid, signal.SIGTERM)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Act first, then say it: the terminal's Ctrl-C may also have ended the reader of our output (`| tee`).
        name = signal.Signals(signum).name
        if self.signame is None:
            self.signame = name
            self._forward()
            tell(
                f"sft launch: {name}: the ranks stop after the current step and save a checkpoint (send it again "
                "to stop at once, without one)"
            )
            return
        if self.forced:
            return
        self.forced = True
        if self.agent is not None:
            try:  # the agent's session; its ranks die with it (PDEATHSIG)
                os.killpg(self.agent.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        tell(f"sft launch: {name} again: ending the ranks now")


def tell(line: str) -> None:
    """A line on stderr that never raises: its reader may be gone, or this may interrupt another print."""
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, RuntimeError, ValueError):
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


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (the SigCgt mask in /proc/<pid>/status)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except OSError:
        pass
    return False


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


class _Survivor:
    """A text stream whose reader may go away (`sft launch ... | tee log`, and Ctrl-C ends tee): output is then
    dropped rather than raising into training, so the stop the signal asked for still happens."""

    def __init__(self, stream: Any) -> None:
        self._stream, self._closed = stream, False

    def write(self, text: str) -> int:
        if not self._closed:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._close()
        return len(text)

    def flush(self) -> None:
        if not self._closed:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._close()

    def _close(self) -> None:
        # What is still buffered goes to /dev/null at exit instead of failing there (exit status 120).
        self._closed = True
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def survive_closed_output() -> None:
    """Keep running when stdout's or stderr's reader is gone (see `_Survivor`)."""
    if not isinstance(sys.stdout, _Survivor):
        sys.stdout, sys.stderr = _Survivor(sys.stdout), _Survivor(sys.stderr)


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
    elif code == EXIT_USER:
        print(f"job {job}: a configuration or data error (above); not requeued", flush=True)
    else:
        print(f"job {job}: training failed with exit code {code}; not requeued", flush=True)
    return code


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "after-step" or not argv[1].lstrip("-").isdigit():
        print("usage: python -m launcher.launch.lifecycle after-step <exit code>", file=sys.stderr)
        return 2
    return after_step(int(argv[1]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
