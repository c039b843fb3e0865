"""The errors keyproxy raises, and the one place they become HTTP statuses.

    KeyproxyError
    ├── ConfigError            bad configuration file (exit 2, never an HTTP answer)
    ├── VaultError             Vault/OpenBao failed or refused; hvac errors become this
    ├── RunError               `keyproxy run` could not start its command (identity, exchange)
    └── RequestError           stops a request; carries the status and a short reason code
        ├── BadRequest         400  malformed request (bad path, bad X-Forwarded-For,
        │                           a credential sent twice or in two places)
        ├── McpRefused         200  an MCP request refused: answered with its JSON-RPC error
        │   └── McpUnreadable  400  an MCP body that cannot be read, with its JSON-RPC error
        ├── Unauthenticated    401  no credential, or a credential that does not verify
        ├── Forbidden          403  authenticated, but no policy allows this request
        ├── NotFound           404  unknown route
        ├── RequestTimeout     408  the caller's request body did not arrive in time
        ├── PayloadTooLarge    413  request body above the route's limit
        ├── TooManyRequests    429  a rate limit or concurrency cap refused the request
        ├── EgressDenied       502  upstream address refused by the egress fence
        ├── BadGateway         502  upstream failed, or answered with a 1xx status
        ├── Unavailable        503  key not loaded or too stale (Vault unreachable)
        ├── GatewayTimeout     504  upstream connect or read timed out
        └── InternalError      500  a bug: logged, answered without details

A `RequestError`'s message and reason are sent to the caller and logged, so they must never
contain a key, a token, or anything derived from one. `retry_after`, when set, is the whole
seconds after which trying again may succeed (the answer's Retry-After); `headers` are other
fields the answer carries (a refusal's RateLimit fields); `limit` names the configured limit
that stopped the request, for its audit event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar


class KeyproxyError(Exception):
    """Base of every error keyproxy raises on purpose."""


class ConfigError(KeyproxyError):
    """The configuration is invalid; `path` is the YAML path of the mistake."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path
        self.message = message


class VaultError(KeyproxyError):
    """Vault or OpenBao could not be reached, or refused the operation."""


class RunError(KeyproxyError):
    """`keyproxy run` could not start its command: one line for a person (never a token)."""


class RequestError(KeyproxyError):
    """Stops a request. `reason` is a short machine-readable code for the audit log."""

    status: ClassVar[int] = 500

    def __init__(
        self,
        reason: str,
        message: str = "",
        *,
        retry_after: int | None = None,
        headers: Mapping[str, str] | None = None,
        limit: str | None = None,
    ) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.message = message or reason
        self.retry_after = retry_after
        self.headers = headers
        self.limit = limit


class BadRequest(RequestError):
    status = 400


class McpRefused(RequestError):
    """MCP requests keyproxy refuses and answers itself: `body` is the JSON-RPC error
    response (an MCP client shows it, to the model for a tool call), sent with HTTP 200 as an
    MCP server would. `calls` are the audit facts of the requests refused."""

    status = 200

    def __init__(
        self, reason: str, message: str, body: bytes, calls: tuple[object, ...] = ()
    ) -> None:
        super().__init__(reason, message)
        self.body = body
        self.calls = calls


class McpUnreadable(McpRefused):
    """An MCP body that cannot be read (or only notifications, refused): a 400 carrying the
    JSON-RPC error."""

    status = 400


class Unauthenticated(RequestError):
    status = 401


class Forbidden(RequestError):
    status = 403


class NotFound(RequestError):
    status = 404


class RequestTimeout(RequestError):
    status = 408


class PayloadTooLarge(RequestError):
    status = 413


class TooManyRequests(RequestError):
    status = 429


class BadGateway(RequestError):
    status = 502


class EgressDenied(BadGateway):
    """The upstream resolved to an address the route does not allow."""


class Unavailable(RequestError):
    status = 503


class GatewayTimeout(RequestError):
    status = 504


class InternalError(RequestError):
    status = 500
