"""Who may use the control plane. A caller whose peer address is loopback (the machine itself, `kubectl
port-forward`, `docker exec`) needs no key; anyone else needs FLEX_PROXY_ADMIN_KEY, as `Authorization: Bearer` or,
for a browser, a session cookie that /login sets: an HMAC keyed by the admin key, never the key itself."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import urllib.parse
from collections.abc import Callable
from enum import Enum
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from starlette.responses import RedirectResponse, Response

from .config import Settings
from .errors import AdminKeyNotSet, Unauthorized
from .page import login_page

COOKIE = "flex_proxy_admin"
SESSION_S = 12 * 3600  # a browser session lasts a working day, then the key is asked for again
# Headers a reverse proxy adds: a loopback peer that carries one is relaying someone else, who is not on loopback.
FORWARDING = ("forwarded", "x-forwarded-for", "x-real-ip")
PAGES = frozenset({"/", "/docs"})  # where /login may send the browser back to: never an address a link chose
MAX_FORM_BYTES = 4096

NO_KEY = (
    "FLEX_PROXY_ADMIN_KEY is not set, so the control plane answers only callers on loopback (the proxy's own "
    "machine or pod: kubectl port-forward, docker exec). Set FLEX_PROXY_ADMIN_KEY to open it to others."
)
WRONG_KEY = (
    "The control plane needs the admin key (FLEX_PROXY_ADMIN_KEY): send Authorization: Bearer <key>, or log in "
    "at /login in a browser."
)

Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))]
SessionCookie = Annotated[
    str | None, Depends(APIKeyCookie(name=COOKIE, auto_error=False, description="set by POST /login"))
]


class Verdict(Enum):
    OPEN = "open"  # on loopback, or the key (or a session made with it) was shown
    NO_KEY = "no_key"  # not on loopback, and no admin key is set: closed
    MISSING = "missing"  # no key shown
    WRONG = "wrong"  # a key, or a session cookie, that does not match


class LoginRequired(Exception):
    """A browser page asked for without the key: it is sent to /login, which says what is needed."""

    def __init__(self, back_to: str) -> None:
        super().__init__(back_to)
        self.back_to = back_to


def on_loopback(host: str | None) -> bool:
    """The peer address is loopback (an IPv4-mapped IPv6 loopback address included)."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class AdminAccess:
    """The rule above, built once from the settings; `wall` is the clock sessions expire by."""

    def __init__(self, settings: Settings, wall: Callable[[], float]) -> None:
        self.loopback_open = settings.loopback_admin
        self._key = settings.admin_key.get_secret_value().encode() if settings.admin_key is not None else None
        self._wall = wall

    def local(self, request: Request) -> bool:
        """On loopback and not relayed by a reverse proxy, and loopback callers are let in."""
        if not self.loopback_open or request.client is None or not on_loopback(request.client.host):
            return False
        return not any(name in request.headers for name in FORWARDING)

    def verdict(self, request: Request, bearer: str | None = None) -> Verdict:
        if self.local(request):
            return Verdict.OPEN
        if self._key is None:
            return Verdict.NO_KEY
        if bearer is not None:
            return Verdict.OPEN if hmac.compare_digest(bearer.encode(), self._key) else Verdict.WRONG
        cookie = request.cookies.get(COOKIE)
        if cookie is None:
            return Verdict.MISSING
        return Verdict.OPEN if self.valid_session(cookie) else Verdict.WRONG

    def check_key(self, given: str) -> bool:
        return self._key is not None and hmac.compare_digest(given.encode(), self._key)

    def _sign(self, expires: int) -> str:
        assert self._key is not None
        return hmac.new(self._key, f"flex-proxy admin session until {expires}".encode(), hashlib.sha256).hexdigest()

    def new_session(self) -> str:
        expires = int(self._wall()) + SESSION_S
        return f"{expires}.{self._sign(expires)}"

    def valid_session(self, value: str) -> bool:
        """Made with this admin key and not expired; compared in constant time."""
        expires, _, signature = value.partition(".")
        if self._key is None or not expires.isdigit() or len(expires) > 12 or int(expires) <= self._wall():
            return False
        return hmac.compare_digest(signature.encode(), self._sign(int(expires)).encode())

    async def api(self, request: Request, bearer: Bearer, session: SessionCookie) -> None:
        """Dependency of the JSON endpoints: 401 or 403 in the OpenAI error shape. (`session` is read again from the
        request; declared here, it puts the cookie in the OpenAPI schema's security schemes.)"""
        verdict = self.verdict(request, bearer.credentials if bearer is not None else None)
        if verdict is Verdict.NO_KEY:
            raise AdminKeyNotSet(NO_KEY)
        if verdict is not Verdict.OPEN:
            raise Unauthorized(WRONG_KEY)

    async def page(self, request: Request, bearer: Bearer) -> None:
        """Dependency of the pages a browser opens: anything but open goes to /login."""
        if self.verdict(request, bearer.credentials if bearer is not None else None) is not Verdict.OPEN:
            raise LoginRequired(request.url.path)

    def install(self, app: FastAPI) -> None:
        """/login (the form, and the key it posts) and /logout."""
        app.add_exception_handler(LoginRequired, _to_login)

        @app.get("/login", include_in_schema=False)
        async def login_form(request: Request, back_to: Annotated[str, Query(alias="next")] = "/") -> Response:
            back = back_to if back_to in PAGES else "/"
            if self.local(request):
                return RedirectResponse(back, status_code=303)
            if self._key is None:
                return login_page(NO_KEY, back, 403, form=False)
            return login_page("", back, 200)

        @app.post("/login", include_in_schema=False)
        async def login(request: Request) -> Response:
            form = urllib.parse.parse_qs((await _small_body(request)).decode("utf-8", "replace"))
            back = form.get("next", ["/"])[0]
            back = back if back in PAGES else "/"
            if self._key is None:
                return login_page(NO_KEY, back, 403, form=False)
            if not self.check_key(form.get("key", [""])[0].strip()):
                return login_page("That is not the admin key.", back, 401)
            answer = RedirectResponse(back, status_code=303)
            answer.set_cookie(
                COOKIE, self.new_session(), max_age=SESSION_S, path="/", httponly=True, samesite="strict",
                secure=request.url.scheme == "https",
            )  # fmt: skip
            return answer

        @app.post("/logout", include_in_schema=False)
        async def logout() -> Response:
            answer = RedirectResponse("/login", status_code=303)
            answer.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
            return answer


async def _small_body(request: Request) -> bytes:
    """A login form is a few dozen bytes: anything past MAX_FORM_BYTES is not read."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return b""
    return body


async def _to_login(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, LoginRequired)
    back = exc.back_to if exc.back_to in PAGES else "/"
    return RedirectResponse("/login?" + urllib.parse.urlencode({"next": back}), status_code=303)
