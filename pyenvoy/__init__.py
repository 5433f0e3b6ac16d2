"""pyenvoy: an Envoy-compatible L4/L7 proxy in Python.

Run it as ``pyenvoy -c envoy.yaml`` or embed it in-process::

    async with pyenvoy.Proxy(config) as proxy:
        port = proxy.port("listener_0")
"""

__version__ = "0.1.0"

from pyenvoy.embed import Proxy  # noqa: E402

__all__ = ["Proxy", "__version__"]
