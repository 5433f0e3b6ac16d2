"""The ``pyenvoy`` command line (run as ``python -m pyenvoy``), options and logging setup."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyenvoy import log as envoy_log
from pyenvoy.cli import parse_options
from pyenvoy.options import ServerOptions

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "configs"
ENVOY = shutil.which("envoy")
needs_envoy = pytest.mark.skipif(ENVOY is None, reason="envoy is not on PATH")


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "pyenvoy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
        env=env,
    )


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout


# --------------------------------------------------------------------------------------------
# Subprocess: python -m pyenvoy


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert len(lines) == 1
    assert re.fullmatch(r"pyenvoy version: \S+/compatible with envoy 1\.40", lines[0])


def test_help_lists_envoy_flags() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    for flag in (
        "--config-path",
        "--config-yaml",
        "--mode",
        "--log-level",
        "--component-log-level",
        "--concurrency",
        "--drain-time-s",
        "--base-id",
        "--restart-epoch",
        "--admin-address-path",
    ):
        assert flag in proc.stdout


@pytest.mark.parametrize(
    "name",
    [
        "01-static-logical-dns.yaml",
        "02-health-checked-cluster.yaml",
        "04-api-routes-v3.yaml",
    ],
)
def test_validate_ok(name: str) -> None:
    path = str(FIXTURES / name)
    proc = run_cli("--mode", "validate", "-c", path)
    no_traceback(proc)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"configuration '{path}' OK\n"


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("03-api-routes-v2-fields.yaml", "routes[2]: no such field: 'per_filter_config'"),
        ("bad-duration.yaml", "duration must end with a single 's'"),
        ("tcp-proxy-no-cluster.yaml", 'field: "cluster_specifier", reason: is required'),
        ("yaml-syntax.yaml", "yaml error at line 5"),
        # Real Envoy loads these two; pyenvoy does not have gRPC xDS or Lua yet and says so
        # (naming the field) instead of serving without them.
        (
            "05-dynamic-ads.yaml",
            "dynamic_resources.lds_config.api_config_source: api_config_source (GRPC) xDS is not supported by pyenvoy yet",
        ),
        ("06-lua-context-injection.yaml", "envoy.filters.http.lua is not supported by pyenvoy"),
    ],
)
def test_validate_rejects(name: str, text: str) -> None:
    path = str(FIXTURES / name)
    proc = run_cli("--mode", "validate", "-c", path)
    no_traceback(proc)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = [ln for ln in proc.stderr.splitlines() if "error initializing configuration" in ln]
    assert len(lines) == 1
    assert "[critical][main]" in lines[0]
    assert f"error initializing configuration '{path}': " in lines[0]
    assert text in lines[0]


def test_validate_missing_file_and_no_config() -> None:
    proc = run_cli("--mode", "validate", "-c", "/nonexistent/envoy.yaml")
    no_traceback(proc)
    assert proc.returncode == 1
    assert "Invalid path: /nonexistent/envoy.yaml" in proc.stderr
    proc = run_cli("--mode", "validate")
    assert proc.returncode == 1
    assert "error initializing configuration '': At least one of --config-path" in proc.stderr


def test_validate_config_yaml_only_and_merge() -> None:
    proc = run_cli("--mode", "validate", "--config-yaml", "node: {id: a, cluster: b}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "configuration '' OK\n"
    # --config-yaml is merged over the file: a second cluster with the same name is appended.
    path = str(FIXTURES / "02-health-checked-cluster.yaml")
    proc = run_cli(
        "--mode",
        "validate",
        "-c",
        path,
        "--config-yaml",
        "static_resources: {clusters: [{name: extra, connect_timeout: 1s}]}",
    )
    assert proc.returncode == 0, proc.stderr


def test_serve_with_bad_config_exits_1_without_traceback() -> None:
    path = str(FIXTURES / "bad-enum.yaml")
    proc = run_cli("-c", path)
    no_traceback(proc)
    assert proc.returncode == 1
    assert f"initializing config '{path}'" in proc.stderr
    # Envoy prints the bare message last, whatever the log level.
    assert "unknown enum value: 'ROUND_ROBINX'" in proc.stderr.splitlines()[-1]
    proc = run_cli("-c", path, "-l", "off")
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith("(line 6)")


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--mode", "bogus"], "error: unknown mode 'bogus'"),
        (["-l", "bogus"], "error: invalid log level specified 'bogus'"),
        (["--component-log-level", "bogus:debug"], "error: invalid component specified 'bogus'"),
        (
            ["--component-log-level", "upstream"],
            "error: component log level not correctly specified 'upstream'",
        ),
        (["--drain-strategy", "slow"], "error: unknown drain-strategy 'slow'"),
        (["--concurrency", "abc"], "Couldn't read argument value from string 'abc'"),
        (["--bogus-flag"], "PARSE ERROR"),
    ],
)
def test_bad_flags_exit_1(args: list[str], text: str) -> None:
    proc = run_cli("--mode", "validate", "--config-yaml", "{}", *args)
    no_traceback(proc)
    assert proc.returncode == 1
    assert text in proc.stderr


@needs_envoy
@pytest.mark.parametrize(
    "name",
    [
        "01-static-logical-dns.yaml",
        "03-api-routes-v2-fields.yaml",
        "bad-duration.yaml",
        "missing-cluster-name.yaml",
        "empty.yaml",
    ],
)
def test_exit_codes_match_envoy(name: str) -> None:
    path = str(FIXTURES / name)
    assert ENVOY is not None
    envoy = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", path, "--disable-hot-restart", "-l", "critical"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    ours = run_cli("--mode", "validate", "-c", path, "-l", "critical")
    assert ours.returncode == envoy.returncode
    if envoy.returncode == 0:
        assert ours.stdout == envoy.stdout  # "configuration '<path>' OK\n"
    else:
        assert f"error initializing configuration '{path}': " in envoy.stderr
        assert f"error initializing configuration '{path}': " in ours.stderr


# --------------------------------------------------------------------------------------------
# In-process: options


def test_option_defaults_mirror_envoy() -> None:
    opts = parse_options(["-c", "x.yaml"])
    assert opts == ServerOptions(config_path="x.yaml", argv=["-c", "x.yaml"])
    assert (opts.log_level, opts.mode, opts.concurrency) == ("info", "serve", 1)
    assert (opts.drain_time_s, opts.parent_shutdown_time_s, opts.drain_strategy) == (
        600,
        900,
        "gradual",
    )
    assert (opts.base_id, opts.restart_epoch, opts.disable_hot_restart) == (0, 0, False)
    assert opts.log_format == "[%Y-%m-%d %T.%e][%t][%l][%n] [%g:%#] %v"
    assert (opts.file_flush_interval_msec, opts.file_flush_min_size_kb) == (10000, 64)
    assert opts.local_address_ip_version == "v4"


def test_option_parsing() -> None:
    opts = parse_options(
        [
            "--config-path=a.yaml",
            "--config-yaml",
            "node: {id: x}",
            "-l",
            "debug",
            "--component-log-level",
            "upstream:trace,http:warn",
            "--concurrency",
            "2",
            "--mode",
            "init_only",
            "--drain-time-s",
            "5",
            "--drain-strategy",
            "immediate",
            "--parent-shutdown-time-s",
            "7",
            "--base-id",
            "11",
            "--disable-hot-restart",
            "--restart-epoch",
            "3",
            "--service-cluster",
            "sc",
            "--service-node",
            "sn",
            "--service-zone",
            "sz",
            "--admin-address-path",
            "/tmp/a",
            "--stats-tag",
            "env:prod",
            "--allow-unknown-fields",
        ]
    )
    assert opts.config_path == "a.yaml" and opts.config_yaml == "node: {id: x}"
    assert opts.component_log_levels == {"upstream": envoy_log.TRACE, "http": logging.WARNING}
    assert (opts.concurrency, opts.mode, opts.drain_time_s, opts.drain_strategy) == (
        2,
        "init_only",
        5,
        "immediate",
    )
    assert (opts.parent_shutdown_time_s, opts.base_id, opts.restart_epoch) == (7, 11, 3)
    assert opts.disable_hot_restart and opts.allow_unknown_static_fields
    assert (opts.service_cluster, opts.service_node, opts.service_zone) == ("sc", "sn", "sz")
    assert opts.admin_address_path == "/tmp/a" and opts.stats_tag_map == {"env": "prod"}


def test_option_validation() -> None:
    with pytest.raises(ValueError, match="cannot use --restart-epoch=1 with --use-dynamic-base-id"):
        parse_options(["--use-dynamic-base-id", "--restart-epoch", "1"])
    with pytest.raises(ValueError, match="misformatted stats-tag 'foo'"):
        parse_options(["--stats-tag", "foo"])
    with pytest.raises(ValueError, match="unknown IP address version 'v5'"):
        parse_options(["--local-address-ip-version", "v5"])


# --------------------------------------------------------------------------------------------
# In-process: logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger("pyenvoy")
    handlers, propagate, level = list(root.handlers), root.propagate, root.level
    levels = {c: envoy_log.get_logger(c).level for c in envoy_log.COMPONENTS}
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.propagate, root.level = propagate, level
    envoy_log._handler = None
    for c, lvl in levels.items():
        envoy_log.get_logger(c).setLevel(lvl)


def test_levels_api(restore_logging: None) -> None:
    envoy_log.configure("warn", "upstream:debug,config:trace")
    levels = envoy_log.get_levels()
    assert list(levels)[:3] == ["a2a", "admin", "ai_protocol_manager"]
    assert levels["upstream"] == "debug" and levels["config"] == "trace"
    assert levels["main"] == "warning" and levels["http"] == "warning"
    assert envoy_log.set_level("http", "critical") and envoy_log.get_levels()["http"] == "critical"
    assert not envoy_log.set_level("nope", "info")
    assert not envoy_log.set_level("http", "loud")
    envoy_log.set_all_levels("off")
    assert set(envoy_log.get_levels().values()) == {"off"}
    assert not envoy_log.get_logger("main").isEnabledFor(logging.CRITICAL)
    with pytest.raises(ValueError):
        envoy_log.set_all_levels("loud")
    with pytest.raises(ValueError, match="invalid component specified 'bogus'"):
        envoy_log.configure("info", "bogus:debug")


def test_envoy_style_lines(restore_logging: None, tmp_path: Path) -> None:
    log_file = tmp_path / "pyenvoy.log"
    envoy_log.configure("info", "", str(log_file))
    logger = envoy_log.get_logger("upstream")
    logger.debug("hidden")
    logger.info("adding host %s", "127.0.0.1:80")
    logging.getLogger("pyenvoy").handlers[0].flush()
    line = log_file.read_text().strip()
    assert "hidden" not in line
    m = re.fullmatch(
        r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3})\]\[(\d+)\]\[info\]\[upstream\] "
        r"\[tests/test_cli\.py:\d+\] adding host 127\.0\.0\.1:80",
        line,
    )
    assert m, line


def test_spdlog_pattern_features() -> None:
    record = logging.LogRecord(
        "pyenvoy.router", logging.WARNING, __file__, 12, 'a\nb "q"', None, None
    )
    fmt = envoy_log.SpdlogFormatter("%L %-8l|%5n|%s:%# %j %%")
    assert fmt.format(record) == 'W warning |router|test_cli.py:12 a\\nb \\"q\\" %'
    assert envoy_log.SpdlogFormatter("%v", escape=True).format(record) == 'a\\nb "q"'
    trace = logging.LogRecord("pyenvoy.pool", envoy_log.TRACE, __file__, 1, "t", None, None)
    assert envoy_log.SpdlogFormatter("[%l][%n] %v").format(trace) == "[trace][pool] t"


def test_main_returns_ints_in_process(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    from pyenvoy.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("pyenvoy version: ")
    assert main(["--mode", "nope"]) == 1
    assert "error: unknown mode 'nope'" in capsys.readouterr().err
    assert main(["--no-such-flag"]) == 1
    assert "PARSE ERROR" in capsys.readouterr().err
    assert main(["--mode", "validate", "-c", str(FIXTURES / "bad-enum.yaml"), "-l", "off"]) == 1
    assert capsys.readouterr().err == ""  # -l off silences the critical line, as in Envoy


# --------------------------------------------------------------------------------------------
# In-process: the validate / serve flows with pyenvoy.server stubbed out


class _FakeServer:
    """Stands in for pyenvoy.server (validate_config / run) to test the CLI's own logic."""

    def __init__(self, fail: Exception | None = None, exit_code: int = 0) -> None:
        self.fail = fail
        self.exit_code = exit_code
        self.validated: list[object] = []
        self.ran: list[tuple[ServerOptions, object]] = []

    def attr(self, name: str) -> object:
        if name == "validate_config":
            return self.validate_config
        if name == "run":
            return self.run
        return None

    def validate_config(self, bootstrap: object) -> None:
        self.validated.append(bootstrap)
        if self.fail is not None:
            raise self.fail

    def run(self, options: ServerOptions, bootstrap: object) -> int:
        self.ran.append((options, bootstrap))
        if self.fail is not None:
            raise self.fail
        return self.exit_code


@pytest.mark.parametrize(
    "name",
    [
        "01-static-logical-dns.yaml",
        "02-health-checked-cluster.yaml",
        "04-api-routes-v3.yaml",
        "05-dynamic-ads.yaml",
        "06-lua-context-injection.yaml",
    ],
)
def test_validate_flow_ok(
    name: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_logging: None,
) -> None:
    from pyenvoy import cli

    fake = _FakeServer()
    monkeypatch.setattr(cli, "_server_attr", fake.attr)
    path = str(FIXTURES / name)
    assert cli.main(["--mode", "validate", "-c", path, "-l", "error"]) == 0
    assert capsys.readouterr().out == f"configuration '{path}' OK\n"
    assert len(fake.validated) == 1


def test_validate_flow_server_rejects(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    from pyenvoy import cli
    from pyenvoy.config import ConfigError

    fake = _FakeServer(
        fail=ConfigError("envoy.filters.http.lua is not supported", "x.http_filters[0]")
    )
    monkeypatch.setattr(cli, "_server_attr", fake.attr)
    path = str(FIXTURES / "06-lua-context-injection.yaml")
    assert cli.main(["--mode", "validate", "-c", path, "--log-format", "%v"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == (
        f"error initializing configuration '{path}': "
        "x.http_filters[0]: envoy.filters.http.lua is not supported\n"
    )
    # A bug in the server is still one line, never a traceback.
    monkeypatch.setattr(cli, "_server_attr", _FakeServer(fail=KeyError("boom")).attr)
    assert cli.main(["--mode", "validate", "-c", path, "--log-format", "%v"]) == 1
    assert (
        capsys.readouterr().err == f"error initializing configuration '{path}': KeyError: 'boom'\n"
    )


def test_validate_without_server_module(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    from pyenvoy import cli

    monkeypatch.setattr(cli, "_server_attr", lambda name: None)
    assert cli.main(["--mode", "validate", "--config-yaml", "node: {id: a}", "-l", "off"]) == 0
    assert capsys.readouterr().out == "configuration '' OK\n"


def test_serve_flow(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    from pyenvoy import cli
    from pyenvoy.config import ConfigError

    fake = _FakeServer(exit_code=3)
    monkeypatch.setattr(cli, "_server_attr", fake.attr)
    path = str(FIXTURES / "02-health-checked-cluster.yaml")
    argv = ["-c", path, "--service-node", "n1", "--service-cluster", "c1", "--service-zone", "z"]
    assert cli.main([*argv, "-l", "off"]) == 3
    options, bootstrap = fake.ran[0]
    assert options.config_path == path and options.mode == "serve"
    node = bootstrap.node  # type: ignore[attr-defined]
    assert (node.id, node.cluster, node.locality.zone) == ("n1", "c1", "z")

    monkeypatch.setattr(cli, "_server_attr", _FakeServer(fail=ConfigError("no", "admin")).attr)
    assert cli.main(["-c", path, "--log-format", "%l|%v"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"critical|error `admin: no` initializing config '{path}'",
        "info|exiting",
        "admin: no",
    ]

    monkeypatch.setattr(cli, "_server_attr", _FakeServer(fail=KeyboardInterrupt()).attr)
    assert cli.main(["-c", path, "-l", "off"]) == 0


def test_concurrency_warning(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    from pyenvoy import cli

    monkeypatch.setattr(cli, "_server_attr", _FakeServer().attr)
    monkeypatch.setattr(cli, "_cpus", lambda: 2)  # the warning depends on the machine's CPUs
    assert cli.main(["--mode", "validate", "--config-yaml", "{}", "--concurrency", "4"]) == 0
    err = capsys.readouterr().err
    assert "[warning][main]" in err and "--concurrency 4 requested" in err


def test_log_format_and_skip_deprecated_logs(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    from pyenvoy import cli
    from pyenvoy.config import validate as validate_mod

    monkeypatch.setattr(cli, "_server_attr", _FakeServer().attr)
    monkeypatch.setattr(validate_mod, "_warned_deprecated", set())
    monkeypatch.setattr(validate_mod, "_skip_deprecated_logs", False)
    path = str(FIXTURES / "01-static-logical-dns.yaml")
    assert cli.main(["--mode", "validate", "-c", path, "--log-format", "%l|%n|%v"]) == 0
    err = capsys.readouterr().err
    assert "warning|misc|Deprecated field: type envoy.config.bootstrap.v3.Admin" in err
    monkeypatch.setattr(validate_mod, "_warned_deprecated", set())
    assert cli.main(["--mode", "validate", "-c", path, "--skip-deprecated-logs"]) == 0
    assert "Deprecated" not in capsys.readouterr().err
