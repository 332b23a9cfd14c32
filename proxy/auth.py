"""Who is calling and whose key goes upstream: the client's own key, or the proxy's for holders of a client key."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from .config import Settings
from .errors import Unauthorized


@dataclass(slots=True)
class Caller:
    name: str  # the client's name from FLEX_PROXY_CLIENT_KEYS (`default` when unnamed or without client keys)
    authorization: str | None  # the Authorization header to send upstream


class Authorizer:
    """Built once from the settings: the client keys as bytes, compared in constant time on every request."""

    def __init__(self, settings: Settings) -> None:
        self._keys = [(entry.name, entry.key.get_secret_value().encode()) for entry in settings.named_client_keys]
        self._own = "Bearer " + settings.api_key.get_secret_value() if settings.api_key else None

    def authorize(self, given: str | None) -> Caller:
        """With client keys set, only their holders get the proxy's key; without, the client's key goes as it came."""
        if self._keys:
            token = (given[7:].strip() if given and given[:7].lower() == "bearer " else "").encode()
            # Compare against every key, in constant time each, so timing tells nothing about which one is close.
            found = None
            for name, key in self._keys:
                if hmac.compare_digest(token, key) and found is None:
                    found = name
            if found is None:
                raise Unauthorized("This proxy needs one of its client keys as the API key (Authorization: Bearer).")
            return Caller(found, self._own)
        if given:
            return Caller("default", given)
        return Caller("default", self._own)
