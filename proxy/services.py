"""What the request pipeline needs from the app, built once by `create_app` and shared by every request."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .auth import Authorizer
from .config import Settings
from .gate import Gates
from .ledger import DailyLedger, Ledger
from .logs import AccessLog
from .metrics import Metrics
from .observed import Observed
from .policies import PolicySet
from .pricing import PriceTable
from .spend import DailySpend
from .upstream import Upstream

if TYPE_CHECKING:
    from .shared import SharedState


@dataclass
class Services:
    """Shared parts of the pipeline; clock, wall, sleep and rand are seams for tests."""

    settings: Settings
    upstream: Upstream
    metrics: Metrics
    prices: PriceTable
    access_log: AccessLog
    auth: Authorizer
    policies: PolicySet
    gates: Gates | None = None  # None: the flex gate is switched off
    observed: Observed = field(default_factory=lambda: Observed(15.0, 2.0, 120.0))
    spend: DailySpend = field(default_factory=DailySpend)
    ledger: DailyLedger = field(default_factory=lambda: Ledger(time.time()))
    shared: SharedState | None = None  # None: no FLEX_PROXY_STATE_URL, every process on its own
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time  # the calendar (UTC days of the ledger, session expiry), not intervals
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    rand: Callable[[], float] = random.random
    draining: bool = False
