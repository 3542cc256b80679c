"""Client identity: X-Forwarded-For only from trusted proxies; IPv6 by /64."""
import ipaddress

import pytest

from regmw.clients import ClientResolver

PROXY = [ipaddress.ip_network("10.0.0.0/8")]


def test_forwarded_for_is_ignored_without_trusted_proxies():
    resolver = ClientResolver()
    assert resolver.client_key({"REMOTE_ADDR": "203.0.113.9", "HTTP_X_FORWARDED_FOR": "1.1.1.1"}) == "203.0.113.9"


def test_forwarded_for_is_ignored_from_an_untrusted_peer():
    resolver = ClientResolver(PROXY)
    assert resolver.client_key({"REMOTE_ADDR": "203.0.113.9", "HTTP_X_FORWARDED_FOR": "1.1.1.1"}) == "203.0.113.9"


def test_rightmost_untrusted_hop_is_the_client():
    resolver = ClientResolver(PROXY)
    environ = {"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "6.6.6.6, 198.51.100.7, 10.0.0.5"}
    # 6.6.6.6 was prepended by the client itself; 198.51.100.7 is who reached our proxies
    assert resolver.client_key(environ) == "198.51.100.7"


def test_garbage_forwarded_for_falls_back_to_the_peer():
    resolver = ClientResolver(PROXY)
    assert resolver.client_key({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "evil\r\n"}) == "10.0.0.2"


def test_ipv6_grouped_by_prefix():
    resolver = ClientResolver()
    a = resolver.client_key({"REMOTE_ADDR": "2001:db8:1:2::1"})
    b = resolver.client_key({"REMOTE_ADDR": "2001:db8:1:2:ffff::9"})
    c = resolver.client_key({"REMOTE_ADDR": "2001:db8:1:3::1"})
    assert a == b == "2001:db8:1:2::/64"
    assert c != a
    assert ClientResolver(ipv6_prefix=48).client_key({"REMOTE_ADDR": "2001:db8:1:3::1"}) == "2001:db8:1::/48"
    assert resolver.client_key({"REMOTE_ADDR": "::ffff:192.0.2.1"}) == "192.0.2.1"


def test_an_ipv6_zone_is_not_part_of_the_client():
    """``fe80::1%eth0`` is the address fe80::1: a zone of any text must not make it another key."""
    for prefix in (64, 128):
        resolver = ClientResolver(PROXY, ipv6_prefix=prefix)
        plain = resolver.client_key({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "fe80::1"})
        for hop in ("fe80::1%eth0", "fe80::1%{evil}", "[fe80::1%a]:443"):
            assert resolver.client_key({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": hop}) == plain, hop
        forwarded = {"REMOTE_ADDR": "10.0.0.2", "HTTP_FORWARDED": 'for="[fe80::1%{b}]:80"'}
        assert resolver.client_key(forwarded) == plain
        assert resolver.client_key({"REMOTE_ADDR": "fe80::1%eth0"}) == plain


# --- hops with ports, and RFC 7239 Forwarded ----------------------------------------


@pytest.mark.parametrize("hop, client", [
    ("198.51.100.7:5501", "198.51.100.7"),  # ip:port, as some load balancers write it
    ("[2001:db8:1:2::7]:443", "2001:db8:1:2::/64"),  # [v6]:port
    ("[2001:db8:1:2::7]", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::7", "2001:db8:1:2::/64"),  # a bare v6 address is not mistaken for ip:port
])
def test_forwarded_for_hop_with_port(hop, client):
    resolver = ClientResolver(PROXY)
    assert resolver.client_key({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": f"6.6.6.6, {hop}, 10.0.0.5:80"}) == client


def test_hops_with_ports_are_different_clients():
    # Before ports were parsed, every such hop was garbage and all clients shared the proxy's limit.
    resolver = ClientResolver(PROXY)
    keys = {resolver.client_key({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": f"198.51.100.{i}:4000{i}"})
            for i in range(1, 4)}
    assert keys == {"198.51.100.1", "198.51.100.2", "198.51.100.3"}


@pytest.mark.parametrize("hop", ["198.51.100.7:", "198.51.100.7:port", "198.51.100.7:1234567", "[2001:db8::7]x",
                                 "[2001:db8::7", "unknown", "_hidden", "1.2.3.4:5:6"])
def test_malformed_hop_falls_back_to_the_peer(hop):
    resolver = ClientResolver(PROXY)
    assert resolver.client_key({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": hop}) == "10.0.0.2"


@pytest.mark.parametrize("header, client", [
    ("for=198.51.100.7", "198.51.100.7"),
    ('for="198.51.100.7:4711";proto=https;by=10.0.0.5', "198.51.100.7"),
    ('for="[2001:db8:cafe::17]:4711"', "2001:db8:cafe::/64"),
    ("for=6.6.6.6, for=198.51.100.7;proto=http, for=10.0.0.5", "198.51.100.7"),  # right to left, skipping proxies
    ('For="198.51.100.7", for="10.0.0.5:80"', "198.51.100.7"),
    ("for=unknown", "10.0.0.2"),  # no usable address: the proxy
    ("for=_gazonk", "10.0.0.2"),
    ('for="198.51.100.7', "10.0.0.2"),  # malformed
    ("proto=https", "10.0.0.2"),  # no for=
])
def test_forwarded_header(header, client):
    resolver = ClientResolver(PROXY)
    assert resolver.client_key({"REMOTE_ADDR": "10.0.0.2", "HTTP_FORWARDED": header}) == client


def test_forwarded_header_ignored_from_an_untrusted_peer():
    resolver = ClientResolver(PROXY)
    assert resolver.client_key({"REMOTE_ADDR": "203.0.113.9", "HTTP_FORWARDED": "for=1.1.1.1"}) == "203.0.113.9"
    assert ClientResolver().client_key({"REMOTE_ADDR": "10.0.0.2", "HTTP_FORWARDED": "for=1.1.1.1"}) == "10.0.0.2"


def test_both_headers_count_only_when_they_agree():
    resolver = ClientResolver(PROXY)
    agree = {"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "198.51.100.7:1234, 10.0.0.9",
             "HTTP_FORWARDED": 'for="198.51.100.7:1234"'}
    assert resolver.client_key(agree) == "198.51.100.7"
    # Our proxy appends to X-Forwarded-For; the client wrote Forwarded itself to pick an identity.
    spoofed = {"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "198.51.100.7", "HTTP_FORWARDED": "for=192.0.2.1"}
    assert resolver.client_key(spoofed) == "10.0.0.2"


@pytest.mark.parametrize("header, client", [
    ("198.51.100.7", "198.51.100.7"),  # the fast path: canonical IPv4, its own key
    ("  198.51.100.7  ", "198.51.100.7"),  # spaces around a hop
    ("010.0.0.1", "10.0.0.2"),  # a leading zero is not an address (ipaddress refuses it too): the peer
    ("198.51.100.7, 10.1.2.3", "198.51.100.7"),  # a trusted IPv4 hop is skipped
    ("10.1.2.3, 10.4.5.6", "10.1.2.3"),  # every hop a trusted proxy: the first one
    ("::ffff:198.51.100.7", "198.51.100.7"),  # IPv4-mapped IPv6 takes the ipaddress path, same key
    ("1.2.3.4\x00", "10.0.0.2"),  # a NUL is garbage, never an address
])
def test_ipv4_fast_path_agrees_with_ipaddress(header, client):
    resolver = ClientResolver(PROXY)
    assert resolver.client_key({"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": header}) == client


def test_untrusted_ipv4_peer_is_its_own_key_and_a_trusted_one_is_not():
    resolver = ClientResolver(PROXY)
    assert resolver.client_key({"REMOTE_ADDR": "203.0.113.9", "HTTP_X_FORWARDED_FOR": "1.1.1.1"}) == "203.0.113.9"
    assert resolver.client_key({"REMOTE_ADDR": "10.9.9.9", "HTTP_X_FORWARDED_FOR": "1.1.1.1"}) == "1.1.1.1"


def test_ipv4_mapped_addresses_are_trusted_as_their_ipv4():
    # `regmw serve --host ::` (dual stack) sees an IPv4 load balancer as ::ffff:a.b.c.d: before, it was
    # never trusted, so every client behind it shared the balancer's limit.
    resolver = ClientResolver(PROXY)
    assert resolver.client_key({"REMOTE_ADDR": "::ffff:10.0.0.2", "HTTP_X_FORWARDED_FOR": "198.51.100.7"}) == "198.51.100.7"
    assert resolver.client_key({"REMOTE_ADDR": "::ffff:10.0.0.2", "HTTP_FORWARDED": "for=198.51.100.7"}) == "198.51.100.7"
    chain = {"REMOTE_ADDR": "10.0.0.2", "HTTP_X_FORWARDED_FOR": "198.51.100.7, ::ffff:10.0.0.5"}
    assert resolver.client_key(chain) == "198.51.100.7"  # a mapped proxy hop is skipped like 10.0.0.5
    # an untrusted mapped peer is still only itself
    assert resolver.client_key({"REMOTE_ADDR": "::ffff:203.0.113.9", "HTTP_X_FORWARDED_FOR": "1.1.1.1"}) == "203.0.113.9"
