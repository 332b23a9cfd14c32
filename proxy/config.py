"""The proxy's settings: one frozen object, read once from flags and `FLEX_PROXY_*` variables."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Strategy = Literal["backoff", "standard", "backoff-then-standard", "fail"]
STRATEGIES: tuple[str, ...] = ("backoff", "standard", "backoff-then-standard", "fail")

# Flex-capable families (OpenAI pricing page, "Flex processing" table, as mirrored in Sept 2026),
# each also as a dated snapshot such as o3-2025-04-16. Pro models are excluded: OpenAI lists them without flex.
FLEX_FAMILIES = (
    "o3", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-5.1", "gpt-5.2", "gpt-5.4", "gpt-5.4-mini",
    "gpt-5.4-nano", "gpt-5.5", "gpt-5.6-sol", "gpt-5.6-terra", "gpt-5.6-luna",
)  # fmt: skip
DEFAULT_FLEX_MODELS = tuple(p for f in FLEX_FAMILIES for p in (f, f"{f}-20[0-9][0-9]-[0-9][0-9]-[0-9][0-9]"))


def _split(value: Any) -> Any:
    """Lists arrive as comma-separated text from the environment and from flags."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# The form client keys had before `name key`: a name, `=`, then a key that does not start with `=` (so the
# padding of a base64 key such as `q3MxXn0RzUQjYl7kP9aWbQ==` never looks like it).
_OLD_NAMED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}=[^=]")
# The client label of requests no client key was accepted for (refused 401, or refused before the key was read).
NO_CLIENT = "none"


def _is_token(key: str) -> bool:
    return bool(key) and all(33 <= ord(c) < 127 for c in key)


@dataclass(frozen=True)
class ClientKey:
    """One client key and the name it counts under; `where` says where it was given, never what it is."""

    name: str
    key: SecretStr
    where: str  # "FLEX_PROXY_CLIENT_KEYS entry 2" or "FLEX_PROXY_CLIENT_KEYS_FILE line 7"
    old_form: bool = False  # written `name=key`, the old form: read as a bare key


def parse_client_key(entry: str, where: str) -> ClientKey:
    """`key` (named `default`) or `name key`: keys hold no whitespace, so the split is unambiguous whatever else
    a key holds (`=`, `+`, `/`). Errors name `where` and never echo any part of the entry: it may be a key."""
    if any(ord(c) < 32 or ord(c) >= 127 for c in entry):
        raise ValueError(f"{where}: has control or non-ASCII characters (the entry is not shown)")
    parts = entry.split()
    if len(parts) == 1:
        return ClientKey("default", SecretStr(parts[0]), where, bool(_OLD_NAMED.match(parts[0])))
    if len(parts) != 2:
        raise ValueError(f"{where}: must be a key, or a name, a space and the key (the entry is not shown)")
    if not _CLIENT_NAME.match(parts[0]):
        raise ValueError(
            f"{where}: the client name must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or "
            "digit (the entry is not shown)"
        )
    if parts[0] == NO_CLIENT:
        raise ValueError(
            f"{where}: the client name {NO_CLIENT!r} is reserved: it labels the requests refused for a missing or "
            "unknown key"
        )
    return ClientKey(parts[0], SecretStr(parts[1]), where)


def where(url: str) -> str:
    """host:port/db of a Redis URL, for logs and the status page: never the user or the password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return "unix:" + parts.path
    host = parts.hostname or "localhost"
    host = f"[{host}]" if ":" in host else host
    try:
        port = parts.port or 6379
    except ValueError:
        port = 6379
    db = parts.path.strip("/") or "0"
    return f"{parts.scheme}://{host}:{port}/{db}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything the operator can set; see the README's settings table for what each one means."""

    model_config = SettingsConfigDict(
        env_prefix="FLEX_PROXY_", frozen=True, extra="forbid", allow_inf_nan=False, hide_input_in_errors=True
    )  # errors never echo a value: it may be a key

    upstream_base_url: str = Field("https://api.openai.com/v1", description="where /v1/<rest> goes: <base>/<rest>")
    host: str = Field("127.0.0.1", description="address to listen on (loopback unless you mean otherwise)")
    port: int = Field(8080, ge=0, le=65535, description="port to listen on")
    on_unavailable: Strategy = Field(
        "backoff-then-standard", description="what to do when flex has no capacity: " + " | ".join(STRATEGIES)
    )
    max_flex_attempts: int = Field(
        4, ge=1, le=100, description="with the gate off: flex attempts per request, the first included"
    )
    backoff_initial_s: float = Field(1.0, gt=0, description="first backoff cap for retries; doubles each retry")
    backoff_max_s: float = Field(30.0, gt=0, description="largest backoff cap")
    min_backoff_s: float = Field(0.25, ge=0, description="shortest wait between two attempts of one request")
    max_retry_after_s: float = Field(
        60.0, ge=0, description="longest upstream retry-after the proxy sleeps through; longer ones are answered now"
    )
    flex_budget_s: float = Field(120.0, ge=0, description="how long one request may keep waiting for flex")
    standard_reserve_s: float = Field(
        15.0, ge=0, description="time kept for the standard re-send before a deadline, until standard is measured"
    )
    standard_reserve_min_s: float = Field(2.0, ge=0, description="smallest learned standard reserve")
    standard_reserve_max_s: float = Field(120.0, ge=0, description="largest learned standard reserve")
    standard_tier: Literal["auto", "default", "omit"] = Field(
        "auto", description="tier of the standard re-send: auto, default, or omit (drop the field)"
    )
    override_client_tier: bool = Field(
        False, description="put eligible requests on flex even when the client set a tier"
    )
    inject_background: bool = Field(False, description="put background:true Responses requests on flex too")
    max_retries: int = Field(2, ge=0, le=20, description="re-sends for rate limits, 5xx, 408 and refused connections")
    upstream_timeout_s: float = Field(
        900.0, gt=0, description="time to an answer's first byte on flex, and the cap for every tier"
    )
    standard_timeout_s: float = Field(600.0, gt=0, description="time to an answer's first byte on other tiers")
    stream_idle_timeout_s: float = Field(
        300.0, gt=0, description="longest silence between events once a stream has started"
    )
    request_budget_s: float = Field(
        900.0, gt=0, description="time for an answer to start when the client states no deadline"
    )
    retry_read_timeouts: bool = Field(
        False, description="re-send a request upstream accepted but did not answer in time (may pay twice)"
    )
    reset_retry_window_s: float = Field(
        2.0, ge=0, description="a connection dropped this soon after sending, before any answer, is re-sent"
    )
    flex_gate: bool = Field(True, description="share one view of flex capacity per model family (the flex gate)")
    gate_scope: Literal["model", "model+key"] = Field(
        "model", description="what one gate covers: a model family, or a family per upstream key"
    )
    gate_probe_initial_s: float = Field(0.25, gt=0, description="a busy gate's first probe interval; doubles")
    gate_probe_max_s: float = Field(0.5, gt=0, description="a busy gate's longest probe interval")
    gate_accept_s: float = Field(
        0.5, gt=0, description="a probe not refused by then opens the gate (flex refuses at once; answers take long)"
    )
    gate_spell_share: float = Field(
        0.8, ge=0, le=1, description="no probe before this share of the shortest recent busy spell has passed (0: off)"
    )
    gate_max_waiting: int = Field(10_000, ge=0, description="requests that may wait in one gate")
    flex_max_in_flight: int = Field(0, ge=0, description="flex requests in flight per gate; 0 = no cap")
    connect_timeout_s: float = Field(10.0, gt=0, description="upstream connect timeout")
    max_connections: int = Field(10_000, ge=1, description="upstream connection pool size")
    # Whole seconds and counts: the kernel takes integers. Linux caps idle and interval at 32767 s and the count
    # at 127.
    tcp_keepalive_idle_s: int = Field(
        60, ge=1, le=32767, description="silence on an upstream connection before the first TCP keepalive probe"
    )
    tcp_keepalive_interval_s: int = Field(15, ge=1, le=32767, description="seconds between TCP keepalive probes")
    tcp_keepalive_count: int = Field(
        4, ge=1, le=127, description="unanswered TCP keepalive probes before an upstream connection is dropped"
    )
    max_body_mb: float = Field(64.0, gt=0, le=4096, description="largest model-request body, in MiB (413 above)")
    flex_models: Annotated[tuple[str, ...], NoDecode] = Field(
        DEFAULT_FLEX_MODELS, description="comma-separated glob patterns of flex-capable models"
    )
    api_key: SecretStr | None = Field(None, description="OpenAI key for requests that carry none (environment only)")
    client_keys: Annotated[tuple[SecretStr, ...], NoDecode] = Field(
        (), description="comma-separated keys clients must present, each a bare key or `name key` (environment only)"
    )
    client_keys_file: Path | None = Field(
        None, description="file of client keys, one bare key or `name key` per line (# comments), for many clients"
    )
    mode: Literal["flex", "shadow"] = Field(
        "flex", description="flex: put eligible requests on flex; shadow: forward them as sent, count what flex saves"
    )
    policy_file: Path | None = Field(None, description="TOML file of named policies and the rules that choose them")
    admin_key: SecretStr | None = Field(
        None, description="key the control plane asks of callers not on loopback (environment only)"
    )
    loopback_admin: bool = Field(
        True, description="callers on loopback (port-forward, docker exec) use the control plane without the admin "
        "key; false behind a reverse proxy or mesh sidecar on the same host, which makes everyone look local",
    )
    metrics_open: bool = Field(True, description="serve /metrics without the admin key, for scrapers")
    prices_file: Path | None = Field(None, description="JSON price file that extends or replaces the packaged table")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="text or json; json makes every line JSON")
    shutdown_grace_s: float = Field(
        900.0, ge=0, description="on SIGTERM, how long in-flight requests may take to finish (as long as a request may)"
    )
    drain_delay_s: float = Field(
        5.0, ge=0, le=300,
        description="on SIGTERM, how long to keep accepting with /readyz answering 503 before closing the listener",
    )  # fmt: skip
    state_url: SecretStr | None = Field(
        None, description="redis:// or rediss:// URL of the state a fleet shares (password and database in it); "
        "unset: each process keeps its own (environment only)",
    )
    state_prefix: str = Field("flexproxy:", description="prefix of every key and channel in the shared state")
    state_timeout_s: float = Field(
        0.25, gt=0, le=10, description="longest wait for the shared state; slower counts as down (local mode)"
    )
    _client_keys: tuple[ClientKey, ...] = PrivateAttr(default=())

    @field_validator("flex_models", "client_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("api_key", "admin_key", "state_url", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()  # a Secret made from a file often ends with a newline
        return None if value == "" else value

    @field_validator("api_key", "admin_key")
    @classmethod
    def _printable_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _is_token(value.get_secret_value()):
            raise ValueError("a key may not contain spaces or control characters (the value is not shown)")
        return value

    @field_validator("state_url")
    @classmethod
    def _redis_url(cls, value: SecretStr | None) -> SecretStr | None:
        # The message never repeats the URL: it may hold a password.
        if value is None:
            return value
        url = value.get_secret_value()
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix:// (the value is not shown)")
        try:
            urlsplit(url).port  # noqa: B018  # parsed for its check: a port that is no number raises
        except ValueError:
            raise ValueError("has a port that is not a number from 0 to 65535 (the value is not shown)") from None
        return value

    @field_validator("state_prefix")
    @classmethod
    def _key_prefix(cls, value: str) -> str:
        # Braces would change the hash tags that keep each script's keys in one Redis Cluster slot.
        if not re.fullmatch(r"[A-Za-z0-9_.:/-]{0,64}", value):
            raise ValueError("may hold at most 64 letters, digits and _ . : / - (no braces or spaces)")
        return value

    @field_validator("upstream_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("prices_file", "client_keys_file", "policy_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _named_keys(self) -> Settings:
        parsed = [
            parse_client_key(item.get_secret_value(), f"FLEX_PROXY_CLIENT_KEYS entry {number}")
            for number, item in enumerate(self.client_keys, 1)
        ]
        if self.client_keys_file is not None:
            lines = self.client_keys_file.read_text(encoding="utf-8").splitlines()
            kept = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip() and line.strip()[0] != "#"]
            parsed += [parse_client_key(line, f"FLEX_PROXY_CLIENT_KEYS_FILE line {n}") for n, line in kept]
            # Held with the others, so every check of "are there client keys" sees the file's too.
            object.__setattr__(self, "client_keys", (*self.client_keys, *(SecretStr(line) for _, line in kept)))
        secrets = [entry.key.get_secret_value() for entry in parsed]
        if len(set(secrets)) != len(secrets):
            raise ValueError("FLEX_PROXY_CLIENT_KEYS: the same key is given twice (the value is not shown)")
        self._client_keys = tuple(parsed)
        return self

    @model_validator(mode="after")
    def _no_open_relay(self) -> Settings:
        # Each message names the setting first, then what is wrong: "invalid setting NAME: problem".
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("FLEX_PROXY_BACKOFF_MAX_S: must be at least FLEX_PROXY_BACKOFF_INITIAL_S")
        if self.api_key and not self.client_keys and not is_loopback(self.host):
            raise ValueError(
                f"FLEX_PROXY_CLIENT_KEYS: missing, and required here: FLEX_PROXY_API_KEY is set and the proxy listens "
                f"on {self.host}, a non-loopback address, so without client keys anyone who reaches it spends your key"
            )
        if self.standard_reserve_max_s < self.standard_reserve_min_s:
            raise ValueError("FLEX_PROXY_STANDARD_RESERVE_MAX_S: must be at least FLEX_PROXY_STANDARD_RESERVE_MIN_S")
        if self.client_keys and not self.api_key:
            raise ValueError("FLEX_PROXY_CLIENT_KEYS: needs FLEX_PROXY_API_KEY, the key used for those clients")
        return self

    @property
    def named_client_keys(self) -> tuple[ClientKey, ...]:
        """Every client key, from FLEX_PROXY_CLIENT_KEYS then FLEX_PROXY_CLIENT_KEYS_FILE, with its name."""
        return self._client_keys

    @property
    def client_names(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(["default", *(entry.name for entry in self._client_keys)]))

    def first_byte_timeout_s(self, on_flex: bool) -> float:
        """How long an attempt may wait for its answer to start: flex may be silent for many minutes."""
        return self.upstream_timeout_s if on_flex else min(self.standard_timeout_s, self.upstream_timeout_s)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
