"""Exact HTTP: raw paths and dot segments, header bytes as they came, pass-through lengths and cut bodies,
aborted uploads, the body untouched with X-Flex-Tier: off, keys with stray whitespace, log lines no one forges."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest
from conftest import ProxyServer
from rawup import RawRequest, RawUpstream, response

from proxy.logs import JsonFormatter, TextFormatter
from proxy.sim import Reply, Simulator

MESSAGES = [{"role": "user", "content": "hi"}]
UTF8_DISPOSITION = 'attachment; filename="résumé.pdf"'.encode()


async def answer_ok(request: RawRequest, writer: asyncio.StreamWriter) -> None:
    headers = [(b"content-type", b"application/octet-stream"), (b"content-disposition", UTF8_DISPOSITION)]
    writer.write(response(200, headers, b"%s" % request.target))


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    with RawUpstream(answer_ok) as upstream:
        yield upstream


@pytest.fixture
def raw_proxy(make_proxy: Callable[..., ProxyServer], raw_upstream: RawUpstream) -> ProxyServer:
    return make_proxy(upstream_base_url=raw_upstream.url + "/v1")


def send_raw(port: int, request: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are (no client library normalises the path) and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(
    "path",
    [b"/v1/files/a%2Fb", b"/v1/files/a%3Fb", b"/v1/files/a%23b", b"/v1/files/a%20b", b"/v1/files/%E2%9C%93?x=%2F"],
)
def test_the_raw_path_reaches_upstream_with_its_escapes_untouched(
    raw_proxy: ProxyServer, raw_upstream: RawUpstream, path: bytes
) -> None:
    answer = send_raw(raw_proxy.port, b"GET " + path + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    assert raw_upstream.requests[-1].target == path


@pytest.mark.parametrize(
    "path",
    [
        b"/v1/../../admin", b"/v1/files/../../admin", b"/v1/%2e%2e/admin", b"/v1/%2E%2E/%2e%2e/admin",
        b"/v1/files/%252e%252e/x", b"/v1/files/..%2F..%2Fadmin", b"/v1/files/..%5C..%5Cadmin", b"/v1/./models",
        b"/v1/files/..\\admin",
    ],
)  # fmt: skip
def test_a_path_with_dot_segments_is_refused(raw_proxy: ProxyServer, raw_upstream: RawUpstream, path: bytes) -> None:
    answer = send_raw(raw_proxy.port, b"GET " + path + b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"]["code"] == "invalid_path"
    assert raw_upstream.requests == []  # nothing left the proxy


def test_upstream_header_bytes_reach_the_client_as_they_came(raw_proxy: ProxyServer) -> None:
    answer = send_raw(raw_proxy.port, b"GET /v1/files/x/content HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200")
    assert b"\r\ncontent-disposition: " + UTF8_DISPOSITION + b"\r\n" in answer


@pytest.mark.parametrize(
    ("path", "own"),
    [(b"/v1/chat/completions", [b"accept-encoding"]), (b"/v1/embeddings", [])],
    ids=["model-request", "pass-through"],
)
def test_upstream_gets_the_clients_headers_and_none_of_aiohttps_own(
    raw_proxy: ProxyServer, raw_upstream: RawUpstream, path: bytes, own: list[bytes]
) -> None:
    # No Accept, no Content-Type, no User-Agent: aiohttp would add `Accept: */*`, `Content-Type:
    # application/octet-stream` and its own User-Agent. (A model request's Accept-Encoding is the proxy's own: it
    # decodes that answer itself. Host and Content-Length are the connection's.)
    body = json.dumps({"model": "o3", "messages": MESSAGES}).encode()
    head = b"POST %s HTTP/1.1\r\nhost: x\r\nx-custom: 1\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
    answer = send_raw(raw_proxy.port, head % (path, len(body)) + body)
    assert answer.startswith(b"HTTP/1.1 200")
    seen = raw_upstream.requests[-1]
    assert sorted(name.lower() for name, _ in seen.headers) == sorted([b"host", b"content-length", b"x-custom", *own])
    assert seen.header(b"content-length") == b"%d" % len(seen.body)
    assert seen.body == body or path != b"/v1/embeddings"  # a model request's body gains its service_tier


def test_pass_through_keeps_content_length_head_included(proxy: ProxyServer, sim: Simulator) -> None:
    from proxy.sim.options import Canned

    sim.set_canned("/v1/files/f1/content", Canned(200, (("content-type", "application/pdf"),), b"x" * 1234))
    got = httpx.get(proxy.base_url + "/files/f1/content", headers={"authorization": "Bearer k"})
    assert got.headers["content-length"] == "1234" and got.content == b"x" * 1234
    head = httpx.head(proxy.base_url + "/files/f1/content", headers={"authorization": "Bearer k"})
    assert head.status_code == 200 and head.headers["content-length"] == "1234"


def test_a_download_cut_mid_body_is_aborted_not_finished(proxy: ProxyServer, sim: Simulator) -> None:
    from proxy.sim.options import Canned

    sim.set_canned("/v1/files/f2/content", Canned(200, (), b"y" * 100_000, cut_at=40_000))
    with pytest.raises(httpx.RemoteProtocolError):  # short of its content-length: the client knows it is cut
        httpx.get(proxy.base_url + "/files/f2/content", headers={"authorization": "Bearer k"})
    proxy_ok = httpx.get(proxy.base_url + "/models", headers={"authorization": "Bearer k"})
    assert proxy_ok.status_code == 200  # and the proxy keeps serving
    assert proxy.metric("flexproxy_requests_total", endpoint="other", outcome="stream_cut") == 1


def test_a_client_that_aborts_its_upload_is_a_client_disconnect(proxy: ProxyServer, sim: Simulator) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nhost: x\r\nauthorization: Bearer k\r\ncontent-type: application/octet-stream"
            b"\r\ncontent-length: 100000\r\n\r\n" + b"z" * 1000
        )
        # The proxy has begun forwarding the body: one request is open at the upstream.
        assert sim.wait_for(lambda: sim.open_connections >= 1, timeout=10)
    # Bounded polling: the proxy records the request once it notices the client is gone.
    assert sim.wait_for(lambda: proxy.metric("flexproxy_requests_total", endpoint="other") == 1, timeout=10)
    assert proxy.metric("flexproxy_requests_total", endpoint="other", outcome="client_disconnected") == 1
    assert proxy.metric("flexproxy_requests_total", outcome="unreachable") == 0


def test_flex_tier_off_sends_the_body_exactly_as_it_came(proxy: ProxyServer, sim: Simulator) -> None:
    body = b'{"model": "o3", "messages": [{"role":"user","content":"hi"}], "stream": true}'
    headers = {"authorization": "Bearer k", "x-flex-tier": "off"}
    with httpx.stream("POST", proxy.base_url + "/chat/completions", content=body, headers=headers) as answer:
        assert answer.status_code == 200
        answer.read()
    assert sim.requests[-1].body == body  # no service_tier and no stream_options either


def test_a_finished_chat_stream_without_done_is_whole(proxy: ProxyServer, sim: Simulator) -> None:
    sim.script(Reply(kind="no_done"))
    stream = proxy.client().chat.completions.create(model="o3", messages=MESSAGES, stream=True)  # type: ignore[call-overload]
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert proxy.metric("flexproxy_requests_total", outcome="ok") == 1


def test_a_final_error_replaces_upstreams_retry_advice(proxy: ProxyServer, sim: Simulator) -> None:
    headers = {"x-should-retry": "true", "retry-after-ms": "1500"}
    sim.script(*[Reply(kind="server_error", status=503, headers=headers)] * 3)
    with pytest.raises(openai.InternalServerError) as caught:
        proxy.client().chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.response.headers.get_list("x-should-retry") == ["false"]
    assert "retry-after-ms" not in caught.value.response.headers
    assert len(sim.requests) == 3  # the proxy's own two retries; the SDK (max_retries=0 here) adds none


def test_the_sdk_does_not_multiply_a_final_error(proxy: ProxyServer, sim: Simulator) -> None:
    sim.script(*[Reply(kind="server_error", status=500, headers={"x-should-retry": "true"})] * 9)
    with pytest.raises(openai.InternalServerError):
        proxy.client(max_retries=2).chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    assert len(sim.requests) == 3  # one create(max_retries=2) made 9 upstream requests before


def test_a_read_timeout_is_not_re_sent(make_proxy: Callable[..., ProxyServer], sim: Simulator) -> None:
    proxy = make_proxy(upstream_timeout_s=1)
    sim.script(Reply(delay_s=1.5), Reply(), Reply())
    with pytest.raises(openai.APIStatusError) as caught:
        proxy.client().chat.completions.create(model="o3", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.status_code == 504
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert sim.settle(10)
    assert len(sim.requests) == 1  # once: upstream accepted it, and may have done the work
    assert proxy.metric("flexproxy_requests_total", outcome="timeout", requested_tier="flex") == 1


def test_a_stream_client_that_leaves_before_the_first_event_closes_upstream(
    proxy: ProxyServer, sim: Simulator
) -> None:
    sim.script(Reply(kind="slow_first_token", delay_s=30))
    with pytest.raises(httpx.ReadTimeout):  # no headers yet: the proxy holds them until the first event
        httpx.post(
            proxy.base_url + "/chat/completions", headers={"authorization": "Bearer k"},
            json={"model": "o3", "messages": MESSAGES, "stream": True}, timeout=0.5,
        )  # fmt: skip
    assert sim.requests[-1].closed_by_peer.wait(5)  # at the upstream: the proxy hung up at once
    assert sim.wait_for(lambda: proxy.metric("flexproxy_requests_total", outcome="client_disconnected") == 1, 5)


@pytest.mark.parametrize("variable", ["FLEX_PROXY_API_KEY", "FLEX_PROXY_CLIENT_KEYS"])
def test_a_key_with_a_newline_is_trimmed_at_start(
    make_proxy: Callable[..., ProxyServer], sim: Simulator, variable: str
) -> None:
    if variable == "FLEX_PROXY_API_KEY":
        proxy = make_proxy(api_key="sk-upstream\n")
        key = "sk-client"
    else:
        proxy = make_proxy(api_key="sk-upstream", client_keys="ck-team\n")
        key = "ck-team"
    headers = {"authorization": f"Bearer {key}"} if variable != "FLEX_PROXY_API_KEY" else {}
    body = {"model": "o3", "messages": MESSAGES}
    answer = httpx.post(proxy.base_url + "/chat/completions", json=body, headers=headers)
    assert answer.status_code == 200
    assert sim.requests[-1].headers["authorization"] == "Bearer sk-upstream"


def test_a_key_with_inner_whitespace_is_refused_at_start_without_showing_it() -> None:
    from pydantic import ValidationError

    from proxy.config import Settings

    with pytest.raises(ValidationError) as caught:
        Settings(api_key="sk-abc def")
    assert "control characters" in str(caught.value) and "sk-abc" not in str(caught.value)


@pytest.mark.parametrize("formatter", [TextFormatter(), JsonFormatter()], ids=["text", "json"])
def test_no_one_can_forge_a_log_line(formatter: logging.Formatter) -> None:
    record = logging.LogRecord("flex_proxy.access", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"path": "/files/x\nfake_line outcome=ok", "model": "o3\r\x1b[2J"}
    line = formatter.format(record)
    assert "\n" not in line and "\r" not in line and "\x1b" not in line
    if isinstance(formatter, JsonFormatter):
        assert json.loads(line)["path"] == "/files/x\nfake_line outcome=ok"


def test_numbers_in_text_logs_are_plain_decimals() -> None:
    record = logging.LogRecord("flex_proxy.access", logging.INFO, __file__, 1, "request", None, None)
    record.fields = {"cost_usd": 5.115e-05, "saved_usd": 0.0}
    line = TextFormatter().format(record)
    assert "cost_usd=0.00005115" in line and "saved_usd=0" in line and "e-05" not in line
