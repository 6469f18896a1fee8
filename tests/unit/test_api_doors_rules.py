"""The Host and Origin rules of api/auth.py (pure): loopback names by default, named hosts in a cluster."""

from __future__ import annotations

from tierflow.api.auth import host_allowed, origin_is_own


def test_by_default_only_loopback_names_on_the_port_of_the_connection() -> None:
    for host in ("127.0.0.1:8080", "localhost:8080", "LOCALHOST:8080", "[::1]:8080"):
        assert host_allowed(host, frozenset(), 8080), host
    for host in ("127.0.0.1:8081", "localhost", "evil.example:8080", "127.0.0.1.evil.example:8080", "",
                 "[::2]:8080", "localhost:8080@evil.example", "0.0.0.0:8080"):
        assert not host_allowed(host, frozenset(), 8080), host


def test_named_hosts_match_by_name_and_by_port_when_given() -> None:
    allowed = frozenset({"tierflow.example.com", "tierflow-api:8080"})
    assert host_allowed("tierflow.example.com", allowed, 8080)
    assert host_allowed("tierflow.example.com:443", allowed, 8080)
    assert host_allowed("tierflow-api:8080", allowed, 8080)
    assert not host_allowed("tierflow-api:9090", allowed, 8080)
    assert not host_allowed("127.0.0.1:8080", allowed, 8080)  # named hosts replace the loopback default


def test_an_origin_is_own_when_it_names_the_host_and_port_asked() -> None:
    assert origin_is_own("http://127.0.0.1:8080", "127.0.0.1:8080")
    assert origin_is_own("http://[::1]:8080", "[::1]:8080")
    assert origin_is_own("https://tierflow.example.com", "tierflow.example.com")  # behind a TLS ingress
    assert origin_is_own("http://tierflow.example.com", "tierflow.example.com:80")
    for origin in ("http://evil.example", "null", "http://127.0.0.1:8081", "http://localhost:8080", "file://",
                   "chrome-extension://abc", "http://127.0.0.1:8080/path", "http://127.0.0.1:notaport"):
        assert not origin_is_own(origin, "127.0.0.1:8080"), origin
