"""A simulated OpenAI-compatible upstream with flex behaviour, for demos, tests and benchmarks.

It is a separate program: nothing here imports the rest of `proxy`.
"""

from .app import create_sim_app
from .options import Reply, SimOptions
from .server import SimServer
from .simulator import RecordedRequest, Simulator

__all__ = ["RecordedRequest", "Reply", "SimOptions", "SimServer", "Simulator", "create_sim_app"]
