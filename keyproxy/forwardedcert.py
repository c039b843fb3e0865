"""A client certificate forwarded by a TLS-terminating front proxy, in a request header.

Two formats (`server.tls.forwarded_client_cert.format`):

- `xfcc`, Envoy's `x-forwarded-client-cert`: one element of `;`-separated `Key=Value` pairs
  (a value is a token or a quoted string with `\\"` and `\\\\` escapes). `Cert` holds the
  URL-encoded PEM leaf, `Chain` (if present) the URL-encoded PEM chain, leaf first. Several
  elements (`,` outside quotes: more than one hop, or more than one certificate) are refused
  as ambiguous, as are a repeated `Cert` or `Chain` and an element without either. Other
  keys may repeat: Envoy writes one `By`, `URI` or `DNS` pair per SAN.
- `escaped_pem`, nginx's `$ssl_client_escaped_cert`: the URL-encoded PEM leaf.

`forwarded_chain` returns the chain as DER, leaf first, for `SvidVerifier.verify`; every
malformed value is an Unauthenticated("forwarded_cert_malformed" or
"forwarded_cert_ambiguous"), never a partial reading. PEM parsing is `cryptography`'s.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from keyproxy.config import ForwardedCertFormat
from keyproxy.errors import Unauthenticated

_MAX_VALUE = 64 * 1024  # a chain of a few certificates fits many times over
_TOKEN_STOP: Final = frozenset(';,="')
_READ: Final = frozenset({"Cert", "Chain"})  # the keys read here: each at most once
# PEM certificates and nothing else: cryptography's reader skips text around them.
_ONLY_CERTIFICATES: Final = re.compile(
    rb"\s*(?:-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----\s*)+"
)


def _malformed(what: str) -> Unauthenticated:
    return Unauthenticated("forwarded_cert_malformed", f"the forwarded client certificate {what}")


def _ambiguous(what: str) -> Unauthenticated:
    return Unauthenticated("forwarded_cert_ambiguous", f"the forwarded client certificate {what}")


def forwarded_chain(values: list[str], form: ForwardedCertFormat) -> tuple[bytes, ...]:
    """The forwarded chain (DER, leaf first) from the header's `values` (every occurrence)."""
    if len(values) != 1:
        raise _ambiguous("header is sent more than once")
    value = values[0]
    if len(value) > _MAX_VALUE:
        raise _malformed("header is too long")
    if form == "escaped_pem":
        return _pem_chain(value, single=True)
    pairs = xfcc_element(value)
    if "Chain" in pairs:
        chain = _pem_chain(pairs["Chain"], single=False)
        if "Cert" in pairs and _pem_chain(pairs["Cert"], single=True) != chain[:1]:
            raise _ambiguous("Cert is not the first certificate of Chain")
        return chain
    if "Cert" in pairs:
        return _pem_chain(pairs["Cert"], single=True)
    raise _malformed("element has neither Cert nor Chain")


def xfcc_element(value: str) -> dict[str, str]:
    """The one element of an `x-forwarded-client-cert` value, as key to (unquoted) value
    (the first, for a key other than `Cert` and `Chain` given more than once)."""
    pairs: dict[str, str] = {}
    i, end = 0, len(value)
    while True:
        eq = value.find("=", i)
        key = value[i:eq] if eq >= 0 else ""
        if not key or any(c in _TOKEN_STOP or c.isspace() for c in key):
            raise _malformed("is not an x-forwarded-client-cert element")
        i = eq + 1
        if i < end and value[i] == '"':
            text, i = _quoted(value, i + 1)
        else:
            start = i
            while i < end and value[i] not in _TOKEN_STOP:
                i += 1
            text = value[start:i]
        if key in pairs and key in _READ:
            raise _ambiguous(f"element repeats {key}")
        pairs.setdefault(key, text)
        if i == end:
            return pairs
        if value[i] == ",":
            raise _ambiguous("header holds more than one element")
        if value[i] != ";":
            raise _malformed("is not an x-forwarded-client-cert element")
        i += 1


def _quoted(value: str, i: int) -> tuple[str, int]:
    """A quoted string's text starting after its opening quote, and the index after it."""
    out: list[str] = []
    while i < len(value):
        c = value[i]
        if c == "\\" and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    raise _malformed("has an unterminated quoted value")


def _pem_chain(escaped: str, *, single: bool) -> tuple[bytes, ...]:
    """URL-encoded PEM certificates as DER; exactly one when `single`."""
    try:
        pem = unquote(escaped, errors="strict").encode()
        certs = x509.load_pem_x509_certificates(pem)
    except (ValueError, UnicodeError):
        raise _malformed("is not URL-encoded PEM") from None
    if single and len(certs) != 1:
        raise _ambiguous("holds more than one certificate")
    if pem.count(b"-----BEGIN") != len(certs) or not _ONLY_CERTIFICATES.fullmatch(pem):
        raise _malformed("holds something other than certificates")
    return tuple(c.public_bytes(Encoding.DER) for c in certs)
