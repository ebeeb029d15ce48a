"""IP access rules: which client may use the gateway, and who the client is behind a proxy.

Pure: no I/O. The server asks `client_ip` for the address to judge (the socket peer, or the
right-most untrusted `X-Forwarded-For` hop when the peer is a trusted proxy) and `allowed`
whether that address may pass. IPv4-mapped IPv6 addresses are treated as IPv4 throughout, and
IPv6 zone ids are dropped, so one client has one spelling.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Sequence
from typing import TypeAlias

from openai_forward.config import ConfigError

_Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
_Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

#: At most this many X-Forwarded-For entries are examined per request.
MAX_FORWARDED_HOPS = 32
#: The verdict cache is cleared when it holds this many addresses.
CACHE_SIZE = 4096

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_OWS = b" \t"


def _address(text: str) -> _Address | None:
    """The normalised address in `text`, or None when it is not a bare IP address."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr.scope_id is not None:
            # The zone is free text ("fe80::1%anything"); it must not reach logs or bucket keys.
            return ipaddress.IPv6Address(int(addr))
    return addr


def _network(entry: object) -> _Network | None:
    if not isinstance(entry, str):  # an int would be read as an address by ipaddress
        return None
    try:
        net = ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError:
        return None
    if isinstance(net, ipaddress.IPv6Network):
        base = int(net.network_address)
        if net.prefixlen >= 96 and ipaddress.IPv6Address(base) in _MAPPED:
            return ipaddress.IPv4Network((base & 0xFFFFFFFF, net.prefixlen - 96))
        return ipaddress.IPv6Network((base, net.prefixlen))  # drops a zone id
    return net


def _networks(key: str, entries: Sequence[str]) -> tuple[_Network, ...]:
    if isinstance(entries, (str, bytes)):
        raise ConfigError(f"{key}: expected a list of addresses or networks, got {entries!r}")
    nets = []
    for index, entry in enumerate(entries):
        net = _network(entry)
        if net is None:
            raise ConfigError(f"{key}[{index}]: {entry!r} is not an IP address or network")
        nets.append(net)
    return tuple(nets)


def _matches(addr: _Address, nets: tuple[_Network, ...]) -> bool:
    return any(addr in net for net in nets)  # a v4 address is never in a v6 network


def _entries_from_right(forwarded_for: Sequence[bytes]) -> Iterator[bytes]:
    """X-Forwarded-For entries right to left, stopping after MAX_FORWARDED_HOPS."""
    budget = MAX_FORWARDED_HOPS
    for value in reversed(forwarded_for):
        # rsplit with a limit only scans as far left as it needs to.
        parts = value.rsplit(b",", budget)
        for part in reversed(parts):
            if budget == 0:
                return
            budget -= 1
            yield part.strip(_OWS)


class AccessRules:
    """Allow/deny lists of addresses and networks, and the proxies whose X-Forwarded-For is
    believed.

    Each entry is an IPv4/IPv6 address or network ("10.0.0.0/8", "::1", "2001:db8::/32").
    Raises ConfigError naming `key`, the list and the index of the first invalid entry.
    """

    def __init__(
        self,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        trusted_proxies: Sequence[str] = (),
        *,
        key: str = "access",
    ) -> None:
        self._allow = _networks(f"{key}.allow", allow)
        self._deny = _networks(f"{key}.deny", deny)
        self._trusted = _networks(f"{key}.trusted_proxies", trusted_proxies)
        self._verdicts: dict[str, bool] = {}

    @property
    def active(self) -> bool:
        """False when there is neither an allow nor a deny rule: every client may pass."""
        return bool(self._allow or self._deny)

    def client_ip(self, peer: str, forwarded_for: Sequence[bytes]) -> str:
        """The address to judge for a connection from `peer` carrying these X-Forwarded-For
        header values (every instance, in order).

        The peer itself unless it is a trusted proxy; then the right-most X-Forwarded-For entry
        that is not a trusted proxy. A malformed entry ends the walk at the last trusted hop
        seen, so the result is always the peer or a normalised address the trusted chain
        reported, never free text. An unparseable peer is returned unchanged.
        """
        hop = _address(peer)
        if hop is None:
            return peer
        if not self._trusted or not _matches(hop, self._trusted):
            return str(hop)
        for entry in _entries_from_right(forwarded_for):
            try:
                addr = _address(entry.decode("ascii"))
            except UnicodeDecodeError:
                addr = None
            if addr is None:
                break
            hop = addr
            if not _matches(hop, self._trusted):
                break
        return str(hop)

    def allowed(self, ip: str) -> bool:
        """Whether `ip` may pass: a deny match refuses; a non-empty allow list must match.

        Always True when the rules are not active; an unparseable `ip` is refused otherwise.
        """
        verdict = self._verdicts.get(ip)
        if verdict is None:
            verdict = self._judge(ip)
            if len(self._verdicts) >= CACHE_SIZE:
                self._verdicts.clear()
            self._verdicts[ip] = verdict
        return verdict

    def _judge(self, ip: str) -> bool:
        if not self.active:
            return True
        addr = _address(ip)
        if addr is None or _matches(addr, self._deny):
            return False
        return not self._allow or _matches(addr, self._allow)
