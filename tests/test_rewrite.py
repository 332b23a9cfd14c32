"""proxy.rewrite: a body goes upstream byte for byte, except the top-level members the proxy sets."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.errors import ClientError
from proxy.rewrite import DROP, parse

FLEX = {"service_tier": "flex"}
USAGE = {"stream_options": {"include_usage": True}}


@pytest.mark.parametrize(
    ("raw", "changes", "expected"),
    [
        pytest.param(
            b'{\n  "model" : "o3",\n\t"messages": [ ]\n}',
            FLEX,
            b'{"service_tier":"flex",\n  "model" : "o3",\n\t"messages": [ ]\n}',
            id="key-order-and-whitespace",
        ),
        pytest.param(
            '{"model":"o3","content":"héllo 日本 🙂"}'.encode(),
            FLEX,
            '{"service_tier":"flex","model":"o3","content":"héllo 日本 🙂"}'.encode(),
            id="raw-utf8",
        ),
        pytest.param(
            b'{"model":"o3","content":"\\u00e9\\ud83d\\ude42\\n"}',
            FLEX,
            b'{"service_tier":"flex","model":"o3","content":"\\u00e9\\ud83d\\ude42\\n"}',
            id="unicode-escapes-kept",
        ),
        pytest.param(
            b'{"model":"o3","seed":1208925819614629174706176}',
            FLEX,
            b'{"service_tier":"flex","model":"o3","seed":1208925819614629174706176}',
            id="big-int-2**80",
        ),
        pytest.param(
            b'{"temperature":1.50,"max":1e5,"z":-0.0,"tiny":1E-7,"top_p":1.0}',
            FLEX,
            b'{"service_tier":"flex","temperature":1.50,"max":1e5,"z":-0.0,"tiny":1E-7,"top_p":1.0}',
            id="floats-as-written",
        ),
        pytest.param(
            b'{"model":"o3","x_vendor":{"a":[1,{"b":null}],"c":true}}',
            FLEX,
            b'{"service_tier":"flex","model":"o3","x_vendor":{"a":[1,{"b":null}],"c":true}}',
            id="unknown-fields",
        ),
        pytest.param(
            b'{"model":"o3","model":"gpt-5"}',
            FLEX,
            b'{"service_tier":"flex","model":"o3","model":"gpt-5"}',
            id="duplicate-keys-kept",
        ),
        pytest.param(
            b'{"model":"o3","messages":[{"role":"user","service_tier":"auto"}]}',
            FLEX,
            b'{"service_tier":"flex","model":"o3","messages":[{"role":"user","service_tier":"auto"}]}',
            id="nested-service-tier-untouched",
        ),
        pytest.param(b"{}", FLEX, b'{"service_tier":"flex"}', id="insert-into-empty"),
        pytest.param(b"{ }", FLEX, b'{"service_tier":"flex" }', id="insert-into-empty-with-space"),
        pytest.param(b" \n{}\n ", FLEX, b' \n{"service_tier":"flex"}\n ', id="outer-whitespace-kept"),
        pytest.param(
            b'{"model":"o3", "service_tier" : "auto" ,"n":1}',
            FLEX,
            b'{"model":"o3", "service_tier" : "flex" ,"n":1}',
            id="replace-in-place",
        ),
        pytest.param(
            b'{"service_tier":"auto","model":"o3","service_tier":"default"}',
            FLEX,
            b'{"service_tier":"flex","model":"o3","service_tier":"flex"}',
            id="replace-every-duplicate",
        ),
        pytest.param(
            '{"content":"日本語","service_tier":"auto","n":1}'.encode(),
            FLEX,
            '{"content":"日本語","service_tier":"flex","n":1}'.encode(),
            id="replace-after-multibyte-text",
        ),
        pytest.param(
            b'{"service_tier":"auto", "model":"o3", "n":1}',
            {"service_tier": DROP},
            b'{"model":"o3", "n":1}',
            id="drop-first",
        ),
        pytest.param(
            b'{"model":"o3", "service_tier":"auto", "n":1}',
            {"service_tier": DROP},
            b'{"model":"o3", "n":1}',
            id="drop-middle",
        ),
        pytest.param(
            b'{"model":"o3", "n":1, "service_tier":"auto"}',
            {"service_tier": DROP},
            b'{"model":"o3", "n":1}',
            id="drop-last",
        ),
        pytest.param(b'{ "service_tier" : "auto" }', {"service_tier": DROP}, b"{  }", id="drop-only"),
        pytest.param(
            b'{"service_tier":"auto","model":"o3","service_tier":"flex","n":1}',
            {"service_tier": DROP},
            b'{"model":"o3","n":1}',
            id="drop-every-duplicate",
        ),
        pytest.param(
            '{"content":"日本語","service_tier":"auto","n":1}'.encode(),
            {"service_tier": DROP},
            '{"content":"日本語","n":1}'.encode(),
            id="drop-after-multibyte-text",
        ),
        pytest.param(b'{"model":"o3"}', {"absent": DROP}, b'{"model":"o3"}', id="drop-absent-is-noop"),
        pytest.param(
            b'{"model":"o3","stream":true}',
            {**FLEX, **USAGE},
            b'{"service_tier":"flex","stream_options":{"include_usage":true},"model":"o3","stream":true}',
            id="add-stream-options",
        ),
        pytest.param(
            b'{"model":"o3"}',
            {"metadata": {"note": "é \u2028"}},
            '{"metadata":{"note":"é \u2028"},"model":"o3"}'.encode(),
            id="inserted-value-is-utf8",
        ),
    ],
)
def test_render(raw: bytes, changes: dict[str, Any], expected: bytes) -> None:
    assert parse(raw).render(changes) == expected


@pytest.mark.parametrize(
    ("raw", "changes", "expected"),
    [
        pytest.param(
            b'{"model":"o3","service_tier":"auto","service_tier":"default"}',
            {"service_tier": DROP},
            b'{"model":"o3"}',
            id="drop-duplicate-at-end",
        ),
        pytest.param(b'{"a":1,"b":2,"c":3,"d":4}', {"c": DROP, "d": DROP}, b'{"a":1,"b":2}', id="drop-last-two"),
        pytest.param(
            b'{"service_tier":"auto"}',
            {"service_tier": DROP, **USAGE},
            b'{"stream_options":{"include_usage":true}}',
            id="drop-only-and-insert",
        ),
    ],
)
def test_render_drops_runs(raw: bytes, changes: dict[str, Any], expected: bytes) -> None:
    assert parse(raw).render(changes) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param(
            b'{"model":"o3","stream":true}',
            b'{"stream_options":{"include_usage":true},"model":"o3","stream":true}',
            id="absent",
        ),
        pytest.param(
            b'{"model":"o3","stream_options": {"include_obfuscation":false},"stream":true}',
            b'{"model":"o3","stream_options": {"include_obfuscation":false,"include_usage":true},"stream":true}',
            id="merged-into-existing",
        ),
        pytest.param(
            b'{"stream_options":{"include_usage":false}}',
            b'{"stream_options":{"include_usage":true}}',
            id="false-turned-true",
        ),
    ],
)
def test_stream_options_merge(raw: bytes, expected: bytes) -> None:
    body = parse(raw)
    options = body.get("stream_options")
    merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    assert body.render({"stream_options": merged}) == expected


@pytest.mark.parametrize(
    "raw",
    [
        b"{}",
        b'{"model":"o3","seed":1208925819614629174706176,"t":1.50,"m":1e5}',
        '{"content":"日本 \\u00e9 🙂","model":"o3","model":"o4-mini"}'.encode(),
        b'\t{ "a" : [ 1 , 2 ] }\r\n',
    ],
)
def test_no_changes_returns_the_same_bytes(raw: bytes) -> None:
    assert parse(raw).render({}) == raw


@pytest.mark.parametrize(
    ("raw", "key", "expected"),
    [
        (b'{"model":"o3","model":"gpt-5"}', "model", "gpt-5"),
        (b'{"seed":1208925819614629174706176}', "seed", 2**80),
        (b'{"t":1.50}', "t", 1.5),
        (b'{"s":"\\u00e9"}', "s", "é"),
        (b'{"o":{"service_tier":"auto"}}', "service_tier", None),
        (b'{"background":true}', "background", True),
    ],
)
def test_get(raw: bytes, key: str, expected: Any) -> None:
    assert parse(raw).get(key) == expected


def test_members_in_text_order_with_duplicates() -> None:
    body = parse(b'{"b":1, "a":2, "b":3}')
    assert [(m.key, m.value) for m in body.order] == [("b", 1), ("a", 2), ("b", 3)]
    assert body.members["b"].value == 3
    assert body.raw[body.members["a"].value_start : body.members["a"].value_end] == b"2"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "the body must be a JSON object"),
        (b"   ", "the body must be a JSON object"),
        (b"[]", "the body must be a JSON object"),
        (b'"x"', "the body must be a JSON object"),
        (b"null", "the body must be a JSON object"),
        (b"42", "the body must be a JSON object"),
        (b'{"a":1,}', "expected a property name at character 7"),
        (b"{,}", "expected a property name at character 1"),
        (b"{a:1}", "expected a property name at character 1"),
        (b'{"a":1} x', "extra data after the JSON object at character 8"),
        (b"{}{}", "extra data after the JSON object at character 2"),
        (b'{"a":1}\x00', "extra data after the JSON object at character 7"),
        (b'{"a":\xff}', "The request body is not valid UTF-8 (byte 5)."),
        (b'{"a":"\xc3"}', "The request body is not valid UTF-8 (byte 6)."),
        (b'{"a":', "Expecting value"),
        (b'{"a"', "expected ':' at character 4"),
        (b'{"a', "Unterminated string"),
        (b"{", "expected a property name at character 1"),
        (b'{"a":1 "b":2}', "expected ',' or '}' at character 7"),
        (b'{"a":[1,2}', "Expecting ',' delimiter"),
    ],
)
def test_malformed_is_a_400(raw: bytes, message: str) -> None:
    with pytest.raises(ClientError) as info:
        parse(raw)
    assert info.value.status == 400
    assert message in info.value.message
    assert json.loads(info.value.body())["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("text", ["x", "é"], ids=["ascii", "multibyte"])
def test_eight_megabyte_body(text: str) -> None:
    original = {
        "model": "o3",
        "messages": [{"role": "user", "content": text * (8 * 1024 * 1024 // len(text.encode()))}],
    }
    raw = json.dumps(original, ensure_ascii=False).encode()
    assert len(raw) > 8 * 1024 * 1024
    out = parse(raw).render({**FLEX, **USAGE})
    prefix = b'{"service_tier":"flex","stream_options":{"include_usage":true},'
    assert out[: len(prefix)] == prefix
    assert out[len(prefix) :] == raw[1:]
    assert json.loads(out) == {**original, **FLEX, **USAGE}


@pytest.mark.parametrize("text", ["x", "é"], ids=["ascii", "multibyte"])
def test_eight_megabyte_body_replace_at_end(text: str) -> None:
    content = text * (8 * 1024 * 1024 // len(text.encode()))
    raw = json.dumps({"messages": [content], "service_tier": "auto"}, ensure_ascii=False).encode()
    out = parse(raw).render(FLEX)
    assert out == raw[: -len(b'"auto"}')] + b'"flex"}'
