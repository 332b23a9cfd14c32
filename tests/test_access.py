"""Who may use the control plane: callers on loopback without a key (the real server), others with the admin key as a
bearer header or the login cookie (the real app over httpx's ASGI transport, with a non-loopback peer address in the
scope: a second loopback listener would still be loopback)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from conftest import ProxyServer

from proxy.access import COOKIE, SESSION_S, on_loopback
from proxy.app import FlexProxy, create_app
from proxy.config import Settings
from proxy.sim import Simulator

ADMIN = "adm-0123456789abcdef"
REMOTE = ("203.0.113.7", 40_000)  # TEST-NET-3: never a real peer, only the scope's word
GUARDED = (
    "/flex/savings", "/flex/status", "/flex/prices", "/flex/policies", "/openapi.json", "/docs/assets/swagger-ui.css",
)  # fmt: skip
PAGES = ("/", "/docs")
OPEN = ("/healthz", "/readyz", "/metrics")


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def app_for(clock: Clock | None = None, **settings: Any) -> FlexProxy:
    values: dict[str, Any] = {"upstream_base_url": "http://127.0.0.1:9", "host": "0.0.0.0"}
    values.update(settings)
    return create_app(Settings(**values), wall=clock or Clock())


def client_of(app: FlexProxy, peer: tuple[str, int] = REMOTE) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=peer)
    return httpx.AsyncClient(transport=transport, base_url="http://proxy.example", follow_redirects=False)


@pytest.fixture
async def remote() -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(app: FlexProxy, peer: tuple[str, int] = REMOTE) -> httpx.AsyncClient:
        clients.append(client_of(app, peer))
        return clients[-1]

    yield make
    for client in clients:
        await client.aclose()


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return str(body["error"]["code"])


async def login(client: httpx.AsyncClient, key: str, back: str = "/") -> httpx.Response:
    return await client.post(
        "/login", content=f"key={key}&next={back}", headers={"content-type": "application/x-www-form-urlencoded"}
    )


def session_of(response: httpx.Response) -> str:
    cookie = response.headers["set-cookie"]
    name, _, rest = cookie.partition("=")
    assert name == COOKIE
    return rest.split(";", 1)[0]


def test_loopback_callers_need_no_key_on_the_real_server(make_proxy: Callable[..., ProxyServer], sim: Simulator) -> None:  # noqa: E501
    # Settings as in the image (every interface, a key set); the caller's peer address is 127.0.0.1.
    proxy = make_proxy(host="0.0.0.0", admin_key=ADMIN)
    for path in (*GUARDED, *PAGES, *OPEN):
        response = httpx.get(proxy.url + path)
        assert response.status_code == 200, path
    assert httpx.get(proxy.url + "/login").headers["location"] == "/"  # nothing to log in to


async def test_a_remote_caller_without_a_key_set_gets_the_403_that_says_how_to_open_it(remote) -> None:  # type: ignore[no-untyped-def]
    client = remote(app_for())
    for path in GUARDED:
        closed = await client.get(path, headers={"authorization": "Bearer anything"})
        assert closed.status_code == 403 and error_code(closed) == "admin_key_not_set", path
        message = closed.json()["error"]["message"]
        assert "FLEX_PROXY_ADMIN_KEY" in message and "port-forward" in message
    for path in PAGES:
        sent = await client.get(path)
        assert sent.status_code == 303 and sent.headers["location"].startswith("/login?next=%2F"), path
    page = await client.get("/login")
    assert page.status_code == 403 and "FLEX_PROXY_ADMIN_KEY is not set" in page.text
    assert (await login(client, "anything")).status_code == 403
    for path in OPEN:
        assert (await client.get(path)).status_code in (200, 503), path  # /readyz: 503, the lifespan did not run


async def test_a_remote_caller_needs_the_admin_key_as_a_bearer(remote) -> None:  # type: ignore[no-untyped-def]
    client = remote(app_for(admin_key=ADMIN))
    for path in GUARDED:
        for headers in ({}, {"authorization": "Bearer adm-wrong"}, {"authorization": ADMIN}):
            refused = await client.get(path, headers=headers)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", (path, headers)
            assert error_code(refused) == "invalid_api_key" and ADMIN not in refused.text
        opened = await client.get(path, headers={"authorization": f"Bearer {ADMIN}"})
        assert opened.status_code == 200, path
    for path in PAGES:
        assert (await client.get(path)).status_code == 303, path
        assert (await client.get(path, headers={"authorization": f"Bearer {ADMIN}"})).status_code == 200, path
    assert (await client.get("/metrics")).status_code == 200  # open to scrapers by default


async def test_a_browser_logs_in_with_the_key_and_gets_a_cookie_that_is_not_the_key(remote) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    client = remote(app_for(clock, admin_key=ADMIN))
    form = await client.get("/login?next=/docs")
    assert form.status_code == 200 and 'name="key"' in form.text and 'value="/docs"' in form.text
    assert "frame-ancestors 'none'" in form.headers["content-security-policy"]
    wrong = await login(client, "adm-wrong")
    assert wrong.status_code == 401 and "not the admin key" in wrong.text and "set-cookie" not in wrong.headers
    good = await login(client, ADMIN, "/docs")
    assert good.status_code == 303 and good.headers["location"] == "/docs"
    cookie = good.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert f"max-age={SESSION_S}" in cookie and "secure" not in cookie  # plain http here: a Secure cookie never returns
    session = session_of(good)
    assert ADMIN not in session and ADMIN not in good.text
    with_cookie = {"cookie": f"{COOKIE}={session}"}
    for path in (*GUARDED, *PAGES):
        assert (await client.get(path, headers=with_cookie)).status_code == 200, path
    expires, _, signature = session.partition(".")
    for forged in (f"{expires}.{'0' * 64}", f"{int(expires) + 1}.{signature}", signature, "", ADMIN):
        refused = await client.get("/flex/savings", headers={"cookie": f"{COOKIE}={forged}"})
        assert refused.status_code == 401, forged
        assert (await client.get("/", headers={"cookie": f"{COOKIE}={forged}"})).status_code == 303
    clock.now += SESSION_S  # the session is over: the key is asked for again
    assert (await client.get("/flex/savings", headers=with_cookie)).status_code == 401
    out = await client.post("/logout", headers=with_cookie)
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert f'{COOKIE}=""' in out.headers["set-cookie"] and "max-age=0" in out.headers["set-cookie"].lower()


async def test_login_sends_back_only_to_its_own_pages_and_reads_a_small_form(remote) -> None:  # type: ignore[no-untyped-def]
    client = remote(app_for(admin_key=ADMIN))
    for back in ("https://evil.example/", "//evil.example", "/flex/savings%0d%0aset-cookie:x", "/docs"):
        answer = await login(client, ADMIN, back)
        assert answer.headers["location"] == ("/docs" if back == "/docs" else "/"), back
    page = await client.get("/login", params={"next": '"><script>alert(1)</script>'})
    assert "<script>alert" not in page.text and 'value="/"' in page.text
    padded = f"key={ADMIN}&pad=" + "x" * 5000  # past the form's bound: not read at all
    too_big = await client.post("/login", content=padded, headers={"content-type": "application/x-www-form-urlencoded"})
    assert too_big.status_code == 401
    at_bound = f"key={ADMIN}&pad=" + "x" * (4096 - len(f"key={ADMIN}&pad="))
    assert len(at_bound) == 4096
    fits = await client.post("/login", content=at_bound, headers={"content-type": "application/x-www-form-urlencoded"})
    assert fits.status_code == 303


async def test_metrics_can_be_closed_to_all_but_the_admin(remote) -> None:  # type: ignore[no-untyped-def]
    app = app_for(admin_key=ADMIN, metrics_open=False)
    client = remote(app)
    assert (await client.get("/metrics")).status_code == 401
    opened = await client.get("/metrics", headers={"authorization": f"Bearer {ADMIN}"})
    assert opened.status_code == 200 and "flexproxy_event_loop_lag_seconds" in opened.text
    schema = (await client.get("/openapi.json", headers={"authorization": f"Bearer {ADMIN}"})).json()
    assert "security" in schema["paths"]["/metrics"]["get"]
    assert (await remote(app, ("127.0.0.1", 5)).get("/metrics")).status_code == 200  # loopback: no key


async def test_a_loopback_peer_relaying_for_someone_else_needs_the_key(remote) -> None:  # type: ignore[no-untyped-def]
    client = remote(app_for(admin_key=ADMIN), ("127.0.0.1", 5))
    assert (await client.get("/flex/status")).status_code == 200
    for header in ("x-forwarded-for", "forwarded", "x-real-ip"):
        relayed = await client.get("/flex/status", headers={header: "198.51.100.1"})
        assert relayed.status_code == 401, header


async def test_loopback_can_be_made_to_need_the_key_too(remote) -> None:  # type: ignore[no-untyped-def]
    client = remote(app_for(admin_key=ADMIN, loopback_admin=False), ("127.0.0.1", 5))
    assert (await client.get("/flex/status")).status_code == 401
    assert (await client.get("/flex/status", headers={"authorization": f"Bearer {ADMIN}"})).status_code == 200


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True), ("127.3.4.5", True), ("::1", True), ("::ffff:127.0.0.1", True),
        ("10.0.0.1", False), ("172.17.0.1", False), ("203.0.113.7", False), ("::ffff:10.0.0.1", False),
        ("fe80::1", False), ("localhost", False), ("", False), (None, False), ("not an address", False),
    ],
)  # fmt: skip
def test_on_loopback(host: str | None, local: bool) -> None:
    assert on_loopback(host) is local


async def test_the_docs_load_only_packaged_assets(remote) -> None:  # type: ignore[no-untyped-def]
    client = remote(create_app(Settings(upstream_base_url="http://127.0.0.1:9")), ("127.0.0.1", 5))
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "https://" not in docs.text and "http://" not in docs.text  # no CDN
    for name, kind in (
        ("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css"), ("favicon-32x32.png", "image/png")
    ):  # fmt: skip
        asset = await client.get("/docs/assets/" + name)
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind), name
        assert f"/docs/assets/{name}" in docs.text and len(asset.content) > 500, name
    for name in ("index.html", "../__init__.py", "swagger-ui.js.map", "%2e%2e%2fswagger-ui.css"):
        assert (await client.get("/docs/assets/" + name)).status_code == 404, name
