from __future__ import annotations

import pytest

from keyproxy.config.node import Node
from keyproxy.config.sections import port
from keyproxy.errors import ConfigError


@pytest.mark.parametrize("value", [0, 3, 7])
def test_a_whole_number_within_its_bounds_is_read(value: int) -> None:
    """Both bounds are inside the range."""
    assert Node(value, "a.b").whole(0, 7, "a whole number from 0 to 7") == value


@pytest.mark.parametrize("value", [-1, 8, True, False, 1.0, "2", None, [1]])
def test_anything_else_names_the_range(value: object) -> None:
    """Out of range, a YAML boolean, a float or a string: the error says what is wanted and
    where."""
    with pytest.raises(ConfigError, match="must be a whole number from 0 to 7") as refused:
        Node(value, "a.b").whole(0, 7, "a whole number from 0 to 7")
    assert "a.b" in str(refused.value)


@pytest.mark.parametrize(
    ("value", "ok"), [(1, True), (10**9, True), (0, False), (-5, False), (True, False)]
)
def test_a_count_is_a_positive_whole_number(value: object, ok: bool) -> None:
    """No upper bound; zero, negatives and booleans are refused."""
    if ok:
        assert Node(value, "n").count() == value
    else:
        with pytest.raises(ConfigError, match="must be a positive whole number"):
            Node(value, "n").count()


@pytest.mark.parametrize(("value", "ok"), [(0, True), (65535, True), (-1, False), (65536, False)])
def test_a_port_is_0_to_65535(value: int, ok: bool) -> None:
    """0 (any free port) to 65535."""
    if ok:
        assert port(Node(value, "server.port")) == value
    else:
        with pytest.raises(ConfigError, match=r"must be a port number \(0-65535\)"):
            port(Node(value, "server.port"))
