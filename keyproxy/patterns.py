"""Path patterns, the one grammar of policy `allow` paths and task-token scope paths.

    parse(text, max_length=None, max_segments=None, error=ValueError) -> segments

A pattern is a plain decoded path ("/v1/*/x/**"): it starts with "/", has no empty segment
but a last one ("/v1/" matches only "/v1/"), no ".", "..", "%", "\\" or control character
(the paths it is matched against are decoded and free of them, keyproxy.paths), and "*" or
"**" only as whole segments. Config parses policy patterns without size limits; a token
request bounds them. Pure: no I/O; below config, which uses it.
"""

from __future__ import annotations

from collections.abc import Callable


def parse(
    text: object,
    *,
    max_length: int | None = None,
    max_segments: int | None = None,
    error: Callable[[str], Exception] = ValueError,
) -> tuple[str, ...]:
    """`text` as segments ("/" gives (), "/a/" gives ("a", "")), or `error(message)` raised
    with the first rule it breaks."""
    if not isinstance(text, str) or not text.startswith("/"):
        raise error("must start with '/'")
    if max_length is not None and len(text) > max_length:
        raise error(f"must be at most {max_length} characters")
    segments = tuple(text[1:].split("/")) if text != "/" else ()
    if max_segments is not None and len(segments) > max_segments:
        raise error(f"must have at most {max_segments} segments")
    for i, seg in enumerate(segments):
        if seg == "" and i != len(segments) - 1:
            raise error("must not contain empty segments ('//')")
        if seg in (".", "..") or "%" in seg or "\\" in seg or any(ord(c) < 0x20 for c in seg):
            raise error(
                "must be a plain decoded path ('.', '..', '%', '\\', control characters "
                "not allowed)"
            )
        if "*" in seg and seg not in ("*", "**"):
            raise error("'*' and '**' must be whole segments")
    return segments
