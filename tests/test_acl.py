"""Allow/deny CIDR lists (portfwd.policy.cidr): deny wins, both IP versions, v4-mapped."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portfwd.policy.cidr import AccessList, CidrSet, parse_cidr


def test_empty_list_allows_everyone():
    acl = AccessList.of()
    assert not acl.active and acl.permits("192.0.2.1") and acl.permits("::1")


def test_allow_list_admits_only_its_networks():
    acl = AccessList.of(allow=["10.0.0.0/8", "2001:db8::/32"])
    assert acl.active
    assert acl.permits("10.255.255.255") and acl.permits("2001:db8::5")
    assert not acl.permits("11.0.0.0") and not acl.permits("2001:db9::1")
    assert not acl.permits("9.255.255.255")


def test_deny_wins_over_allow():
    acl = AccessList.of(allow=["10.0.0.0/8"], deny=["10.1.0.0/16"])
    assert acl.permits("10.2.0.1") and not acl.permits("10.1.2.3")


def test_deny_only_list():
    acl = AccessList.of(deny=["127.0.0.2", "::1"])
    assert acl.permits("127.0.0.1") and not acl.permits("127.0.0.2") and not acl.permits("::1")


def test_v4_mapped_client_matches_ipv4_rules():
    acl = AccessList.of(allow=["127.0.0.0/8"], deny=["127.0.0.9"])
    assert acl.permits("::ffff:127.0.0.1")
    assert not acl.permits("::ffff:127.0.0.9")
    assert not acl.permits("::ffff:10.0.0.1")


def test_v4_mapped_rule_covers_plain_ipv4():
    assert parse_cidr("::ffff:10.0.0.0/104") == ipaddress.ip_network("10.0.0.0/8")
    acl = AccessList.of(deny=["::ffff:10.0.0.0/104"])
    assert not acl.permits("10.9.9.9") and acl.permits("11.0.0.1")


def test_scope_id_is_ignored():
    assert not AccessList.of(deny=["fe80::/10"]).permits("fe80::1%lo")


def test_unparsable_address_is_refused():
    assert not AccessList.of(deny=["10.0.0.0/8"]).permits("not-an-ip")


@pytest.mark.parametrize("text", ["10.0.0.1/8", "10.0.0.0/33", "300.0.0.0/8", "", "::/129",
                                  "example.com"])
def test_bad_cidr(text):
    with pytest.raises(ValueError):
        parse_cidr(text)


def test_bare_address_is_a_host_network():
    assert parse_cidr("192.0.2.7") == ipaddress.ip_network("192.0.2.7/32")
    assert parse_cidr("::1") == ipaddress.ip_network("::1/128")


def test_overlapping_and_adjacent_ranges_merge():
    cidrs = CidrSet(map(parse_cidr, ["10.0.0.0/9", "10.128.0.0/9", "10.0.0.0/16", "12.0.0.0/8"]))
    assert cidrs.v4.starts == [int(ipaddress.ip_address("10.0.0.0")),
                               int(ipaddress.ip_address("12.0.0.0"))]
    assert "10.200.0.1" in cidrs and "11.0.0.1" not in cidrs and "12.1.1.1" in cidrs


networks = st.lists(st.one_of(st.ip_addresses(v=4).flatmap(
    lambda a: st.integers(0, 32).map(lambda n: ipaddress.ip_network(f"{a}/{n}", strict=False))),
    st.ip_addresses(v=6).flatmap(
    lambda a: st.integers(0, 128).map(lambda n: ipaddress.ip_network(f"{a}/{n}", strict=False)))),
    max_size=12)


@given(networks, networks, st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)))
def test_matches_the_obvious_definition(allow, deny, address):
    acl = AccessList(CidrSet(allow), CidrSet(deny))
    plain = address.ipv4_mapped if address.version == 6 and address.ipv4_mapped else address
    denied = any(plain in n for n in deny if n.version == plain.version)
    allowed = not allow or any(plain in n for n in allow if n.version == plain.version)
    assert acl.permits(str(address)) == (allowed and not denied)
