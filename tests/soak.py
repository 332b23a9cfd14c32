"""Soak: many requests, streaming and not, with faults from the fault table (docs/faults.md) and clients that
leave, through the real `flex-proxy` process in front of the simulated upstream, all on 127.0.0.1.

    python tests/soak.py            # CI size: 2,000 requests, 75 at a time
    python tests/soak.py --full     # 20,000 requests, 200 at a time

Each request carries its own script: the simulator answers it (and its re-sends) by the plan its
`x-soak-id` header names, so every request's fate is known and the checks can be exact:

- every request ends in exactly one complete answer or one clean error (an OpenAI-shaped error body, or one
  in-band error event as a stream's last event), the one its plan leads to; a client that left is let go;
- upstream did each request's work at most once; an answer the client got whole is the one upstream delivered;
- the cost metrics count exactly the tokens upstream delivered, and flexproxy_unread_answers_total exactly the
  requests upstream accepted and never delivered (whether their client stayed or left);
- the counters add up: requests_total == requests sent, upstream_attempts_total == attempts upstream saw,
  nothing left in flight, every upstream exchange ended (a client that left closed its upstream request);
- the proxy's RSS after the soak is within a small margin of its RSS after a warm-up, and it still serves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import openai

from proxy.sim import RecordedRequest, Reply, SimOptions, SimServer, Simulator

FLEX_MODELS = ("o3", "gpt-5-mini")
MODELS = (("o3", 45), ("gpt-5-mini", 30), ("gpt-4.1", 25))
# Flex capacity errors close the flex gate of their model family for every request of it; they go to one family
# only, so the soak has one family whose gate opens and closes all the time and one whose gate stays open.
BUSY_FAMILY = ("gpt-5-mini",)
MODEL_PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}
MALFORMED = '{"id": "chatcmpl-broken", "choices": ['  # the simulator's one non-JSON event (malformed_event)
MIB = 1024 * 1024

# The proxy's settings for the soak: timeouts shrunk so a fault costs seconds at most. The reset window keeps its
# default, and a late reset (2.5 s) falls well inside the time to first byte (4 s): under full load the simulator
# itself can be half a second late to reset "at once", or late.
PROXY_ENV = {
    "FLEX_PROXY_UPSTREAM_TIMEOUT_S": "4",
    "FLEX_PROXY_STANDARD_TIMEOUT_S": "4",
    "FLEX_PROXY_STREAM_IDLE_TIMEOUT_S": "1",
    "FLEX_PROXY_RESET_RETRY_WINDOW_S": "2",
    "FLEX_PROXY_MAX_RETRY_AFTER_S": "1",
    "FLEX_PROXY_MIN_BACKOFF_S": "0.01",
    "FLEX_PROXY_BACKOFF_INITIAL_S": "0.02",
    "FLEX_PROXY_BACKOFF_MAX_S": "0.1",
    "FLEX_PROXY_GATE_PROBE_INITIAL_S": "0.05",
    "FLEX_PROXY_GATE_PROBE_MAX_S": "0.2",
    "FLEX_PROXY_LOG_LEVEL": "warning",
    "FLEX_PROXY_DRAIN_DELAY_S": "0",  # stopped with SIGTERM; nothing polls /readyz
}


# -- plans: what upstream does to one request, and what its client should get -----------------------------------


@dataclass(frozen=True)
class Plan:
    """One kind of request in the soak.

    `replies` answer the request's attempts in turn (then plain answers); `expect` is what the client gets, for a
    stream and for a whole answer: "answer", "stream_error" or "error:<status>". `leave` makes the client go:
    "cancel" (its task is cancelled `leave_after` seconds after upstream saw the request) or "close" (it closes
    the stream after `close_after` events). `stream` pins streaming on or off; `models` the model to one of those.
    A `slow` plan holds upstream for a second or more: it stays off the busy family, where as the gate's one probe
    it would hold up every waiting request of that family (the soak would measure the gate, not the proxy).
    """

    name: str
    weight: int
    replies: tuple[Reply, ...] = ()
    expect: tuple[str, str] = ("answer", "answer")
    stream: bool | None = None
    models: tuple[str, ...] = ()
    slow: bool = False
    leave: str | None = None
    leave_after: tuple[float, float] = (0.0, 0.0)
    close_after: tuple[int, int] = (0, 0)


def _err(status: int) -> tuple[str, str]:
    return (f"error:{status}", f"error:{status}")


def _error_body(code: str, message: str, param: str | None = None) -> bytes:
    error = {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    return json.dumps({"error": error}).encode()


TOO_LONG = _error_body("context_length_exceeded", "This model's maximum context length is exceeded.", "messages")
FILTERED = _error_body("content_policy_violation", "Your request was rejected as a result of our safety system.")
SLOW_STREAM = Reply("ok", events=12, event_interval_s=0.1)  # its usage comes ~1.2 s in: long after any leave
PLANS: tuple[Plan, ...] = (
    Plan("ok", 30),
    Plan("paced_stream", 4, (Reply("ok", events=6, event_interval_s=0.02),), stream=True),
    Plan("separator_crlf", 1, (Reply("ok", separator="\r\n\r\n"),), stream=True),
    Plan("separator_mixed", 1, (Reply("ok", separator="\n\r\n"),), stream=True),
    Plan("flex_429", 2, (Reply("flex_429"),), models=BUSY_FAMILY),
    Plan("flex_429_retry_after", 1, (Reply("flex_429", retry_after_ms=150),), models=BUSY_FAMILY),
    Plan("flex_429_persistent", 1, (Reply("flex_429"),) * 4, models=BUSY_FAMILY),  # then standard
    Plan("rate_limit", 4, (Reply("rate_limit_429", retry_after_ms=50),)),
    Plan("rate_limit_too_long", 2, (Reply("rate_limit_429", retry_after_ms=5000),), _err(429)),
    Plan("rate_limit_persistent", 1, (Reply("rate_limit_429", retry_after_ms=20),) * 3, _err(429)),
    Plan("quota", 2, (Reply("quota_429"),), _err(429)),
    Plan("tier_400", 2, (Reply("tier_400"),), models=FLEX_MODELS),
    Plan("server_500_once", 3, (Reply("server_error", status=500),)),
    Plan("server_503_persistent", 1, (Reply("server_error", status=503),) * 3, _err(503)),
    Plan("reset_at_once", 2, (Reply("reset"),)),
    Plan("drop_at_once", 2, (Reply("drop"),)),
    Plan("reset_after_silence", 1, (Reply("reset", delay_s=2.5),), _err(502), slow=True),
    Plan("hang", 2, (Reply("hang"),), _err(504), slow=True),
    Plan("slow_first_token", 2, (Reply("slow_first_token", delay_s=0.1),)),
    Plan("cut", 3, (Reply("cut_stream", events=2),), ("stream_error", "error:502")),
    Plan("stall", 2, (Reply("stall", events=2, delay_s=30),), ("stream_error", "error:504"), slow=True),
    Plan("malformed_event", 2, (Reply("malformed_event"),)),
    Plan("no_done", 2, (Reply("no_done"),), stream=True),
    Plan("in_band_flex_error", 1, (Reply("stream_error"),), stream=True, models=BUSY_FAMILY),
    Plan("prelude_then_error", 1, (Reply("prelude_then_error"),), stream=True, models=BUSY_FAMILY),
    Plan("context_length", 1, (Reply(status=400, body=TOO_LONG),), _err(400)),
    Plan("content_filter", 1, (Reply(status=400, body=FILTERED),), _err(400)),
    # Clients that leave. Each leaves well before upstream would deliver the usage, so delivery never races it.
    Plan("leave_before_headers", 3, (Reply("hang"),), leave="cancel", leave_after=(0.05, 0.5), slow=True),
    Plan(
        "leave_before_first_event",
        2,
        (Reply("slow_first_token", delay_s=30),),
        stream=True,
        leave="cancel",
        leave_after=(0.05, 0.5),
        slow=True,
    ),
    Plan("leave_mid_stream", 3, (SLOW_STREAM,), stream=True, leave="close", close_after=(2, 5), slow=True),
    Plan("cancel_mid_stream", 2, (SLOW_STREAM,), stream=True, leave="cancel", leave_after=(0.1, 0.5), slow=True),
    Plan(
        "leave_during_backoff",
        2,
        (Reply("rate_limit_429", retry_after_ms=1000),),
        stream=False,
        leave="cancel",
        leave_after=(0.05, 0.3),
        slow=True,
    ),
    Plan(
        "leave_during_stall",
        1,
        (Reply("stall", events=2, delay_s=30),),
        stream=True,
        leave="cancel",
        leave_after=(0.05, 0.3),
        slow=True,
    ),
)


@dataclass(frozen=True)
class Spec:
    """One request to send: its id, plan, endpoint, model, body, and where its client leaves."""

    id: str
    plan: Plan
    endpoint: str
    model: str
    stream: bool
    include_usage: bool
    body: bytes
    leave_after: float = 0.0
    close_after: int = 0

    @property
    def expect(self) -> str:
        return self.plan.expect[0] if self.stream else self.plan.expect[1]


def make_specs(count: int, rng: random.Random, prefix: str, plans: tuple[Plan, ...] = PLANS) -> list[Spec]:
    weights = [plan.weight for plan in plans]
    specs = []
    for number in range(count):
        plan = rng.choices(plans, weights)[0]
        stream = rng.random() < 0.5 if plan.stream is None else plan.stream
        endpoint = "chat" if rng.random() < 0.6 else "responses"
        if plan.name == "no_done":  # a chat stream's ending; Responses streams have no [DONE] anyway
            endpoint = "chat"
        models = [(m, w) for m, w in MODELS if not (plan.slow and m in BUSY_FAMILY)]
        if plan.models:
            model = rng.choice(plan.models)
        else:
            model = rng.choices([m for m, _ in models], [w for _, w in models])[0]
        include_usage = endpoint == "chat" and stream and rng.random() < 0.5
        text = f"soak request {prefix}{number}"
        body: dict[str, Any] = {"model": model}
        if endpoint == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["input"] = text
        if stream:
            body["stream"] = True
        if include_usage:
            body["stream_options"] = {"include_usage": True}
        specs.append(
            Spec(
                id=f"{prefix}{number}",
                plan=plan,
                endpoint=endpoint,
                model=model,
                stream=stream,
                include_usage=include_usage,
                body=json.dumps(body).encode(),
                leave_after=rng.uniform(*plan.leave_after),
                close_after=rng.randint(*plan.close_after) if plan.leave == "close" else 0,
            )
        )
    return specs


# -- the upstream: the simulator, answering each request by its own plan -------------------------------------------

_current: contextvars.ContextVar[RecordedRequest | None] = contextvars.ContextVar("soak_current", default=None)


class SoakSim(Simulator):
    """The simulator, answering each request by the plan its `x-soak-id` header names.

    The simulator records a request, then (in the same task) asks for its scripted reply: the recorded request
    is carried from one to the other in a context variable. `on_arrival` hears of every attempt, from the
    simulator's thread.
    """

    def __init__(self, options: SimOptions) -> None:
        super().__init__(options)
        self._plans: dict[str, deque[Reply]] = {}
        self._plans_lock = threading.Lock()
        self.on_arrival: Callable[[str], None] | None = None

    def plan(self, request_id: str, replies: Iterable[Reply]) -> None:
        with self._plans_lock:
            self._plans[request_id] = deque(replies)

    def record(self, method: str, path: str, query: str, headers: dict[str, str], body: bytes) -> RecordedRequest:
        recorded = super().record(method, path, query, headers, body)
        _current.set(recorded)
        request_id = headers.get("x-soak-id")
        if request_id is not None and self.on_arrival is not None:
            self.on_arrival(request_id)
        return recorded

    def pop_script(self) -> Reply | None:
        recorded = _current.get()
        request_id = recorded.headers.get("x-soak-id") if recorded is not None else None
        with self._plans_lock:
            replies = self._plans.get(request_id) if request_id is not None else None
            if replies:
                return replies.popleft()
        return super().pop_script()  # then the simulator's own plain answer


# -- the proxy: the real `flex-proxy` command in its own process ----------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def flex_proxy_command() -> str:
    beside = Path(sys.executable).with_name("flex-proxy")
    found = str(beside) if beside.exists() else shutil.which("flex-proxy")
    if found is None:
        raise RuntimeError("the flex-proxy command is not installed (pip install -e .)")
    return found


class ProxyProcess:
    """`flex-proxy` as a subprocess on a free loopback port, so its memory is its own."""

    def __init__(self, upstream_base_url: str, log: IO[bytes]) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEX_PROXY_")}
        env.update(PROXY_ENV)
        env.update({"FLEX_PROXY_UPSTREAM_BASE_URL": upstream_base_url, "FLEX_PROXY_PORT": str(self.port)})
        self.process = subprocess.Popen([flex_proxy_command()], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"flex-proxy exited at start with status {self.process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("flex-proxy did not answer /healthz within 30 s")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS for the proxy process")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Metrics:
    """One scrape of /metrics; `total(name, **labels)` sums the samples whose labels include those given."""

    def __init__(self, text: str) -> None:
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            match = _SAMPLE.match(line)
            if match:
                labels = dict(_LABEL.findall(match.group(2) or ""))
                self.samples.append((match.group(1), labels, float(match.group(3))))

    def total(self, name: str, where: Callable[[dict[str, str]], bool] | None = None, **labels: str) -> float:
        return sum(
            value
            for sample, found, value in self.samples
            if sample == name and all(found.get(k) == v for k, v in labels.items()) and (where is None or where(found))
        )


def model_endpoint(labels: dict[str, str]) -> bool:
    return labels.get("endpoint") in MODEL_PATHS


# -- the client ------------------------------------------------------------------------------------------------------


@dataclass
class Result:
    """What one client got."""

    spec: Spec
    status: int | None = None
    headers: httpx.Headers | None = None
    body: bytes = b""
    left: bool = False  # the client left before the end (cancelled, or closed its stream)
    transport_error: str | None = None
    seconds: float = 0.0


def event_count(data: bytes) -> int:
    return len(split_events(data)[0])


def split_events(data: bytes) -> tuple[list[tuple[str | None, str]], bytes]:
    """SSE blocks as (event name, data); comments are skipped. Any of CRLF, CR, LF ends a line (the SSE spec)."""
    text = data.decode("utf-8", "replace").replace("\r\n", "\n").replace("\r", "\n")
    *blocks, rest = text.split("\n\n")
    events = []
    for block in blocks:
        name, lines = None, []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "data":
                lines.append(value)
        if name is not None or lines:
            events.append((name, "\n".join(lines)))
    return events, rest.encode()


async def exchange(client: httpx.AsyncClient, base_url: str, spec: Spec) -> Result:
    result = Result(spec)
    started = time.monotonic()
    headers = {"authorization": "Bearer sk-soak", "content-type": "application/json", "x-soak-id": spec.id}
    path = "/chat/completions" if spec.endpoint == "chat" else "/responses"
    try:
        async with client.stream("POST", base_url + path, content=spec.body, headers=headers) as response:
            result.status, result.headers = response.status_code, response.headers
            if spec.close_after and response.status_code == 200:
                async for chunk in response.aiter_raw():
                    result.body += chunk
                    if event_count(result.body) >= spec.close_after:
                        result.left = True
                        break  # leaving the block closes the connection mid-stream
            else:
                result.body = await response.aread()
    except httpx.HTTPError as exc:
        result.transport_error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.monotonic() - started
    return result


class Driver:
    """Sends the specs, `concurrency` at a time, and keeps what each client got."""

    def __init__(
        self, sim: SoakSim, base_url: str, concurrency: int, on_tenth: Callable[[int], None] | None = None
    ) -> None:
        self.sim, self.base_url, self.concurrency = sim, base_url, concurrency
        self.on_tenth = on_tenth  # told each time another tenth of a run's requests has ended
        self._arrivals: dict[str, asyncio.Event] = {}

    async def run(self, specs: list[Spec]) -> list[Result]:
        loop = asyncio.get_running_loop()

        def arrived(request_id: str) -> None:  # runs in the simulator's thread
            loop.call_soon_threadsafe(self._arrived, request_id)

        self.sim.on_arrival = arrived
        pending: Iterator[Spec] = iter(specs)
        results: list[Result] = []
        tenth = max(1, len(specs) // 10)

        async def worker() -> None:
            # A client of its own per worker: httpx's pool costs more CPU per request the more connections it holds.
            limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
            async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0, connect=10.0)) as client:
                for spec in pending:  # one iterator shared by the workers: each spec is taken once
                    results.append(await self._one(client, spec))
                    if self.on_tenth is not None and len(results) % tenth == 0:
                        self.on_tenth(len(results))

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        self.sim.on_arrival = None
        return results

    def _arrived(self, request_id: str) -> None:
        event = self._arrivals.get(request_id)
        if event is not None:
            event.set()

    async def _one(self, client: httpx.AsyncClient, spec: Spec) -> Result:
        self.sim.plan(spec.id, spec.plan.replies)
        if spec.plan.leave != "cancel":
            return await exchange(client, self.base_url, spec)
        # Leave only once upstream has the request, so the proxy has surely seen it too and counts it.
        arrived = self._arrivals[spec.id] = asyncio.Event()
        task = asyncio.create_task(exchange(client, self.base_url, spec))
        waiting = asyncio.create_task(arrived.wait())
        try:
            await asyncio.wait({task, waiting}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                await asyncio.sleep(spec.leave_after)
            if not task.done():
                task.cancel()
            try:
                return await task
            except asyncio.CancelledError:
                return Result(spec, left=True)
        finally:
            waiting.cancel()
            del self._arrivals[spec.id]


# -- checks ----------------------------------------------------------------------------------------------------------


def what_arrived(result: Result) -> tuple[str, list[str]]:
    """What the client got ("answer", "stream_error", "error:<status>", "left") and what is wrong with it."""
    spec = result.spec
    if result.transport_error is not None:
        return "broken", [f"transport error: {result.transport_error}"]
    if result.status is None:
        return "left", []
    headers = result.headers or httpx.Headers()
    if result.status >= 400:
        return f"error:{result.status}", _error_shape(result.body, headers)
    if result.status != 200:
        return f"status:{result.status}", [f"unexpected status {result.status}"]
    if not spec.stream:
        return "answer", _whole_answer(spec, result.body)
    if not headers.get("content-type", "").startswith("text/event-stream"):
        return "broken", [f"stream answered as {headers.get('content-type')!r}"]
    if result.left:
        return "left", []
    events, rest = split_events(result.body)
    problems = [f"stream ends inside an event: {rest[:80]!r}"] if rest.strip() else []
    check = _chat_stream if spec.endpoint == "chat" else _responses_stream
    kind, found = check(spec, events)
    return kind, problems + found


def _error_shape(body: bytes, headers: httpx.Headers) -> list[str]:
    problems = []
    try:
        error = json.loads(body)["error"]
        if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= set(error):
            problems.append(f"error body is not OpenAI-shaped: {body[:200]!r}")
    except (ValueError, KeyError, TypeError):
        problems.append(f"error body is not OpenAI-shaped: {body[:200]!r}")
    if headers.get_list("x-should-retry") != ["false"]:
        problems.append(f"final error without x-should-retry: false ({headers.get_list('x-should-retry')})")
    if "retry-after-ms" in headers or len(headers.get_list("retry-after")) > 1:
        problems.append("more than one retry-after")
    return problems


def _whole_answer(spec: Spec, body: bytes) -> list[str]:
    try:
        data = json.loads(body)
    except ValueError:
        return [f"answer is not JSON: {body[:120]!r}"]
    if not isinstance(data.get("usage"), dict):
        return ["answer without usage"]
    if spec.endpoint == "chat":
        choices = data.get("choices") or [{}]
        return [] if choices[0].get("finish_reason") else ["chat answer without finish_reason"]
    return [] if data.get("status") == "completed" else [f"response status {data.get('status')!r}"]


def _chat_stream(spec: Spec, events: list[tuple[str | None, str]]) -> tuple[str, list[str]]:
    problems: list[str] = []
    chunks: list[dict[str, Any]] = []
    errors, done_at = [], None
    for index, (_, data) in enumerate(events):
        if done_at is not None:
            problems.append("data after [DONE]")
        if data == "[DONE]":
            done_at = index
            continue
        if data == MALFORMED:
            continue  # upstream's own broken event, passed on as it came
        try:
            obj = json.loads(data)
        except ValueError:
            problems.append(f"event is not JSON: {data[:80]!r}")
            continue
        if "error" in obj:
            errors.append(index)
        else:
            chunks.append(obj)
    roles = sum(1 for c in chunks for ch in c.get("choices") or [] if (ch.get("delta") or {}).get("role"))
    if roles > 1:
        problems.append(f"{roles} answers in one stream")
    if errors:
        if errors != [len(events) - 1]:
            problems.append(f"error events at {errors} of {len(events)}: not one, last")
        if done_at is not None:
            problems.append("an error and [DONE] in one stream")
        return "stream_error", problems
    finished = {ch.get("index") for c in chunks for ch in c.get("choices") or [] if ch.get("finish_reason")}
    seen = {ch.get("index") for c in chunks for ch in c.get("choices") or []}
    usage = [c for c in chunks if c.get("usage")]
    if not seen or finished != seen:
        problems.append("stream ended before every choice finished, without an error")
    if spec.include_usage and len(usage) != 1:
        problems.append(f"{len(usage)} usage chunks where the client asked for usage")
    if not spec.include_usage and usage:
        problems.append("a usage chunk the client did not ask for")
    return "answer", problems


def _responses_stream(spec: Spec, events: list[tuple[str | None, str]]) -> tuple[str, list[str]]:
    problems = []
    names = [name for name, _ in events]
    if names.count("response.created") > 1:
        problems.append(f"{names.count('response.created')} response.created events")
    for name, data in events:
        if data != MALFORMED and not _is_json(data):
            problems.append(f"{name} event is not JSON: {data[:80]!r}")
    if "error" in names:
        if names.count("error") != 1 or names[-1] != "error":
            problems.append(f"error events not one and last: {names[-3:]}")
        if "response.completed" in names:
            problems.append("an error and response.completed in one stream")
        return "stream_error", problems
    if not names or names[-1] != "response.completed" or names.count("response.completed") != 1:
        problems.append(f"stream does not end with one response.completed: {names[-3:]}")
    return "answer", problems


def _is_json(data: str) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


@dataclass
class Report:
    requests: int = 0
    concurrency: int = 0
    seconds: float = 0.0
    rss_warm: int = 0
    rss_after: int = 0
    rss_trace: list[int] = field(default_factory=list)  # after each tenth of the soak's requests
    outcomes: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def add(self, problem: str) -> None:
        if problem not in self.problems:
            self.problems.append(problem)

    def summary(self) -> str:
        lines = [
            f"soak: {self.requests} requests, {self.concurrency} at a time, {self.seconds:.1f} s",
            f"proxy RSS: {self.rss_warm / MIB:.1f} MiB after warm-up, {self.rss_after / MIB:.1f} MiB after "
            f"(by tenths: {', '.join(f'{rss / MIB:.1f}' for rss in self.rss_trace)})",
            "client results: " + ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items())),
            *(f"{key}: {value}" for key, value in self.facts.items()),
        ]
        if self.problems:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  - {problem}" for problem in self.problems[:60]]
        else:
            lines.append("all checks passed")
        return "\n".join(lines)


def by_request(sim: SoakSim) -> dict[str, list[RecordedRequest]]:
    """Upstream's records of each soak request's attempts, in order."""
    found: dict[str, list[RecordedRequest]] = defaultdict(list)
    for recorded in sim.requests:
        found[recorded.headers.get("x-soak-id", "")].append(recorded)
    return found


def _attempts(records: list[RecordedRequest]) -> str:
    start = records[0].received_at if records else 0.0
    return ", ".join(f"{r.outcome}@{r.received_at - start:.3f}s" for r in records)


def check_results(results: list[Result], attempts: dict[str, list[RecordedRequest]], report: Report) -> set[str]:
    """Each client's result against its plan; the ids whose client got an answer whole."""
    answered = set()
    for result in results:
        kind, problems = what_arrived(result)
        spec = result.spec
        report.outcomes[kind] += 1
        for problem in problems:
            report.add(f"{spec.plan.name} ({spec.endpoint}, stream={spec.stream}, {spec.model}): {problem}")
        if kind == "answer":
            answered.add(spec.id)
        leaves = spec.plan.leave is not None
        if not leaves and kind != spec.expect:
            report.add(
                f"{spec.plan.name} ({spec.endpoint}, stream={spec.stream}, {spec.model}): "
                f"expected {spec.expect}, got {kind} after upstream attempts [{_attempts(attempts[spec.id])}]: "
                f"{result.body[:160]!r}"
            )
    return answered


@dataclass
class Upstream:
    """What upstream saw, per request: who left, and whose accepted work was never delivered."""

    left: int = 0  # clients that left once upstream had their request
    unread_stayed: int = 0  # accepted, not delivered, and the client stayed (timeouts, cuts, silent drops)
    unread_left: int = 0  # accepted, not delivered, and the client left


def check_upstream(
    sim: SoakSim, results: list[Result], by_id: dict[str, list[RecordedRequest]], answered: set[str], report: Report
) -> Upstream:
    """Per request, at the upstream: work done at most once, and delivered exactly when the client got it whole."""
    open_ = [r for r in sim.requests if not r.ended.is_set()]
    if open_:
        report.add(f"{len(open_)} upstream exchanges still open after the soak: {[r.outcome for r in open_[:5]]}")
    seen = Upstream()
    for result in results:
        spec, records = result.spec, by_id.get(result.spec.id, [])
        accepted = [r for r in records if r.accepted]
        delivered = [r for r in records if r.delivered]
        name = f"{spec.plan.name} ({spec.endpoint}, stream={spec.stream})"
        if len(accepted) > 1:
            report.add(f"{name}: upstream did the work {len(accepted)} times")
        if len(delivered) != (1 if spec.id in answered else 0):
            got = "answered" if spec.id in answered else "not answered"
            report.add(f"{name}: {len(delivered)} delivered upstream, client {got}")
        unread = len(accepted) > len(delivered)
        if result.left and records:
            seen.left += 1
            seen.unread_left += unread
        else:
            seen.unread_stayed += unread
    return seen


def check_metrics(metrics: Metrics, sim: SoakSim, sent: int, seen: Upstream, report: Report) -> None:
    """The proxy's counters against what was sent and what upstream saw, billed and delivered."""
    requests = metrics.total("flexproxy_requests_total", model_endpoint)
    if requests != sent:
        report.add(f"flexproxy_requests_total is {requests:g}, {sent} requests were sent")
    # The exact counters agree with the breakdown, request for request and ending for ending.
    outcomes = {found.get("outcome", "") for name, found, _ in metrics.samples if name == "flexproxy_outcomes_total"}
    for outcome in sorted(outcomes):
        exact = metrics.total("flexproxy_outcomes_total", model_endpoint, outcome=outcome)
        broken_down = metrics.total("flexproxy_requests_total", model_endpoint, outcome=outcome)
        if exact != broken_down:
            report.add(f"flexproxy_outcomes_total counts {exact:g} {outcome}, flexproxy_requests_total {broken_down:g}")
    answered = metrics.total("flexproxy_answered_total", model_endpoint)
    if answered != metrics.total("flexproxy_requests_total", model_endpoint, outcome="ok"):
        report.add(f"flexproxy_answered_total is {answered:g}, not the requests answered ok")
    left = metrics.total("flexproxy_requests_total", outcome="client_disconnected")
    if left != seen.left:
        report.add(f"{left:g} requests counted client_disconnected, {seen.left} clients left")
    attempts = metrics.total("flexproxy_upstream_attempts_total", model_endpoint)
    upstream_saw = sum(1 for r in sim.requests if r.path in MODEL_PATHS.values())
    if attempts != upstream_saw:
        report.add(f"flexproxy_upstream_attempts_total is {attempts:g}, upstream saw {upstream_saw} attempts")
    in_flight = metrics.total("flexproxy_requests_in_flight")
    if in_flight:
        report.add(f"{in_flight:g} requests still in flight")
    errors = metrics.total("flexproxy_requests_total", outcome="proxy_error")
    if errors:
        report.add(f"{errors:g} requests ended in proxy_error")
    billing = sim.billing()
    tiers = {"flex": "flex", "default": "standard", "priority": "priority"}
    kinds = {"input": "input", "cached": "cached_input", "output": "output", "reasoning": "reasoning"}
    for sim_tier, counts in billing.delivered_tokens.items():
        for sim_kind, count in counts.items():
            label = {"tier": tiers[sim_tier], "kind": kinds[sim_kind]}
            counted = metrics.total("flexproxy_tokens_total", None, **label)
            if counted != count:
                report.add(f"tokens {label}: the proxy counted {counted:g}, upstream delivered {count}")
    delivered_tiers = {tiers[t] for t in billing.delivered_tokens}
    extra = metrics.total("flexproxy_tokens_total", lambda labels: labels.get("tier") not in delivered_tiers)
    if extra:
        report.add(f"the proxy counted {extra:g} tokens on tiers upstream delivered none on")
    # Every request whose accepted work was never delivered is an unread answer, whether its client stayed (a
    # timeout, a cut, a silent drop) or left; a client that left after refused attempts only cost nothing.
    unread = metrics.total("flexproxy_unread_answers_total")
    if billing.undelivered != seen.unread_stayed + seen.unread_left:
        report.add(
            f"upstream left {billing.undelivered} accepted requests undelivered; the soak traced "
            f"{seen.unread_stayed + seen.unread_left}"
        )
    if unread != billing.undelivered:
        report.add(
            f"flexproxy_unread_answers_total is {unread:g}; upstream accepted and never delivered "
            f"{seen.unread_stayed} requests whose client stayed and {seen.unread_left} whose client left"
        )
    report.facts["upstream"] = (
        f"{billing.accepted} accepted ({billing.delivered} delivered, {billing.undelivered} not), "
        f"{billing.refused} refused, {upstream_saw} attempts"
    )
    report.facts["traced"] = (
        f"{seen.left} clients left once upstream had their request; accepted, never delivered: "
        f"{seen.unread_stayed} whose client stayed, {seen.unread_left} whose client left"
    )
    report.facts["proxy"] = (
        f"{requests:g} requests ({left:g} client_disconnected), {attempts:g} attempts, {unread:g} unread answers"
    )


def rss_margin(warm: int) -> int:
    """How far RSS may grow after the warm-up: a quarter, and never more than 30 MiB."""
    return min(warm // 4, 30 * MIB)


# -- the run ---------------------------------------------------------------------------------------------------------


async def _final_answer(base_url: str) -> str:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-soak", max_retries=0)
    async with client:
        answer = await client.chat.completions.create(model="o3", messages=[{"role": "user", "content": "still?"}])
    return answer.choices[0].message.content or ""


def run_soak(
    requests: int,
    concurrency: int,
    *,
    seed: int = 8,
    warmup: int | None = None,
    plans: tuple[Plan, ...] = PLANS,
    log: IO[bytes] | None = None,
) -> Report:
    """Run the soak and return its report; `report.problems` is empty when every check passed."""
    rng = random.Random(seed)
    warmup = warmup if warmup is not None else max(300, requests // 10)
    report = Report(requests=requests, concurrency=concurrency)
    sim = SoakSim(SimOptions(cached_share=0.25, reasoning_tokens=6, latency_flex_s=0.02, latency_standard_s=0.01))
    with contextlib.ExitStack() as stack:
        log = log or stack.enter_context(tempfile.TemporaryFile())
        server = stack.enter_context(SimServer(sim))
        proxy = ProxyProcess(server.base_url, log)
        stack.callback(proxy.stop)
        driver = Driver(sim, proxy.url + "/v1", concurrency)
        warm = asyncio.run(driver.run(make_specs(warmup, rng, "w", plans)))
        report.rss_warm = proxy.rss_bytes()
        driver.on_tenth = lambda _: report.rss_trace.append(proxy.rss_bytes())
        started = time.monotonic()
        soak = asyncio.run(driver.run(make_specs(requests, rng, "s", plans)))
        report.seconds = time.monotonic() - started
        if not sim.settle(15):
            report.add("upstream exchanges did not all end within 15 s of the last client")
        report.rss_after = proxy.rss_bytes()
        try:
            text = asyncio.run(_final_answer(proxy.url + "/v1"))
            if not text:
                report.add("the proxy's last answer was empty")
        except openai.OpenAIError as exc:
            report.add(f"the proxy no longer serves: {exc!r}")
        sent = len(warm) + len(soak) + 1
        results = warm + soak
        by_id = by_request(sim)
        answered = check_results(results, by_id, report)
        seen = check_upstream(sim, results, by_id, answered, report)
        metrics = _settled_metrics(proxy.url, sent)
        check_metrics(metrics, sim, sent, seen, report)
        if report.rss_after > report.rss_warm + rss_margin(report.rss_warm):
            report.add(
                f"proxy RSS grew from {report.rss_warm / MIB:.1f} MiB to {report.rss_after / MIB:.1f} MiB "
                f"(margin {rss_margin(report.rss_warm) / MIB:.1f} MiB)"
            )
        if proxy.process.poll() is not None:
            report.add(f"flex-proxy exited with status {proxy.process.returncode}")
        if report.problems and log.readable():
            log.seek(0)
            tail = b"".join(log.readlines()[-20:]).decode(errors="replace").rstrip()
            if tail:
                report.facts["proxy output, last lines"] = "\n" + tail
    return report


def _settled_metrics(url: str, sent: int, timeout: float = 10.0) -> Metrics:
    """The metrics once every request sent is counted (a client that left is counted when the proxy notices)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = Metrics(httpx.get(url + "/metrics", timeout=10).text)
        done = metrics.total("flexproxy_requests_total", model_endpoint) >= sent
        if (done and not metrics.total("flexproxy_requests_in_flight")) or time.monotonic() > deadline:
            return metrics
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="20,000 requests, 200 at a time")
    parser.add_argument("--requests", type=int, help="how many requests (default 2,000; 20,000 with --full)")
    parser.add_argument("--concurrency", type=int, help="requests at a time (default 75; 200 with --full)")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--log", type=Path, help="keep the proxy's output in this file")
    parser.add_argument("--without", default="", help="comma-separated plan names to leave out")
    args = parser.parse_args(argv)
    left_out = {name.strip() for name in args.without.split(",") if name.strip()}
    unknown = left_out - {plan.name for plan in PLANS}
    if unknown:
        parser.error(f"unknown plans: {', '.join(sorted(unknown))}")
    plans = tuple(plan for plan in PLANS if plan.name not in left_out)
    requests = args.requests or (20_000 if args.full else 2_000)
    concurrency = args.concurrency or (200 if args.full else 75)
    with contextlib.ExitStack() as stack:
        log = stack.enter_context(args.log.open("wb")) if args.log else None
        report = run_soak(requests, concurrency, seed=args.seed, plans=plans, log=log)
    print(report.summary())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
