"""Shared pytest fixtures: test upstreams and proxies (real Envoy and pyenvoy) from config templates.

Strategy: differential tests are parametrised over the proxy kind with a MODULE-scoped
fixture, so pytest runs a module's tests against one long-lived Envoy process, then against
one pyenvoy process (never both at once). A test module names its config template in
``CONFIG`` (a file under tests/integration/configs/) and may add ``CONFIG_VALUES``; the
``proxy`` fixture fills ``{upstream_port}`` with the module's HTTP upstream and every other
``{*_port}`` with a free port. Which proxies run is chosen by ``PYENVOY_IT_PROXIES``
(default ``envoy,pyenvoy``); envoy tests are skipped when no ``envoy`` binary is installed.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.procs import EnvoyProcess, ProxyProcess, start_proxy  # noqa: E402
from tests.support.upstream import HttpUpstream, TcpEchoUpstream  # noqa: E402

CONFIG_DIR = ROOT / "tests" / "integration" / "configs"
PROXY_KINDS = [k.strip() for k in os.environ.get("PYENVOY_IT_PROXIES", "envoy,pyenvoy").split(",")]
PROXY_KINDS = [k for k in PROXY_KINDS if k]


def load_config(name: str) -> str:
    """The text of a config template under tests/integration/configs/."""
    return (CONFIG_DIR / name).read_text()


@pytest.fixture(scope="module", params=PROXY_KINDS)
def proxy_kind(request: pytest.FixtureRequest) -> str:
    kind = str(request.param)
    if kind == "envoy" and shutil.which(EnvoyProcess.executable) is None:
        pytest.skip("envoy binary not installed")
    return kind


@pytest.fixture(scope="module")
def http_upstream() -> Iterator[HttpUpstream]:
    up = HttpUpstream()
    up.start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(scope="module")
def tcp_upstream() -> Iterator[TcpEchoUpstream]:
    up = TcpEchoUpstream()
    up.start()
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(scope="module")
def proxy(
    request: pytest.FixtureRequest, proxy_kind: str, http_upstream: HttpUpstream
) -> Iterator[ProxyProcess]:
    """One proxy process per (module, kind), started from the module's ``CONFIG``."""
    template = load_config(request.module.CONFIG)
    values = dict(getattr(request.module, "CONFIG_VALUES", {}))
    values.setdefault("upstream_port", http_upstream.port)
    p = start_proxy(proxy_kind, template, **values)
    try:
        yield p
    finally:
        p.stop()
