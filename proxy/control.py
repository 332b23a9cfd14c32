"""The control plane: health, readiness, metrics and what is in force (flex gates, prices, policies), as a FastAPI
app with typed answers and an OpenAPI schema. Never on the hot path: `app.FlexProxy` sends /v1/... elsewhere."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from . import __version__, apidoc
from .access import AdminAccess
from .config import Strategy
from .errors import ClientError, FlexProxyError, NotFound
from .gate import State
from .ledger import MAX_DAYS
from .observed import RATE_WINDOW_S
from .page import savings_page
from .policies import Policy, Rule
from .pricing import ModelPrice, Rates
from .savings import DEFAULT_DAYS, Figures, SavingsFigures, savings_figures
from .services import Services

# First path segments of the OpenAI API: a request for one of these without /v1 comes from a base_url missing it.
API_ROOTS = frozenset({
    "assistants", "audio", "batches", "chat", "completions", "containers", "conversations", "embeddings", "evals",
    "files", "fine_tuning", "images", "models", "moderations", "realtime", "responses", "threads", "uploads",
    "vector_stores", "videos",
})  # fmt: skip


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """Every error, in the shape of the OpenAI API's."""

    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    upstream_started: bool = Field(description="the upstream connection pool is open")
    draining: bool = Field(description="the proxy is shutting down and finishing what it holds")


class GateStatus(BaseModel):
    key: str = Field(description="the model family; with gate_scope model+key, family@fingerprint of the key")
    state: Literal["open", "busy"]
    waiting: int = Field(description="requests waiting in the gate for flex capacity")
    in_flight: int = Field(description="flex attempts sent through the gate and not yet over")
    next_probe_in_s: float | None = Field(description="busy gates: seconds until the next probe may go")


class FamilyStatus(BaseModel):
    family: str
    gates: list[GateStatus] = Field(description="empty while the family has no gate (or the gate is off)")
    flex_429_rate: float | None = Field(
        description="share of flex attempts in the last rate_window_s answered with a capacity 429; null: none"
    )
    standard_reserve_s: float = Field(description="time kept for a standard re-send before a client's deadline")
    standard_p95_s: float | None = Field(description="95th percentile of standard time-to-answer; null: none seen")


class SharedStateStatus(BaseModel):
    mode: Literal["off", "shared", "local"] = Field(
        description="off: FLEX_PROXY_STATE_URL unset; shared: Redis answers; local: it does not, this process "
        "serves on its own state until it does"
    )
    since: float | None = Field(description="Unix time the mode began; null when off")
    last_error: str | None = Field(
        description="the last failure's kind: unreachable, timeout, auth, refused or error; null: none yet"
    )
    where: str | None = Field(description="scheme://host:port/db of the shared state, never its password")


class FlexStatus(BaseModel):
    gate_enabled: bool
    gate_scope: str
    rate_window_s: float
    families: list[FamilyStatus]
    shared_state: SharedStateStatus
    today: Figures | None = Field(
        None, description="today's money and flex share (UTC), as /flex/savings has them; null inside /flex/savings"
    )


class RatesOut(BaseModel):
    input: float
    cached_input: float
    output: float
    cache_write: float | None


class PriceOut(BaseModel):
    family: str
    standard: RatesOut
    flex: RatesOut | None = Field(description="null: the model has no flex tier")
    priority: RatesOut | None = Field(description="null: no published priority price")
    source: str | None
    effective: str | None


class Prices(BaseModel):
    unit: Literal["USD per 1M tokens"] = "USD per 1M tokens"
    override_file: str | None = Field(description="FLEX_PROXY_PRICES_FILE, when one extends the packaged table")
    models: list[PriceOut]


class StrategyOut(BaseModel):
    """The global strategy: what every request gets unless a named policy says otherwise."""

    on_unavailable: Strategy
    max_flex_attempts: int
    flex_budget_s: float
    backoff_initial_s: float
    backoff_max_s: float
    min_backoff_s: float
    max_retry_after_s: float
    max_retries: int
    standard_tier: str
    override_client_tier: bool
    inject_background: bool
    retry_read_timeouts: bool
    reset_retry_window_s: float
    standard_reserve_s: float
    standard_reserve_min_s: float
    standard_reserve_max_s: float


class TimeoutsOut(BaseModel):
    upstream_timeout_s: float
    standard_timeout_s: float
    stream_idle_timeout_s: float
    connect_timeout_s: float
    request_budget_s: float


class GateSettingsOut(BaseModel):
    enabled: bool
    scope: str
    probe_initial_s: float
    probe_max_s: float
    max_waiting: int
    max_in_flight: int


class ClientOut(BaseModel):
    name: str = Field(description="a client name from FLEX_PROXY_CLIENT_KEYS (never its key); default: unnamed keys")
    policy_header: bool = Field(description="may choose a policy with X-Flex-Policy")
    standard_spend_cap_usd: float | None = Field(description="per UTC day; null: no cap")
    standard_spent_today_usd: float = Field(
        description="standard-tier spend this UTC day: the fleet's with shared state, else this process's"
    )
    spend_scope: Literal["fleet", "process"] = Field(description="whose spend standard_spent_today_usd counts")


class Policies(BaseModel):
    mode: str = Field(description="flex, or shadow: requests forwarded as sent, flex savings only counted")
    strategy: StrategyOut = Field(description="the settings the built-in policy comes from")
    timeouts: TimeoutsOut
    gate: GateSettingsOut
    flex_models: list[str] = Field(description="glob patterns of the models put on flex")
    policy_file: str | None = Field(description="FLEX_PROXY_POLICY_FILE; null: only the built-in policy")
    default: str = Field(description="the policy a request gets when no rule matches")
    named: dict[str, Policy] = Field(description="every policy in force, the built-in one included")
    rules: list[Rule] = Field(description="first match wins; X-Flex-Policy, where allowed, comes before them")
    clients: list[ClientOut]


class Savings(SavingsFigures):
    """Today and the last `days` UTC days: totals, by client, by model and by day; and each flex gate's state."""

    gates: FlexStatus


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorEnvelope, "description": "not on loopback: the admin key (bearer or login cookie) is missing "
          "or wrong"},
    403: {"model": ErrorEnvelope, "description": "not on loopback, and FLEX_PROXY_ADMIN_KEY is not set"},
}  # fmt: skip


def control_app(services: Services, lifespan: Callable[[FastAPI], Any] | None = None) -> FastAPI:
    """The FastAPI app for everything outside /v1/; `lifespan` is the proxy's (it owns the upstream client)."""
    settings = services.settings
    access = AdminAccess(settings, services.wall)
    guarded = [Depends(access.api)]
    app = FastAPI(
        title="flex-proxy control plane",
        version=__version__,
        description="The savings page (`/`), what flex saved, health, readiness, metrics and what is in force. The "
        "OpenAI API itself is served under /v1/ by the proxy's own pipeline; its two rewritten endpoints are "
        "described here too. A caller on loopback (the proxy's machine or pod: `kubectl port-forward`, `docker "
        "exec`) needs no key; any other needs FLEX_PROXY_ADMIN_KEY as `Authorization: Bearer <key>`, or the cookie "
        "`POST /login` sets, for every endpoint but /healthz, /readyz (and /metrics unless "
        "FLEX_PROXY_METRICS_OPEN=false).",
        lifespan=lifespan,
        redoc_url=None,
        docs_url=None,
        openapi_url=None,
    )
    app.add_exception_handler(FlexProxyError, _proxy_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid_query)
    access.install(app)

    @app.get("/healthz", response_model=Health, tags=["probes"])
    async def healthz() -> Health:
        """Live: the process answers."""
        return Health()

    @app.get(
        "/readyz",
        response_model=Readiness,
        tags=["probes"],
        responses={503: {"model": Readiness, "description": "not ready: upstream client not started, or draining"}},
    )
    async def readyz() -> Response:
        """Ready for traffic: the upstream client is started and the proxy is not draining."""
        started, draining = services.upstream.started, services.draining
        body = Readiness(ready=started and not draining, upstream_started=started, draining=draining)
        return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)

    app.add_api_route("/healthz", healthz, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/readyz", readyz, methods=["HEAD"], include_in_schema=False)

    @app.get(
        "/metrics",
        tags=["metrics"],
        response_class=Response,
        dependencies=[] if settings.metrics_open else guarded,
        responses={
            200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
            **({} if settings.metrics_open else ERRORS),
        },
    )
    async def metrics() -> Response:
        """Prometheus metrics (open to scrapers unless FLEX_PROXY_METRICS_OPEN=false)."""
        return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/flex/status", response_model=FlexStatus, dependencies=guarded, responses=ERRORS, tags=["flex"])
    async def flex_status() -> FlexStatus:
        """Per model family: its flex gate(s), the recent flex-429 rate and the learned standard latency; and
        today's money (what flex saved, what it cost, the flex share), from the daily ledger."""
        shadow = services.metrics.shadow_saved.total()
        found = await savings_figures(services.ledger, 1, services.wall(), settings.mode, shadow)
        return flex_status_of(services).model_copy(update={"today": found.today.totals})

    @app.get("/flex/prices", response_model=Prices, dependencies=guarded, responses=ERRORS, tags=["flex"])
    async def flex_prices() -> Prices:
        """The price table in force."""
        table = services.prices.models
        models = [_price(table[name]) for name in sorted(table)]
        override = settings.prices_file
        return Prices(override_file=str(override) if override is not None else None, models=models)

    @app.get("/flex/policies", response_model=Policies, dependencies=guarded, responses=ERRORS, tags=["flex"])
    async def flex_policies() -> Policies:
        """The strategy, timeouts and gate settings in force, and the named policies; never a key."""
        names = sorted(set(settings.client_names) | set(services.policies.clients))
        return policies_of(services, {name: await services.spend.spent(name) for name in names})

    @app.get("/flex/savings", response_model=Savings, dependencies=guarded, responses=ERRORS, tags=["flex"])
    async def flex_savings(
        days: Annotated[int, Query(ge=1, le=MAX_DAYS, description="UTC days ending today")] = DEFAULT_DAYS,
    ) -> Savings:
        """What flex saved: today and the last `days` UTC days, totals and by client, model and day, from the daily
        ledger (this process since it started, or the fleet's); and each flex gate's state."""
        shadow = services.metrics.shadow_saved.total()
        found = await savings_figures(services.ledger, days, services.wall(), settings.mode, shadow)
        return Savings(**dict(found), gates=flex_status_of(services))

    @app.get("/", include_in_schema=False, dependencies=[Depends(access.page)])
    async def page() -> Response:
        return savings_page()

    _docs(app, guarded, [Depends(access.page)])
    return app


def _docs(app: FastAPI, guarded: list[Any], page: list[Any]) -> None:
    """/openapi.json and /docs (Swagger UI from packaged assets), behind the same rule as the rest."""

    async def openapi() -> JSONResponse:
        return JSONResponse(apidoc.with_mirrored(app.openapi()))

    async def docs() -> Response:
        return apidoc.docs_page(app.title + " - docs")

    async def asset(name: str) -> Response:
        found = apidoc.asset(name)
        if found is None:
            raise HTTPException(404)
        return found

    app.add_api_route("/openapi.json", openapi, dependencies=guarded, include_in_schema=False)
    app.add_api_route("/docs", docs, dependencies=page, include_in_schema=False)
    app.add_api_route(apidoc.ASSET_PATH + "{name}", asset, dependencies=guarded, include_in_schema=False)


def flex_status_of(services: Services) -> FlexStatus:
    settings, now = services.settings, services.clock()
    gates: dict[str, list[GateStatus]] = {}
    for gate in services.gates or ():
        core = gate.core
        busy = core.state is State.BUSY
        gates.setdefault(gate.key.partition("@")[0], []).append(
            GateStatus(
                key=gate.key,
                state="busy" if busy else "open",
                waiting=len(core.queue),
                in_flight=core.in_flight,
                next_probe_in_s=max(0.0, core.next_probe_at - now) if busy else None,
            )
        )
    observed = services.observed
    families = [
        FamilyStatus(
            family=name,
            gates=sorted(gates.get(name, []), key=lambda g: g.key),
            flex_429_rate=observed.flex_busy_rate(name, now),
            standard_reserve_s=observed.reserve(name),
            standard_p95_s=observed.standard_p95(name),
        )
        for name in sorted(set(observed.names()) | set(gates))
    ]
    shared = services.shared
    health = shared.health if shared is not None else None
    return FlexStatus(
        gate_enabled=services.gates is not None,
        gate_scope=settings.gate_scope,
        rate_window_s=RATE_WINDOW_S,
        families=families,
        shared_state=SharedStateStatus(
            mode=health.mode if health else "off",
            since=health.since if health else None,
            last_error=health.last_error if health else None,
            where=health.where if health else None,
        ),
    )


def policies_of(services: Services, spent: dict[str, float]) -> Policies:
    """What is in force; `spent` is each client's standard spend today (read from the shared state, when set)."""
    s, chosen = services.settings, services.policies
    scope = "fleet" if services.shared is not None and services.shared.up else "process"
    names = sorted(set(s.client_names) | set(chosen.clients))
    return Policies(
        mode=s.mode,
        strategy=StrategyOut.model_validate(s, from_attributes=True),
        timeouts=TimeoutsOut.model_validate(s, from_attributes=True),
        gate=GateSettingsOut(
            enabled=s.flex_gate,
            scope=s.gate_scope,
            probe_initial_s=s.gate_probe_initial_s,
            probe_max_s=max(s.gate_probe_max_s, s.gate_probe_initial_s),
            max_waiting=s.gate_max_waiting,
            max_in_flight=s.flex_max_in_flight,
        ),
        flex_models=list(s.flex_models),
        policy_file=None if s.policy_file is None else str(s.policy_file),
        default=chosen.default,
        named=dict(chosen.policies),
        rules=list(chosen.rules),
        clients=[
            ClientOut(
                name=name,
                policy_header=chosen.client(name).policy_header,
                standard_spend_cap_usd=chosen.client(name).standard_spend_cap_usd,
                standard_spent_today_usd=spent.get(name, 0.0),
                spend_scope=scope,
            )
            for name in names
        ],
    )


def _rates(rates: Rates | None) -> RatesOut | None:
    if rates is None:
        return None
    write = rates.cache_write
    return RatesOut(
        input=float(rates.input),
        cached_input=float(rates.cached_input),
        output=float(rates.output),
        cache_write=None if write is None else float(write),
    )


def _price(model: ModelPrice) -> PriceOut:
    standard = _rates(model.standard)
    assert standard is not None
    return PriceOut(
        family=model.family,
        standard=standard,
        flex=_rates(model.flex),
        priority=_rates(model.priority),
        source=model.source,
        effective=model.effective,
    )


async def _proxy_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FlexProxyError)
    headers = {"www-authenticate": "Bearer"} if exc.status == 401 else None
    return Response(exc.body(), exc.status, headers=headers, media_type="application/json")


async def _invalid_query(request: Request, exc: Exception) -> Response:
    """A query parameter out of bounds, in the OpenAI shape (FastAPI's own would be a 422 of another shape)."""
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = first.get("loc", ())
    param = str(where[-1]) if where else None
    error = ClientError(f"Invalid {param or 'request'}: {first.get('msg', 'not valid')}.", param=param)
    return Response(error.body(), 400, media_type="application/json")


async def _http_error(request: Request, exc: Exception) -> Response:
    """Routing's own errors (404, 405) in the OpenAI shape; a 404 for an API path says to add /v1."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return await _proxy_error(request, NotFound(not_found_message(request)))
    error = ClientError(str(exc.detail), code="method_not_allowed" if exc.status_code == 405 else None)
    error.status = exc.status_code
    return Response(error.body(), exc.status_code, headers=exc.headers, media_type="application/json")


def not_found_message(request: Request) -> str:
    method, path = request.method, request.url.path
    shown = path if len(path) <= 200 else path[:200] + "..."
    first = path.strip("/").split("/", 1)[0]
    if first in API_ROOTS:
        return (
            f"Unknown URL ({method} {shown}). OpenAI API paths start with /v1 here: add /v1 to the client's "
            f"base_url ({str(request.base_url).rstrip('/')}/v1)."
        )
    return (
        f"Unknown URL ({method} {shown}). This proxy serves the OpenAI API under /v1/, and the savings page at /, "
        "/healthz, /readyz, /metrics, /flex/savings, /flex/status, /flex/prices, /flex/policies and /docs."
    )
