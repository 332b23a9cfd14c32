"""Read a JSON request body once and re-emit it with changed top-level members, all other bytes untouched.

The client's body reaches upstream exactly as sent (key order, spacing, unicode, big integers, unknown
fields): only the members the proxy sets are spliced in or out of the original bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

from . import jsontext
from .errors import ClientError

_WS = re.compile(r"[ \t\n\r]*")
_scan_value = json.JSONDecoder().raw_decode
_DROP = object()
Parts = tuple[bytes | memoryview, ...]  # a body as consecutive pieces


@dataclass(frozen=True)
class Member:
    key: str
    key_start: int  # offset of the key's opening quote
    value_start: int
    value_end: int
    value: Any


@dataclass(frozen=True)
class Body:
    """A parsed request body: the original bytes, the top-level values, and (when an edit needs them) where
    each top-level member sits in the text."""

    raw: bytes
    values: dict[str, Any]  # a duplicated key keeps its last value, as json.loads does
    open_brace: int

    @cached_property
    def text(self) -> str:
        """The body as text (valid UTF-8: `parse` checked), made only for an edit that needs it."""
        return self.raw.decode("utf-8")

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    @cached_property
    def order(self) -> tuple[Member, ...]:
        """Every member in text order, duplicates included: scanned only for an edit of an existing key."""
        return _members(self.text)

    @property
    def members(self) -> dict[str, Member]:
        return {m.key: m for m in self.order}

    def render(self, changes: dict[str, Any]) -> bytes:
        """The body with each key in `changes` set to its value, or removed when the value is DROP."""
        return b"".join(self.render_parts(changes))

    def render_parts(self, changes: dict[str, Any]) -> Parts:
        """`render` as consecutive pieces, mostly views of the original bytes, so a large body is not copied."""
        edits: list[tuple[int, int, str]] = []  # (start, end, replacement) in text offsets
        # The common edit adds keys the body lacks, at its front: no member needs locating for that.
        order = self.order if any(key in self.values for key in changes) else ()
        if order:
            dropped = [m.key in changes and changes[m.key] is _DROP for m in order]
            edits.extend(self._removals(order, dropped))
        prefix: list[str] = []
        for key, value in changes.items():
            if value is _DROP:
                continue
            present = [m for m in order if m.key == key]
            if present:
                edits.extend((m.value_start, m.value_end, _dumps(value)) for m in present)
            else:
                prefix.append(f"{_dumps(key)}:{_dumps(value)}")
        if prefix:
            remaining = any(not (key in changes and changes[key] is _DROP) for key in self.values)
            edits.append((self.open_brace + 1, self.open_brace + 1, ",".join(prefix) + ("," if remaining else "")))
        return self._apply(edits)

    @staticmethod
    def _removals(order: tuple[Member, ...], dropped: list[bool]) -> list[tuple[int, int, str]]:
        """Cut each run of dropped members together with the one comma that separated it from the rest."""
        cuts = []
        i = 0
        while i < len(order):
            if not dropped[i]:
                i += 1
                continue
            j = i
            while j + 1 < len(order) and dropped[j + 1]:
                j += 1
            if j + 1 < len(order):
                cuts.append((order[i].key_start, order[j + 1].key_start, ""))
            elif i > 0:
                cuts.append((order[i - 1].value_end, order[j].value_end, ""))
            else:
                cuts.append((order[i].key_start, order[j].value_end, ""))
            i = j + 1
        return cuts

    def _apply(self, edits: list[tuple[int, int, str]]) -> Parts:
        if not edits:
            return (self.raw,)
        ascii_only = self.raw.isascii()  # then text offsets are byte offsets, and the text need not be made
        raw = memoryview(self.raw)  # slices of the original are views, not copies
        out: list[bytes | memoryview] = []
        cursor = 0
        for start, end, replacement in sorted(edits):
            b_start = start if ascii_only else len(self.text[:start].encode())
            b_end = end if ascii_only else b_start + len(self.text[start:end].encode())
            out.append(raw[cursor:b_start])
            out.append(replacement.encode())
            cursor = b_end
        out.append(raw[cursor:])
        return tuple(out)


DROP = _DROP


class RawJSON(str):
    """A member value given as JSON text, spliced in as it is."""


# Made once: json.dumps with any option builds a new encoder on every call.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _dumps(value: Any) -> str:
    if isinstance(value, RawJSON):
        return str(value)
    return _ENCODE(value)


def with_usage(body: Body) -> RawJSON | None:
    """`stream_options` asking for usage too, made from the client's own text so its numbers keep their spelling
    (`1.50`, `1e400`); None where that cannot be done without changing what the client meant."""
    options = body.get("stream_options")
    if options is None:
        return RawJSON('{"include_usage":true}')
    if not isinstance(options, dict):
        return None  # the client's own mistake: upstream answers it as it is
    if "include_usage" in options:
        return None  # include_usage false, or not a boolean: the client's choice stands, and goes unpriced
    member = next(m for m in reversed(body.order) if m.key == "stream_options")
    text = body.text[member.value_start : member.value_end]
    rest = text[1:].lstrip(" \t\n\r")
    return RawJSON('{"include_usage":true' + ("" if rest.startswith("}") else ",") + text[1:])


def parse(raw: bytes) -> Body:
    """Parse a JSON object body; anything else is a ClientError naming what is wrong."""
    try:
        values = jsontext.fast_loads(raw)  # msgspec accepts valid UTF-8 only
    except jsontext.Refused:
        values = _strict_loads(raw)
    if not isinstance(values, dict):
        _strict_loads(raw)  # says what is wrong with it
    return Body(raw, values, len(raw) - len(raw.lstrip(b" \t\n\r")))


def _strict_loads(raw: bytes) -> dict[str, Any]:
    """The standard library's reading of the body, or the ClientError that says why it is not a JSON object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ClientError(f"The request body is not valid UTF-8 (byte {exc.start}).") from None
    try:
        values = json.loads(text, parse_constant=_no_constant)
        if not isinstance(values, dict):
            raise ValueError("the body must be a JSON object")
    except RecursionError:
        raise ClientError("The JSON body of your request is nested too deeply to read.") from None
    except ValueError as exc:
        reason = str(exc)
        try:
            _members(text)  # json's C parser is fast but terse: the member scan says where the body goes wrong
        except (ValueError, IndexError, RecursionError) as precise:
            reason = str(precise)
        raise ClientError(f"We could not parse the JSON body of your request: {reason}") from None
    return values


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _members(text: str) -> tuple[Member, ...]:
    """The top-level members of a JSON object text with their offsets; ValueError where it is not one."""
    pos = _WS.match(text, 0).end()  # type: ignore[union-attr]
    if text[pos : pos + 1] != "{":
        raise ValueError("the body must be a JSON object")
    order: list[Member] = []
    pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
    if text[pos : pos + 1] == "}":
        pos += 1
    else:
        while True:
            if text[pos : pos + 1] != '"':
                raise ValueError(f"expected a property name at character {pos}")
            key_start = pos
            key, pos = scanstring(text, pos + 1)
            pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
            if text[pos : pos + 1] != ":":
                raise ValueError(f"expected ':' at character {pos}")
            value_start = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
            value, pos = _scan_value(text, value_start)
            order.append(Member(key, key_start, value_start, pos, value))
            pos = _WS.match(text, pos).end()  # type: ignore[union-attr]
            separator = text[pos : pos + 1]
            pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
            if separator == "}":
                break
            if separator != ",":
                raise ValueError(f"expected ',' or '}}' at character {pos - 1}")
    if _WS.match(text, pos).end() != len(text):  # type: ignore[union-attr]
        raise ValueError(f"extra data after the JSON object at character {pos}")
    return tuple(order)
