"""Shared cases of the outbound guard's tests: the refusal table and a scripted resolver."""

import ipaddress
from dataclasses import dataclass, field

from gateway.outbound import IPAddress

LOOPBACK = "127.0.0.1"


def teredo(server: str, client: str) -> str:
    """A Teredo address: 2001:0::/32, server in bits 32..63, client inverted in the last 32."""
    bits = (
        (0x2001_0000 << 96)
        | (int(ipaddress.IPv4Address(server)) << 64)
        | (0x8000_63BF << 32)  # flags and the obfuscated port: any value
        | (~int(ipaddress.IPv4Address(client)) & 0xFFFF_FFFF)
    )
    return str(ipaddress.IPv6Address(bits))


TEREDO_LOOPBACK_CLIENT = teredo("65.54.227.120", "127.0.0.1")

# (URL, words the refusal must contain). The host of every one but the last three is an IP.
REFUSED = [
    ("https://127.0.0.1/", "loopback"),
    ("https://2130706433/", "loopback"),
    ("https://0x7f.1/", "loopback"),
    ("https://017700000001/", "loopback"),
    ("https://127.1/", "loopback"),
    ("https://[::1]/", "loopback"),
    ("https://[::ffff:127.0.0.1]/", "loopback address in IPv4-mapped form"),
    ("https://[::ffff:7f00:1]/", "loopback address in IPv4-mapped form"),
    ("https://169.254.169.254/", "link-local (cloud metadata)"),
    ("https://10.0.0.1/", "private"),
    ("https://100.64.0.1/", "shared"),
    ("https://[64:ff9b::7f00:1]/", "loopback address in NAT64 form"),
    ("https://[2002:7f00:1::]/", "loopback address in 6to4 form"),
    (f"https://[{TEREDO_LOOPBACK_CLIENT}]/", "loopback address in Teredo form"),
    ("https://[fe80::1]/", "link-local"),
    ("https://[fc00::1]/", "private"),
    ("https://0.0.0.0/", "unspecified"),
    ("https://224.0.0.1/", "multicast"),
    ("https://240.0.0.1/", "reserved"),
    ("http://example.com/", "must be an https:// URL"),
    ("https://example.com/" + "a" * 2029, "must be at most 2048 characters"),
    ("https://user:pw@example.com/", "must not contain a user name or password"),
]
LITERAL_REFUSED = REFUSED[:-3]
assert len(REFUSED[-2][0]) == 2049


@dataclass
class ScriptedResolver:
    """Answers the n-th lookup with ``answers[n]`` (the last one again after that)."""

    answers: list[list[str]] = field(default_factory=list)
    lookups: list[str] = field(default_factory=list)

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        self.lookups.append(host)
        assert self.answers, f"no lookup expected, got one for {host}"
        answer = self.answers[min(len(self.lookups), len(self.answers)) - 1]
        return [ipaddress.ip_address(address) for address in answer]
