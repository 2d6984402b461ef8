"""The `sft` entry point (`sft = launcher.cli:main`; `python -m launcher.cli ...` under torchrun, deepspeed, srun).

The commands live in `launcher/launch/`: the table and dispatch in `cli.py`, their bodies in `commands.py`.
"""

import sys

from launcher.launch.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
