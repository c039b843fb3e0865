"""`keyproxy explain`: why a request would be allowed or denied, and by which rule.

    keyproxy explain -c FILE --issuer NAME --subject SUB [--claim NAME=VALUE ...]
                     --route R [--method M] --path P [--source IP]
    keyproxy explain -c FILE --token JWT|- --route R [--method M] --path P [--source IP]

The first form describes a caller; the second decides for a real token (`-`: read it from
stdin, which keeps it out of the process list), verified as the proxy verifies it: a workload
identity token by `IdentityVerifier` (fetching its issuer's keys), a task token by
`TaskTokens` (the Transit public keys and the revocation list, read from Vault with the
configuration's login, or the operator's with --as-operator). Then, as in the proxy, a task
token's scope narrows the request, an exception token's scope is its grant, and otherwise
the first allowing policy wins.

The answer names the policy and its rule (route, methods, path pattern) that allowed the
request, or for every policy how far it got and what it would have needed; -o json gives the
same as one object (docs/operations.md). Route and issuer names are checked against the file
before anything else. Exit 0 allowed, 1 denied (or the token refused), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from keyproxy import config, mcproute, paths, policy, secret
from keyproxy import scope as scopes
from keyproxy.cli.common import (
    UsageError,
    add_config,
    add_operator,
    add_output,
    known_issuer,
    known_route,
    load_config,
    print_json,
    vault_for,
    wants_json,
)
from keyproxy.config import Policy
from keyproxy.errors import RequestError, Unauthenticated, VaultError
from keyproxy.identity import Identity, IdentityVerifier
from keyproxy.tokens import TASK_TOKEN_TYPE, TaskToken, TaskTokens, is_task_token

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def register(sub: Any) -> None:
    explain = sub.add_parser("explain", help="explain the policy decision for a request")
    add_config(explain)
    who = explain.add_argument_group("the caller: a real token, or a described identity")
    who.add_argument(
        "--token", metavar="JWT", help="a workload identity or task token ('-': from stdin)"
    )
    who.add_argument("--issuer", help="issuer name from the configuration")
    who.add_argument("--subject")
    who.add_argument("--claim", action="append", default=[], metavar="NAME=VALUE")
    explain.add_argument("--route", required=True)
    explain.add_argument("--method", default="GET")
    explain.add_argument("--path", required=True, help="upstream path, e.g. /v1/models")
    explain.add_argument("--source", default="127.0.0.1", help="caller address")
    add_operator(explain)
    add_output(explain)
    explain.set_defaults(func=_explain)


@dataclass(frozen=True)
class Request:
    route: str
    method: str
    path: str
    segments: tuple[str, ...]
    source: IPAddress


@dataclass
class Answer:
    """The decision and everything that explains it; `as_dict` is the -o json shape."""

    request: Request
    allowed: bool = False
    status: int = 403
    reason: str = ""
    policy: str | None = None
    rule: dict[str, Any] | None = None
    identity: Identity | None = None
    token: dict[str, Any] | None = None
    policies: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        r = self.request
        return {
            "allowed": self.allowed,
            "status": self.status,
            "reason": self.reason,
            "policy": self.policy,
            "rule": self.rule,
            "request": {
                "route": r.route,
                "method": r.method,
                "path": r.path,
                "source": str(r.source),
            },
            "identity": None
            if self.identity is None
            else {"issuer": self.identity.issuer, "subject": self.identity.subject},
            "token": self.token,
            "policies": self.policies,
        }


def _explain(args: argparse.Namespace) -> int:
    cfg = load_config(args)
    request = _request(cfg, args)
    if args.token is not None:
        if args.issuer or args.subject or args.claim:
            raise UsageError("--token brings its own identity: no --issuer, --subject, --claim")
        token = _read_token(args.token)
        if not token:
            raise UsageError("--token: empty token")
        secret.register(token)  # scrubbed from any log line or error, like a key
        try:
            answer = asyncio.run(_for_token(cfg, args, request, token))
        except VaultError as exc:
            print(f"keyproxy: cannot verify the task token: {exc}", file=sys.stderr)  # noqa: T201
            return 1
    else:
        if not args.issuer or args.subject is None:
            raise UsageError("give --token, or --issuer and --subject")
        known_issuer(cfg, args.issuer)
        identity = Identity(args.issuer, args.subject, _claims(args.claim))
        answer = _decide(cfg, request, identity, None)
    if wants_json(args):
        print_json(answer.as_dict())
    else:
        print(_text(answer))  # noqa: T201  # the command's answer
    return 0 if answer.allowed else 1


def _read_token(given: str) -> str:
    return (sys.stdin.readline() if given == "-" else given).strip()


def _request(cfg: config.Config, args: argparse.Namespace) -> Request:
    known_route(cfg, args.route)
    try:
        segments, sent = paths.normalise_encoded(args.path)
        source = ipaddress.ip_address(args.source)
    except (RequestError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return Request(args.route, args.method.upper(), sent, segments, source)


def _claims(items: list[str]) -> dict[str, str]:
    claims = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--claim {item!r}: expected NAME=VALUE")
        claims[name] = value
    return claims


async def _for_token(
    cfg: config.Config, args: argparse.Namespace, request: Request, token: str
) -> Answer:
    """Verify `token` as the proxy would, then decide; a refused token is a 401 answer."""
    task: TaskToken | None = None
    try:
        if is_task_token(token):
            task = await _verify_task(cfg, args, token)
            identity = task.identity
            _check_source(task, request)
        else:
            identity = await _verify_workload(cfg, token)
    except Unauthenticated as exc:
        answer = Answer(request, status=401, reason=exc.reason)
        if task is not None:
            answer.identity, answer.token = task.identity, _task_facts(task)
        answer.token = {**(answer.token or {"kind": _kind(token)}), "refused": exc.message}
        return answer
    answer = _decide(cfg, request, identity, task)
    if task is None:
        answer.token = _workload_facts(identity)
    return answer


def _kind(token: str) -> str:
    return "task" if is_task_token(token) else "workload"


def _workload_facts(identity: Identity) -> dict[str, Any]:
    """What a verified workload identity token says about itself (never the token)."""
    jti, exp = identity.claims.get("jti"), identity.claims.get("exp")
    return {
        "kind": "workload",
        "token_id": jti if isinstance(jti, str) else None,
        "expires_in": round(exp - time.time()) if isinstance(exp, int | float) else None,
    }


def _check_source(task: TaskToken, request: Request) -> None:
    if task.source is not None and task.source != str(request.source):
        raise Unauthenticated("wrong_source", "this token is bound to another address")


async def _verify_workload(cfg: config.Config, token: str) -> Identity:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=10), trust_env=False
    ) as session:
        # SECURITY: as in the proxy, a task token never passes for a workload identity.
        verifier = IdentityVerifier(cfg.identity, session, rejected_types={TASK_TOKEN_TYPE})
        return await verifier.verify(token)


async def _verify_task(cfg: config.Config, args: argparse.Namespace, token: str) -> TaskToken:
    vault = vault_for(args, cfg)
    try:
        await vault.login()
        tasks = TaskTokens(cfg, vault)
        await tasks.refresh_keys(force=True)
        await tasks.refresh_revocations()  # a revoked token is refused, as on every replica
        return await tasks.verify(token)
    finally:
        vault.close()


def _decide(
    cfg: config.Config, request: Request, identity: Identity, task: TaskToken | None
) -> Answer:
    """The proxy's authorisation step (keyproxy.proxy), with its reasons spelt out: an MCP
    route's endpoint (keyproxy.mcproute) first, then policy."""
    try:
        mcproute.check_endpoint(cfg.routes[request.route], request.path)
    except RequestError as exc:
        facts = _task_facts(task) if task is not None else None
        return Answer(request, identity=identity, token=facts, status=exc.status, reason=exc.reason)
    return _authorised(cfg, request, identity, task)


def _authorised(
    cfg: config.Config, request: Request, identity: Identity, task: TaskToken | None
) -> Answer:
    r = request
    answer = Answer(request, identity=identity)
    if task is not None:
        answer.token = _task_facts(task)
        if not scopes.allows(task.scope, r.route, r.method, r.segments):
            answer.reason = "outside_token_scope"
            return answer
        if task.exception_owner is not None:
            # Exception tokens stand for no workload identity: their scope is their grant.
            answer.allowed, answer.status, answer.reason = True, 200, "exception_token"
            answer.rule = _scope_rule(task.scope, r)
            return answer
    decision = policy.compile(cfg.policies).decide(
        identity, r.route, r.method, r.segments, r.source
    )
    outcomes = policy.explain(cfg.policies, identity, r.route, r.method, r.segments, r.source)
    by_name = {p.name: p for p in cfg.policies}
    answer.policies = [_policy_entry(by_name[name], outcome, r) for name, outcome in outcomes]
    answer.reason, answer.policy = decision.reason, decision.policy
    if decision.allowed:
        answer.allowed, answer.status = True, 200
        answer.rule = next(e["rule"] for e in answer.policies if e["name"] == decision.policy)
    return answer


def _policy_entry(p: Policy, outcome: str, r: Request) -> dict[str, Any]:
    """What one policy said, and what it grants or needs: the rule that decided."""
    entry: dict[str, Any] = {"name": p.name, "outcome": outcome}
    grant = p.allow.get(r.route)
    if outcome == "allowed" and grant is not None:
        matched = next(pat for pat in grant.paths if policy.match_path(pat, r.segments))
        entry["rule"] = {
            "route": r.route,
            "methods": sorted(grant.methods),
            "path": scopes.format_pattern(matched),
        }
    elif outcome == "no_policy_for_identity":
        entry["needs"] = {
            "issuers": list(p.issuers),
            "subjects": list(p.subjects),
            "claims": dict(p.claims),
        }
    elif outcome == "source_not_allowed":
        entry["needs"] = {"source_cidrs": [str(n) for n in p.source_cidrs]}
    elif outcome == "route_not_granted":
        entry["grants"] = {"routes": sorted(p.allow)}
    elif grant is not None:
        entry["grants"] = {
            "route": r.route,
            "methods": sorted(grant.methods),
            "paths": [scopes.format_pattern(pat) for pat in grant.paths],
        }
    return entry


def _scope_rule(scope: scopes.Scope, r: Request) -> dict[str, Any] | None:
    for grant in scope.get(r.route, ()):
        for pattern in grant.paths:
            if r.method in grant.methods and policy.match_path(pattern, r.segments):
                methods = sorted(grant.methods)
                return {
                    "route": r.route,
                    "methods": methods,
                    "path": scopes.format_pattern(pattern),
                }
    return None


def _task_facts(task: TaskToken) -> dict[str, Any]:
    """What a task token says about itself (never the token)."""
    return {
        "kind": "exception" if task.exception_owner is not None else "task",
        "token_id": task.token_id,
        "task": task.task,
        "exception_owner": task.exception_owner,
        "scope": scopes.describe(task.scope),
        "expires_in": round(task.expires_at - time.time()),
        "bound_source": task.source,
    }


# ---------------------------------------------------------------------------- text


def _text(a: Answer) -> str:
    lines = []
    if a.token is not None:
        lines.append(_token_line(a))
    elif a.identity is not None and a.status != 401:
        lines.append(f"identity: {a.identity.issuer} {a.identity.subject}")
    if a.reason == "exception_token" and a.rule is not None:
        lines.append(f"  token scope: allowed, by {_rule_text(a.rule)}")
    for entry in a.policies:
        lines.append(f"  {entry['name']}: {_entry_text(entry)}")
    if a.allowed:
        who = f"allowed by {a.policy}" if a.policy else "allowed by the exception token's scope"
        lines.append(who)
    else:
        lines.append(f"denied: {a.reason}" + (" (401)" if a.status == 401 else ""))
    return "\n".join(lines)


def _token_line(a: Answer) -> str:
    t = a.token or {}
    kind = {"exception": "exception token", "task": "task token"}.get(t.get("kind", ""))
    parts = [f"token: {kind or 'workload identity token'}"]
    if t.get("token_id"):
        parts[0] += f" {t['token_id']}"
    if a.identity is not None:
        parts[0] += f" of {a.identity.issuer} {a.identity.subject}"
    if t.get("task"):
        parts.append(f"task {t['task']}")
    if "scope" in t:
        parts.append(f"scope {t['scope'] or '(none)'}")
    if t.get("expires_in") is not None:
        parts.append(f"expires in {t['expires_in']}s")
    if "refused" in t:
        parts.append(f"refused: {t['refused']}")
    return ", ".join(parts)


def _entry_text(entry: dict[str, Any]) -> str:
    outcome = entry["outcome"]
    if "rule" in entry:
        return f"allowed, by {_rule_text(entry['rule'])}"
    if "grants" in entry and "routes" in entry["grants"]:
        routes = ", ".join(entry["grants"]["routes"]) or "no route"
        return f"{outcome} (it grants {routes})"
    if "grants" in entry:
        g = entry["grants"]
        return f"{outcome} ({g['route']}: {', '.join(g['methods'])} on {', '.join(g['paths'])})"
    needs = entry.get("needs", {})
    if "source_cidrs" in needs:
        return f"{outcome} (source_cidrs {', '.join(needs['source_cidrs'])})"
    if needs:
        parts = [f"subjects {', '.join(needs['subjects'])}"]
        if needs["issuers"]:
            parts.insert(0, f"issuers {', '.join(needs['issuers'])}")
        if needs["claims"]:
            parts.append("claims " + ", ".join(f"{k}={v}" for k, v in needs["claims"].items()))
        return f"{outcome} ({'; '.join(parts)})"
    return str(outcome)


def _rule_text(rule: dict[str, Any]) -> str:
    return f"{rule['route']}: {', '.join(rule['methods'])} on {rule['path']}"


__all__ = ["register"]
