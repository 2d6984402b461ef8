"""`sft launch`'s ranks: torchrun started here, supervised until it ends, its outcome said on one line.

    code = run_ranks(overrides, nproc=2, run_dir=Path("runs/x"))

The torchrun agent runs in a session of its own (Ctrl-C in the terminal reaches only the launcher, which turns it
into an agreed stop: `launcher.launch.lifecycle.LaunchStop`) and dies with the launcher however the launcher dies
(`die_with_parent`). A rank's error is printed once, from the files the ranks write (`launcher.launch.rankerrors`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from launcher.errors import EXIT_BUG, EXIT_OK, EXIT_PREEMPTED, EXIT_USER
from launcher.launch import lifecycle
from launcher.launch.rankerrors import ERROR_DIR_ENV, first_error, lost_ranks


def run_ranks(args: list[str], nproc: int, run_dir: Path) -> int:
    """Start `sft train <args>` on `nproc` local ranks under torchrun and wait; the launcher's exit code."""
    import torch

    errors = run_dir / "logs" / "errors"
    shutil.rmtree(errors, ignore_errors=True)  # a previous attempt's errors are not this one's
    env = {**os.environ, ERROR_DIR_ENV: str(errors)}
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // nproc)))
    cmd = [
        sys.executable,
        "-m",
        "launcher.launch.rankerrors",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "launcher.cli",
        "train",
        *args,
    ]
    print("launching:", " ".join(cmd), flush=True)
    t0 = time.time()
    me = os.getpid()
    # A session of its own: Ctrl-C in the terminal reaches only this process, which turns it into an agreed stop.
    with lifecycle.LaunchStop() as stop:
        code = stop.wait(
            subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=lambda: die_with_parent(me))
        )
    if stop.signame or code == EXIT_PREEMPTED:  # the ranks may have been signalled directly
        return stopped(stop, code, run_dir, args, nproc)
    if not code:  # on success rank 0's `run_dir:` stays the last line
        return EXIT_OK
    err, lost = first_error(errors), lost_ranks(errors)
    took = f"after {time.time() - t0:.1f}s"
    if lost:  # a rank killed outright says nothing; the others only see a broken or timed-out collective
        then = f"; then rank {err['rank']}: {err['message']}" if err else ""
        print(f"error: {', '.join(lost)} died {took} and the job ended{then}", file=sys.stderr)
        return EXIT_BUG
    if err is None:
        print(f"error: launch failed {took} with exit code {code}", file=sys.stderr)
        return EXIT_BUG
    kind = "error" if err["user"] else "internal error"
    print(f"{kind} (rank {err['rank']}): {err['message']} [traceback: {err['traceback']}]", file=sys.stderr)
    return EXIT_USER if err["user"] else EXIT_BUG


def stopped(stop: lifecycle.LaunchStop, code: int, run_dir: Path, args: list[str], nproc: int) -> int:
    """The launcher's one line after a stop: where the run can resume from, and how. Exit code: EXIT_PREEMPTED
    when the ranks agreed on a step and saved it, 128 + the signal when they were ended before."""
    from launcher.checkpoint import newest_complete

    if code == 0:  # the run finished before the ranks saw the request
        return EXIT_OK
    ckpt, _ = newest_complete(run_dir / "checkpoints")
    kept = [a for a in args if not a.lstrip("+").startswith("train.resume=")]
    resume = (
        f"resume with: {shlex.join(['sft', 'launch', '--nproc', str(nproc), *kept, 'train.resume=auto'])}"
    )
    name = stop.signame or "a signal to the ranks"
    if code == EXIT_PREEMPTED and not stop.forced and ckpt is not None:
        lifecycle.tell(f"stopped on {name}: checkpoint {ckpt} saved; {resume}")
        return EXIT_PREEMPTED
    when = (
        "at once, on a second signal" if stop.forced else f"before a checkpoint was saved (exit code {code})"
    )
    then = f"the newest complete checkpoint is {ckpt}; {resume}" if ckpt else f"no checkpoint in {run_dir}"
    lifecycle.tell(f"stopped on {name} {when}: {then}")
    return 128 + signal.Signals[stop.signame].value if stop.signame else code


def die_with_parent(parent: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies, however the parent dies (Linux).

    `sft launch` -> torchrun agent -> ranks: torchrun starts each rank in a session of its own, so a SIGKILL to
    the launcher or the agent (a preemption, an OOM kill, `kill -9`) would leave the agent and the ranks running
    as orphans that hold the GPUs and go on writing checkpoints. Cheap enough to run between fork and exec.
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if parent is None else parent
    _PRCTL(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG = 1, SIGKILL = 9
    if os.getppid() != parent:  # the parent died before the request was in place
        os._exit(1)


def _load_prctl():
    import ctypes

    # Looked up once, in the parent: the forked child of `sft launch` only calls it.
    return ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


_PRCTL = _load_prctl()
