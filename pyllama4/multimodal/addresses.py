"""Which IP addresses an image fetch may connect to (the `--image-fetch-networks` policy).

Invariant: `refusal(address, networks)` is None only for an address that `networks` allows:
  - "any": every address;
  - "private" (the default): every address but loopback (127.0.0.0/8, ::1), link-local
    (169.254.0.0/16 with the cloud metadata endpoint 169.254.169.254, fe80::/10), unspecified
    (0.0.0.0/8, ::), multicast and reserved ones (240.0.0.0/4, ::/8 and the other IETF-reserved
    blocks); RFC 1918, carrier-grade NAT and unique-local (fc00::/7) addresses are allowed;
  - "public": only globally routable addresses (`ipaddress`'s is_global).
An IPv4-mapped IPv6 address (::ffff:a.b.c.d) is judged as the IPv4 address it carries, because
a connection to it goes there.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_network
from typing import Literal, TypeAlias

Networks: TypeAlias = Literal["public", "private", "any"]
NETWORKS: tuple[Networks, ...] = ("public", "private", "any")
DEFAULT_NETWORKS: Networks = "private"

IPAddress: TypeAlias = IPv4Address | IPv6Address

_THIS_HOST = ip_network("0.0.0.0/8")  # Linux connects 0.0.0.0 to the local host
_ALWAYS_REFUSED: tuple[tuple[str, Callable[[IPAddress], bool]], ...] = (
    ("loopback", lambda a: a.is_loopback),
    ("link-local", lambda a: a.is_link_local),
    ("unspecified", lambda a: a.is_unspecified or a in _THIS_HOST),
    ("multicast", lambda a: a.is_multicast),
    ("reserved", lambda a: a.is_reserved),
)


def refusal(address: IPAddress, networks: Networks) -> str | None:
    """Why `networks` refuses a connection to `address` (a word for the log), or None."""
    if networks == "any":
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind, applies in _ALWAYS_REFUSED:
        if applies(address):
            return kind
    if networks == "public" and not address.is_global:
        return "not public"
    return None
