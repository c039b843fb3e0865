"""A route's `rotation` section: schedule, grace, and the rotator (manual, http or command),
whose templated calls are checked here against the fields each call may use."""

from __future__ import annotations

import json
import re

from keyproxy.config.model import (
    HEADER_NAME,
    METHODS,
    CommandRotator,
    HttpCall,
    HttpRotator,
    ManualRotator,
    Rotation,
    Rotator,
)
from keyproxy.config.node import Node, opt, required, secret_ref
from keyproxy.text import hidden

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_CREATE_FIELDS = frozenset({"admin", "route", "attempt"})
# {attempt} exists only while creating: verify and revoke happen for a key, not an attempt.
_KEY_FIELDS = frozenset({"admin", "route", "key", "key_id"})
_POINTER = re.compile(r"^(/([^~/]|~[01])*)+\Z")


def rotation_config(node: Node, kv_mount: str) -> Rotation:
    f = node.mapping({"every", "grace", "lock_timeout", "rotator"})
    rotator = _rotator(required(node, f, "rotator"), kv_mount)
    every = opt(f, "every", Node.duration, None)
    if every is None and not isinstance(rotator, ManualRotator):
        raise node._child("every").error("is required for an automated rotator")
    grace = opt(f, "grace", Node.duration, 600.0)
    if every is not None and grace >= every:
        where = f.get("grace") or f["every"]
        raise where.error("grace (default 10m) must be shorter than every")
    return Rotation(
        rotator=rotator,
        every=every,
        grace=grace,
        lock_timeout=opt(f, "lock_timeout", Node.duration, 300.0),
    )


def _rotator(node: Node, kv_mount: str) -> Rotator:
    kind_node = node.mapping({"type", *_HTTP_KEYS, *_COMMAND_KEYS}).get("type")
    if kind_node is None:
        raise node._child("type").error("is required (http, command or manual)")
    kind = kind_node.string()
    if kind == "manual":
        node.mapping({"type"})
        return ManualRotator()
    if kind == "command":
        f = node.mapping({"type", *_COMMAND_KEYS})
        argv = required(node, f, "command").strings()
        if not argv:
            raise f["command"].error("must list the executable and its arguments")
        return CommandRotator(
            argv=argv,
            admin_secret=opt(f, "admin_secret", lambda n: secret_ref(n, kv_mount, "token"), None),
            verify=opt(f, "verify", Node.boolean, False),
            timeout=opt(f, "timeout", Node.duration, 60.0),
        )
    if kind != "http":
        raise kind_node.error("must be one of http, command, manual")
    f = node.mapping({"type", *_HTTP_KEYS})
    allow_http = opt(f, "allow_http", Node.boolean, False)
    tls = f["tls"].mapping({"verify", "ca_file"}) if "tls" in f else {}
    return HttpRotator(
        create=_http_call(required(node, f, "create"), _CREATE_FIELDS, allow_http),
        revoke=_http_call(required(node, f, "revoke"), _KEY_FIELDS, allow_http),
        verify=opt(f, "verify", lambda n: _http_call(n, _KEY_FIELDS, allow_http), None),
        admin_secret=opt(f, "admin_secret", lambda n: secret_ref(n, kv_mount, "token"), None),
        key_pointer=opt(f, "key_pointer", _pointer, "/key"),
        id_pointer=opt(f, "id_pointer", _pointer, "/id"),
        timeout=opt(f, "timeout", Node.duration, 30.0),
        tls_verify=opt(tls, "verify", Node.boolean, True),
        ca_file=opt(tls, "ca_file", Node.path_value, None),
    )


_HTTP_KEYS = {
    "create",
    "verify",
    "revoke",
    "admin_secret",
    "key_pointer",
    "id_pointer",
    "timeout",
    "allow_http",
    "tls",
}
_COMMAND_KEYS = {"command", "admin_secret", "verify", "timeout"}


def _pointer(node: Node) -> str:
    value = node.string()
    if not _POINTER.match(value):
        raise node.error("must be a JSON pointer such as /key or /data/0/secret")
    return value


def _http_call(node: Node, fields: frozenset[str], allow_http: bool) -> HttpCall:
    f = node.mapping({"method", "url", "headers", "body"})
    method = opt(f, "method", Node.string, "POST").upper()
    if method not in METHODS:
        raise f["method"].error(f"unknown method (one of {', '.join(sorted(METHODS))})")
    url_node = required(node, f, "url")
    url = _call_template(url_node, fields)
    scheme = url.partition("://")[0].lower()
    if scheme not in ("http", "https") or "://" not in url:
        raise url_node.error("must be an absolute http(s) URL")
    if scheme == "http" and not allow_http:
        raise url_node.error("http:// would send credentials unencrypted; set allow_http: true")
    headers = []
    header_nodes: list[tuple[str, Node]] = opt(f, "headers", Node.items, [])
    for name, value in header_nodes:
        if not HEADER_NAME.match(name):
            raise value.error("not a valid header name")
        headers.append((name, _call_template(value, fields)))
    body = None
    if "body" in f:
        _check_body(f["body"], fields)
        body = json.dumps(f["body"].value)
    return HttpCall(method=method, url=url, headers=tuple(headers), body=body)


def _check_body(node: Node, fields: frozenset[str]) -> None:
    """A JSON body: every string in it is a template; other scalars pass through."""
    if isinstance(node.value, dict):
        for _, child in node.items():
            _check_body(child, fields)
    elif isinstance(node.value, list):
        for child in node.sequence():
            _check_body(child, fields)
    elif isinstance(node.value, str):
        _call_template(node, fields)
    elif not isinstance(node.value, int | float | bool) and node.value is not None:
        raise node.error("must be JSON: mappings, lists, strings, numbers, booleans, null")


def _call_template(node: Node, fields: frozenset[str]) -> str:
    template = node.string()
    for name in _PLACEHOLDER.findall(template):
        if name not in fields:
            raise node.error(f"unknown placeholder {{{name}}} (here: {', '.join(sorted(fields))})")
    if "{" in _PLACEHOLDER.sub("", template) or "}" in _PLACEHOLDER.sub("", template):
        raise node.error("unbalanced brace")
    if hidden(template):  # the rule of keys and agents' names (keyproxy.text)
        raise node.error("must not contain control characters (C0, DEL, C1 or bidirectional)")
    return template
