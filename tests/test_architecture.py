"""Imports point one way: every keyproxy module imports only its own layer or the ones below.

The layers, from the bottom, are data here (LAYERS). Each module's `keyproxy.*` imports are
read with `ast` (top level, inside functions, under TYPE_CHECKING alike), so a lazy import
inside a function cannot hide a wrong-way dependency.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "keyproxy"

# Bottom first. A module may import its own layer (without a cycle) and any layer below it.
# A module is named below `keyproxy` ("vault.keycache"; a package's __init__ is the package,
# "vault"). A package may hold modules of different layers: rotation.state is pure core while
# the rest of keyproxy.rotation does I/O. A package's __init__ re-exports its modules, so it
# sits in the layer of the highest of them (or above).
LAYERS: list[tuple[str, frozenset[str]]] = [
    # What everything may use: the error tree, redacting secrets, the path-pattern grammar
    # (config compiles policy paths with it), the MCP name checks (config checks MCP grants
    # with them), the SPIFFE ID grammar (config checks trust domains with it). `keyproxy` is
    # the package itself.
    (
        "foundation",
        frozenset(
            {
                "keyproxy",
                "errors",
                "capped",
                "secret",
                "patterns",
                "strictjson",
                "text",
                "mcp.names",
                "spiffe",
            }
        ),
    ),
    (
        "config",
        frozenset(
            {
                "config",
                "config.compile",
                "config.loader",
                "config.model",
                "config.node",
                "config.sections",
                "config.routes",
                "config.rotation",
                "config.policies",
                "config.limits",
                "config.changes",
                "config.store",
            }
        ),
    ),
    # Pure core: decisions and transformations, no I/O of their own.
    (
        "pure core",
        frozenset(
            {
                "addresses",
                "caller",
                "forwardedcert",
                "paths",
                "policy",
                "scope",
                "inject",
                "headers",
                "netguard",
                "fragments",
                "redact",
                "jws",
                "deadline",
                "verified",
                "sdkenv",
                "rotation.state",
                "mcp",
                "mcp.jsonrpc",
                "mcp.grants",
                "mcp.lists",
                "mcp.sse",
                "mcp.audit",
            }
        ),
    ),
    # The shared limit store (Valkey/Redis or in-process): below the adapters that use it.
    (
        "state",
        frozenset(
            {
                "state",
                "state.store",
                "state.memory",
                "state.redis",
                "state.scripts",
                "state.batch",
                "state.limits",
            }
        ),
    ),
    # I/O adapters: Vault, the issuers, task tokens, upstream sessions, rotators, logs, metrics.
    (
        "I/O adapters",
        frozenset(
            {
                "vault",
                "vault.transport",
                "vault.auth",
                "vault.kv",
                "vault.transit",
                "vault.client",
                "vault.keycache",
                "identity",
                "identity.keys",
                "identity.issuers",
                "identity.verifier",
                "tokens",
                "tokens.format",
                "tokens.shared",
                "tokens.revoked",
                "tokens.listread",
                "tokens.revocation",
                "tokens.lineage",
                "tokens.inflight",
                "tokens.exceptions",
                "tokens.signing",
                "tokens.verify",
                "tokens.sessionseal",
                "tokens.tasks",
                "pool",
                "upstream",
                "rotation.rotators",
                "rotation.journal",
                "audit",
                "audit.lines",
                "audit.log",
                "audit.calls",
                "audit.query",
                "audit.tree",
                "metrics",
                "gauges",
                "tls",
                "watch",
                "command",
                "workload",
                "runner",
            }
        ),
    ),
    (
        "pipeline and app",
        frozenset(
            {
                "proxy",
                "mtls",
                "mcproute",
                "mcpanswer",
                "outgoing",
                "limiter",
                "forward",
                "broker",
                "lifecycle",
                "delegation",
                "asked",
                "answers",
                "rotation",
                "rotation.steps",
                "rotation.engine",
                "rotation.status",
                "demo",
                "mcp_demo",
                "devserver",
                "devca",
                "storeserver",
            }
        ),
    ),
    (
        "server",
        frozenset(
            {
                "server",
                "server.app",
                "server.listen",
                "server.limits",
                "server.collector",
                "server.reload",
                "server.tlsapp",
            }
        ),
    ),
    (
        "cli",
        frozenset(
            {
                "cli",
                "cli.__main__",
                "cli.common",
                "cli.explain",
                "cli.token",
                "cli.rotate",
                "cli.query",
                "cli.tree",
                "cli.dev",
                "cli.reload",
                "cli.serve",
                "cli.run",
            }
        ),
    ),
]

# Wrong-way imports that exist today in modules being reworked elsewhere, as (importer,
# imported). Each must still exist (the test says when one can go); none may be added.
KNOWN_LAYER_EXCEPTIONS: frozenset[tuple[str, str]] = frozenset()

# Outside keyproxy.config, its objects are imported from `keyproxy.config`, never from its
# modules (config.model, config.compile, config.loader are its implementation).
KNOWN_CONFIG_SUBMODULE_IMPORTS: frozenset[tuple[str, str]] = frozenset()


def _modules() -> dict[str, Path]:
    """Every module of keyproxy/ by its dotted name below `keyproxy` ("config.model")."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts) or "keyproxy"] = path
    return found


MODULES = _modules()


def _resolve(dotted: str) -> str:
    """A `keyproxy.x.y` name as the module that holds it (a name inside a module is that
    module; `from keyproxy import __version__` is the package itself)."""
    parts = dotted.split(".")[1:]
    while parts and ".".join(parts) not in MODULES:
        parts.pop()
    return ".".join(parts) or "keyproxy"


def _read_imports(source: str, package: list[str]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for each keyproxy import in `source`, anywhere in it;
    `package` is the dotted package a relative import starts from."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "keyproxy":
                    yield _resolve(alias.name), node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package, then up
                start = package[: len(package) - node.level + 1]
                base = ".".join([*start, *([base] if base else [])])
            if base.split(".")[0] != "keyproxy":
                continue
            for alias in node.names:
                yield _resolve(f"{base}.{alias.name}"), node.lineno


def _graph() -> dict[str, list[tuple[str, int]]]:
    graph = {}
    for module, path in MODULES.items():
        package = ["keyproxy", *path.relative_to(PACKAGE).parent.parts]
        found = _read_imports(path.read_text(encoding="utf-8"), package)
        graph[module] = [(imported, line) for imported, line in found if imported != module]
    return graph


GRAPH = _graph()


def _layer_of() -> dict[str, int]:
    return {module: i for i, (_, members) in enumerate(LAYERS) for module in members}


def test_every_module_has_a_layer() -> None:
    """Each module of keyproxy/ is placed in exactly one layer, and every listed one exists."""
    listed = [module for _, members in LAYERS for module in members]
    twice = sorted({m for m in listed if listed.count(m) > 1})
    assert not twice, f"modules listed in more than one layer: {twice}"
    missing = sorted(set(MODULES) - set(listed))
    assert not missing, f"modules with no layer (add them to LAYERS): {missing}"
    gone = sorted(set(listed) - set(MODULES))
    assert not gone, f"LAYERS lists modules that do not exist: {gone}"


def _upward(graph: dict[str, list[tuple[str, int]]]) -> list[tuple[str, str, str]]:
    """(importer, imported, message) for each import of a higher layer in `graph`."""
    layer = _layer_of()
    found = []
    for module, imports in graph.items():
        for imported, line in imports:
            if layer[imported] > layer[module]:
                where = MODULES[module].relative_to(PACKAGE)
                found.append(
                    (
                        module,
                        imported,
                        f"keyproxy/{where}:{line}: {module} ({LAYERS[layer[module]][0]}) "
                        f"imports {imported} ({LAYERS[layer[imported]][0]}), a higher layer",
                    )
                )
    return found


def test_imports_point_downwards() -> None:
    """No module imports a module of a higher layer (but for the listed known exceptions)."""
    upward = _upward(GRAPH)
    wrong = [message for *edge, message in upward if tuple(edge) not in KNOWN_LAYER_EXCEPTIONS]
    assert not wrong, "imports pointing upwards:\n" + "\n".join(wrong)
    stale = sorted(KNOWN_LAYER_EXCEPTIONS - {(m, i) for m, i, _ in upward})
    assert not stale, f"known exceptions that no longer exist (remove them): {stale}"


def test_no_import_cycles() -> None:
    """The import graph has no cycle, inside a layer or across layers."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for imported, _ in GRAPH[module]:
            if state.get(imported) == "open":
                return [*path[path.index(imported) :], imported]
            if imported not in state and (cycle := visit(imported, [*path, imported])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(GRAPH):
        if module not in state and (cycle := visit(module, [module])):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_config_is_imported_through_its_package() -> None:
    """Outside keyproxy/config, config's objects come from `keyproxy.config`, not its modules."""
    wrong = []
    seen = set()
    for module, imports in GRAPH.items():
        if module == "config" or module.startswith("config."):
            continue
        for imported, line in imports:
            if not imported.startswith("config."):
                continue
            seen.add((module, imported))
            if (module, imported) not in KNOWN_CONFIG_SUBMODULE_IMPORTS:
                wrong.append(
                    f"keyproxy/{MODULES[module].relative_to(PACKAGE)}:{line}: {module} imports "
                    f"keyproxy.{imported}; import from keyproxy.config"
                )
    assert not wrong, "imports of config's implementation modules:\n" + "\n".join(wrong)
    stale = sorted(KNOWN_CONFIG_SUBMODULE_IMPORTS - seen)
    assert not stale, f"known exceptions that no longer exist (remove them): {stale}"


def test_the_reader_finds_every_form_of_import() -> None:
    """Imports at top level, inside functions, under TYPE_CHECKING and relative are all read,
    each as the module that holds the imported name."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from keyproxy import policy\n"
        "import keyproxy.config.model\n"
        "if TYPE_CHECKING:\n"
        "    from keyproxy.vault import Vault\n"
        "def late():\n"
        "    from keyproxy.proxy import Proxy\n"
        "    from .model import Route\n"
        "    from .. import scope\n"
    )
    found = sorted(name for name, _ in _read_imports(source, ["keyproxy", "config"]))
    assert found == ["config.model", "config.model", "policy", "proxy", "scope", "vault"]


def test_an_upward_import_is_named_with_its_module_and_line() -> None:
    """A pure-core module importing the pipeline is reported with file, line and both layers."""
    message = _upward({"policy": [("proxy", 7)], "proxy": [("policy", 3)]})
    assert [m for *_, m in message] == [
        "keyproxy/policy.py:7: policy (pure core) imports proxy (pipeline and app), a higher layer"
    ]


MAX_MODULE_LINES = 400


def test_no_module_is_over_400_lines() -> None:
    """Each module holds one concept, small enough to read whole: past 400 lines it is
    split, not grown."""
    long = {
        str(path.relative_to(PACKAGE.parent)): count
        for path in sorted(PACKAGE.rglob("*.py"))
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
