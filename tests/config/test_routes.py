"""keyproxy.config.routes: MCP options belong to MCP routes only; bodies on GET, OPTIONS and
DELETE are taken only where a route says so."""

from __future__ import annotations

import pytest

from keyproxy import paths
from keyproxy.errors import BadRequest, ConfigError
from tests.helpers.configs import MCP_ROUTE, parse_doc, with_setting


def test_mcp_options_only_on_mcp_routes() -> None:
    """`mcp:` on an http route, an unknown kind, or an unknown server request is refused."""
    for path, value, what in [
        ("routes.openai.mcp", {"server_requests": []}, "only applies to routes of kind: mcp"),
        ("routes.openai.kind", "grpc", "must be http or mcp"),
    ]:
        with pytest.raises(ConfigError, match=what):
            parse_doc(with_setting(path, value))
    bad = {**MCP_ROUTE, "mcp": {"server_requests": ["tools/call"]}}
    with pytest.raises(ConfigError, match=r"routes\.github-mcp\.mcp\.server_requests"):
        parse_doc(with_setting("routes.github-mcp", bad))


def test_an_mcp_endpoint_is_one_plain_path() -> None:
    """`mcp.endpoint` is kept as written when it is a path as sent upstream, `/mcp` when
    unset; one with a dot segment, percent-encoding, a query or no leading slash is refused
    with its YAML path."""
    for endpoint in ("/mcp", "/", "/v1/mcp/"):
        route = {**MCP_ROUTE, "mcp": {"endpoint": endpoint}}
        parsed = parse_doc(with_setting("routes.github-mcp", route))
        assert parsed.routes["github-mcp"].mcp_endpoint == endpoint
    routes = parse_doc(with_setting("routes.github-mcp", MCP_ROUTE)).routes
    assert routes["github-mcp"].mcp_endpoint == "/mcp"  # the SDKs' own, not every path
    assert routes["openai"].mcp_endpoint is None  # kind: http
    for endpoint in ("mcp", "/a/../mcp", "/./mcp", "/m%63p", "/mcp?x=1", "//mcp", ""):
        route = {**MCP_ROUTE, "mcp": {"endpoint": endpoint}}
        with pytest.raises(ConfigError, match=r"routes\.github-mcp\.mcp\.endpoint"):
            parse_doc(with_setting("routes.github-mcp", route))


# Endpoints a request reaches or not, as keyproxy.paths reads the path a request names.
ENDPOINTS = ["/mcp", "/", "/v1/mcp/", "/mcp;v=1", "/..a", "/a..", "/~x", "/..;x", "/.;a/mcp"]
ENDPOINTS += ["/...", "/a/.../b", "/;x", "/a%2Fb", "/a/./b"]


def test_an_mcp_endpoint_is_accepted_only_where_a_request_can_reach_it() -> None:
    """An endpoint is accepted exactly when it is a path a request's path is sent upstream
    as: never one that every request naming it is refused for (`/..;x`, a dot segment)."""
    for endpoint in ENDPOINTS:
        try:
            reachable = paths.normalise_encoded(endpoint)[1] == endpoint
        except BadRequest:
            reachable = False
        route = {**MCP_ROUTE, "mcp": {"endpoint": endpoint}}
        if reachable:
            parsed = parse_doc(with_setting("routes.github-mcp", route))
            assert parsed.routes["github-mcp"].mcp_endpoint == endpoint
        else:
            with pytest.raises(ConfigError, match=r"routes\.github-mcp\.mcp\.endpoint"):
                parse_doc(with_setting("routes.github-mcp", route))


def test_bodies_on_names_only_methods_whose_bodies_mean_nothing() -> None:
    """A route takes bodies on none of GET, OPTIONS, DELETE by default; `bodies_on` names
    those it does, and anything else (HEAD, a method in lower case) is refused with its path."""
    assert parse_doc(with_setting("routes.openai.bodies_on", [])).routes["openai"].bodies_on == (
        frozenset()
    )
    taken = parse_doc(with_setting("routes.openai.bodies_on", ["GET", "DELETE"]))
    assert taken.routes["openai"].bodies_on == {"GET", "DELETE"}
    for methods in (["HEAD"], ["get"], ["POST"]):
        with pytest.raises(ConfigError, match=r"routes\.openai\.bodies_on\[0\]"):
            parse_doc(with_setting("routes.openai.bodies_on", methods))


@pytest.mark.parametrize("control", ["\x01", "\x7f", "\u0085", "\u202e", "\u2066"])
def test_an_injection_format_holds_no_control_character(control: str) -> None:
    """An injected header's format is refused with any character a key may not hold
    either (C0, DEL, C1, a bidirectional control), with its path."""
    inject = [{"header": "Authorization", "format": f"Bearer{control} {{key}}"}]
    with pytest.raises(ConfigError, match=r"routes\.openai\.inject\[0\]\.format.*control"):
        parse_doc(with_setting("routes.openai.inject", inject))


def test_the_upstreams_base_path_is_sent_as_written() -> None:
    """The base path keeps its percent-encoding (an encoded `?`, `/` or space stays one: it
    never becomes a query, a segment boundary or a space in the request line), and what must
    be encoded is."""
    for upstream, base in [
        ("https://api.example.com/v1%3Fx/a%2Fb/my%20api/", "/v1%3Fx/a%2Fb/my%20api"),
        ("https://api.example.com/caf\u00e9/a%25b", "/caf%C3%A9/a%25b"),
        ("https://api.example.com/v1", "/v1"),
        ("https://api.example.com", ""),
    ]:
        parsed = parse_doc(with_setting("routes.openai.upstream", upstream))
        assert parsed.routes["openai"].upstream.base_path == base, upstream


def test_an_internationalised_upstream_host_is_kept_in_its_ascii_form() -> None:
    """The key goes to the host the operator wrote: its IDNA 2008 form, which yarl and DNS
    use. The Unicode form would be resolved, sent as Host and verified in TLS by Python's
    IDNA 2003 codec, which maps `straße` to `strasse`: another domain, maybe someone else's."""
    parsed = parse_doc(with_setting("routes.openai.upstream", "https://stra\u00dfe.example/v1"))
    upstream = parsed.routes["openai"].upstream
    assert upstream.host == "xn--strae-oqa.example"
    assert upstream.origin == "https://xn--strae-oqa.example:443"


def test_an_upstream_ipv6_address_with_a_zone_is_refused() -> None:
    """A zone's escape (`%25eth0`) would reach the resolver as written, another zone than
    the one meant: such an upstream is refused with its YAML path."""
    with pytest.raises(ConfigError) as refused:
        parse_doc(with_setting("routes.openai.upstream", "http://[fe80::1%25eth0]:8080/v1"))
    assert str(refused.value) == (
        "routes.openai.upstream: must not name an IPv6 address with a zone"
    )
