"""Whose key goes upstream: the client's own, or the proxy's for holders of a client key."""

from __future__ import annotations

import hmac

from .config import Settings
from .errors import Unauthorized


def authorize(settings: Settings, given: str | None) -> str | None:
    """The Authorization header to send upstream; with client keys set, only their holders get the proxy's key."""
    if settings.client_keys:
        token = given[7:].strip() if given and given[:7].lower() == "bearer " else ""
        # Compare against every key, in constant time each, so timing tells nothing about which one is close.
        matches = [hmac.compare_digest(token.encode(), k.get_secret_value().encode()) for k in settings.client_keys]
        if not any(matches):
            raise Unauthorized("This proxy needs one of its client keys as the API key (Authorization: Bearer).")
        assert settings.api_key is not None  # config refuses client keys without an api key
        return "Bearer " + settings.api_key.get_secret_value()
    if given:
        return given
    return "Bearer " + settings.api_key.get_secret_value() if settings.api_key else None
