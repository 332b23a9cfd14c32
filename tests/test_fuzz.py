"""Fuzzing the request path with hypothesis: the body rewrite and the path check as pure functions (many
examples), then the proxy under uvicorn on 127.0.0.1 with arbitrary bodies, headers, paths and methods.

Properties: a body goes upstream with only the members the proxy sets changed, every other member byte for
byte; anything that is not a JSON object is a ClientError (a 400), never another exception; no path whose dot
segments (plain or escaped, once or twice) could leave /v1/ reaches upstream, and every other path reaches it
as the client wrote it; the proxy never answers 500, its errors are OpenAI-shaped, and it still serves after.

The client is httpcore (httpx's own transport), because httpx resolves dot segments in a URL before sending it.
Runs are deterministic (derandomize, no example database). What the fuzzing found is also kept as minimal cases
at the end of the file.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import httpcore
import pytest
from conftest import ProxyServer
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from rawup import RawRequest, RawUpstream, response

from proxy.config import Settings
from proxy.errors import ClientError
from proxy.rewrite import DROP, parse
from proxy.routes import check_path
from proxy.sim import SimServer

_CHECKS = [
    HealthCheck.too_slow,
    HealthCheck.data_too_large,
    HealthCheck.large_base_example,
    HealthCheck.filter_too_much,
]
PURE = settings(max_examples=400, derandomize=True, database=None, deadline=None, suppress_health_check=_CHECKS)
WIRE = settings(max_examples=80, derandomize=True, database=None, deadline=None, suppress_health_check=_CHECKS)
MODEL_PATHS = ("/v1/chat/completions", "/v1/responses", "/v1/responses/compact")
SET_BY_PROXY = ("service_tier", "stream_options")


# -- oracles, independent of proxy code -----------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_STRICT = json.JSONDecoder(parse_constant=_no_constant)
_WS = re.compile(r"[ \t\n\r]*")


def strict_loads(text: str) -> Any:
    """json.loads without NaN/Infinity, which JSON does not have."""
    return _STRICT.decode(text)


def scan(text: str) -> list[tuple[str, str, str]]:
    """Every top-level member of a JSON object text, duplicates included: (key, key as written, value as written)."""
    members: list[tuple[str, str, str]] = []
    pos = _WS.match(text, 0).end()  # type: ignore[union-attr]
    assert text[pos] == "{", text[:80]
    pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
    if text[pos] == "}":
        return members
    while True:
        key, key_end = json.decoder.scanstring(text, pos + 1)  # type: ignore[attr-defined]
        key_text = text[pos:key_end]
        pos = _WS.match(text, key_end).end()  # type: ignore[union-attr]
        assert text[pos] == ":"
        start = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
        _, end = _STRICT.raw_decode(text, start)
        members.append((key, key_text, text[start:end]))
        pos = _WS.match(text, end).end()  # type: ignore[union-attr]
        if text[pos] == "}":
            return members
        assert text[pos] == ","
        pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]


def canon(value: Any) -> tuple[str, ...]:
    """A value as tokens whose equality tells true from 1 and 1 from 1.0 (Python's == does not), member order
    aside; iterative, so a value nested as deep as the parser allows does not overflow the stack here."""
    tokens: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Token):
            tokens.append(item.text)
        elif isinstance(item, dict):
            tokens.append("{")
            stack.append(_Token("}"))
            for key, member in sorted(item.items(), key=lambda kv: kv[0], reverse=True):
                stack += [member, _Token(json.dumps(key) + ":")]
        elif isinstance(item, list):
            tokens.append("[")
            stack += [_Token("]"), *reversed(item)]
        elif isinstance(item, float):
            tokens.append("float " + repr(item))
        else:
            tokens.append(json.dumps(item))
    return tuple(tokens)


@dataclass(frozen=True)
class _Token:
    text: str


def all_finite(value: Any) -> bool:
    """Whether every number in `value` is finite (1e400 is JSON, but Python reads it as inf)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        stack += item.values() if isinstance(item, dict) else item if isinstance(item, list) else []
    return True


def decodings(path: str) -> list[str]:
    """The path as written, percent-decoded once, and twice."""
    once = unquote(path)
    return [path, once, unquote(once)]


def has_dot_segment(path: str) -> bool:
    return any(part in (".", "..") for decoded in decodings(path) for part in decoded.replace("\\", "/").split("/"))


def under_v1(target: bytes) -> bool:
    """Whether a request target stays in /v1/ however a server reads it: as written (it must start with /v1/),
    percent-decoded once or twice, `\\` as `/`, dot segments resolved."""
    path = target.decode("latin-1").partition("?")[0]
    if not path.startswith("/v1/"):
        return False
    for decoded in decodings(path):
        segments: list[str] = []
        for part in decoded.replace("\\", "/").split("/")[1:]:
            if part == "..":
                if segments:
                    segments.pop()
            elif part != ".":
                segments.append(part)
        if len(segments) < 2 or segments[0] != "v1":
            return False
    return True


def assert_openai_error(status: int, body: bytes) -> None:
    assert status != 500, body[:300]
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)


# -- strategies: JSON written the many ways JSON may be written -----------------------------------------------


@dataclass(frozen=True)
class RawNumber:
    """A number written as text that Python's float cannot hold exactly (1e400 parses as inf)."""

    text: str


PLAIN_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**300), max_value=10**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
SCALARS = PLAIN_SCALARS | st.sampled_from([RawNumber(t) for t in ("1e400", "-1E+400", "1.0e-400", "-0")])


def json_values(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
        max_leaves=12,
    )  # fmt: skip


JSON = json_values(SCALARS)  # as a client may write it
PLAIN_JSON = json_values(PLAIN_SCALARS)  # as Python can hold it exactly
KEYS = st.sampled_from(["model", "service_tier", "stream_options", "stream", "messages", "input", "a"]) | st.text(
    max_size=5
)
SPACE = st.sampled_from(["", "", " ", "\n", "\t", "\r\n  "])


def write_string(draw: st.DrawFn, text: str) -> str:
    style = draw(st.sampled_from(["ascii", "utf-8", "escaped"]))
    if style == "escaped":  # every character as \uXXXX: the same key written another way
        return '"' + "".join(json.dumps(c)[1:-1] if ord(c) > 0xFFFF else f"\\u{ord(c):04x}" for c in text) + '"'
    return json.dumps(text, ensure_ascii=style == "ascii")


def write(draw: st.DrawFn, value: Any) -> str:
    """`value` as JSON text with arbitrary spacing, escaping and number spelling."""
    if isinstance(value, RawNumber):
        return value.text
    if isinstance(value, str):
        return write_string(draw, value)
    if isinstance(value, float):
        spelled = draw(st.sampled_from(["repr", "exponent", "padded"]))
        if spelled == "exponent":
            return f"{value:.17E}"
        text = json.dumps(value)
        return text + "0" if spelled == "padded" and "." in text and "e" not in text else text
    if isinstance(value, list):
        inner = ",".join(draw(SPACE) + write(draw, v) + draw(SPACE) for v in value)
        return "[" + (inner or draw(SPACE)) + "]"
    if isinstance(value, dict):
        return write_object(draw, list(value.items()))
    return json.dumps(value)  # null, true, false, int


def write_object(draw: st.DrawFn, members: list[tuple[str, Any]]) -> str:
    inner = ",".join(
        draw(SPACE) + write_string(draw, k) + draw(SPACE) + ":" + draw(SPACE) + write(draw, v) + draw(SPACE)
        for k, v in members
    )
    return "{" + (inner or draw(SPACE)) + "}"


def nested(depth: int, kind: str = "[") -> str:
    if kind == "[":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "null" + "}" * depth


@st.composite
def json_bodies(draw: st.DrawFn, members: st.SearchStrategy[list[tuple[str, Any]]] | None = None) -> str:
    """A JSON object text: duplicate keys as raw text, odd spacing, unicode, big numbers, deep nesting."""
    items = draw(members if members is not None else st.lists(st.tuples(KEYS, JSON), max_size=8))
    text = write_object(draw, items)
    if draw(st.integers(0, 9)) == 9:  # one member nested a few hundred levels deep
        deep = nested(draw(st.integers(1, 400)), draw(st.sampled_from(["[", "{"])))
        text = '{"deep":' + deep + ("," + text[1:] if items else "}")
    return draw(SPACE) + text + draw(SPACE)


CHANGES = st.dictionaries(
    st.sampled_from(["service_tier", "stream_options", "model", "messages", "a"]) | st.text(max_size=4),
    st.sampled_from([DROP, "flex", "default"])
    | st.fixed_dictionaries({"include_usage": st.just(True)}, optional={"x": PLAIN_JSON})
    | PLAIN_JSON,
    max_size=3,
)


@st.composite
def not_objects(draw: st.DrawFn) -> bytes:
    """Bodies that are not one JSON object in UTF-8, or only just are."""
    text = draw(json_bodies())
    kind = draw(st.sampled_from(["bytes", "truncated", "spliced", "constant", "not-object", "bad-utf8", "bom", "deep"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "truncated":
        return text.encode()[: draw(st.integers(0, max(0, len(text.encode()) - 1)))]
    if kind == "spliced":
        raw = text.encode()
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.binary(min_size=1, max_size=3)) + raw[at:]
    if kind == "constant":
        return ('{"model":"o3","temperature":' + draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])) + "}").encode()
    if kind == "not-object":
        return write(draw, draw(st.lists(JSON, max_size=3) | SCALARS)).encode()
    if kind == "bad-utf8":
        raw = text.encode()
        at = draw(st.integers(0, len(raw)))
        return raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xae", b"\x80"])) + raw[at:]
    if kind == "bom":
        return b"\xef\xbb\xbf" + text.encode()
    depth = draw(st.sampled_from([999, 1000, 1500, 5000, 100_000]))
    return ('{"a":' + nested(depth, draw(st.sampled_from(["[", "{"]))) + "}").encode()


# -- pure layer: rewrite.parse and Body.render ----------------------------------------------------------------


@PURE
@given(text=json_bodies(), changes=CHANGES)
@example(text='{"a":1,"a":2,"\\u0061":3}', changes={"a": DROP, "service_tier": "flex"})
@example(text='{"model":"o3"}', changes={"model": DROP, "service_tier": "flex"})
def test_render_changes_only_the_changed_members(text: str, changes: dict[str, Any]) -> None:
    raw = text.encode()
    body = parse(raw)
    assert canon(body.values) == canon(strict_loads(text))
    rendered = body.render(changes)
    parts = body.render_parts(changes)
    assert all(isinstance(part, bytes | memoryview) for part in parts)
    assert b"".join(parts) == rendered
    if not changes:
        assert rendered == raw
    out = rendered.decode()
    before, after = scan(text), scan(out)
    # Every member the proxy did not touch: same key as written, same value as written, same order.
    assert [m for m in after if m[0] not in changes] == [m for m in before if m[0] not in changes]
    expected = strict_loads(text)
    for key, value in changes.items():
        found = [strict_loads(v) for k, _, v in after if k == key]
        if value is DROP:
            assert found == []
            expected.pop(key, None)
        else:
            assert len(found) == max(1, sum(1 for k, _, _ in before if k == key))  # each duplicate set, or one added
            assert all(canon(f) == canon(value) for f in found)
            expected[key] = value
    assert canon(strict_loads(out)) == canon(expected)


@PURE
@given(raw=not_objects() | json_bodies().map(str.encode))
def test_parse_answers_a_body_or_a_client_error(raw: bytes) -> None:
    """Anything a client may send parses to a JSON object or raises ClientError (a 400), never another exception."""
    try:
        body = parse(raw)
    except ClientError as exc:
        assert exc.status == 400 and exc.message
        try:
            value = strict_loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # RecursionError: too deep to hold; refusing it is fair
            return
        assert not isinstance(value, dict), "a JSON object was refused"
        return
    try:
        value = strict_loads(raw.decode("utf-8"))
    except RecursionError:  # the test's own stack is deeper than the parser's was: nothing to compare with
        return
    assert isinstance(value, dict)
    assert canon(body.values) == canon(value)


SEGMENTS = st.sampled_from([
    ".", "..", "%2e", "%2E", "%2e%2E", ".%2e", "%2e.", "%252e", "%252E%252e", "%25252e", "%5c", "%5C", "%255c", "\\",
    "%2f", "%2F", "%252f", "a", "v1", "models", "%", "%2", "%zz", "%25", "..a", "a..", "...", ". .", "%20", "%3F",
    "%23", "%C3%A9", "é", "%c0%ae", "%2e%2e%5c", "..\\", "\\..", "",
])  # fmt: skip
PATHS = st.lists(SEGMENTS | st.text(max_size=4), max_size=8).map(lambda parts: "/" + "/".join(parts)) | st.text()


@PURE
@given(path=PATHS)
@example(path="/..%5c..%5cadmin")
@example(path="/%252e%252e/admin")
@example(path="/%25252e%25252e/admin")  # decoded three times to reach "..": outside what is checked
def test_check_path_refuses_dot_segments_and_only_them(path: str) -> None:
    dotted = has_dot_segment(path)
    try:
        check_path(path)
    except ClientError as exc:
        assert dotted, f"a clean path was refused: {path!r}"
        assert (exc.status, exc.code) == (400, "invalid_path")
        return
    assert not dotted, f"a path with a dot segment went through: {path!r}"


# -- end to end: real servers on 127.0.0.1 --------------------------------------------------------------------


def proxy_settings(upstream_base_url: str, **extra: Any) -> Settings:
    """The proxy's settings for these tests: short backoffs, so a retried attempt costs milliseconds."""
    fast: dict[str, Any] = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "min_backoff_s": 0.005}
    return Settings(upstream_base_url=upstream_base_url, **fast, **extra)


def request(
    port: int,
    method: str,
    target: bytes,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    chunked: bool = False,
) -> httpcore.Response:
    """One request with the target, headers and body exactly as given (httpcore resolves and re-escapes nothing)."""
    all_headers = [(b"host", b"127.0.0.1"), *(headers or [])]
    content: bytes | Iterator[bytes] = body
    if chunked:
        all_headers.append((b"transfer-encoding", b"chunked"))
        content = iter([body[i : i + 7] for i in range(0, len(body), 7)])
    elif body or method in ("POST", "PUT", "PATCH"):
        all_headers.append((b"content-length", str(len(body)).encode()))
    url = httpcore.URL(scheme=b"http", host=b"127.0.0.1", port=port, target=target)
    timeout = {"connect": 5.0, "read": 20.0, "write": 5.0, "pool": 5.0}
    return httpcore.request(method, url, headers=all_headers, content=content, extensions={"timeout": timeout})


CHAT = json.dumps({
    "id": "chatcmpl-fuzz", "object": "chat.completion", "created": 1, "model": "o3", "service_tier": "flex",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}).encode()  # fmt: skip


@dataclass
class Recording:
    """A raw upstream that records each request byte for byte and answers with `reply_headers` and CHAT."""

    upstream: RawUpstream
    proxy: ProxyServer
    reply_headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def send(
        self,
        method: str,
        target: bytes,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        chunked: bool = False,
        proxy: ProxyServer | None = None,
    ) -> tuple[httpcore.Response, list[RawRequest]]:
        seen = len(self.upstream.requests)
        answer = request((proxy or self.proxy).port, method, target, body, headers, chunked=chunked)
        return answer, self.upstream.requests[seen:]


@pytest.fixture(scope="module")
def recording() -> Iterator[Recording]:
    state: dict[str, Recording] = {}

    async def handler(req: RawRequest, writer: Any) -> None:
        headers = [(b"content-type", b"application/json"), *state["r"].reply_headers]
        if req.method == "HEAD":
            lines = [b"HTTP/1.1 200 OK", *(k + b": " + v for k, v in headers), b"content-length: %d" % len(CHAT)]
            writer.write(b"\r\n".join([*lines, b"connection: close"]) + b"\r\n\r\n")
        else:
            writer.write(response(200, headers, CHAT))

    with RawUpstream(handler) as upstream:
        proxy = ProxyServer(proxy_settings(upstream.url + "/v1")).start()
        state["r"] = Recording(upstream, proxy)
        try:
            yield state["r"]
        finally:
            proxy.stop()


@pytest.fixture(scope="module")
def sim_proxy(sim_server: SimServer) -> Iterator[ProxyServer]:
    proxy = ProxyServer(proxy_settings(sim_server.base_url)).start()
    yield proxy
    proxy.stop()


# Paths the proxy serves (uvicorn's decoded path starts with /v1/), written with every kind of escape.
PREFIXES = st.sampled_from(["/v1/", "/v1/", "/v1/", "/v1%2f", "/v1%2F", "/v%31/", "/%76%31/"])
TARGET_CHARS = st.sampled_from([*"abcxyz019-._~!$&'()*+,;=:@\\", "%2F", "%3F", "%23", "%20", "%2e", "%5c", "%25"])
TARGET_SEGMENTS = SEGMENTS.filter(lambda s: s.isascii() and " " not in s) | st.lists(TARGET_CHARS, max_size=6).map(
    "".join
)
QUERIES = st.none() | st.lists(TARGET_CHARS | st.sampled_from(["/", "?", "=", "&", "/../", "%2e%2e"]), max_size=10).map(
    "".join
)


@st.composite
def targets(draw: st.DrawFn) -> str:
    path = draw(PREFIXES) + "/".join(draw(st.lists(TARGET_SEGMENTS, max_size=6)))
    if draw(st.integers(0, 19)) == 19:  # shrinks to off
        path += "/" + "a" * draw(st.sampled_from([2_000, 6_000]))
    query = draw(QUERIES)
    return path + ("?" + query if query is not None else "")


UPLOADS = st.sampled_from([b'{"model":"gpt-4.1","input":"hi"}', b'{"model":"o3","messages":[]}']) | st.binary(
    max_size=64
)


@WIRE
@given(
    target=targets() | st.sampled_from(MODEL_PATHS).map(lambda p: p + "?x=%2e%2e&y=/../"),
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
    upload=UPLOADS,
    chunked=st.booleans(),
)
@example(target="/v1/models/%2e%2e/%2e%2e/admin", method="GET", upload=b"", chunked=False)
@example(target="/v1/files/a%2Fb%3Fc%23d%20e?x=%2e%2e", method="GET", upload=b"", chunked=False)
@example(target="/v1/a\\..\\..\\admin", method="DELETE", upload=b"", chunked=False)
def test_paths_reach_upstream_as_sent_and_never_leave_v1(
    recording: Recording, target: str, method: str, upload: bytes, chunked: bool
) -> None:
    """A path with a dot segment is refused; a path under /v1/ as written reaches upstream exactly as written,
    with its body. A path the proxy serves whose /v1/ is escaped (`/v%31/`, `/v1%2f`) is refused, or goes as
    /v1/ and the rest exactly as written."""
    body = upload if method in ("POST", "PUT", "PATCH") else b""
    answer, seen = recording.send(method, target.encode(), body, chunked=chunked and bool(body))
    path, _, query = target.partition("?")
    rest = after_v1(path)
    clean = not has_dot_segment(path)
    if answer.status != 200:
        assert seen == [], f"{target!r} reached upstream as {seen[0].target!r}"
        assert 400 <= answer.status < 500, (target, answer.status)
        code = None
        if method != "HEAD":  # a HEAD answer has no body
            assert_openai_error(answer.status, answer.content)
            code = json.loads(answer.content)["error"]["code"]
        if clean and path.startswith("/v1/"):  # only a model request's body may be refused on a clean path
            assert method == "POST" and path in MODEL_PATHS and code != "invalid_path", (
                f"a clean path was refused: {target!r}: {answer.content[:200]!r}"
            )
        elif not clean:
            assert code in (None, "invalid_path")
        return
    assert clean, f"a path with a dot segment was served: {target!r}"
    assert len(seen) == 1
    assert under_v1(seen[0].target), f"{target!r} reached upstream as {seen[0].target!r}, outside /v1/"
    sent = "/v1/" + rest + ("?" + query if query else "")  # an empty query may go as no query
    assert seen[0].target == sent.encode(), "the path upstream is not the one the client sent"
    if method == "POST" and path in MODEL_PATHS:
        assert_only_proxy_members_changed(body, seen[0].body)
    else:
        assert seen[0].body == body


def after_v1(path: str) -> str:
    """What follows the client's /v1/, however it was escaped (uvicorn routes on the decoded path)."""
    end = next(i for i in range(1, len(path) + 1) if unquote(path[:i]) == "/v1/")
    return path[end:]


# Header values as h11 lets a client send them: visible ASCII and obs-text bytes, spaces inside.
VALUE_BYTES = st.binary(max_size=40).map(lambda b: bytes(c for c in b if c > 0x20 and c != 0x7F) or b"x")
NON_ASCII = st.sampled_from([b"caf\xc3\xa9", b"\xe6\x97\xa5\xe6\x9c\xac", b"\xf0\x9f\x99\x82", b"\xff\xfe", b"\xe9"])
VALUES = (
    st.lists(VALUE_BYTES, min_size=1, max_size=3).map(b" ".join)
    | st.sampled_from([b"off", b"flex", b"OFF", b"backoff", b"fail", b"1.5", b"0", b"-1", b"nan", b"inf", b"1e309"])
    | NON_ASCII
    | st.integers(1_000, 8_000).map(lambda n: b"v" * n)
)
NAMES = st.sampled_from([
    b"x-flex-tier", b"x-flex-on-unavailable", b"x-flex-deadline-s", b"x-flex-junk", b"x-stainless-read-timeout",
    b"openai-organization", b"openai-project", b"user-agent", b"accept", b"content-type", b"x-custom", b"x-custom",
    b"cookie", b"te", b"keep-alive", b"proxy-authorization", b"X-Mixed-Case", b"authorization", b"Authorization",
]) | st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12).map(str.encode)  # fmt: skip
# Never forwarded by design: framing and hop-by-hop, the proxy's own X-Flex-*, cookies, the key.
NOT_FORWARDED = {
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length", b"accept-encoding", b"cookie",
    b"expect", b"authorization",
}  # fmt: skip
REPLY_HEADERS = st.lists(
    st.tuples(st.sampled_from([b"x-reply", b"content-disposition", b"openai-model", b"x-request-id"]), VALUES),
    max_size=3,
)


@WIRE
@given(
    endpoint=st.sampled_from([("POST", b"/v1/chat/completions"), ("GET", b"/v1/models")]),
    headers=st.lists(st.tuples(NAMES, VALUES), max_size=6),
    reply=REPLY_HEADERS,
)
@example(
    endpoint=("GET", b"/v1/models"), headers=[], reply=[(b"content-disposition", b"attachment; filename=\xc3\xa9")]
)
def test_odd_headers_are_forwarded_as_sent_or_refused_cleanly(
    recording: Recording, endpoint: tuple[str, bytes], headers: list[tuple[bytes, bytes]],
    reply: list[tuple[bytes, bytes]],
) -> None:  # fmt: skip
    method, target = endpoint
    body = b'{"model":"o3","messages":[{"role":"user","content":"hi"}]}' if method == "POST" else b""
    headers = [(name, value) for name, value in headers if name.lower() not in (b"content-length", b"host")]
    recording.reply_headers = reply
    answer, seen = recording.send(method, target, body, headers)
    if answer.status >= 400:
        assert_openai_error(answer.status, answer.content)
        assert answer.status in (400, 504), (answer.status, answer.content[:300])  # a junk X-Flex-* or a tiny deadline
        return
    assert answer.status == 200 and len(seen) == 1
    forwarded = [(k.lower(), v) for k, v in seen[0].headers]
    assert not [k for k, _ in forwarded if k.startswith(b"x-flex-")], "an X-Flex-* header went upstream"
    sent = [
        (k.lower(), v) for k, v in headers if k.lower() not in NOT_FORWARDED and not k.lower().startswith(b"x-flex-")
    ]
    for name in {k for k, _ in sent}:
        assert [v for k, v in forwarded if k == name] == [v for k, v in sent if k == name], f"header {name!r} changed"
    keys = [v for k, v in headers if k.lower() == b"authorization"]
    assert [v for k, v in forwarded if k == b"authorization"] == keys[:1], "the client's key did not go as it came"
    got = [(k.lower(), v) for k, v in answer.headers]
    for name, value in reply:
        assert (name, value) in got, f"upstream header {name!r}: {value!r} did not reach the client as it came"


@pytest.fixture(scope="module")
def keyed_proxy(recording: Recording) -> Iterator[ProxyServer]:
    """A proxy that holds the upstream key and lets in only holders of its client keys."""
    url = f"{recording.upstream.url}/v1"
    keyed = proxy_settings(url, api_key="sk-proxy", client_keys=("ck-fuzz",))
    proxy = ProxyServer(keyed).start()
    yield proxy
    proxy.stop()


@WIRE
@given(keys=st.lists(st.sampled_from([b"Bearer ck-fuzz", b"bearer  ck-fuzz", b"Bearer ck-fuzz2", b"ck-fuzz"]) | VALUES,
                     max_size=2))  # fmt: skip
@example(keys=[b"Bearer ck-fuzz\xc3\xa9"])
@example(keys=[b"Bearer \xe9"])
def test_client_keys_any_authorization_is_401_or_the_proxy_key(
    recording: Recording, keyed_proxy: ProxyServer, keys: list[bytes]
) -> None:
    headers = [(b"authorization", key) for key in keys]
    body = b'{"model":"o3","messages":[]}'
    answer, seen = recording.send("POST", b"/v1/chat/completions", body, headers, proxy=keyed_proxy)
    if answer.status != 200:
        assert_openai_error(answer.status, answer.content)
        assert answer.status in (400, 401) and seen == [], (answer.status, answer.content[:300])
        return
    assert keys and keys[0].lower().startswith(b"bearer ") and keys[0][7:].strip() == b"ck-fuzz"
    assert [v for k, v in seen[0].headers if k.lower() == b"authorization"] == [b"Bearer sk-proxy"]


@pytest.mark.parametrize("depth", [500, 990, 1000, 3000, 100_000])
@pytest.mark.parametrize("kind", ["[", "{"])
def test_deeply_nested_body_is_never_a_500(recording: Recording, depth: int, kind: str) -> None:
    body = ('{"model":"o3","messages":[],"metadata":' + nested(depth, kind) + "}").encode()
    answer, seen = recording.send("POST", b"/v1/chat/completions", body, [(b"content-type", b"application/json")])
    if answer.status == 200:
        assert len(seen) == 1 and seen[0].body.endswith(body[1:])
    else:
        assert_openai_error(answer.status, answer.content)
        assert answer.status == 400 and seen == []


# Model-request bodies: the members the proxy reads, with plausible and junk values, and anything else.
MODEL_MEMBERS = st.lists(
    st.one_of(
        st.tuples(st.just("model"), st.sampled_from(["o3", "gpt-5-mini", "gpt-4.1", "o3-2025-04-16", ""]) | JSON),
        st.tuples(st.just("stream"), st.sampled_from([True, False, None, "yes", 1])),
        st.tuples(
            st.just("stream_options"),
            st.fixed_dictionaries({}, optional={"include_usage": JSON, "x": JSON}) | JSON,
        ),
        st.tuples(st.just("service_tier"), st.sampled_from(["flex", "auto", "default", "priority", 5]) | JSON),
        st.tuples(st.sampled_from(["messages", "input"]), JSON),
        st.tuples(KEYS, JSON),
    ),
    max_size=8,
)


@st.composite
def model_bodies(draw: st.DrawFn) -> bytes:
    members = draw(MODEL_MEMBERS)
    if draw(st.integers(0, 3)):  # mostly a body the simulator can answer
        members = [("model", draw(st.sampled_from(["o3", "gpt-5-mini", "gpt-4.1"]))), *members]
    if draw(st.integers(0, 5)) == 5:
        return draw(not_objects().filter(lambda raw: b"[[[[[[[[[[" not in raw and b'{"a":{"a":{"a"' not in raw))
    return draw(json_bodies(st.just(members))).encode()


def assert_only_proxy_members_changed(sent: bytes, received: bytes) -> None:
    before, after = scan(sent.decode()), scan(received.decode())
    kept = [m for m in before if m[0] not in SET_BY_PROXY]
    assert [m for m in after if m[0] not in SET_BY_PROXY] == kept, "a member the proxy does not own was changed"
    client = strict_loads(sent.decode())
    for key, key_text, value_text in after:
        if key not in SET_BY_PROXY or (key, key_text, value_text) in before:
            continue
        value = strict_loads(value_text)  # the proxy's own value must be JSON too (no Infinity)
        if key == "service_tier":
            assert isinstance(value, str)
        else:
            options = client.get("stream_options")
            assert canon(value) == canon({**(options if isinstance(options, dict) else {}), "include_usage": True})


@WIRE
@given(
    path=st.sampled_from(MODEL_PATHS),
    body=model_bodies(),
    tier=st.sampled_from([None, b"off", b"flex", b"Flex", b"OFF", b"junk"]),
)
@example(
    path="/v1/chat/completions", body=b'{ "model" : "o3", "stream" :true ,"messages":[1.50, "\\u00e9"]}', tier=b"off"
)
def test_model_bodies_reach_upstream_with_only_tier_and_stream_options_changed(
    sim_proxy: ProxyServer, sim_server: SimServer, path: str, body: bytes, tier: bytes | None
) -> None:
    sim = sim_server.sim
    sim.reset()
    headers = [(b"content-type", b"application/json"), (b"authorization", b"Bearer sk-fuzz")]
    if tier is not None:
        headers.append((b"x-flex-tier", tier))
    answer = request(sim_proxy.port, "POST", path.encode(), body, headers)
    assert sim.settle(10)
    seen = list(sim.requests)
    if answer.status >= 400:
        assert_openai_error(answer.status, answer.content)
    if tier == b"junk":
        assert answer.status == 400 and seen == []
        return
    try:
        is_object = isinstance(strict_loads(body.decode("utf-8")), dict)
    except (ValueError, RecursionError):
        is_object = False
    if not is_object:
        assert answer.status == 400 and seen == [], (answer.status, answer.content[:300])
        return
    if answer.status == 400 and not seen:  # refused: fair only for stream_options the proxy cannot extend as JSON
        options = strict_loads(body.decode()).get("stream_options")
        assert not all_finite(options), f"the proxy refused a JSON object: {answer.content[:200]!r}"
        return
    for recorded in seen:
        assert recorded.path == path
        if tier is not None and tier.strip().lower() == b"off":
            assert recorded.body == body
        assert_only_proxy_members_changed(body, recorded.body)


# -- minimal cases of what the fuzzing found -----------------------------------------------------------------


@pytest.mark.parametrize("target", [b"/v%31/models", b"/%76%31/models", b"/v1%2fmodels", b"/v1%2Fmodels"])
def test_an_escaped_v1_prefix_never_reaches_upstream_outside_v1(recording: Recording, target: bytes) -> None:
    """uvicorn decodes the path to route it, so these reach the proxy as /v1/models; sent on as written they
    leave /v1/ (`/v%31/models` went upstream as /v131/models)."""
    answer, seen = recording.send("GET", target)
    assert [r.target for r in seen if not under_v1(r.target)] == [], "a request left /v1/"
    if answer.status != 200:
        assert_openai_error(answer.status, answer.content)
        assert 400 <= answer.status < 500


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_parse_refuses_a_body_too_deep_to_read_as_a_client_error(depth: int) -> None:
    raw = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
    try:
        parse(raw)
    except ClientError as exc:
        assert exc.status == 400
    # RecursionError (any exception but ClientError) fails the test: served, it is a 500 proxy_error


def test_stream_options_with_a_number_beyond_float_stays_json(sim_proxy: ProxyServer, sim_server: SimServer) -> None:
    """1e400 is valid JSON that Python reads as inf; the proxy's stream_options went upstream with `Infinity`."""
    sim_server.sim.reset()
    body = b'{"model":"o3","stream":true,"stream_options":{"x":1e400},"messages":[]}'
    answer = request(sim_proxy.port, "POST", b"/v1/chat/completions", body, [(b"content-type", b"application/json")])
    assert sim_server.sim.settle(10)
    if answer.status == 400:
        assert_openai_error(answer.status, answer.content)
        return
    for recorded in sim_server.sim.requests:
        assert_only_proxy_members_changed(body, recorded.body)


@pytest.mark.parametrize("value", [b"caf\xc3\xa9", b"\xe6\x97\xa5\xe6\x9c\xac"])
def test_a_utf8_request_header_reaches_upstream_as_sent(recording: Recording, value: bytes) -> None:
    """uvicorn gives header bytes, the proxy reads them as latin-1 and aiohttp writes UTF-8: café became cafÃ©."""
    body = b'{"model":"o3","messages":[]}'
    answer, seen = recording.send("POST", b"/v1/chat/completions", body, [(b"x-title", value)])
    assert answer.status == 200 and len(seen) == 1
    assert seen[0].header(b"x-title") == value


def test_proxy_still_serves_after_the_fuzz(
    recording: Recording, keyed_proxy: ProxyServer, sim_proxy: ProxyServer
) -> None:
    keyed_proxy.client(api_key="ck-fuzz").models.list()
    for proxy in (recording.proxy, sim_proxy):
        assert request(proxy.port, "GET", b"/healthz").status == 200
        answer = proxy.client().chat.completions.create(model="o3", messages=[{"role": "user", "content": "hi"}])
        assert answer.choices[0].message.content
