"""The HTML the control plane serves to a browser: the savings page at `/` and the login form, each one packaged
self-contained file (inline CSS and script, nothing fetched from elsewhere) with headers that keep it so."""

from __future__ import annotations

import functools
import html
from importlib import resources

from starlette.responses import HTMLResponse

# The page may load nothing from elsewhere, be framed by no one, and tell no one where it was opened from.
HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
}


@functools.cache
def _static(name: str) -> str:
    return resources.files("proxy").joinpath("static", name).read_text(encoding="utf-8")


def savings_page() -> HTMLResponse:
    """The savings page; its script reads /flex/savings and draws the figures."""
    return HTMLResponse(_static("savings.html"), headers=HEADERS)


def login_page(message: str, back_to: str, status: int, *, form: bool = True) -> HTMLResponse:
    """The login form (or, with `form` false, only `message`: there is no key to log in with)."""
    text = (
        _static("login.html")
        .replace("{{message}}", html.escape(message))
        .replace("{{next}}", html.escape(back_to, quote=True))
        .replace("{{form_hidden}}", "" if form else "hidden")
    )
    return HTMLResponse(text, status_code=status, headers=HEADERS)
