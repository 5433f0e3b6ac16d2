"""The %COMMAND% substitution formatter against what real Envoy 1.40 printed.

Expected strings marked "observed" come from running real Envoy with a file access log using
the same format strings (see the route-table task report).
"""

from __future__ import annotations

import socket

import pytest

from pyenvoy import stream_info as sinfo
from pyenvoy.config.errors import ConfigError
from pyenvoy.formatter import DEFAULT_ACCESS_LOG_FORMAT, compile_format, format_response_flags_long
from pyenvoy.http.headers import HeaderMap, RequestHeaders, ResponseHeaders
from pyenvoy.stream_info import StreamInfo

START = 1795313804.134353  # 2026-11-22T02:16:44.134353Z


def make_info() -> StreamInfo:
    si = StreamInfo(("127.0.0.1", 46678), ("127.0.0.1", 56671), "HTTP/1.1")
    si.start_time = START
    si.start_monotonic = 100.0
    return si


def make_request() -> RequestHeaders:
    return RequestHeaders(
        b"GET",
        b"/new/a?b",
        b"foo.com",
        b"http",
        [
            [b"user-agent", b"agent/1.0"],
            [b"x-envoy-original-path", b"/rw/a?b"],
            [b"x-request-id", b"rid"],
            [b"x-forwarded-for", b"1.2.3.4"],
        ],
    )


def test_default_format_is_envoys() -> None:
    assert DEFAULT_ACCESS_LOG_FORMAT == (
        '[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
        "%RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% "
        '%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% "%REQ(X-FORWARDED-FOR)%" "%REQ(USER-AGENT)%" '
        '"%REQ(X-REQUEST-ID)%" "%REQ(:AUTHORITY)%" "%UPSTREAM_HOST%"\n'
    )


def test_default_access_log_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sinfo.time, "monotonic", lambda: 100.0015)  # DURATION = 1 ms
    si = make_info()
    si.response_code = 200
    si.bytes_received = 0
    si.bytes_sent = 274
    si.upstream_host = ("127.0.0.1", 34313)
    resp = ResponseHeaders(200, [[b"x-envoy-upstream-service-time", b"0"]])
    line = compile_format(DEFAULT_ACCESS_LOG_FORMAT).format(si, make_request(), resp)
    # Same shape as the observed line
    # [2026-11-22T02:16:43.059Z] "GET /rw/a?b HTTP/1.1" 200 - 0 274 1 0 "-" "agent/1.0" "..." "foo.com" "127.0.0.1:34313"
    assert line == (
        '[2026-11-22T02:16:44.134Z] "GET /rw/a?b HTTP/1.1" 200 - 0 274 1 0 "1.2.3.4" '
        '"agent/1.0" "rid" "foo.com" "127.0.0.1:34313"\n'
    )


def test_default_access_log_line_for_an_early_failure() -> None:  # observed 426 line shape
    si = StreamInfo(None, ("127.0.0.1", 1))
    si.start_time = START
    si.response_code = 426
    si.bytes_sent = 16
    si.set_response_flag(sinfo.DOWNSTREAM_PROTOCOL_ERROR)
    line = compile_format(DEFAULT_ACCESS_LOG_FORMAT).format(si)
    assert line.endswith('"- - HTTP/1.1" 426 DPE 0 16 0 - "-" "-" "-" "-" "-"\n')


def test_start_time_formats() -> None:  # observed, character for character
    fmt = (
        "1=%START_TIME% 2=%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)% 3=%START_TIME(%s)% 4=%START_TIME(%s.%3f)% "
        "5=%START_TIME(%s.%6f)% 6=%START_TIME(%f)% 7=%START_TIME(%9f|%1f|%Ef|%E3f)% "
        "8=%START_TIME(%d/%b/%Y:%H:%M:%S %z)% 9=%START_TIME(%A %a %j %e %%)% 10=%START_TIME(%ms)% "
        "11=%START_TIME(%E9S %E6S %E3S %ES)%"
    )
    assert compile_format(fmt).format(make_info()) == (
        "1=2026-11-22T02:16:44.134Z 2=2026-11-22T02:16:44.134Z 3=1795313804 4=1795313804.134 "
        "5=1795313804.134353 6=134353000 7=134353000|1|%Ef|134 8=22/Nov/2026:02:16:44 +0000 "
        "9=Sunday Sun 326 22 % 10=11s 11=44.134353000 44.134353 44.134 %ES"
    )


def test_start_time_cache_follows_the_second() -> None:
    f = compile_format("%START_TIME(%H:%M:%S.%3f)%")
    si = make_info()
    assert f.format(si) == "02:16:44.134"
    si.start_time = START + 1.5
    assert f.format(si) == "02:16:45.634"
    si.start_time = START
    assert f.format(si) == "02:16:44.134"


def test_stream_info_commands() -> None:  # values as observed for the proxied request
    si = make_info()
    si.response_code = 200
    si.response_code_details = "via_upstream"
    si.upstream_host = ("127.0.0.1", 37069)
    si.upstream_cluster = "echo"
    si.upstream_local_address = ("127.0.0.1", 35652)
    si.bytes_received = 5
    si.bytes_sent = 313
    si.request_complete_monotonic = 100.0004
    si.first_upstream_rx_monotonic = 100.0012
    si.last_downstream_tx_monotonic = 100.0042
    fmt = (
        "A=%DOWNSTREAM_REMOTE_ADDRESS% B=%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% "
        "C=%DOWNSTREAM_LOCAL_ADDRESS% D=%DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT% "
        "E=%DOWNSTREAM_REMOTE_PORT% F=%UPSTREAM_HOST% G=%UPSTREAM_CLUSTER% H=%PROTOCOL% "
        "I=%RESPONSE_CODE% J=%RESPONSE_FLAGS% K=%RESPONSE_CODE_DETAILS% L=%ROUTE_NAME% "
        "M=%REQ(user-agent):4% O=%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% P=%REQ(:path)% "
        "Q=%REQUEST_DURATION% R=%RESPONSE_DURATION% S=%BYTES_RECEIVED% T=%BYTES_SENT% "
        "V=%DOWNSTREAM_LOCAL_PORT% W=%REQ(:METHOD)% X=%REQ(:scheme)% Y=%REQ(:authority)% "
        "Z=%REQ(host)% AA=%RESP(:status)% AB=%UPSTREAM_LOCAL_ADDRESS% AC=%RESPONSE_FLAGS_LONG% "
        "AD=%REQ(x-missing)% AE=%% AF=%RESPONSE_TX_DURATION% AG=%UPSTREAM_REMOTE_PORT%"
    )
    out = compile_format(fmt).format(si, make_request(), ResponseHeaders(200))
    assert out == (
        "A=127.0.0.1:46678 B=127.0.0.1 C=127.0.0.1:56671 D=127.0.0.1 E=46678 F=127.0.0.1:37069 "
        "G=echo H=HTTP/1.1 I=200 J=- K=via_upstream L=- M=agen O=/rw/a?b P=/new/a?b Q=0 R=1 S=5 "
        "T=313 V=56671 W=GET X=http Y=foo.com Z=foo.com AA=200 AB=127.0.0.1:35652 AC=- AD=- AE=% "
        "AF=3 AG=37069"
    )


def test_missing_values_dash_in_access_logs_empty_in_headers() -> None:
    fmt = "[%UPSTREAM_HOST%|%ROUTE_NAME%|%REQ(x-none)%|%RESPONSE_DURATION%|%RESPONSE_CODE%|%PROTOCOL%]"
    si = make_info()
    si.protocol = None  # type: ignore[assignment]
    assert compile_format(fmt).format(si) == "[-|-|-|-|0|-]"
    assert compile_format(fmt, omit_empty_values=True).format(si) == "[||||0|]"


def test_route_name_and_response_flags() -> None:
    si = make_info()
    si.route_name = "drroute"
    si.set_response_flag(sinfo.NO_ROUTE_FOUND)
    si.set_response_flag(sinfo.NO_HEALTHY_UPSTREAM)
    out = compile_format("%ROUTE_NAME% %RESPONSE_FLAGS% %RESPONSE_FLAGS_LONG%").format(si)
    assert out == "drroute UH,NR NoHealthyUpstream,NoRouteFound"
    assert format_response_flags_long(0) == "-"
    assert format_response_flags_long(sinfo.DOWNSTREAM_PROTOCOL_ERROR) == "DownstreamProtocolError"


def test_response_code_details_whitespace() -> None:
    si = make_info()
    si.response_code_details = "upstream reset before headers"
    assert compile_format("%RESPONSE_CODE_DETAILS%").format(si) == "upstream_reset_before_headers"
    allow = compile_format("%RESPONSE_CODE_DETAILS(ALLOW_WHITESPACES)%")
    assert allow.format(si) == "upstream reset before headers"


def test_request_and_response_headers() -> None:
    req = make_request()
    resp = ResponseHeaders(503, [[b"content-type", b"text/plain"], [b"x-m", b"1"], [b"x-m", b"2"]])
    trailers = HeaderMap([[b"grpc-status", b"0"]])
    f = compile_format(
        "%REQ(USER-AGENT)% %REQ(X-NONE?X-REQUEST-ID)% %RESP(content-type):4% %RESP(x-m)% "
        "%RESP(:STATUS)% %TRAILER(grpc-status)% %LOCAL_REPLY_BODY%"
    )
    assert (
        f.format(make_info(), req, resp, trailers, b"body!") == "agent/1.0 rid text 1 503 0 body!"
    )
    assert f.format(make_info()) == "- - - - - - "


def test_ipv6_addresses() -> None:
    si = StreamInfo(("::1", 4000), ("::1", 80))
    out = compile_format(
        "%DOWNSTREAM_REMOTE_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_LOCAL_PORT%"
    )
    assert out.format(si) == "[::1]:4000 ::1 80"


def test_literals_and_bytes() -> None:
    f = compile_format("100%% sure")
    assert f.is_literal and f.literal == b"100% sure"
    assert f.format(make_info()) == "100% sure"
    assert compile_format("").format_bytes(make_info()) == b""
    # "%PROTOCOL%:3" is a command followed by the literal ":3" (real Envoy accepts it).
    assert compile_format("%PROTOCOL%:3").format(make_info()) == "HTTP/1.1:3"
    # Non-UTF-8 header bytes survive format_bytes and round-trip through format().
    req = RequestHeaders(headers=[[b"x-bin", b"\xff\xfe"]])
    f2 = compile_format("é=%REQ(x-bin)%")
    assert f2.format_bytes(make_info(), req) == "é=".encode() + b"\xff\xfe"
    assert (
        f2.format(make_info(), req).encode("utf-8", "surrogateescape")
        == "é=".encode() + b"\xff\xfe"
    )


def test_misc_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYENVOY_FMT_TEST", "hello-world")
    si = make_info()
    si.request_id = b"abc-123"
    si.attempt_count = 2
    out = compile_format(
        "%HOSTNAME% %ENVIRONMENT(PYENVOY_FMT_TEST):5% %ENVIRONMENT(PYENVOY_FMT_UNSET)% %STREAM_ID% "
        "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"
    ).format(si)
    assert out == f"{socket.gethostname()} hello - abc-123 2"
    unique = compile_format("%UNIQUE_ID%")
    a, b = unique.format(si), unique.format(si)
    assert len(a) == 36 and a != b


# Envoy 1.40's own error texts (``envoy --mode validate`` with the format as a header value).
@pytest.mark.parametrize(
    "fmt,message",
    [
        ("%FOO%", "Not supported field in StreamInfo: FOO"),
        ("%REQ%", "REQ requires parameters"),
        ("%PROTOCOL(x)%", "PROTOCOL does not take any parameters or length"),
        ("%PROTOCOL:3%", "PROTOCOL does not take any parameters or length"),
        (
            "abc%PROTOCOL",
            "Incorrect configuration: abc%PROTOCOL. Couldn't find valid command at position 3",
        ),
        (
            "%protocol%",
            "Incorrect configuration: %protocol%. Couldn't find valid command at position 0",
        ),
        ("%REQ(a?b?c)%", "More than 1 alternative header specified in token: a?b?c"),
        ("100%", "Incorrect configuration: 100%. Couldn't find valid command at position 3"),
        ("%START_TIME:3%", "START_TIME does not allow length to be specified."),
        ("%REQ(a b)%", "Invalid header configuration. Format string contains invalid characters."),
    ],
)
def test_envoy_error_texts(fmt: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        compile_format(fmt, path="some.field")
    assert info.value.message == message
    assert info.value.path == "some.field"


def test_envoy_commands_pyenvoy_lacks_are_named() -> None:
    with pytest.raises(ConfigError, match="DOWNSTREAM_TLS_VERSION"):
        compile_format("%DOWNSTREAM_TLS_VERSION%")
