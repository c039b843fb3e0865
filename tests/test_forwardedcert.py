"""keyproxy.forwardedcert: the strict reading of a front proxy's client certificate header."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from keyproxy.errors import Unauthenticated
from keyproxy.forwardedcert import forwarded_chain, xfcc_element
from tests.helpers.svid_ca import SvidCA


def escaped(pem: bytes) -> str:
    return quote(pem, safe="")


def test_xfcc_reads_cert_and_chain() -> None:
    """Chain (leaf first, with the intermediate) is the chain; Cert alone is the leaf."""
    issued = SvidCA("example.org", intermediate=True).svid("/agent")
    leaf = issued.certificate.public_bytes(Encoding.PEM)
    both = f'By=spiffe://front;Cert="{escaped(leaf)}";Chain="{escaped(issued.chain_pem())}"'
    assert forwarded_chain([both], "xfcc")[0] == issued.der
    assert len(forwarded_chain([both], "xfcc")) == 2
    assert forwarded_chain([f"Cert={escaped(leaf)}"], "xfcc") == (issued.der,)
    assert forwarded_chain([escaped(leaf)], "escaped_pem") == (issued.der,)


def test_quoted_values_unescape() -> None:
    """A quoted value keeps `;` and `,` and unescapes backslashes."""
    pairs = xfcc_element(r'Subject="CN=a\"b,O=c;d";URI=spiffe://x/y')
    assert pairs == {"Subject": 'CN=a"b,O=c;d', "URI": "spiffe://x/y"}


def test_envoys_repeated_san_keys_are_read() -> None:
    """Envoy writes one DNS= (and URI=, By=) pair per SAN: only a repeated Cert or Chain
    is ambiguous, not the keys keyproxy does not read."""
    issued = SvidCA("example.org").svid("/agent")
    leaf = escaped(issued.certificate.public_bytes(Encoding.PEM))
    value = (
        "By=spiffe://example.org/front;By=spiffe://example.org/edge;Hash=ab12;"
        f'Cert="{leaf}";Subject="";URI=spiffe://example.org/agent;URI=https://a.test;'
        "DNS=a.example.org;DNS=b.example.org"
    )
    assert forwarded_chain([value], "xfcc") == (issued.der,)


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (["Cert=a", "Cert=b"], "forwarded_cert_ambiguous"),
        (["Cert=a,Cert=b"], "forwarded_cert_ambiguous"),
        (["Cert=a;Cert=b"], "forwarded_cert_ambiguous"),
        (["Chain=a;Cert=b;Chain=c"], "forwarded_cert_ambiguous"),
        (["Cert=a;"], "forwarded_cert_malformed"),
        (['Cert="a'], "forwarded_cert_malformed"),
        (['Cert="a"x'], "forwarded_cert_malformed"),
        (["=a"], "forwarded_cert_malformed"),
        (["Hash=ab"], "forwarded_cert_malformed"),
        (["Cert=%ff%fe"], "forwarded_cert_malformed"),
        (["Cert=not-pem"], "forwarded_cert_malformed"),
    ],
    ids=[
        "two-headers",
        "two-elements",
        "repeated-cert",
        "repeated-chain",
        "trailing-separator",
        "unterminated",
        "text-after-quote",
        "empty-key",
        "no-cert",
        "not-utf8",
        "not-pem",
    ],
)
def test_malformed_and_ambiguous_values_are_refused(values: list[str], reason: str) -> None:
    """Every value outside the grammar, or naming more than one certificate, is refused."""
    with pytest.raises(Unauthenticated) as refused:
        forwarded_chain(values, "xfcc")
    assert refused.value.reason == reason


def test_a_chain_whose_first_is_not_cert_is_refused() -> None:
    """Cert and Chain naming different leaves are refused as ambiguous."""
    ca = SvidCA("example.org")
    one, other = ca.svid("/a"), ca.svid("/b")
    value = f"Cert={escaped(one.chain_pem())};Chain={escaped(other.chain_pem())}"
    with pytest.raises(Unauthenticated) as refused:
        forwarded_chain([value], "xfcc")
    assert refused.value.reason == "forwarded_cert_ambiguous"
    with pytest.raises(Unauthenticated) as refused:
        forwarded_chain([escaped(one.chain_pem() + other.chain_pem())], "escaped_pem")
    assert refused.value.reason == "forwarded_cert_ambiguous"


def test_text_around_the_certificate_is_refused() -> None:
    """A value holds PEM certificates and nothing else (cryptography's reader skips text
    around them): leading or trailing text, or an xfcc element given to the nginx reader,
    is malformed; whitespace around the certificate is not."""
    pem = SvidCA("example.org").svid("/agent").certificate.public_bytes(Encoding.PEM)
    for value in (b"x" + pem, pem + b"x", b'Cert="' + pem + b'"', b"Subject=a\n" + pem):
        for form, header in (("escaped_pem", escaped(value)), ("xfcc", f"Cert={escaped(value)}")):
            with pytest.raises(Unauthenticated) as refused:
                forwarded_chain([header], form)  # type: ignore[arg-type]
            assert refused.value.reason == "forwarded_cert_malformed", (form, value[:12])
    assert len(forwarded_chain([escaped(b"\n" + pem + b"\n")], "escaped_pem")) == 1
