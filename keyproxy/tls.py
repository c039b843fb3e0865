"""Server-side TLS for a listener, built from files and reloaded in place.

`ServerTLS(files)` reads the certificate chain, its key and the client trust bundles, and hands
out one `context` to give the listener (`keyproxy.server.tlsapp.TLSSite`, which also bounds the
handshake) for its whole life. `reload()` reads the files again and builds a complete new
`ssl.SSLContext` and `SvidVerifier`; only when both are built does it swap them in, so a
half-written or mismatched file leaves the running ones in force (the error is raised for the
caller to log). New handshakes use the new certificate and bundles; connections already open
keep the context they started with. `follow()` does that whenever a file's content changes
(keyproxy/watch.py).

How the swap works: asyncio wraps every accepted connection with `context.wrap_bio(...)`. The
context given to the listener is a thin `ssl.SSLContext` whose `wrap_bio` delegates to the newest
built context, so each connection is bound, once, to whichever context was current when it
arrived. Loading a new chain into the live context instead (`load_cert_chain` again) would be
neither atomic (a key that does not match leaves the new certificate with the old key) nor able
to drop a removed trust bundle.

Refusals in the handshake. Python's `ssl` verifies the client's chain inside the handshake against
the union of the client bundles, and fails the handshake on an unknown CA or an expired
certificate (and on a missing one where it is required). asyncio then closes the connection
without sending the TLS alert, so the caller only sees the connection end. To give every refusal
a reason for the audit log, each connection's `SSLObject` reports a failed handshake to
`on_refused(reason, message)`: `svid_untrusted`, `svid_expired`, `svid_not_yet_valid`,
`svid_missing`, `svid_refused` (any other certificate error) or `tls_handshake_failed` (not TLS,
no shared version or cipher, ...). Everything after the handshake (the SVID rules, the bundle of
the leaf's own trust domain) is `SvidVerifier`'s, with its own reasons.

`listener_tls(settings, where, on_refused)` builds one from a listener's `server.tls` settings,
refusing files that cannot be read or do not fit together with a ConfigError naming the setting.
`file_problems(settings, where)` says the same without building anything to keep, one problem
per file (missing, unreadable, not a certificate, key or bundle), for `keyproxy check`.

`peer_chain(request.transport)` gives the client certificate chain the handshake verified (DER, leaf
first), for `SvidVerifier.verify`, from the connection's private `_sslobj` (public only from
3.13, and there as DER that fails on a resumed session without a certificate).

Settings: TLS 1.2 at least; for TLS 1.2, only ECDHE key exchange with AEAD ciphers (TLS 1.3's
suites are all modern already); no compression, no renegotiation, a fresh ECDH key per handshake.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from keyproxy.config import ListenerTLS
from keyproxy.errors import ConfigError
from keyproxy.spiffe import SvidVerifier, TrustBundle, parse_bundle
from keyproxy.watch import digest, watch_files

# TLS 1.2 suites: forward secrecy (ECDHE) and AEAD only, ECDSA or RSA certificates.
TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
_ENCODING_DER = 2  # ssl's private _ssl.ENCODING_DER, for Certificate.public_bytes
# OpenSSL X509_V_ERR_* codes, as ssl.SSLCertVerificationError.verify_code gives them.
_VERIFY_REASONS = {
    2: "svid_untrusted",  # unable to get issuer certificate
    9: "svid_not_yet_valid",
    10: "svid_expired",
    18: "svid_untrusted",  # self-signed leaf
    19: "svid_untrusted",  # self-signed certificate in chain
    20: "svid_untrusted",  # unable to get local issuer certificate
    21: "svid_untrusted",  # unable to verify the first certificate
}

OnRefused = Callable[[str, str], None]
"""Called with (reason, message) when a handshake fails; must not raise."""


class ClientAuth(Enum):
    """Whether a listener asks for a client certificate."""

    NONE = "none"  # no certificate asked for
    OPTIONAL = "optional"  # asked for; a caller without one falls back to a token
    REQUIRED = "required"  # the handshake fails without a verifying certificate


@dataclass(frozen=True)
class TLSFiles:
    """Where a listener's TLS material lives. `client_bundles` maps trust domain to bundle file."""

    certificate: Path
    key: Path
    client_bundles: Mapping[str, Path] = field(default_factory=dict)
    client_auth: ClientAuth = ClientAuth.NONE

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every file the context is built from, for a file watch."""
        return (self.certificate, self.key, *self.client_bundles.values())


@dataclass(frozen=True)
class _Built:
    context: ssl.SSLContext
    verifier: SvidVerifier
    loaded_at: dt.datetime
    digests: Mapping[Path, str | None]  # of each file, taken before it was read


def build_context(files: TLSFiles, bundles: tuple[TrustBundle, ...]) -> ssl.SSLContext:
    """A server context from the files, trusting `bundles` for client certificates."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= (
        ssl.OP_NO_COMPRESSION
        | ssl.OP_NO_RENEGOTIATION
        | ssl.OP_SINGLE_ECDH_USE
        | ssl.OP_CIPHER_SERVER_PREFERENCE
    )
    context.load_cert_chain(files.certificate, files.key)
    if files.client_auth is not ClientAuth.NONE:
        if not bundles:
            raise ValueError("client certificates need at least one client trust bundle")
        context.load_verify_locations(cadata=b"".join(b.pem() for b in bundles).decode())
        context.verify_mode = (
            ssl.CERT_REQUIRED if files.client_auth is ClientAuth.REQUIRED else ssl.CERT_OPTIONAL
        )
        # No session tickets: a session resumed from one may not hold the chain the client
        # presented (peer_chain), where one from this process's session cache does.
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
    return context


def handshake_refusal(exc: ssl.SSLError) -> str:
    """The reason code for a failed server handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(exc.verify_code, "svid_refused")
    if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "svid_missing"
    return "tls_handshake_failed"


def _reporting_sslobject(on_refused: OnRefused) -> type[ssl.SSLObject]:
    class ReportingSSLObject(ssl.SSLObject):
        """An SSLObject that reports a failed handshake before asyncio closes the connection."""

        def do_handshake(self) -> None:
            try:
                super().do_handshake()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except ssl.SSLError as exc:
                on_refused(
                    handshake_refusal(exc),
                    exc.verify_message
                    if isinstance(exc, ssl.SSLCertVerificationError)
                    else str(exc.reason),
                )
                raise

    return ReportingSSLObject


def _build(files: TLSFiles, sslobject_class: type[ssl.SSLObject] | None) -> _Built:
    digests = {path: digest(path) for path in files.paths}
    bundles = tuple(
        parse_bundle(trust_domain, path.read_bytes())
        for trust_domain, path in files.client_bundles.items()
    )
    context = build_context(files, bundles)
    if sslobject_class is not None:
        context.sslobject_class = sslobject_class
    return _Built(context, SvidVerifier(bundles), dt.datetime.now(dt.UTC), digests)


class _ReloadingContext(ssl.SSLContext):
    """The listener's context: each new connection is wrapped by the newest built context.

    Only `wrap_bio` (what asyncio calls) is delegated; this context is for asyncio listeners.
    """

    current: ssl.SSLContext

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return self.current.wrap_bio(incoming, outgoing, server_side, server_hostname, session)


class ServerTLS:
    """A listener's TLS context and client verifier, re-read from files by `reload()`."""

    def __init__(self, files: TLSFiles, *, on_refused: OnRefused | None = None) -> None:
        self.files = files
        self._sslobject_class = _reporting_sslobject(on_refused) if on_refused else None
        self._built = _build(files, self._sslobject_class)
        self._context = _ReloadingContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.current = self._built.context

    @property
    def context(self) -> ssl.SSLContext:
        """The context for the listener; it stays the same object across reloads."""
        return self._context

    @property
    def active_context(self) -> ssl.SSLContext:
        """The built context that new handshakes use now."""
        return self._context.current

    @property
    def verifier(self) -> SvidVerifier:
        """The client SVID verifier built from the current bundles."""
        return self._built.verifier

    @property
    def loaded_at(self) -> dt.datetime:
        return self._built.loaded_at

    def reload(self) -> None:
        """Re-read every file and swap in the result; on any error nothing changes.

        Raises OSError (a file missing or unreadable), ssl.SSLError (a bad certificate or key,
        or a key that does not match), spiffe.BundleError or ValueError (a bad bundle).
        """
        self._swap(_build(self.files, self._sslobject_class))

    def _swap(self, built: _Built) -> None:
        self._built = built
        self._context.current = built.context

    async def follow(
        self,
        on_error: Callable[[Exception], None],
        *,
        stop: asyncio.Event | None = None,
        on_reload: Callable[[], None] | None = None,
        poll: bool = False,
    ) -> None:
        """Reload whenever the content of one of the files changes, until `stop` is set.

        Run by the owner's task (the app's cleanup context). A failed reload goes to `on_error`
        and the running context stays: a certificate written before its key fails once, and
        the key's own change then reloads both. Paths must be absolute (see keyproxy/watch.py).
        """
        changes = watch_files(self.files.paths, stop=stop, baseline=self._built.digests, poll=poll)
        async for _changed in changes:
            try:
                built = await asyncio.to_thread(_build, self.files, self._sslobject_class)
            # ssl.SSLError is an OSError, spiffe.BundleError a ValueError.
            except (OSError, ValueError) as exc:
                on_error(exc)
                continue
            self._swap(built)
            if on_reload is not None:
                on_reload()


class _HasExtraInfo(Protocol):
    def get_extra_info(self, name: str, default: object = None) -> object: ...


def peer_chain(transport: _HasExtraInfo | None) -> tuple[bytes, ...]:
    """The client certificate chain the handshake verified (DER, leaf first); () if none.

    Pass `request.transport`. Empty on a plain connection, when no certificate was sent, or
    once the transport has closed.
    """
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if not isinstance(ssl_object, ssl.SSLObject):
        return ()
    # The connection's own chains are certificate objects on every version (3.13's public
    # methods turn them into DER, and fail on a resumed session without a certificate).
    inner = ssl_object._sslobj  # type: ignore[attr-defined]
    chain = inner.get_verified_chain()
    if not chain and ssl_object.session_reused and ssl_object.getpeercert(True) is not None:
        # SECURITY: a resumed TLS 1.2 session keeps only the chain the client presented in
        # the full handshake that verified it (resuming proves it holds its secrets). It
        # stands in, verified again at each use like every chain: taken for none, a token
        # asked for on it would lose its binding without a word.
        chain = inner.get_unverified_chain()
    return tuple(cert.public_bytes(_ENCODING_DER) for cert in chain or () if cert is not None)


def peer_certificate(transport: _HasExtraInfo | None) -> bytes | None:
    """The client's leaf certificate (DER), or None; pass `request.transport`."""
    chain = peer_chain(transport)
    return chain[0] if chain else None


def listener_tls(settings: ListenerTLS, where: str, on_refused: OnRefused) -> ServerTLS:
    """A listener's TLS from its settings (paths made absolute, as the file watch needs);
    a ConfigError naming `where` if the files cannot be read or do not fit together."""
    files = TLSFiles(
        certificate=settings.certificate.absolute(),
        key=settings.key.absolute(),
        client_bundles={td: path.absolute() for td, path in settings.trust_bundles},
        client_auth=ClientAuth(settings.client_auth),
    )
    for key, path in _named_files(settings):
        read = _read(path, f"{where}.{key}")  # the ssl module's errors do not say which file
        if isinstance(read, ConfigError):
            raise read
    try:
        return ServerTLS(files, on_refused=on_refused)
    # ssl.SSLError is an OSError, spiffe.BundleError a ValueError.
    except (OSError, ValueError) as exc:
        raise ConfigError(where, f"cannot load the TLS files: {error_text(exc)}") from None


def file_problems(settings: ListenerTLS, where: str) -> list[ConfigError]:
    """What would stop `listener_tls` here: per file, the setting, its path and what is wrong
    (missing, unreadable, not PEM certificates, not an unencrypted PEM private key, not a
    trust bundle); when every file reads, whether they fit together (a key that does not
    match its certificate). Never any of the files' content."""
    checks: list[Callable[[bytes], str | None]] = [_certificates, _private_key]
    checks += [_bundle(td) for td, _ in settings.trust_bundles]
    problems = []
    for (key, path), problem_of in zip(_named_files(settings), checks, strict=True):
        data = _read(path, f"{where}.{key}")
        if isinstance(data, ConfigError):
            problems.append(data)
            continue
        problem = problem_of(data)
        if problem is not None:
            problems.append(ConfigError(f"{where}.{key}", f"{path}: {problem}"))
    if not problems:
        try:
            listener_tls(settings, where, lambda _reason, _message: None)
        except ConfigError as exc:
            problems.append(exc)
    return problems


def _named_files(settings: ListenerTLS) -> list[tuple[str, Path]]:
    """A listener's files, each with the setting that names it (certificate, key, bundles)."""
    named = [("certificate", settings.certificate), ("key", settings.key)]
    return named + [(f"trust_bundles.{td}", path) for td, path in settings.trust_bundles]


def _read(path: Path, setting: str) -> bytes | ConfigError:
    """A file's bytes, or the error naming its setting and path (never its content)."""
    try:
        return path.read_bytes()
    except OSError as exc:
        return ConfigError(setting, f"cannot read {path}: {exc.strerror}")


def _certificates(data: bytes) -> str | None:
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        return "not a PEM certificate chain"
    return None


def _private_key(data: bytes) -> str | None:
    # SECURITY: cryptography's own error text is not quoted: nothing of a key file is shown.
    try:
        serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return "not an unencrypted PEM private key"
    return None


def _bundle(trust_domain: str) -> Callable[[bytes], str | None]:
    def problem(data: bytes) -> str | None:
        try:
            parse_bundle(trust_domain, data)
        except ValueError as exc:  # spiffe.BundleError: says what is wrong, quotes nothing
            return f"not a trust bundle: {exc}"
        return None

    return problem


def error_text(exc: Exception) -> str:
    """What went wrong loading TLS files, without any of their content."""
    if isinstance(exc, ssl.SSLError):
        return f"{exc.reason or exc}"  # OpenSSL's reason, never the key's bytes
    if isinstance(exc, OSError):
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)
