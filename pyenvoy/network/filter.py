"""The network (L4) filter interface (Envoy's ``envoy/network/filter.h``).

Strategy: a connection runs its read filters in order on every chunk read; a filter
returns CONTINUE to pass the data on, or STOP_ITERATION to keep it. Terminal filters
(``tcp_proxy``, ``http_connection_manager``) consume the data and return STOP_ITERATION.
A filter learns of close and write back-pressure through ``ConnectionCallbacks``
registered with ``connection.add_connection_callbacks``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pyenvoy.network.connection import Connection

CONTINUE = 0
STOP_ITERATION = 1

# Connection events
REMOTE_CLOSE = "RemoteClose"
LOCAL_CLOSE = "LocalClose"
CONNECTED = "Connected"


class ReadFilter:
    connection: Connection

    def initialize_read_filter_callbacks(self, connection: Connection) -> None:
        self.connection = connection

    def on_new_connection(self) -> int:
        return CONTINUE

    def on_data(self, data: bytes, end_stream: bool) -> int:
        return CONTINUE


class ConnectionCallbacks(Protocol):
    def on_event(self, event: str) -> None: ...
    def on_above_write_buffer_high_watermark(self) -> None: ...
    def on_below_write_buffer_low_watermark(self) -> None: ...
