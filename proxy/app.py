"""Composition root: build the ASGI app from settings. The lifespan owns the upstream client and the loop-lag
sampler; the control plane is FastAPI (control.py), the /v1 hot path the proxy's own pipeline (routes.py)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

from fastapi import FastAPI
from prometheus_client import Gauge, disable_created_metrics
from starlette.types import ASGIApp, Receive, Scope, Send

from .auth import Authorizer
from .config import Settings
from .control import control_app
from .gate import GateConfig, Gates, Reporter
from .ledger import Ledger
from .logs import AccessLog
from .metrics import Metrics
from .observed import Observed
from .policies import load as load_policies
from .pricing import PriceTable
from .reporting import GateMetrics
from .routes import ProxyApp
from .services import Services
from .spend import DailySpend
from .upstream import Keepalive, Upstream

if TYPE_CHECKING:  # the shared state's modules bring redis-py (~7 MB): imported only when it is configured
    from .fleet import Fleet
    from .fleet_ledger import FleetLedger
    from .fleet_spend import FleetSpend
    from .shared import SharedState

LAG_INTERVAL_S = 0.5


def create_app(
    settings: Settings | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rand: Callable[[], float] = random.random,
    wall: Callable[[], float] = time.time,
) -> FlexProxy:
    """The flex-proxy app; nothing is started until the lifespan runs."""
    settings = settings or Settings()
    disable_created_metrics()  # type: ignore[no-untyped-call]  # the *_created series only add noise to every counter
    prices = PriceTable.load(settings.prices_file)
    policies = load_policies(settings.policy_file, settings)
    metrics = Metrics(
        known_models=prices.known_families(settings.flex_models),
        clients=settings.client_names,
        flex_models=prices.flex_families,
        gate_per_family=settings.flex_gate and settings.gate_scope == "model",  # else no gate is named by family
    )
    upstream = Upstream(
        settings.upstream_base_url,
        connect_timeout_s=settings.connect_timeout_s,
        idle_timeout_s=settings.stream_idle_timeout_s,
        max_connections=settings.max_connections,
        keepalive=Keepalive(
            settings.tcp_keepalive_idle_s, settings.tcp_keepalive_interval_s, settings.tcp_keepalive_count
        ),
    )
    shared: SharedState | None = None
    fleet_spend: FleetSpend | None = None
    fleet_ledger: FleetLedger | None = None
    if settings.state_url is not None:
        from .fleet_ledger import FleetLedger
        from .fleet_spend import FleetSpend
        from .shared import SharedState

        shared = SharedState(
            settings.state_url.get_secret_value(),
            prefix=settings.state_prefix,
            timeout_s=settings.state_timeout_s,
            on_health=lambda up: metrics.shared_state_up.set(1 if up else 0),
        )
        fleet_spend, fleet_ledger = FleetSpend(shared, wall), FleetLedger(Ledger(wall()), shared)
    gates = None
    fleet: Fleet | None = None
    if settings.flex_gate:
        config = GateConfig(
            probe_initial_s=settings.gate_probe_initial_s,
            probe_max_s=max(settings.gate_probe_max_s, settings.gate_probe_initial_s),
            probe_min_s=settings.min_backoff_s,
            accept_after_s=settings.gate_accept_s,
            spell_share=settings.gate_spell_share,
            max_retry_after_s=settings.max_retry_after_s,
            max_waiting=settings.gate_max_waiting,
            max_in_flight=settings.flex_max_in_flight,
            needs_lease=shared is not None,
        )
        reporter: Reporter = GateMetrics(metrics)
        if shared is not None:  # the gates of every process that shares the state act as one
            from .fleet import Fleet

            reporter = fleet = Fleet(shared, reporter, rand)
        gates = Gates(config, clock, reporter)
    observed = Observed(settings.standard_reserve_s, settings.standard_reserve_min_s, settings.standard_reserve_max_s)
    services = Services(
        settings=settings,
        upstream=upstream,
        metrics=metrics,
        prices=prices,
        access_log=AccessLog(settings.log_format),
        auth=Authorizer(settings),
        policies=policies,
        gates=gates,
        observed=observed,
        spend=fleet_spend or DailySpend(wall),
        ledger=fleet_ledger or Ledger(wall()),
        shared=shared,
        clock=clock,
        wall=wall,
        sleep=sleep,
        rand=rand,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await upstream.start()
        sampler = asyncio.get_running_loop().create_task(sample_loop_lag(metrics.loop_lag))
        if shared is not None and fleet_spend is not None and fleet_ledger is not None:
            if fleet is not None and gates is not None:
                fleet.attach(gates)  # before the start, so the first catch-up reads the fleet's gates
            await shared.start()  # local mode when Redis does not answer: start-up waits one timeout at most
            await fleet_spend.start()
            await fleet_ledger.start()
        try:
            yield
        finally:
            services.draining = True
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            if shared is not None and fleet_spend is not None and fleet_ledger is not None:
                if fleet is not None:
                    await fleet.close()
                await fleet_spend.close()  # what waits to be written goes now, bounded by the timeout
                await fleet_ledger.close()
                await shared.close()
            await upstream.close()

    return FlexProxy(ProxyApp(services), control_app(services, lifespan), services)


async def sample_loop_lag(gauge: Gauge, interval_s: float = LAG_INTERVAL_S) -> None:
    """How late the event loop wakes from a timer, every `interval_s`: what every ready callback waits on top."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval_s)
        gauge.set(max(0.0, loop.time() - start - interval_s))


class FlexProxy:
    """The ASGI app: /v1/... goes straight to the proxy pipeline; the rest (control plane, lifespan) to FastAPI.

    The pipeline catches its own errors, so it skips the framework's routing and middleware: measured at ~10% of
    the CPU per request.
    """

    def __init__(self, proxy: ASGIApp, control: FastAPI, services: Services) -> None:
        self.proxy = proxy
        self.control = control
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            await self.proxy(scope, receive, send)
        else:
            await self.control(scope, receive, send)
