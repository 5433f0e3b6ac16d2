"""Server options: everything the ``pyenvoy`` command line accepts, with Envoy's defaults.

Strategy: one plain dataclass mirroring Envoy's ``OptionsImpl`` field by field (names are the
flags with dashes turned into underscores), so the server, hot restart and admin (``/options``
style output) read one object. ``validate()`` applies Envoy's own cross-field checks and
raises ValueError with Envoy's wording; the CLI turns that into ``error: ...`` and exit 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pyenvoy.log import DEFAULT_LOG_FORMAT, level_number, parse_component_levels

__all__ = ["ServerOptions", "ENVOY_COMPAT_VERSION", "HOT_RESTART_VERSION", "MODES"]

ENVOY_COMPAT_VERSION = "1.40"
# Printed by --hot-restart-version; processes only hot-restart into a matching version.
HOT_RESTART_VERSION = "pyenvoy.1"
MODES = ("serve", "validate", "init_only")
DRAIN_STRATEGIES = ("gradual", "immediate")


@dataclass
class ServerOptions:
    """Parsed command-line options (Envoy's flags; defaults as ``envoy --help`` states)."""

    config_path: str = ""
    config_yaml: str = ""
    mode: str = "serve"
    # Logging
    log_level: str = "info"
    component_log_level: str = ""
    log_path: str = ""
    log_format: str = DEFAULT_LOG_FORMAT
    log_format_escaped: bool = False
    enable_fine_grain_logging: bool = False
    log_stacktrace_single_entry: bool = False
    skip_deprecated_logs: bool = False
    # Workers. Envoy defaults to the number of hardware threads; pyenvoy to one worker.
    concurrency: int = 1
    cpuset_threads: bool = False
    # Draining and hot restart
    drain_time_s: int = 600
    drain_strategy: str = "gradual"
    parent_shutdown_time_s: int = 900
    base_id: int = 0
    use_dynamic_base_id: bool = False
    base_id_path: str = ""
    disable_hot_restart: bool = False
    restart_epoch: int = 0
    socket_path: str = "@envoy_domain_socket"
    socket_mode: str = "600"
    skip_hot_restart_parent_stats: bool = False
    skip_hot_restart_on_no_parent: bool = False
    # Node identity (override bootstrap node.cluster / node.id / node.locality.zone)
    service_cluster: str = ""
    service_node: str = ""
    service_zone: str = ""
    # Admin / networking
    admin_address_path: str = ""
    local_address_ip_version: str = "v4"
    # Files and stats
    file_flush_interval_msec: int = 10000
    file_flush_min_size_kb: int = 64
    stats_tags: list[str] = field(default_factory=list)
    # Unknown-field handling
    allow_unknown_static_fields: bool = False
    reject_unknown_dynamic_fields: bool = False
    ignore_unknown_dynamic_fields: bool = False
    # Reload the static resources when the -c file changes (SIGHUP always reloads)
    watch_config: bool = False
    # Accepted for compatibility; no effect in pyenvoy
    disable_extensions: str = ""
    enable_core_dump: bool = False
    enable_mutex_tracing: bool = False
    # The command line as given (hot restart re-uses it)
    argv: list[str] = field(default_factory=list)

    @property
    def hot_restart_disabled(self) -> bool:
        return self.disable_hot_restart

    @property
    def component_log_levels(self) -> dict[str, int]:
        """``--component-log-level`` parsed into component -> logging level number."""
        return parse_component_levels(self.component_log_level)

    @property
    def stats_tag_map(self) -> dict[str, str]:
        """``--stats-tag name:value`` pairs."""
        out: dict[str, str] = {}
        for tag in self.stats_tags:
            name, _, value = tag.partition(":")
            out[name] = value
        return out

    @property
    def disabled_extensions(self) -> list[str]:
        return [x for x in self.disable_extensions.split(",") if x]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Envoy's option checks; ValueError carries Envoy's message text."""
        if self.mode not in MODES:
            raise ValueError(f"unknown mode '{self.mode}'")
        if self.drain_strategy not in DRAIN_STRATEGIES:
            raise ValueError(f"unknown drain-strategy '{self.drain_strategy}'")
        if level_number(self.log_level) is None:
            raise ValueError(f"invalid log level specified '{self.log_level}'")
        parse_component_levels(self.component_log_level)
        if self.local_address_ip_version not in ("v4", "v6"):
            raise ValueError(f"unknown IP address version '{self.local_address_ip_version}'")
        if self.use_dynamic_base_id and self.restart_epoch > 0:
            raise ValueError(
                f"cannot use --restart-epoch={self.restart_epoch} with --use-dynamic-base-id"
            )
        for number, flag in (
            (self.concurrency, "concurrency"),
            (self.drain_time_s, "drain-time-s"),
            (self.parent_shutdown_time_s, "parent-shutdown-time-s"),
            (self.base_id, "base-id"),
            (self.restart_epoch, "restart-epoch"),
            (self.file_flush_interval_msec, "file-flush-interval-msec"),
            (self.file_flush_min_size_kb, "file-flush-min-size-kb"),
        ):
            if number < 0 or number > 0xFFFFFFFF:
                raise ValueError(f"(--{flag}) -- Couldn't read argument value '{number}'")
        for tag in self.stats_tags:
            name, sep, value = tag.partition(":")
            if not sep:
                raise ValueError(f"misformatted stats-tag '{tag}'")
            if not name.replace("_", "").isalnum():
                raise ValueError(
                    f"misformatted stats-tag '{tag}' contains invalid char in '{name}'"
                )
            if "." in value:
                raise ValueError(
                    f"misformatted stats-tag '{tag}' contains invalid char in '{value}'"
                )
