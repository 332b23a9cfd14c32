"""Named policies and the rules that choose one for each request, read from a TOML file. Pure but loading.

TOML, not YAML: Python reads it with no dependency (tomllib), it has comments, and its values have one meaning
each (no `no` that turns into false). A file looks like this (the README has the full example):

    default = "batch"                   # the policy when no rule matches (else the built-in one, from settings)

    [policies.interactive]
    flex = false                        # never put these requests on flex

    [policies.batch]
    strategy = "backoff-then-standard"
    flex_budget_s = 1800

    [clients.nightly]                   # a client named in FLEX_PROXY_CLIENT_KEYS
    policy_header = true                # may choose a policy with X-Flex-Policy
    standard_spend_cap_usd = 20.0       # per UTC day; past it, requests stay on flex (wait or fail)

    [[rules]]                           # first match wins; a missing pattern matches everything
    client = "web-*"
    model = "gpt-5*"
    policy = "interactive"

Precedence: X-Flex-Policy (for a client allowed to use it) > the first matching rule > `default` > built-in.
"""

from __future__ import annotations

import fnmatch
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .config import STRATEGIES, Settings
from .errors import ClientError

BUILT_IN = "built-in"
STANDARD_TIERS = ("auto", "default", "omit")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class PolicyFileError(ValueError):
    """A policy file that cannot be used: the message names the line and the problem."""


@dataclass(frozen=True)
class Policy:
    """How the proxy treats one request."""

    name: str
    flex: bool = True  # put eligible requests on flex
    strategy: str = "backoff-then-standard"
    max_flex_attempts: int = 4
    flex_budget_s: float = 120.0  # how long to keep waiting for flex
    request_budget_s: float = 900.0  # the deadline when the client states none
    client_deadline: bool = True  # honour the SDKs' x-stainless-(read-)timeout and X-Flex-Deadline-S
    standard_tier: str = "auto"  # tier of the standard re-send: auto, default, omit

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(
            name=BUILT_IN,
            strategy=settings.on_unavailable,
            max_flex_attempts=settings.max_flex_attempts,
            flex_budget_s=settings.flex_budget_s,
            request_budget_s=settings.request_budget_s,
            standard_tier=settings.standard_tier,
        )


@dataclass(frozen=True)
class ClientRules:
    policy_header: bool = False  # may choose a policy with X-Flex-Policy
    standard_spend_cap_usd: float | None = None  # per UTC day


@dataclass(frozen=True)
class Rule:
    policy: str
    client: str | None = None  # glob
    model: str | None = None  # glob

    def matches(self, client: str, model: str | None) -> bool:
        if self.client is not None and not fnmatch.fnmatchcase(client, self.client):
            return False
        return self.model is None or (model is not None and fnmatch.fnmatchcase(model, self.model))


@dataclass(frozen=True)
class PolicySet:
    """Every policy, client rule and selection rule in force."""

    policies: Mapping[str, Policy]
    default: str = BUILT_IN
    clients: Mapping[str, ClientRules] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()

    @classmethod
    def built_in(cls, settings: Settings) -> PolicySet:
        return cls({BUILT_IN: Policy.from_settings(settings)})

    def client(self, name: str) -> ClientRules:
        return self.clients.get(name, _NO_RULES)

    def select(self, client: str, model: str | None, header: str | None) -> Policy:
        """The policy for one request; an X-Flex-Policy the client may not use, or that names no policy, is a
        client error rather than silently ignored."""
        if header is not None:
            name = header.strip()
            if not self.client(client).policy_header:
                raise ClientError(
                    "This client may not choose a policy with X-Flex-Policy.", param="X-Flex-Policy",
                    code="policy_not_allowed",
                )  # fmt: skip
            if name not in self.policies:
                message = f"X-Flex-Policy names no policy: {name!r}."
                raise ClientError(message, param="X-Flex-Policy", code="invalid_header")
            return self.policies[name]
        for rule in self.rules:
            if rule.matches(client, model):
                return self.policies[rule.policy]
        return self.policies[self.default]


_NO_RULES = ClientRules()


def load(path: Path | None, settings: Settings) -> PolicySet:
    """The policies in `path` (or only the built-in one); PolicyFileError naming the line on any problem."""
    if path is None:
        return PolicySet.built_in(settings)
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyFileError(f"{path}: {exc}") from None
    try:
        return _parse(data, settings, text)
    except _Problem as problem:
        line = _line_of(text, problem.where)
        at = f" line {line}" if line else ""
        raise PolicyFileError(f"{path}{at}: {problem.message}") from None


class _Problem(Exception):
    def __init__(self, where: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.where = where
        self.message = message


_POLICY_TYPES: dict[str, tuple[type, ...]] = {
    "flex": (bool,), "strategy": (str,), "max_flex_attempts": (int,), "flex_budget_s": (int, float),
    "request_budget_s": (int, float), "client_deadline": (bool,), "standard_tier": (str,),
}  # fmt: skip


# Each number's range (its setting's, and always finite), and how an error says it. A nan compares false with
# everything, so only a number in range passes.
_RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    "max_flex_attempts": (lambda v: 1 <= v <= 100, "a whole number from 1 to 100"),
    "flex_budget_s": (lambda v: 0 <= v < math.inf, "a finite number of seconds, 0 or more"),
    "request_budget_s": (lambda v: 0 < v < math.inf, "a finite number of seconds, more than 0"),
}


def _parse(data: Mapping[str, Any], settings: Settings, text: str) -> PolicySet:
    unknown = set(data) - {"default", "policies", "clients", "rules"}
    if unknown:
        key = sorted(unknown)[0]
        raise _Problem((key,), f"unknown key {key!r} (expected default, policies, clients, rules)")
    base = Policy.from_settings(settings)
    policies: dict[str, Policy] = {BUILT_IN: base}
    for name, table in _table(data, "policies").items():
        where = ("policies", name)
        if not _NAME.match(name) or name == BUILT_IN:
            raise _Problem(where, f"policy name {name!r} must be letters, digits, '_', '.', '-' (and not {BUILT_IN})")
        if not isinstance(table, dict):
            raise _Problem(where, f"policies.{name} must be a table")
        policies[name] = _policy(name, table, base)
    clients: dict[str, ClientRules] = {}
    for name, table in _table(data, "clients").items():
        where = ("clients", name)
        if not isinstance(table, dict):
            raise _Problem(where, f"clients.{name} must be a table")
        for key, value in table.items():
            if key == "policy_header" and not isinstance(value, bool):
                raise _Problem((*where, key), "policy_header must be true or false")
            if key == "standard_spend_cap_usd" and (isinstance(value, bool) or not isinstance(value, int | float)
                                                    or not 0 <= value < math.inf):  # fmt: skip
                raise _Problem((*where, key), "standard_spend_cap_usd must be a finite number of dollars, 0 or more")
            if key not in ("policy_header", "standard_spend_cap_usd"):
                raise _Problem((*where, key), f"unknown key {key!r} in clients.{name}")
        cap = table.get("standard_spend_cap_usd")
        clients[name] = ClientRules(table.get("policy_header", False), None if cap is None else float(cap))
    rules = []
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise _Problem(("rules",), "rules must be an array of tables ([[rules]])")
    for index, rule in enumerate(raw_rules):
        where = ("rules", str(index))
        if not isinstance(rule, dict) or not isinstance(rule.get("policy"), str):
            raise _Problem(where, f"rule {index + 1} needs policy = \"<name>\"")
        extra = set(rule) - {"policy", "client", "model"}
        if extra:
            raise _Problem(where, f"rule {index + 1}: unknown key {sorted(extra)[0]!r}")
        if rule["policy"] not in policies:
            raise _Problem(where, f"rule {index + 1} names no policy: {rule['policy']!r}")
        for key in ("client", "model"):
            if key in rule and not isinstance(rule[key], str):
                raise _Problem(where, f"rule {index + 1}: {key} must be a glob pattern in quotes")
        rules.append(Rule(rule["policy"], rule.get("client"), rule.get("model")))
    default = data.get("default", BUILT_IN)
    if not isinstance(default, str) or default not in policies:
        raise _Problem(("default",), f"default names no policy: {default!r}")
    return PolicySet(policies, default, clients, tuple(rules))


def _table(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise _Problem((key,), f"{key} must be a table")
    return value


def _policy(name: str, table: Mapping[str, Any], base: Policy) -> Policy:
    values: dict[str, Any] = {}
    for key, value in table.items():
        where = ("policies", name, key)
        types = _POLICY_TYPES.get(key)
        if types is None:
            raise _Problem(where, f"unknown key {key!r} in policies.{name} (expected {', '.join(_POLICY_TYPES)})")
        if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            raise _Problem(where, f"{key} must be {' or '.join(t.__name__ for t in types)}, not {value!r}")
        values[key] = value
    if values.get("strategy", base.strategy) not in STRATEGIES:
        raise _Problem(("policies", name, "strategy"), f"strategy must be one of {', '.join(STRATEGIES)}")
    if values.get("standard_tier", base.standard_tier) not in STANDARD_TIERS:
        raise _Problem(("policies", name, "standard_tier"), f"standard_tier must be one of {', '.join(STANDARD_TIERS)}")
    for key, (in_range, rule) in _RANGES.items():
        if key in values and not in_range(values[key]):  # TOML has nan, inf and -inf
            raise _Problem(("policies", name, key), f"{key} must be {rule}, not {values[key]!r}")
    names = {f.name for f in fields(Policy)}
    return replace(base, name=name, **{k: v for k, v in values.items() if k in names})


def _line_of(text: str, where: tuple[str, ...]) -> int | None:
    """The line a problem is on: the key inside its table, else the table's header (a best effort on the text)."""
    lines = text.splitlines()
    if not where:
        return None
    if where[0] == "rules":
        index = int(where[1]) if len(where) > 1 else 0
        seen = -1
        for number, line in enumerate(lines, 1):
            if line.strip().startswith("[[rules]]"):
                seen += 1
                if seen == index:
                    return number
        return None
    header = None
    if len(where) >= 2:
        pattern = re.compile(r"^\s*\[\s*" + re.escape(where[0]) + r"\s*\.\s*\"?" + re.escape(where[1]) + r"\"?\s*\]")
        header = next((n for n, line in enumerate(lines, 1) if pattern.match(line)), None)
    key = where[-1] if len(where) != 2 else None
    if len(where) == 1:
        key = where[0]
    if key is not None:
        start = header or 0
        for number, line in enumerate(lines[start:], start + 1):
            if re.match(r"^\s*" + re.escape(key) + r"\s*=", line):
                return number
            if header and number > start + 1 and line.lstrip().startswith("["):
                break
    return header


def check_file(path: Path, settings: Settings | None = None) -> str:
    """`flex-proxy check-policy FILE`: a summary of a good file; PolicyFileError for a bad one."""
    policy_set = load(path, settings or Settings())
    names = ", ".join(name for name in policy_set.policies if name != BUILT_IN) or "none"
    return (
        f"{path}: ok: policies {names}; default {policy_set.default}; "
        f"{len(policy_set.rules)} rule(s); {len(policy_set.clients)} client(s)"
    )
