"""What a caller may use on an MCP route, and the decision for each message it sends.

    Grant.build(tools=..., prompts=..., resources=..., methods=..., server_requests=...)
    decide(body, grant, version) -> Decision      (allowed, or refusals to answer with)
    decide_server_request(message, grant) -> Refusal | None

Names are compared exactly: a tool granted as "search_issues" does not allow
"Search_Issues" or a differently normalised Unicode spelling, and a requested name that is
not NFC or holds a control or format character is refused outright, so no server can fold
it into a granted one. A batch holding any refused message is refused whole. A method
outside the negotiated revision's table is refused unless the grant names it in `methods`;
a grant with `methods` allows only those (and the lifecycle methods every session needs).
Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from keyproxy.mcp.audit import Call, call_of
from keyproxy.mcp.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    Body,
    Id,
    Kind,
    Message,
    MessageError,
)
from keyproxy.mcp.names import (
    SERVER_REQUEST_ANSWERS,
    folded_twin,
    name_problem,
    names,
    uri_problem,
    uris,
)
from keyproxy.mcp.names import (
    server_requests as server_requests_of,
)

# Requests a client sends, per revision (from the published schema of each).
_BASE_REQUESTS: Final = frozenset(
    {
        "initialize",
        "ping",
        "completion/complete",
        "logging/setLevel",
        "prompts/get",
        "prompts/list",
        "resources/list",
        "resources/read",
        "resources/subscribe",
        "resources/unsubscribe",
        "resources/templates/list",
        "tools/call",
        "tools/list",
    }
)
_BASE_NOTIFICATIONS: Final = frozenset(
    {
        "notifications/cancelled",
        "notifications/initialized",
        "notifications/progress",
        "notifications/roots/list_changed",
    }
)
_TASKS: Final = frozenset({"tasks/get", "tasks/result", "tasks/list", "tasks/cancel"})
CLIENT_METHODS: Final[Mapping[str, frozenset[str]]] = {
    "2025-03-26": _BASE_REQUESTS | _BASE_NOTIFICATIONS,
    "2025-06-18": _BASE_REQUESTS | _BASE_NOTIFICATIONS,
    "2025-11-25": _BASE_REQUESTS | _BASE_NOTIFICATIONS | _TASKS | {"notifications/tasks/status"},
}

# Every session needs these; a grant's `methods` list cannot take them away.
_LIFECYCLE: Final = frozenset(
    {
        "initialize",
        "ping",
        "notifications/initialized",
        "notifications/cancelled",
        "notifications/progress",
    }
)
LIST_METHODS: Final[Mapping[str, str]] = {
    "tools/list": "tools",
    "prompts/list": "prompts",
    "resources/list": "resources",
    "resources/templates/list": "resourceTemplates",
}


@dataclass(frozen=True)
class ResourceRule:
    """A granted resource: an exact URI, or a prefix when written with a trailing "*"."""

    text: str

    @property
    def prefix(self) -> bool:
        return self.text.endswith("*")

    def matches(self, uri: str) -> bool:
        return uri.startswith(self.text[:-1]) if self.prefix else uri == self.text

    def covers_template(self, template: str) -> bool:
        """Whether every URI `template` (RFC 6570) can expand to is matched: its literal part
        before the first expression starts with the prefix (or is the exact URI)."""
        literal = template.split("{", 1)[0]
        if self.prefix:
            return literal.startswith(self.text[:-1])
        return "{" not in template and template == self.text


@dataclass(frozen=True)
class Grant:
    """What a caller may use on one MCP route. `methods` None means the revision's table;
    `server_requests` are the server-to-client requests the route passes to the caller."""

    tools: frozenset[str] = frozenset()
    prompts: frozenset[str] = frozenset()
    resources: tuple[ResourceRule, ...] = ()
    methods: frozenset[str] | None = None
    server_requests: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        *,
        tools: Iterable[object] = (),
        prompts: Iterable[object] = (),
        resources: Iterable[object] = (),
        methods: Iterable[object] | None = None,
        server_requests: Iterable[object] = (),
        error: Callable[[str], Exception] = ValueError,
    ) -> Grant:
        """A grant from config or scope values, each checked; `error(message)` is raised with
        the first bad one (config passes a ConfigError factory carrying the YAML path)."""
        return cls(
            tools=names("tools", tools, error),
            prompts=names("prompts", prompts, error),
            resources=tuple(ResourceRule(text) for text in uris(resources, error)),
            methods=None if methods is None else names("methods", methods, error),
            server_requests=server_requests_of(server_requests, error),
        )

    def allows_tool(self, name: str) -> bool:
        return name in self.tools

    def allows_prompt(self, name: str) -> bool:
        return name in self.prompts

    def allows_uri(self, uri: str) -> bool:
        return any(rule.matches(uri) for rule in self.resources)

    def reads(self, uri: object) -> bool:
        """Whether a `resources/read` of `uri` would be allowed (its URI rules included)."""
        return _resource(uri, self) is None

    def allows_template(self, template: str) -> bool:
        return any(rule.covers_template(template) for rule in self.resources)


@dataclass(frozen=True)
class Refusal:
    """A message keyproxy answers itself and never forwards."""

    id: Id | None
    code: int
    message: str

    @classmethod
    def from_error(cls, error: MessageError) -> Refusal:
        """The answer to a body that could not be read (its id when one was read)."""
        return cls(error.id, error.code, error.message)

    def response(self) -> dict[str, Any]:
        """The JSON-RPC error response an MCP client shows (to the model, for a tool call)."""
        return {
            "jsonrpc": "2.0",
            "id": self.id,
            "error": {"code": self.code, "message": self.message},
        }


@dataclass(frozen=True)
class Decision:
    """The decision on one body: `calls` (audit facts, one per request) and `refusals`
    (empty when the body may be forwarded as it is)."""

    calls: tuple[Call, ...]
    refusals: tuple[Refusal, ...]
    batch: bool

    @property
    def allowed(self) -> bool:
        return not self.refusals

    def answer(self) -> bytes:
        """The JSON body keyproxy answers a refused body with: one error response, or for a
        batch one per request (every request of a refused batch gets one)."""
        responses = [r.response() for r in self.refusals]
        value = responses if self.batch else responses[0]
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def decide(body: Body, grant: Grant, version: str) -> Decision:
    """Allowed, or the refusals to answer `body` with. A batch with one refused message is
    refused whole: each of its requests is answered with its own reason or the first one."""
    calls = tuple(call_of(m) for m in body.messages if m.kind is Kind.REQUEST)
    own = [(m, _refusal(m, grant, version)) for m in body.messages]
    first = next((r for _, r in own if r is not None), None)
    if first is None:
        return Decision(calls, (), body.batch)
    if not body.batch:
        return Decision(calls, (first,), batch=False)
    answers = tuple(
        r or Refusal(m.id, first.code, f"batch refused: {first.message}")
        for m, r in own
        if m.kind is Kind.REQUEST
    )
    # A batch of notifications has no request to answer: one error without an id says why.
    return Decision(calls, answers or (first,), batch=bool(answers))


def decide_server_request(message: Message, grant: Grant) -> Refusal | None:
    """None when a request the server sent on its stream may reach the caller; else the
    error response to send the server instead (the caller never sees the request)."""
    if message.kind is not Kind.REQUEST or message.method == "ping":
        return None
    if message.method in grant.server_requests:
        return None
    return Refusal(message.id, METHOD_NOT_FOUND, f"{message.method} is not allowed on this route")


def _refusal(message: Message, grant: Grant, version: str) -> Refusal | None:
    if message.kind is Kind.RESPONSE:
        return _unasked(message, grant)
    method = message.method
    assert method is not None  # requests and notifications have one
    known = CLIENT_METHODS[version]
    if grant.methods is not None:
        allowed = method in grant.methods or method in _LIFECYCLE
    else:
        allowed = method in known
    if not allowed:
        return Refusal(message.id, METHOD_NOT_FOUND, f"method {method!r} is not allowed")
    problem = _params_problem(method, message.params, grant)
    if problem is not None:
        return Refusal(message.id, INVALID_PARAMS, problem)
    return None


def _unasked(response: Message, grant: Grant) -> Refusal | None:
    """Why the client's `response` cannot answer a server request its stream let through,
    or None. SECURITY: a request the route withholds is answered by keyproxy with an error,
    but the client can guess its id (servers count from 0) and race that error with a result
    of its own (an elicitation accepted, a sampling reply, roots) that the server would act
    on. Where the route lets no server request through, the only one the caller ever sees is
    `ping`, whose result is empty: any other result is refused (its id not echoed). Where it
    lets some through, a result holding what only a withheld request's result holds is."""
    result = response.result
    if result is None or set(result) <= {"_meta"}:
        return None
    if grant.server_requests and all(
        method in grant.server_requests or member not in result
        for method, member in SERVER_REQUEST_ANSWERS.items()
    ):
        return None
    withheld = "a result answering a server request this route withholds"
    return Refusal(None, INVALID_REQUEST, withheld)


def _params_problem(method: str, params: Mapping[str, Any], grant: Grant) -> str | None:
    """Why `params` of a granted method name something not granted, or None."""
    twin = _folded_twin(params)
    if twin is not None:
        return twin
    if method == "tools/call":
        return _named("tool", params.get("name"), grant.allows_tool)
    if method == "prompts/get":
        return _named("prompt", params.get("name"), grant.allows_prompt)
    if method in ("resources/read", "resources/subscribe", "resources/unsubscribe"):
        return _resource(params.get("uri"), grant)
    if method == "completion/complete":
        return _completion(params.get("ref"), grant)
    return None


def _completion(ref: object, grant: Grant) -> str | None:
    """completion/complete names a prompt or a resource template: the grant must cover it."""
    if not isinstance(ref, dict):
        return "completion/complete needs a ref object"
    twin = _folded_twin(ref)
    if twin is not None:
        return twin
    if ref.get("type") == "ref/prompt":
        return _named("prompt", ref.get("name"), grant.allows_prompt)
    if ref.get("type") == "ref/resource":
        return _named("resource", ref.get("uri"), grant.allows_template)
    return "completion/complete ref type is neither ref/prompt nor ref/resource"


# The members whose values the grant is checked against (and `ref`'s).
_CHECKED_MEMBERS: Final = frozenset({"name", "uri", "ref", "type"})


def _folded_twin(members: Mapping[str, Any]) -> str | None:
    """Why `members` hold a member another server reads as a checked one (`folded_twin`:
    the check here would judge one tool and the server call another), or None."""
    key = folded_twin(members, _CHECKED_MEMBERS)
    return None if key is None else f"member {key!r} differs from {key.casefold()!r} only by case"


def _named(what: str, name: object, allows: Callable[[str], bool]) -> str | None:
    problem = name_problem(name)
    if problem is not None:
        return f"{what} name {problem}"
    assert isinstance(name, str)
    if not allows(name):
        return f"{what} {name!r} is not granted to this caller"
    return None


def _resource(uri: object, grant: Grant) -> str | None:
    problem = uri_problem(uri)
    if problem is not None:
        return f"resource URI {problem}"
    assert isinstance(uri, str)
    if not grant.allows_uri(uri):
        return f"resource {uri!r} is not granted to this caller"
    return None
