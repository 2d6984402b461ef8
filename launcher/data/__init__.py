"""Data stage: load -> template + assistant mask -> pack -> collate.

Stable API (external checks call these)::

    from launcher.data import encode_conversation, pack_examples, collate
"""

from typing import Any

from launcher.data.packing import pack_examples
from launcher.data.template import encode_conversation

__all__ = ["collate", "encode_conversation", "pack_examples"]


def __getattr__(name: str) -> Any:
    # `collate` (torch) is imported on first use: preparing data, and each of its worker processes, never
    # imports torch (about 2.4 s of start-up per process on the 2-core machine).
    if name == "collate":
        from launcher.data.loader import collate

        return collate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
