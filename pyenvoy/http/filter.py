"""The HTTP filter interface (Envoy's ``envoy/http/filter.h``).

Strategy: filters are plain objects with synchronous callbacks. The connection manager
calls ``decode_*`` in chain order and ``encode_*`` in reverse order; a callback returns
CONTINUE to pass the frame on, or STOP_ITERATION to hold the chain at this filter until the
filter calls ``callbacks.continue_decoding()`` / ``continue_encoding()`` (for example after
an asynchronous side call finished). Anything asynchronous is started by the filter
(``loop.create_task``) and comes back through the callbacks.

Filters need not subclass these classes; they document the shape. A filter that only
decodes may omit ``encode_*`` methods and vice versa.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pyenvoy.http.headers import RequestHeaders, ResponseHeaders
    from pyenvoy.stream_info import StreamInfo

# Headers status
CONTINUE = 0
STOP_ITERATION = 1
# Data status
STOP_ITERATION_AND_BUFFER = 2
STOP_ITERATION_NO_BUFFER = 3


class DecoderFilterCallbacks(Protocol):
    """What the connection manager offers a decoder filter (ActiveStream implements it)."""

    stream_info: StreamInfo
    request_headers: RequestHeaders | None

    def route(self) -> Any: ...
    def clear_route_cache(self) -> None: ...
    def continue_decoding(self) -> None: ...
    def send_local_reply(
        self,
        status: int,
        body: str | bytes,
        details: str = "",
        flags: int = 0,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None: ...
    # Used by the terminal (router) filter to send the upstream response downstream:
    def encode_headers(self, headers: ResponseHeaders, end_stream: bool) -> None: ...
    def encode_data(self, data: bytes, end_stream: bool) -> None: ...
    def encode_trailers(self, trailers: Any) -> None: ...
    # Back-pressure both ways:
    def on_decoder_filter_above_write_buffer_high_watermark(self) -> None: ...
    def on_decoder_filter_below_write_buffer_low_watermark(self) -> None: ...
    def add_downstream_watermark_callbacks(self, cb: Any) -> None: ...
    def remove_downstream_watermark_callbacks(self, cb: Any) -> None: ...
    def reset_stream(self) -> None: ...


class EncoderFilterCallbacks(Protocol):
    stream_info: StreamInfo

    def continue_encoding(self) -> None: ...
    def route(self) -> Any: ...


class StreamDecoderFilter:
    """Base with pass-through defaults."""

    callbacks: Any = None

    def set_decoder_filter_callbacks(self, callbacks: DecoderFilterCallbacks) -> None:
        self.callbacks = callbacks

    def decode_headers(self, headers: RequestHeaders, end_stream: bool) -> int:
        return CONTINUE

    def decode_data(self, data: bytes, end_stream: bool) -> int:
        return CONTINUE

    def decode_trailers(self, trailers: Any) -> int:
        return CONTINUE

    def on_destroy(self) -> None:
        pass


class StreamEncoderFilter:
    encoder_callbacks: Any = None

    def set_encoder_filter_callbacks(self, callbacks: EncoderFilterCallbacks) -> None:
        self.encoder_callbacks = callbacks

    def encode_headers(self, headers: ResponseHeaders, end_stream: bool) -> int:
        return CONTINUE

    def encode_data(self, data: bytes, end_stream: bool) -> int:
        return CONTINUE

    def encode_trailers(self, trailers: Any) -> int:
        return CONTINUE

    def on_destroy(self) -> None:
        pass


class StreamFilter(StreamDecoderFilter, StreamEncoderFilter):
    pass
