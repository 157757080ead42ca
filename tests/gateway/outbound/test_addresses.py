"""Which addresses the outbound guard sends to: IP literals in every spelling, public or not,
and one lookup (``gateway/outbound/addresses.py``)."""

import ipaddress
import re
import socket

import pytest
from guard_cases import LITERAL_REFUSED, LOOPBACK, ScriptedResolver, teredo
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import outbound
from gateway.outbound import ForbiddenAddress

# --- Literal IPs -----------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.1", "127.0.0.1"),
        ("0X7F.0.0.1", "127.0.0.1"),
        ("017700000001", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("4294967295", "255.255.255.255"),
        ("1.16777215", "1.255.255.255"),
        ("127.0.0.1.", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::1", "::1"),
        ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ],
)
def test_literal_ip_is_read_in_every_spelling(host: str, expected: str) -> None:
    assert outbound.parse_literal_ip(host) == ipaddress.ip_address(expected)


@pytest.mark.parametrize(
    "host",
    ["example.com", "receiver.test", "1.2.3.4.5", "256.1.1.1", "1.16777216", "4294967296", "08"],
)
def test_a_name_is_not_an_ip(host: str) -> None:
    assert outbound.parse_literal_ip(host) is None


@pytest.mark.parametrize("host", ["[fe80::1%25eth0]", "fe80::1%eth0", "[zz]", "[::1"])
def test_zone_ids_and_broken_ipv6_are_refused(host: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        outbound.parse_literal_ip(host)


def inet_aton(text: str) -> ipaddress.IPv4Address | None:
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except OSError:
        return None


def agrees_with_inet_aton(text: str) -> None:
    # inet_aton refuses a trailing dot that we accept as the DNS root; everything else agrees.
    if not text.endswith("."):
        assert outbound.parse_literal_ip(text) == inet_aton(text), text


@pytest.mark.parametrize(
    "text",
    [
        "0x", "0x.1", "1.", "1..2", "00", "08", "09", "0x100000000", "4294967296",
        "1.16777216", "256.1", "1.2.65536", "0xg", "1.2.3.4.5", "", ".", "0x0x1",
        "00000000000000000000000001", "0x00000000000000000000001", "1e2", "0.0.0.0x",
        "0xffffffff", "0x1ffffffff", "255.255.255.255", "255.255.255.256",
    ],
)  # fmt: skip
def test_ipv4_parser_agrees_with_inet_aton_on_edges(text: str) -> None:
    agrees_with_inet_aton(text)


def ipv4_part() -> st.SearchStrategy[str]:
    number = st.integers(min_value=0, max_value=2**33)
    return st.one_of(
        number.map(str),
        number.map(lambda n: f"0{n:o}"),
        number.map(lambda n: f"0x{n:x}"),
        number.map(lambda n: f"0X{n:X}"),
    )


@settings(max_examples=500, deadline=None)
@given(st.lists(ipv4_part(), min_size=1, max_size=5).map(".".join))
def test_ipv4_parser_agrees_with_inet_aton_on_numbers(text: str) -> None:
    agrees_with_inet_aton(text)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="0123456789abcdefxX.", max_size=16))
def test_ipv4_parser_agrees_with_inet_aton_on_any_text(text: str) -> None:
    agrees_with_inet_aton(text)


# --- Public or not ---------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "93.184.216.34",
        "8.8.8.8",
        "2606:2800:220:1:248:1893:25c8:1946",
        "::ffff:93.184.216.34",
        "64:ff9b::808:808",
        "2002:808:808::1",
        teredo("65.54.227.120", "93.184.216.34"),
    ],
)
def test_global_unicast_is_public(address: str) -> None:
    assert outbound.is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    [
        "127.255.255.254", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1",
        "169.254.169.254", "100.64.0.1", "100.127.255.255", "0.0.0.0", "0.1.2.3",
        "224.0.0.1", "239.255.255.255", "240.0.0.1", "255.255.255.255", "192.0.0.8",
        "192.0.2.1", "198.18.0.1", "198.19.255.255", "198.51.100.1", "203.0.113.1",
        "::", "::1", "::127.0.0.1", "::8.8.8.8", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe", "64:ff9b:1::1", "2002:a00:1::", "2002:c0a8:101::1",
        teredo("10.0.0.1", "93.184.216.34"), teredo("65.54.227.120", "192.168.0.1"),
        "2001:db8::1", "3fff::1", "2001:2::1", "100::1", "fc00::1", "fdff::1", "fe80::1",
        "febf::1", "fec0::1", "ff02::1", "4000::1",
    ],
)  # fmt: skip
def test_every_internal_or_reserved_range_is_not_public(address: str) -> None:
    assert not outbound.is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize(("url", "words"), LITERAL_REFUSED)
async def test_delivery_refuses_a_literal_ip_without_a_lookup(url: str, words: str) -> None:
    host = url.removeprefix("https://").removesuffix("/").strip("[]")
    with pytest.raises(ForbiddenAddress, match=re.escape(words)):
        await outbound.resolve_public(host, 443, resolver=ScriptedResolver())


# --- Resolving once --------------------------------------------------------


async def test_a_name_that_resolves_to_loopback_is_refused_without_naming_the_address() -> None:
    resolver = ScriptedResolver([["127.0.0.1"]])
    with pytest.raises(ForbiddenAddress) as refused:
        await outbound.resolve_public("evil.test", 443, resolver=resolver)
    assert str(refused.value) == (
        "must not point at an internal address: evil.test resolves to a loopback address"
    )
    assert resolver.lookups == ["evil.test"]


async def test_one_internal_address_among_public_ones_is_enough_to_refuse() -> None:
    resolver = ScriptedResolver([["93.184.216.34", "2606:2800:220:1::1", "::ffff:10.0.0.1"]])
    with pytest.raises(ForbiddenAddress, match="private address in IPv4-mapped form"):
        await outbound.resolve_public("mixed.test", 443, resolver=resolver)


async def test_addresses_come_back_once_each_in_the_resolvers_order() -> None:
    resolver = ScriptedResolver([["93.184.216.34", "2606:2800:220:1::1", "93.184.216.34"]])
    addresses = await outbound.resolve_public("example.test", 443, resolver=resolver)
    assert addresses == [
        ipaddress.ip_address("93.184.216.34"),
        ipaddress.ip_address("2606:2800:220:1::1"),
    ]


async def test_an_allowed_host_may_resolve_to_loopback() -> None:
    resolver = ScriptedResolver([[LOOPBACK]])
    addresses = await outbound.resolve_public(
        "Receiver.Test.", 443, resolver=resolver, allowed_hosts=frozenset({"receiver.test"})
    )
    assert addresses == [ipaddress.ip_address(LOOPBACK)]


async def test_the_system_resolver_is_used_by_default() -> None:
    # "localhost" resolves from /etc/hosts: no DNS traffic leaves the machine.
    with pytest.raises(ForbiddenAddress, match="localhost resolves to a loopback address"):
        await outbound.resolve_public("localhost", 443)
