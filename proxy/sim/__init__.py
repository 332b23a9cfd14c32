"""A simulated OpenAI-compatible upstream with flex behaviour, for demos, tests and benchmarks.

It is a separate program: nothing here imports the rest of `proxy`.
"""

from .app import create_sim_app
from .ledger import Billing
from .options import Canned, Reply, SimOptions
from .recorded import leaves_v1
from .server import SimServer
from .simulator import RecordedRequest, Simulator

__all__ = [
    "Billing", "Canned", "RecordedRequest", "Reply", "SimOptions", "SimServer", "Simulator", "create_sim_app",
    "leaves_v1",
]  # fmt: skip
