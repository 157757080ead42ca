"""The form of an outbound URL, checked at submit (``gateway/outbound/urls.py``): each refusal
names the field."""

import re

import pytest
from guard_cases import REFUSED

from gateway.callback_urls import validate_callback_url
from gateway.errors import InvalidRequest


@pytest.mark.parametrize(("url", "words"), REFUSED)
def test_submit_refuses_naming_the_field(url: str, words: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        validate_callback_url(url)
    assert refused.value.message.startswith("callback_url: ")
    assert words in refused.value.message
    with pytest.raises(InvalidRequest, match=r"^X-Webhook-URL: "):
        validate_callback_url(url, "X-Webhook-URL")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("https://a b/", "must name a valid host"),
        ("https://1.2.3.4.5/", "must name a valid host"),
        ("https://example.123/", "must name a valid host"),
        ("https://bücher.example/", "must name a valid host"),
        ("https://[fe80::1%25eth0]/", "must name a valid host"),
        ("https://134744072/", "four decimal numbers"),
        ("https://example.com:99999/", "is not a valid URL"),
        ("https:///path", "must name a host"),
    ],
)
def test_submit_refuses_a_malformed_host(url: str, words: str) -> None:
    with pytest.raises(InvalidRequest, match=r"^callback_url: .*" + re.escape(words)):
        validate_callback_url(url)


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/hook",
        "https://hooks.example.com:8443/a?b=c",
        "https://93.184.216.34/hook",
        "https://[2606:2800:220:1:248:1893:25c8:1946]/hook",
        "https://internal_name.example./hook",
    ],
)
def test_submit_accepts_a_public_url(url: str) -> None:
    assert validate_callback_url(url) == url


def test_an_allowed_host_may_be_internal_at_submit() -> None:
    url = "https://127.0.0.1:8443/hook"
    assert validate_callback_url(url, allowed_hosts=frozenset({"127.0.0.1"})) == url
