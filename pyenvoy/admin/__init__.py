"""Envoy's admin endpoint: ``AdminServer(server, (host, port), access_log_path)``.

Strategy: ``server.py`` is the HTTP/1.1 listener (asyncio + h11), ``handlers.py`` the
endpoint table with Envoy's texts, ``config_dump.py`` and ``proto_json.py`` the
``/config_dump`` and protobuf-JSON rendering; stats rendering lives in
``pyenvoy.stats_render``.
"""

from pyenvoy.admin.server import AdminServer

__all__ = ["AdminServer"]
