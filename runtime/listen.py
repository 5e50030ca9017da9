"""Listen addresses of our HTTP endpoints (``HOST:PORT``), parsed without any I/O: the fog's
and the cloud's config modules read them, and config modules load nothing of asyncio."""

import ipaddress
from typing import Final

from protocol.errors import FogpayError

PORT_MAX: Final = 65_535


class ListenError(FogpayError):
    """A listen address is malformed, or cannot be bound."""


def parse_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9464"`` or ``"[::1]:9464"`` as (host, port); the host must be an IP
    literal (no name lookup at start), the port 0 (pick a free one) to 65535."""
    if not isinstance(value, str) or ":" not in value:
        raise ListenError("must be HOST:PORT, e.g. 127.0.0.1:9464")
    host, _, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ListenError("an IPv6 host goes in brackets: [::1]:9464")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ListenError(f"host {host!r} is not an IP address") from None
    if not port_text.isascii() or not port_text.isdigit() or int(port_text) > PORT_MAX:
        raise ListenError(f"port {port_text!r} is not in [0, {PORT_MAX}]")
    return host, int(port_text)


def url_host(host: str) -> str:
    """The host part of a URL reaching a server bound to ``host`` (a wildcard: loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
