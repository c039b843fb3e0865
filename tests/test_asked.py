from __future__ import annotations

from typing import Any

import pytest

from keyproxy.asked import read_asked
from keyproxy.config import SecretRef
from keyproxy.errors import BadRequest
from tests.helpers.vault import route

ROUTES = {"r": route("r", SecretRef("secret", "keyproxy/keys/r", "api_key"))}


def _asked(fields: dict[str, Any], *, form: bool = False) -> Any:
    return read_asked({"scope": "r" if form else {"r": {}}} | fields, form, ROUTES, delegated=False)


@pytest.mark.parametrize(
    ("value", "bound"),
    [
        *[(True, True), ("true", True), ("1", True), (1, True)],
        *[(False, False), ("false", False), ("0", False), (0, False), (None, False)],
    ],
)
def test_bind_source_is_a_yes_or_no(value: object, bound: bool) -> None:
    """JSON's booleans, the form's true/false and 1/0, and null for not asked."""
    assert _asked({"bind_source": value}).bind_source is bound
    assert _asked({}).bind_source is False


@pytest.mark.parametrize("value", ["True", "yes", "on", "", 2, 1.0, [True], {"x": 1}])
def test_any_other_bind_source_is_refused(value: object) -> None:
    """A value that is neither is a 400, never read as no: a caller asking for a bound token
    must not get an unbound one by a typo."""
    with pytest.raises(BadRequest) as refused:
        _asked({"bind_source": value})
    assert refused.value.reason == "invalid_request"
    assert "bind_source" in refused.value.message


@pytest.mark.parametrize("text", ["r:", "r:GET:", "r::/v1", ":GET", "r:GET,,POST:/v1"])
def test_an_empty_part_of_a_form_scope_item_is_refused(text: str) -> None:
    """`r:GET:` is what an unset shell variable leaves: refused, not read as every path."""
    with pytest.raises(BadRequest):
        _asked({"scope": text}, form=True)


@pytest.mark.parametrize(
    "task", ["a\x1b[2J", "a\x7f", "a\u009b2J", "a\u202eevil", "a\u2066b", "a\u200fb"]
)
def test_a_task_name_a_terminal_would_obey_is_refused(task: str) -> None:
    """A task name (it reaches operators' terminals through the audit log) holding a control
    character, C0, DEL or C1, or a bidirectional control is a 400; letters of any script
    are not."""
    with pytest.raises(BadRequest) as refused:
        _asked({"task": task})
    assert refused.value.reason == "invalid_request"
    assert _asked({"task": "résumé-タスク"}).task == "résumé-タスク"


@pytest.mark.parametrize("name", ["task", "intent"])
def test_a_token_pasted_as_task_or_intent_is_refused(name: str) -> None:
    """Task and intent are audited (the task in every request's event): one holding a JWT,
    a token pasted by mistake, is a 400 that does not quote it; text naming JWTs is not."""
    token = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0.c2ln"
    for value in (token, f"summarise {token} please"):
        with pytest.raises(BadRequest) as refused:
            _asked({name: value})
        assert refused.value.reason == "invalid_request"
        assert "eyJ" not in refused.value.message
    assert getattr(_asked({name: "keyJWT-rotation v1.eyJ"}), name) == "keyJWT-rotation v1.eyJ"


@pytest.mark.parametrize(
    ("fields", "form"),
    [
        ({"scope": ""}, True),
        ({"resource": ""}, True),
        ({"scope": ""}, False),
        ({"scope": None}, False),
        ({"scope": {}}, False),
        ({"scope": []}, False),
        ({"scope": False}, False),
    ],
)
def test_a_delegation_asking_for_an_empty_scope_is_refused(
    fields: dict[str, Any], form: bool
) -> None:
    """A delegation may leave its scope out (its parent's whole scope), but a scope given
    empty (`scope=` from an unset variable) asks for nothing: a 400 as any empty scope,
    never all of the parent's."""
    with pytest.raises(BadRequest) as refused:
        read_asked(fields, form, ROUTES, delegated=True)
    assert refused.value.reason == "invalid_request"
    assert read_asked({}, form, ROUTES, delegated=True).scope == {}  # left out: the parent's


@pytest.mark.parametrize(
    ("fields", "form", "said"),
    [
        ({"bind-source": True}, False, "unknown field 'bind-source'"),
        ({"max_use": 1}, False, "unknown field 'max_use'"),
        ({"idle-ttl": "30s"}, False, "unknown field 'idle-ttl'"),
        ({"Scope": "r"}, True, "unknown field 'Scope'"),
        ({"subject_token": "x"}, False, "unknown field 'subject_token'"),  # a second credential
        ({"x" * 65: 1}, False, "unknown field"),
        ({"a\x1b[2Jb": 1}, False, "unknown field"),
        ({"sk-live-51Hxyz0": ""}, True, "unknown field"),  # a key pasted as the whole body
        ({"audience": "r"}, False, "unknown field 'audience'"),  # the form's, never read here
        ({"actor_token": "eyJ"}, False, "actor_token goes with a task token"),
        ({"actor_token": False}, False, "actor_token goes with a task token"),  # not a JWT:
        ({"actor_token": {}}, False, "actor_token goes with a task token"),  # refused too
        ({"requested_token_type": "urn:x"}, True, "requested_token_type must be"),
    ],
)
def test_a_field_keyproxy_does_not_read_is_refused(
    fields: dict[str, Any], form: bool, said: str
) -> None:
    """A misspelt field would get a token without the limit its caller asked for, and a
    second credential or an actor without a delegation would go unchecked: each is a 400,
    naming the field unless its name is long or holds controls."""
    with pytest.raises(BadRequest) as refused:
        _asked(fields, form=form)
    assert refused.value.reason == "invalid_request"
    assert refused.value.message.startswith(said)
    assert "\x1b" not in refused.value.message
    assert "x" * 65 not in refused.value.message
    assert "sk-live" not in refused.value.message


def test_what_standard_rfc8693_clients_add_is_taken() -> None:
    """`client_id` (Spring Security, oauthlib) is taken and not read."""
    assert _asked({"client_id": "agent"}, form=True).scope
