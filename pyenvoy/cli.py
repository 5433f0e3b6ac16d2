"""The ``pyenvoy`` command line: Envoy's flags, Envoy's messages, Envoy's exit codes.

Strategy: argparse with Envoy's flag names and defaults fills a ``ServerOptions``; logging
is configured before anything else so config warnings (deprecated fields) are visible. Then:

- ``--mode validate``: load + PGV-validate the bootstrap, let ``pyenvoy.server.validate_config``
  build the full runtime config without binding sockets, and print Envoy's
  ``configuration '<path>' OK`` (stdout, exit 0) or log Envoy's critical
  ``error initializing configuration '<path>': <message>`` line (stderr, exit 1).
- ``--mode serve`` / ``init_only``: load, then hand over to ``pyenvoy.server.run(options,
  bootstrap)``, which returns the exit code. A startup ConfigError is logged as Envoy does
  (``error `<msg>` initializing config '<path>'``), its message printed on stderr, exit 1.

``main`` never lets a traceback out: usage errors exit 1 like Envoy's TCLAP, unexpected
exceptions become one line (the traceback goes to the debug log), Ctrl-C exits cleanly.
The server module is imported lazily, so this works (minus that step) before it exists.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from pyenvoy.config.errors import ConfigError
from pyenvoy.log import DEFAULT_LOG_FORMAT
from pyenvoy.options import ENVOY_COMPAT_VERSION, HOT_RESTART_VERSION, MODES, ServerOptions

__all__ = ["main", "parse_options", "build_parser", "version_string", "DEFAULT_CONCURRENCY"]

log = logging.getLogger("pyenvoy.main")

# Envoy defaults --concurrency to the number of hardware threads. pyenvoy defaults to one
# process: see "Processes: --concurrency and hot restart" in README.md for the measurements.
DEFAULT_CONCURRENCY = 1


class _Exit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """Envoy (TCLAP) style usage errors: ``error: ...`` and exit status 1, not 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(
            f"PARSE ERROR: {message}\n\nBrief {self.format_usage()}\n"
            f"For complete USAGE and HELP type: \n   {self.prog} --help\n"
        )
        raise _Exit(1)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise _Exit(status)


def package_version() -> str:
    """pyenvoy's version: installed metadata, else the repository's pyproject.toml."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("pyenvoy")
        except PackageNotFoundError:
            pass
    except ImportError:
        pass
    import os
    import tomllib

    pyproject = os.path.join(os.path.dirname(os.path.dirname(__file__)), "pyproject.toml")
    try:
        with open(pyproject, "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def version_string() -> str:
    return f"pyenvoy version: {package_version()}/compatible with envoy {ENVOY_COMPAT_VERSION}"


def _uint32(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"Couldn't read argument value from string '{text}'"
        ) from None
    if value < 0 or value > 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"Couldn't read argument value from string '{text}'")
    return value


def build_parser(prog: str = "pyenvoy") -> argparse.ArgumentParser:
    p = _Parser(
        prog=prog,
        description=(
            "pyenvoy: an Envoy-compatible L4/L7 proxy in Python.\n"
            f"It takes the same v3 bootstrap YAML and the same flags as envoy {ENVOY_COMPAT_VERSION}."
        ),
        epilog=(
            "examples:\n"
            "  pyenvoy -c envoy.yaml\n"
            "  pyenvoy -c envoy.yaml --mode validate\n"
            "  pyenvoy -c envoy.yaml -l debug --component-log-level upstream:trace\n"
            '  pyenvoy --config-yaml "$(cat envoy.yaml)" --admin-address-path /tmp/admin'
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
        allow_abbrev=False,
    )
    g = p.add_argument_group("configuration")
    g.add_argument(
        "-c",
        "--config-path",
        default="",
        metavar="PATH",
        help="Path to configuration file (.yaml/.yml, .json, .pb_text, .pb)",
    )
    g.add_argument(
        "--config-yaml",
        default="",
        metavar="YAML",
        help="Inline YAML configuration, merges with the contents of --config-path",
    )
    g.add_argument(
        "--mode",
        default="serve",
        metavar="MODE",
        help="One of 'serve' (default; validate configs and then serve traffic "
        "normally), 'validate' (validate configs and exit) or 'init_only' "
        "(initialize the server and exit)",
    )
    g.add_argument(
        "--allow-unknown-static-fields",
        action="store_true",
        help="Allow unknown fields in static configuration",
    )
    g.add_argument(
        "--allow-unknown-fields",
        action="store_true",
        help="Allow unknown fields in static configuration (DEPRECATED)",
    )
    g.add_argument(
        "--reject-unknown-dynamic-fields",
        action="store_true",
        help="Reject unknown fields in dynamic configuration",
    )
    g.add_argument(
        "--ignore-unknown-dynamic-fields",
        action="store_true",
        help="Ignore unknown fields in dynamic configuration",
    )
    g.add_argument(
        "--watch-config",
        action="store_true",
        help="Reload the static resources when the --config-path file changes "
        "(pyenvoy; SIGHUP always reloads)",
    )
    g.add_argument(
        "--disable-extensions",
        default="",
        metavar="NAMES",
        help="Comma-separated list of extensions to disable",
    )

    g = p.add_argument_group("logging")
    g.add_argument(
        "-l",
        "--log-level",
        default="info",
        metavar="LEVEL",
        help="Log levels: [trace][debug][info][warning|warn][error][critical][off] (default: info)",
    )
    g.add_argument(
        "--component-log-level",
        default="",
        metavar="SPEC",
        help="Comma-separated list of component log levels, "
        "for example upstream:debug,config:trace",
    )
    g.add_argument("--log-path", default="", metavar="PATH", help="Path to logfile")
    g.add_argument(
        "--log-format",
        default=DEFAULT_LOG_FORMAT,
        metavar="FORMAT",
        help="Log message format in spdlog syntax "
        f'(default: "{DEFAULT_LOG_FORMAT.replace("%", "%%")}")',
    )
    g.add_argument(
        "--log-format-escaped",
        action="store_true",
        help="Escape c-style escape sequences in the application logs",
    )
    g.add_argument(
        "--enable-fine-grain-logging",
        action="store_true",
        help="Accepted for compatibility (loggers are per component)",
    )
    g.add_argument(
        "--log-stacktrace-single-entry",
        action="store_true",
        help="Emit a stack trace as a single log entry",
    )
    g.add_argument(
        "--skip-deprecated-logs",
        action="store_true",
        help="Skip the logging of deprecated field warnings",
    )

    g = p.add_argument_group("workers, draining and hot restart")
    g.add_argument(
        "--concurrency",
        type=_uint32,
        default=None,
        metavar="N",
        help=f"# of worker processes to run (default: {DEFAULT_CONCURRENCY}; 1 = one process "
        "serving everything, N > 1 = N worker processes plus a main process for admin)",
    )
    g.add_argument(
        "--cpuset-threads",
        action="store_true",
        help="Get the default # of workers from the cpuset size",
    )
    g.add_argument(
        "--drain-time-s",
        type=_uint32,
        default=600,
        metavar="SECONDS",
        help="Hot restart and LDS removal drain time in seconds (default: 600)",
    )
    g.add_argument(
        "--drain-strategy",
        default="gradual",
        metavar="STRATEGY",
        help="Hot restart drain sequence behaviour, one of 'gradual' (default) or 'immediate'",
    )
    g.add_argument(
        "--parent-shutdown-time-s",
        type=_uint32,
        default=900,
        metavar="SECONDS",
        help="Hot restart parent shutdown time in seconds (default: 900)",
    )
    g.add_argument(
        "--base-id",
        type=_uint32,
        default=0,
        metavar="ID",
        help="Base ID so that multiple pyenvoys can run on the same host",
    )
    g.add_argument(
        "--use-dynamic-base-id",
        action="store_true",
        help="The server chooses a base ID dynamically",
    )
    g.add_argument(
        "--base-id-path", default="", metavar="PATH", help="Path to which the base ID is written"
    )
    g.add_argument(
        "--disable-hot-restart", action="store_true", help="Disable hot restart functionality"
    )
    g.add_argument(
        "--restart-epoch", type=_uint32, default=0, metavar="EPOCH", help="Hot restart epoch #"
    )
    g.add_argument(
        "--hot-restart-version",
        action="store_true",
        help="Print the hot restart compatibility version and exit",
    )
    g.add_argument(
        "--socket-path",
        default="@envoy_domain_socket",
        metavar="PATH",
        help="Path to hot restart socket file",
    )
    g.add_argument("--socket-mode", default="600", metavar="MODE", help="Socket file permission")
    g.add_argument(
        "--skip-hot-restart-parent-stats",
        action="store_true",
        help="Do not copy stats from the parent while it drains",
    )
    g.add_argument(
        "--skip-hot-restart-on-no-parent",
        action="store_true",
        help="With --restart-epoch > 0, start normally if no parent is found",
    )

    g = p.add_argument_group("node identity")
    g.add_argument("--service-cluster", default="", metavar="NAME", help="Cluster name")
    g.add_argument("--service-node", default="", metavar="NAME", help="Node name")
    g.add_argument("--service-zone", default="", metavar="NAME", help="Zone name")

    g = p.add_argument_group("admin, stats and files")
    g.add_argument(
        "--admin-address-path",
        default="",
        metavar="PATH",
        help="Write the admin address to this file once listening",
    )
    g.add_argument(
        "--local-address-ip-version",
        default="v4",
        metavar="VERSION",
        help="The local IP address version (v4 or v6)",
    )
    g.add_argument(
        "--stats-tag",
        action="append",
        default=[],
        metavar="TAG:VALUE",
        help="A universal tag for all stats (may be repeated)",
    )
    g.add_argument(
        "--file-flush-interval-msec",
        type=_uint32,
        default=10000,
        metavar="MS",
        help="Interval for log flushing in msec",
    )
    g.add_argument(
        "--file-flush-min-size-kb",
        type=_uint32,
        default=64,
        metavar="KB",
        help="Minimum size in KB for log flushing",
    )
    g.add_argument("--enable-core-dump", action="store_true", help="Accepted; no effect")
    g.add_argument("--enable-mutex-tracing", action="store_true", help="Accepted; no effect")

    g = p.add_argument_group("information")
    g.add_argument("--version", action="store_true", help="Displays version information and exits")
    g.add_argument("-h", "--help", action="help", help="Displays usage information and exits")
    return p


def parse_options(argv: Sequence[str] | None = None) -> ServerOptions:
    """Parse a command line into ServerOptions. Raises ValueError on invalid option values."""
    args = list(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(args)
    opts = ServerOptions(
        config_path=ns.config_path,
        config_yaml=ns.config_yaml,
        mode=ns.mode,
        log_level=ns.log_level,
        component_log_level=ns.component_log_level,
        log_path=ns.log_path,
        log_format=ns.log_format,
        log_format_escaped=ns.log_format_escaped,
        enable_fine_grain_logging=ns.enable_fine_grain_logging,
        log_stacktrace_single_entry=ns.log_stacktrace_single_entry,
        skip_deprecated_logs=ns.skip_deprecated_logs,
        concurrency=_concurrency(ns.concurrency, ns.cpuset_threads),
        cpuset_threads=ns.cpuset_threads,
        drain_time_s=ns.drain_time_s,
        drain_strategy=ns.drain_strategy,
        parent_shutdown_time_s=ns.parent_shutdown_time_s,
        base_id=ns.base_id,
        use_dynamic_base_id=ns.use_dynamic_base_id,
        base_id_path=ns.base_id_path,
        disable_hot_restart=ns.disable_hot_restart,
        restart_epoch=ns.restart_epoch,
        socket_path=ns.socket_path,
        socket_mode=ns.socket_mode,
        skip_hot_restart_parent_stats=ns.skip_hot_restart_parent_stats,
        skip_hot_restart_on_no_parent=ns.skip_hot_restart_on_no_parent,
        service_cluster=ns.service_cluster,
        service_node=ns.service_node,
        service_zone=ns.service_zone,
        admin_address_path=ns.admin_address_path,
        local_address_ip_version=ns.local_address_ip_version,
        file_flush_interval_msec=ns.file_flush_interval_msec,
        file_flush_min_size_kb=ns.file_flush_min_size_kb,
        stats_tags=list(ns.stats_tag),
        allow_unknown_static_fields=ns.allow_unknown_static_fields or ns.allow_unknown_fields,
        reject_unknown_dynamic_fields=ns.reject_unknown_dynamic_fields,
        ignore_unknown_dynamic_fields=ns.ignore_unknown_dynamic_fields,
        disable_extensions=ns.disable_extensions,
        watch_config=ns.watch_config,
        enable_core_dump=ns.enable_core_dump,
        enable_mutex_tracing=ns.enable_mutex_tracing,
        argv=args,
    )
    if ns.version:
        raise _Info(version_string())
    if ns.hot_restart_version:
        raise _Info(HOT_RESTART_VERSION)
    opts.validate()
    return opts


def _cpus() -> int:
    """CPUs this process may run on (its cpuset), else all of them."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _concurrency(given: int | None, cpuset_threads: bool) -> int:
    """``--concurrency``, else the cpuset size with ``--cpuset-threads``, else the default."""
    if given is not None:
        return given
    return _cpus() if cpuset_threads else DEFAULT_CONCURRENCY


class _Info(Exception):
    """--version / --hot-restart-version: print and exit 0."""


def apply_node_overrides(bootstrap: Any, opts: ServerOptions) -> None:
    """--service-cluster/-node/-zone override the bootstrap's node, as Envoy does."""
    if opts.service_cluster:
        bootstrap.node.cluster = opts.service_cluster
    if opts.service_node:
        bootstrap.node.id = opts.service_node
    if opts.service_zone:
        bootstrap.node.locality.zone = opts.service_zone


def _server_attr(name: str) -> Callable[..., Any] | None:
    """``pyenvoy.server.<name>`` if that module exists yet (the lead writes it)."""
    try:
        import importlib

        server = importlib.import_module("pyenvoy.server")
    except ModuleNotFoundError as e:
        if e.name in ("pyenvoy.server", "pyenvoy"):
            return None
        raise
    fn = getattr(server, name, None)
    return fn if callable(fn) else None


def _load(opts: ServerOptions) -> Any:
    from pyenvoy.config.loader import load_bootstrap

    if opts.skip_deprecated_logs:
        from pyenvoy.config.validate import set_skip_deprecated_logs

        set_skip_deprecated_logs(True)
    bootstrap = load_bootstrap(
        opts.config_path or None,
        opts.config_yaml or None,
        allow_unknown_fields=opts.allow_unknown_static_fields,
    )
    apply_node_overrides(bootstrap, opts)
    return bootstrap


def _one_line(e: BaseException) -> str:
    text = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
    return text.replace("\n", " ")


def _validate(opts: ServerOptions) -> int:
    path = opts.config_path
    try:
        bootstrap = _load(opts)
        validate_config = _server_attr("validate_config")
        if validate_config is not None:
            validate_config(bootstrap)
    except ConfigError as e:
        log.critical("error initializing configuration '%s': %s", path, _one_line(e))
        return 1
    except Exception as e:  # a bug, not a config problem: still one line, exit 1
        log.debug("unexpected error while validating", exc_info=True)
        log.critical("error initializing configuration '%s': %s", path, _one_line(e))
        return 1
    sys.stdout.write(f"configuration '{path}' OK\n")
    sys.stdout.flush()
    return 0


def _startup_failed(opts: ServerOptions, e: BaseException) -> int:
    message = _one_line(e)
    log.critical("error `%s` initializing config '%s'", message, opts.config_path)
    log.info("exiting")
    for handler in logging.getLogger("pyenvoy").handlers:
        handler.flush()
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    return 1


def _serve(opts: ServerOptions) -> int:
    try:
        bootstrap = _load(opts)
        run = _server_attr("run")
    except ConfigError as e:
        return _startup_failed(opts, e)
    except Exception as e:
        log.debug("unexpected error during startup", exc_info=True)
        return _startup_failed(opts, e)
    if run is None:
        if opts.mode == "init_only":
            return 0
        sys.stderr.write("error: pyenvoy.server is not available in this build\n")
        return 1
    try:
        return int(run(opts, bootstrap) or 0)
    except ConfigError as e:
        return _startup_failed(opts, e)


def main(argv: list[str] | None = None) -> int:
    """Run pyenvoy; returns the process exit status (``sys.exit(main())``-safe)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 0
    except _Exit as e:
        return e.code
    except BrokenPipeError:
        return 1


def _main(argv: list[str] | None) -> int:
    try:
        opts = parse_options(argv)
    except _Info as info:
        sys.stdout.write(f"{info}\n")
        return 0
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    from pyenvoy import log as envoy_log

    try:
        envoy_log.configure(
            opts.log_level,
            opts.component_log_level,
            opts.log_path or None,
            opts.log_format,
            log_format_escaped=opts.log_format_escaped,
        )
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        return 1
    except OSError as e:
        sys.stderr.write(f"error: cannot open log path '{opts.log_path}': {e.strerror}\n")
        return 1
    cpus = _cpus()
    if opts.concurrency > cpus:
        log.warning(
            "--concurrency %d requested: more worker processes than the %d CPU(s) available",
            opts.concurrency,
            cpus,
        )
    assert opts.mode in MODES
    if opts.mode == "validate":
        return _validate(opts)
    return _serve(opts)


if __name__ == "__main__":
    sys.exit(main())
