"""A rank's failure reaches the user once, as one line, with the traceback kept under `<run_dir>/logs/`.

`sft launch` runs the torchrun agent quietly (`python -m launcher.launch.rankerrors ...`: torchrun's own
ChildFailedError report and per-rank failure logs are silenced) and gives each rank `SFT_ERROR_DIR`. A rank that
fails writes `rank<N>.json` (its one-line message, whether it is a user error) and `rank<N>.traceback` there and
prints nothing; after torchrun exits the launcher prints the earliest rank's line. Ranks started any other way
(torchrun, srun, deepspeed by hand) print their own line, as before.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ERROR_DIR_ENV = "SFT_ERROR_DIR"
AGENT_FILE = "agent.json"  # the torchrun agent's account of the ranks that failed


def one_line(e: BaseException) -> str:
    """The message of an exception on one line (multi-line messages are joined with '; ')."""
    text = str(e).strip() or type(e).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def record(e: BaseException, user: bool) -> bool:
    """Write this rank's error files if the launcher asked for them; True when written (then stay quiet)."""
    where = os.environ.get(ERROR_DIR_ENV)
    if not where:
        return False
    rank = os.environ.get("RANK", "0")
    out = Path(where)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tb = out / f"rank{rank}.traceback"
        tb.write_text("".join(traceback.format_exception(type(e), e, e.__traceback__)))
        info = {
            "rank": int(rank),
            "message": one_line(e),
            "user": user,
            "time": time.time(),
            "traceback": str(tb),
        }
        (out / f"rank{rank}.json").write_text(json.dumps(info))
    except OSError:
        return False
    return True


def first_error(where: Path) -> dict[str, Any] | None:
    """The earliest rank failure recorded in `where` (later ones are usually the others noticing it)."""
    errors = []
    for f in where.glob("rank*.json"):
        try:
            errors.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return min(errors, key=lambda x: (x["time"], x["rank"])) if errors else None


def lost_ranks(where: Path) -> list[str]:
    """Ranks that died without a word of their own (killed by a signal: SIGKILL, the OOM killer, a node lost),
    as `rank N (SIGKILL)`, from the agent's account."""
    try:
        ended = json.loads((where / AGENT_FILE).read_text())
    except (OSError, ValueError):
        return []
    spoke = {int(f.stem[4:]) for f in where.glob("rank*.json")}
    return [f"rank {e['rank']} ({e['signal']})" for e in ended if e["signal"] and e["rank"] not in spoke]


def run_agent(argv: list[str]) -> int:
    """torchrun's agent without its failure report: the ranks' own error files say what happened."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    for name in ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        where = os.environ.get(ERROR_DIR_ENV)
        if where:  # how each rank ended, for the launcher's one line (a killed rank writes nothing itself)
            ended = [
                {"rank": rank, "exitcode": f.exitcode, "signal": f.signal_name() if f.exitcode < 0 else ""}
                for rank, f in e.failures.items()
            ]
            Path(where).mkdir(parents=True, exist_ok=True)
            (Path(where) / AGENT_FILE).write_text(json.dumps(ended))
        return next((c for c in codes if c > 0), 1)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":  # `sft launch` sets the parent-death signal on this process before exec
    sys.exit(run_agent(sys.argv[1:]))
