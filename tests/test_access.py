"""Unit and property tests of the IP access rules (openai_forward.access).

The address judged must be one the client cannot choose: the socket peer, unless a configured
trusted proxy vouches for the hop before it. A spoofed X-Forwarded-For from anyone else is
ignored (TESTING.md G6).
"""

from __future__ import annotations

import ipaddress
import time

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from openai_forward.access import CACHE_SIZE, MAX_FORWARDED_HOPS, AccessRules
from openai_forward.config import ConfigError

# --------------------------------------------------------------------------------------------
# construction


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"allow": ["10.0.0.0/8", "::1", "10.0.0.300/8"]},
            "access.allow[2]: '10.0.0.300/8' is not an IP address or network",
        ),
        ({"deny": ["unknown"]}, "access.deny[0]: 'unknown' is not an IP address or network"),
        ({"deny": [""]}, "access.deny[0]: '' is not an IP address or network"),
        (
            {"trusted_proxies": ["127.0.0.1", "1.2.3.4:80"]},
            "access.trusted_proxies[1]: '1.2.3.4:80' is not an IP address or network",
        ),
        ({"allow": ["10.0.0.0/33"]}, "access.allow[0]: '10.0.0.0/33' is not an IP address"),
        ({"allow": ["2001:db8::/129"]}, "access.allow[0]: '2001:db8::/129' is not an IP"),
        ({"allow": ["2001:db8:::1"]}, "access.allow[0]: '2001:db8:::1' is not an IP"),
        ({"allow": ["010.0.0.1"]}, "access.allow[0]: '010.0.0.1' is not an IP"),
        ({"allow": ["[::1]"]}, "access.allow[0]: '[::1]' is not an IP"),
        ({"allow": ["example.com"]}, "access.allow[0]: 'example.com' is not an IP"),
        # YAML can hand us an int; ipaddress would read 10 as 0.0.0.10
        ({"allow": [10]}, "access.allow[0]: 10 is not an IP address or network"),
        ({"allow": [None]}, "access.allow[0]: None is not an IP address or network"),
        # a bare string is not a list of one network
        ({"deny": "10.0.0.0/8"}, "access.deny: expected a list of addresses or networks"),
    ],
)
def test_an_invalid_entry_is_refused_with_its_key_and_index(
    kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        AccessRules(**kwargs)  # type: ignore[arg-type]
    assert str(info.value).startswith(message)


def test_the_error_names_the_configured_key() -> None:
    with pytest.raises(ConfigError, match=r"^upstreams\[1\]\.access\.deny\[0\]: 'x'"):
        AccessRules(deny=["x"], key="upstreams[1].access")


@pytest.mark.parametrize(
    "entry",
    [
        "10.0.0.0/8",
        "10.1.2.3/8",  # host bits set: read as 10.0.0.0/8
        "192.168.1.7",
        "0.0.0.0/0",
        "::1",
        "::/0",
        "2001:db8::/32",
        "::ffff:10.0.0.0/104",
        "fe80::%eth0/64",
        " 10.0.0.0/8 ",
        "10.0.0.0/255.0.0.0",
    ],
)
def test_valid_entries_are_accepted(entry: str) -> None:
    rules = AccessRules(allow=[entry], deny=[entry], trusted_proxies=[entry])
    assert rules.active
    network = ipaddress.ip_network(entry.strip().replace("%eth0", ""), strict=False)
    assert not rules.allowed(str(network.network_address))  # listed in deny, deny wins


@pytest.mark.parametrize(
    ("allow", "deny", "active"),
    [((), (), False), (["10.0.0.0/8"], (), True), ((), ["10.0.0.0/8"], True)],
)
def test_rules_are_active_only_with_an_allow_or_deny_list(
    allow: list[str], deny: list[str], active: bool
) -> None:
    assert AccessRules(allow, deny, trusted_proxies=["10.0.0.1"]).active is active


# --------------------------------------------------------------------------------------------
# allowed


@pytest.mark.parametrize(
    ("allow", "deny", "ip", "expected"),
    [
        # no rules: everyone passes, even an unparseable peer
        ([], [], "1.2.3.4", True),
        ([], [], "unix-socket", True),
        # allow list
        (["10.0.0.0/8"], [], "10.200.3.4", True),
        (["10.0.0.0/8"], [], "11.0.0.1", False),
        (["10.0.0.0/8", "192.168.1.7"], [], "192.168.1.7", True),
        (["10.0.0.0/8", "192.168.1.7"], [], "192.168.1.8", False),
        (["10.1.2.3/8"], [], "10.9.9.9", True),
        # deny list alone: everyone else passes (empty allow = all)
        ([], ["10.0.0.0/8"], "10.0.0.1", False),
        ([], ["10.0.0.0/8"], "11.0.0.1", True),
        ([], ["10.0.0.0/8"], "2001:db8::1", True),
        # deny beats allow
        (["10.0.0.0/8"], ["10.6.0.0/16"], "10.6.1.1", False),
        (["10.0.0.0/8"], ["10.6.0.0/16"], "10.7.1.1", True),
        (["10.6.0.5"], ["10.6.0.5"], "10.6.0.5", False),
        # IPv6
        (["2001:db8::/32"], [], "2001:db8:ffff::1", True),
        (["2001:db8::/32"], [], "2001:db9::1", False),
        (["2001:db8::/32"], [], "2001:DB8:0:0:0:0:0:1", True),
        (["::1"], [], "::1", True),
        ([], ["2001:db8::/32"], "2001:db8::7", False),
        (["::/0"], [], "2001:db8::1", True),
        # a v4 rule never matches a v6 address and vice versa
        (["0.0.0.0/0"], [], "2001:db8::1", False),
        (["::/0"], [], "10.0.0.1", False),
        # IPv4-mapped IPv6 is the IPv4 address, in the ip and in the rules
        (["10.0.0.0/8"], [], "::ffff:10.1.2.3", True),
        ([], ["10.0.0.0/8"], "::ffff:10.1.2.3", False),
        ([], ["10.0.0.0/8"], "::ffff:a01:203", False),
        (["::ffff:10.0.0.0/104"], [], "10.1.2.3", True),
        (["::ffff:10.0.0.0/104"], [], "11.1.2.3", False),
        ([], ["::ffff:10.1.2.3"], "10.1.2.3", False),
        # zone ids do not change who the client is
        (["fe80::/10"], [], "fe80::1%eth0", True),
        ([], ["fe80::1"], "fe80::1%eth0", False),
        # unparseable ip with active rules: refused
        (["10.0.0.0/8"], [], "", False),
        (["10.0.0.0/8"], [], "unknown", False),
        ([], ["10.0.0.0/8"], "1.2.3.4:80", False),
        ([], ["10.0.0.0/8"], " 1.2.3.4", False),
        (["0.0.0.0/0"], [], "010.0.0.1", False),
    ],
)
def test_allowed(allow: list[str], deny: list[str], ip: str, expected: bool) -> None:
    rules = AccessRules(allow, deny)
    assert rules.allowed(ip) is expected
    assert rules.allowed(ip) is expected  # and again, from the cache


def test_the_verdict_cache_stays_bounded_and_correct() -> None:
    rules = AccessRules(allow=["10.0.0.0/16"], deny=["10.0.0.0/24"])
    for n in range(CACHE_SIZE * 2 + 10):
        ip = str(ipaddress.IPv4Address(0x0A000000 + n))
        assert rules.allowed(ip) is (n >= 256)
        assert len(rules._verdicts) <= CACHE_SIZE
    assert rules.allowed("10.0.0.1") is False
    assert rules.allowed("10.0.1.1") is True
    assert rules.allowed("10.1.0.1") is False


# --------------------------------------------------------------------------------------------
# client_ip

PROXIES = AccessRules(trusted_proxies=["127.0.0.1", "10.0.0.0/8", "fd00::/8"])


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        # no trusted proxies configured / untrusted peer: the peer, whatever XFF says
        ("203.0.113.9", [b"1.1.1.1"], "203.0.113.9"),
        ("203.0.113.9", [b"127.0.0.1"], "203.0.113.9"),
        ("203.0.113.9", [b"10.0.0.1, 1.1.1.1"], "203.0.113.9"),
        ("2001:db8::9", [b"1.1.1.1"], "2001:db8::9"),
        # trusted peer without XFF: the peer
        ("127.0.0.1", [], "127.0.0.1"),
        # trusted peer: the right-most untrusted entry
        ("127.0.0.1", [b"198.51.100.7"], "198.51.100.7"),
        ("127.0.0.1", [b"6.6.6.6, 198.51.100.7"], "198.51.100.7"),
        ("127.0.0.1", [b"6.6.6.6, 198.51.100.7, 10.0.0.2, 10.9.9.9"], "198.51.100.7"),
        ("10.0.0.5", [b"6.6.6.6,198.51.100.7 ,\t10.0.0.2"], "198.51.100.7"),
        ("fd00::1", [b"2001:db8::7, fd12::3"], "2001:db8::7"),
        ("fd00::1", [b"2001:DB8:0::7"], "2001:db8::7"),
        # several header instances are one list, in order
        ("127.0.0.1", [b"6.6.6.6", b"198.51.100.7", b"10.0.0.2"], "198.51.100.7"),
        ("127.0.0.1", [b"6.6.6.6, 198.51.100.7", b"10.0.0.2, 10.0.0.3"], "198.51.100.7"),
        ("127.0.0.1", [b"198.51.100.7", b"10.0.0.2", b""], "127.0.0.1"),
        # everything trusted: the left-most (last examined) trusted hop
        ("127.0.0.1", [b"10.0.0.3, 10.0.0.2"], "10.0.0.3"),
        # mapped addresses are IPv4, in the peer and in the entries
        ("::ffff:127.0.0.1", [b"198.51.100.7"], "198.51.100.7"),
        ("::ffff:203.0.113.9", [b"198.51.100.7"], "203.0.113.9"),
        ("127.0.0.1", [b"::ffff:198.51.100.7"], "198.51.100.7"),
        ("127.0.0.1", [b"6.6.6.6, ::ffff:10.0.0.2"], "6.6.6.6"),
        # malformed entries end the walk at the last trusted hop, never returning the garbage
        ("127.0.0.1", [b"unknown"], "127.0.0.1"),
        ("127.0.0.1", [b"6.6.6.6, unknown"], "127.0.0.1"),
        ("127.0.0.1", [b"6.6.6.6, unknown, 10.0.0.2"], "10.0.0.2"),
        ("127.0.0.1", [b"6.6.6.6, 1.2.3.4:80"], "127.0.0.1"),
        ("127.0.0.1", [b"6.6.6.6, [2001:db8::1]"], "127.0.0.1"),
        ("127.0.0.1", [b"6.6.6.6,,10.0.0.2"], "10.0.0.2"),
        ("127.0.0.1", [b"6.6.6.6, "], "127.0.0.1"),
        ("127.0.0.1", [b"<script>"], "127.0.0.1"),
        ("127.0.0.1", [b"1.2.3.\xb2"], "127.0.0.1"),
        ("127.0.0.1", [b"6.6.6.6 7.7.7.7"], "127.0.0.1"),
        # a zone id is free text: dropped, not echoed
        ("127.0.0.1", [b"fe80::1%<script>"], "fe80::1"),
        ("fe80::1%eth0", [], "fe80::1"),
        # an unparseable peer (e.g. a unix socket) comes back unchanged
        ("", [b"1.1.1.1"], ""),
        ("unix:/run/gw.sock", [b"1.1.1.1"], "unix:/run/gw.sock"),
    ],
)
def test_client_ip(peer: str, xff: list[bytes], expected: str) -> None:
    assert PROXIES.client_ip(peer, xff) == expected


def test_a_spoofed_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    rules = AccessRules(deny=["203.0.113.0/24"], trusted_proxies=["127.0.0.1"])
    ip = rules.client_ip("203.0.113.9", [b"127.0.0.1", b"10.0.0.1"])
    assert ip == "203.0.113.9"
    assert rules.allowed(ip) is False


def test_a_client_cannot_hide_behind_a_trusted_proxy_by_prepending_entries() -> None:
    # The proxy appends the real peer; whatever the client wrote lies to its left.
    rules = AccessRules(allow=["10.0.0.0/8"], trusted_proxies=["127.0.0.1"])
    ip = rules.client_ip("127.0.0.1", [b"10.1.1.1, 10.2.2.2, 203.0.113.9"])
    assert ip == "203.0.113.9"
    assert rules.allowed(ip) is False


def test_without_trusted_proxies_the_peer_is_always_the_client() -> None:
    rules = AccessRules(allow=["127.0.0.1"])
    assert rules.client_ip("127.0.0.1", [b"198.51.100.7"]) == "127.0.0.1"


def test_the_walk_examines_at_most_32_entries() -> None:
    rules = AccessRules(trusted_proxies=["10.0.0.0/8"])
    hops = [f"10.0.{n // 256}.{n % 256}".encode() for n in range(100)]
    header = b", ".join([b"198.51.100.7", *hops])
    # right to left, the 32nd entry is hops[100 - 32]; the client at the far left is not reached
    assert rules.client_ip("10.255.0.1", [header]) == hops[100 - MAX_FORWARDED_HOPS].decode()
    assert rules.client_ip("10.255.0.1", [b"198.51.100.7", *hops]) == hops[68].decode()
    split = [b", ".join(hops[:50]), b", ".join(hops[50:])]
    assert rules.client_ip("10.255.0.1", [b"198.51.100.7", *split]) == hops[68].decode()
    # 31 trusted hops leave room for the client
    assert rules.client_ip("10.255.0.1", [b"198.51.100.7", *hops[:31]]) == "198.51.100.7"


def test_a_huge_forwarded_for_costs_no_more_than_a_short_one() -> None:
    rules = AccessRules(trusted_proxies=["10.0.0.0/8"])
    header = b"1.1.1.1," * 200_000 + b"10.0.0.2"
    headers = [b"1.1.1.1"] * 100_000 + [header]
    start = time.perf_counter()
    for _ in range(100):
        assert rules.client_ip("10.0.0.1", headers) == "1.1.1.1"
    assert time.perf_counter() - start < 0.5


# --------------------------------------------------------------------------------------------
# properties


def _normal(text: str) -> str | None:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr).split("%")[0]


_v4_small = st.integers(0, 63).map(lambda n: str(ipaddress.IPv4Address(0x0A000000 + n)))
_v4_any = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
_v6_small = st.integers(0, 63).map(lambda n: str(ipaddress.IPv6Address(0x20010DB8 << 96 | n)))
_v4 = st.one_of(_v4_small, _v4_any)
_address_text = st.one_of(
    _v4,
    _v6_small,
    _v4.map(lambda a: f"::ffff:{a}"),
    st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n))),
)
_garbage = st.one_of(
    st.sampled_from(["", "unknown", "1.2.3.4:80", "[::1]", "_hidden", "1.2.3", "a b"]),
    st.text(alphabet="0123456789abcdef.:%[] x", max_size=12),
)
_entry = st.one_of(_address_text, _address_text, _garbage)
_padding = st.sampled_from(["", " ", "\t", "  "])


@st.composite
def _forwarded_for(draw: st.DrawFn) -> list[bytes]:
    entries = draw(st.lists(st.tuples(_padding, _entry, _padding), max_size=40))
    texts = [f"{a}{e}{b}" for a, e, b in entries]
    cuts = sorted(draw(st.sets(st.integers(0, len(texts)), max_size=4)))
    headers, start = [], 0
    for cut in [*cuts, len(texts)]:
        if cut > start:
            headers.append(",".join(texts[start:cut]).encode())
            start = cut
    return headers


_trusted = st.lists(
    st.one_of(
        st.tuples(_v4_small, st.integers(26, 32)).map(lambda t: f"{t[0]}/{t[1]}"),
        st.tuples(_v6_small, st.integers(122, 128)).map(lambda t: f"{t[0]}/{t[1]}"),
        st.tuples(_v4_small, st.integers(122, 128)).map(lambda t: f"::ffff:{t[0]}/{t[1]}"),
    ),
    max_size=3,
)


def _reference_client_ip(rules_trusted: list[str], peer: str, xff: list[bytes]) -> str:
    """The walk written the obvious way: split everything, then look at the last 32."""
    nets = [_reference_network(n) for n in rules_trusted]

    def trusted(text: str) -> bool:
        return any(ipaddress.ip_address(text) in net for net in nets)

    hop = _normal(peer)
    if hop is None:
        return peer
    if not trusted(hop):
        return hop
    entries = b",".join(xff).split(b",") if xff else []
    for raw in list(reversed(entries))[:MAX_FORWARDED_HOPS]:
        raw = raw.strip(b" \t")
        text = _normal(raw.decode("latin-1"))
        if text is None or not raw.isascii():
            break
        hop = text
        if not trusted(hop):
            break
    return hop


@settings(max_examples=300, deadline=None)
@given(trusted=_trusted, peer=st.one_of(_address_text, _garbage), xff=_forwarded_for())
@example(trusted=["10.0.0.0/26"], peer="10.0.0.1", xff=[b"10.0.0.5, ::ffff:10.0.0.2"])
def test_client_ip_is_the_peer_or_a_forwarded_entry(
    trusted: list[str], peer: str, xff: list[bytes]
) -> None:
    rules = AccessRules(trusted_proxies=trusted)
    got = rules.client_ip(peer, xff)
    candidates = {peer, _normal(peer)}
    candidates |= {_normal(e.strip(b" \t").decode("latin-1")) for h in xff for e in h.split(b",")}
    assert got in candidates
    assert got == _reference_client_ip(trusted, peer, xff)


@settings(max_examples=200, deadline=None)
@given(peer=st.one_of(_address_text, _garbage), xff=_forwarded_for())
def test_without_trusted_proxies_client_ip_is_always_the_peer(peer: str, xff: list[bytes]) -> None:
    got = AccessRules(allow=["10.0.0.0/8"]).client_ip(peer, xff)
    assert got == (_normal(peer) or peer)


def _reference_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    net = ipaddress.ip_network(text, strict=False)
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(mapped):
        first = net.network_address.ipv4_mapped
        return ipaddress.ip_network(f"{first}/{net.prefixlen - 96}", strict=False)
    return net


def _reference_allowed(allow: list[str], deny: list[str], ip: str) -> bool:
    if not allow and not deny:
        return True
    text = _normal(ip)
    if text is None:
        return False
    addr = ipaddress.ip_address(text)
    if any(addr in _reference_network(n) for n in deny):
        return False
    return not allow or any(addr in _reference_network(n) for n in allow)


_network_text = st.one_of(
    st.tuples(_v4_small, st.integers(24, 32)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(_v4, st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(_v6_small, st.integers(120, 128)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(_v4_small, st.integers(120, 128)).map(lambda t: f"::ffff:{t[0]}/{t[1]}"),
    _address_text,
)


@settings(max_examples=300, deadline=None)
@given(
    allow=st.lists(_network_text, max_size=3),
    deny=st.lists(_network_text, max_size=3),
    ips=st.lists(st.one_of(_address_text, _garbage), min_size=1, max_size=5),
)
def test_allowed_agrees_with_a_reference(allow: list[str], deny: list[str], ips: list[str]) -> None:
    rules = AccessRules(allow, deny)
    for ip in ips:
        assert rules.allowed(ip) is _reference_allowed(allow, deny, ip), ip
