"""Data stage: load -> template + assistant mask -> pack -> collate.

Stable API (external checks call these)::

    from launcher.data import encode_conversation, pack_examples, collate
"""

from launcher.data.loader import collate
from launcher.data.packing import pack_examples
from launcher.data.template import encode_conversation

__all__ = ["collate", "encode_conversation", "pack_examples"]
