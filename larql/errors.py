"""The root of every error larql raises on purpose (`larql.LarqlError`).

The command line reports any LarqlError in one line and exits non-zero; a traceback means a
bug (or `--debug`). Each module keeps its own subclasses next to the code that raises them:
ProtocolError/RemoteError (protocol.py), ShardError/BadReply (client/core.py), ShardSpecError (shardmap.py),
KernelError (kernels.py), VindexError (vindex/), AuthError (transport.py).
"""

from __future__ import annotations


class LarqlError(Exception):
    """An expected failure with a message meant for the user."""
