"""The product's demo CA (keyproxy.devca) with the deliberately wrong certificates tests need:
any SANs and leaf options (`svid`, `svid_for`), expired SVIDs, a CA certificate used as a leaf.
`Issued.write` puts a certificate chain and its key in PEM files for `ssl` and aiohttp clients.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from cryptography import x509

from keyproxy.devca import DevCA, Issued

__all__ = ["Issued", "SvidCA"]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class SvidCA(DevCA):
    """A DevCA whose leaves take every option of `DevCA.issue`."""

    def svid(self, path: str = "/agent", **options: Any) -> Issued:
        """An X.509-SVID for spiffe://<trust domain><path>; `options` go to `issue`."""
        uri = x509.UniformResourceIdentifier(f"spiffe://{self.trust_domain}{path}")
        return self.issue([uri], **options)

    def svid_for(self, *uris: str, **options: Any) -> Issued:
        """A leaf carrying exactly these URI SANs (any trust domain, any count)."""
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        return self.issue(sans, **options)

    def expired_svid(self, path: str = "/agent") -> Issued:
        return self.svid(
            path,
            not_before=_now() - dt.timedelta(hours=2),
            not_after=_now() - dt.timedelta(hours=1),
        )

    def ca_as_leaf(self) -> Issued:
        """A CA certificate (cA=true, keyCertSign, digitalSignature) with a SPIFFE ID, as a leaf."""
        return self.svid("/agent", ca=True)
