"""The proxy's settings: one frozen object, read once from flags and `FLEX_PROXY_*` variables."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Strategy = Literal["backoff", "standard", "backoff-then-standard", "fail"]
STRATEGIES: tuple[str, ...] = ("backoff", "standard", "backoff-then-standard", "fail")

# Flex-capable families (shared/reference/openai-api.md §3, OpenAI pricing page as mirrored in Sept 2026),
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything the operator can set; see the README's settings table for what each one means."""

    model_config = SettingsConfigDict(env_prefix="FLEX_PROXY_", frozen=True, extra="forbid", allow_inf_nan=False)

    upstream_base_url: str = "https://api.openai.com/v1"
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    on_unavailable: Strategy = "backoff-then-standard"
    max_flex_attempts: int = Field(4, ge=1, le=100)
    backoff_initial_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(30.0, gt=0)
    flex_budget_s: float = Field(120.0, ge=0)
    standard_reserve_s: float = Field(60.0, ge=0)
    standard_tier: Literal["auto", "default", "omit"] = "auto"
    override_client_tier: bool = False
    inject_background: bool = False
    max_retries: int = Field(2, ge=0, le=20)
    upstream_timeout_s: float = Field(900.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    max_connections: int = Field(10_000, ge=1)
    max_body_mb: float = Field(64.0, gt=0, le=4096)
    flex_models: Annotated[tuple[str, ...], NoDecode] = DEFAULT_FLEX_MODELS
    api_key: SecretStr | None = None
    client_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    prices_file: Path | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    shutdown_grace_s: float = Field(30.0, ge=0)

    @field_validator("flex_models", "client_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("upstream_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("prices_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"no such file: {value}")
        return value

    @model_validator(mode="after")
    def _no_open_relay(self) -> Settings:
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError("FLEX_PROXY_BACKOFF_MAX_S must be at least FLEX_PROXY_BACKOFF_INITIAL_S")
        if self.api_key and not self.client_keys and not is_loopback(self.host):
            raise ValueError(
                f"FLEX_PROXY_CLIENT_KEYS is required: FLEX_PROXY_API_KEY is set and the proxy listens on "
                f"{self.host}, a non-loopback address, so without client keys anyone who reaches it spends your key"
            )
        if self.client_keys and not self.api_key:
            raise ValueError("FLEX_PROXY_CLIENT_KEYS needs FLEX_PROXY_API_KEY, the key used for those clients")
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)
