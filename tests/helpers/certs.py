"""A throw-away CA with server and client certificates, as PEM files, for TLS tests of the
services keyproxy talks to (OpenBao, Valkey/Redis); the certificates are keyproxy.devca's."""

from __future__ import annotations

from pathlib import Path

from keyproxy.devca import DevCA
from keyproxy.secret import write_private


def pem_files(directory: Path) -> dict[str, Path]:
    """A CA (`ca`), a server certificate for 127.0.0.1 (`server`, `server-key`) and a client
    certificate (`client`, `client-key`) it signed, and a second CA that signed neither
    (`other-ca`); every file mode 0600."""
    ca = DevCA("ca.test")
    files = {
        "ca": write_private(directory / "ca.pem", ca.bundle_pem()),
        "other-ca": write_private(directory / "other-ca.pem", DevCA("other-ca.test").bundle_pem()),
    }
    for name, issued in (("server", ca.server_cert()), ("client", ca.svid("/client"))):
        files[name] = write_private(directory / f"{name}.pem", issued.chain_pem())
        files[f"{name}-key"] = write_private(directory / f"{name}-key.pem", issued.key_pem())
    return files
