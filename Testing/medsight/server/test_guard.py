"""Which Host headers the guard lets through: the names the engine was given, bare IPv6 addresses included."""

from __future__ import annotations

from medsight.server.guard import HostPolicy, host_name

LAN_V6, OTHER_IP = "2001:db8::5", "203.0.113.5"


def test_an_engine_bound_to_the_ipv6_loopback_answers_to_loopback_names_only():
    """Before the fix `--host ::1` was read as a malformed name, i.e. a wildcard bind: any IP literal was allowed."""
    policy = HostPolicy("::1")
    assert policy.allows(host_name("[::1]:8765")) and policy.allows(host_name("localhost:8765"))
    assert not policy.allows(host_name(f"{OTHER_IP}:8765"))
    assert not policy.allows(host_name(f"[{LAN_V6}]:8765"))


def test_a_bare_ipv6_address_given_to_allow_host_is_allowed():
    """Before the fix `--allow-host 2001:db8::5` allowed nothing: only the bracketed form worked."""
    for given in (LAN_V6, f"[{LAN_V6}]", LAN_V6.upper()):
        policy = HostPolicy("192.168.1.5", (given,))
        assert policy.allows(host_name(f"[{LAN_V6}]:8765")), given
        assert not policy.allows(host_name(f"{OTHER_IP}:8765")), given


def test_an_engine_bound_to_an_ipv6_address_answers_to_it():
    policy = HostPolicy(LAN_V6)
    assert policy.allows(host_name(f"[{LAN_V6}]:8765")) and not policy.allows(host_name(OTHER_IP))
    assert HostPolicy("::").any_ip and HostPolicy("0.0.0.0").any_ip
