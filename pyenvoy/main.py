"""Process lifecycle: signals, the event loop, (later) hot restart and worker processes.

Strategy: ``run_process`` owns everything that is about the OS process rather than one
config snapshot: it installs uvloop, builds and starts a ``Server``, turns SIGTERM/SIGINT
into a graceful stop, and returns the exit code. ``pyenvoy.server`` stays about a single
server instance, so embedding (pyenvoy.embed) never touches process-wide state.
"""

from __future__ import annotations

import asyncio
import gc
import signal
from typing import TYPE_CHECKING

from pyenvoy.server import Server

if TYPE_CHECKING:
    from envoy.config.bootstrap.v3.bootstrap_pb2 import Bootstrap

    from pyenvoy.options import ServerOptions


async def _serve(options: ServerOptions, bootstrap: Bootstrap) -> int:
    server = Server(bootstrap, options)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, server.shutdown)
        except (NotImplementedError, RuntimeError):
            pass
    await server.start()
    if getattr(options, "mode", "serve") == "init_only":
        await server.stop(0)
        return 0
    # The config objects live as long as the process: keep the collector off them.
    gc.collect()
    gc.freeze()
    await server.wait_closed()
    return 0


def run_process(options: ServerOptions, bootstrap: Bootstrap) -> int:
    """Run a server until it is told to stop; returns the process exit code."""
    import uvloop

    try:
        return uvloop.run(_serve(options, bootstrap))
    except KeyboardInterrupt:
        return 0
