"""Client identity: X-Forwarded-For only from trusted proxies; IPv6 by /64."""
import ipaddress

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
