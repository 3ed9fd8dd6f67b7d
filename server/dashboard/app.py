"""The dashboard's web app (Starlette): three pages, their JSON, the vendored scripts.

Pages are static HTML shells (``static/*.html``) whose script polls the JSON API twice a second,
with ``If-None-Match`` (a 304 when nothing changed), so a round's files show on the page within
about half a second of being written, without reload. Every route is GET (read-only). A run is
named by its id from :func:`server.dashboard.runs.discover`; a figure by a file name checked
against a pattern and resolved inside the run's ``report/`` folder. A request whose path holds
``..`` is refused outright, and an unknown id or name is a 404, never a file read.

With a token (any non-loopback bind), every request must carry it: ``?token=`` once (the page
then keeps it in an HttpOnly, SameSite=Strict cookie) or ``Authorization: Bearer``. It is compared
with :func:`hmac.compare_digest`. Bound to loopback without a token, only loopback ``Host``
headers are served (DNS rebinding cannot reach it from a web page).
"""

from __future__ import annotations

import hmac
import json
import logging
from importlib import resources
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from server.dashboard.runs import RunReader, finite
from server.dashboard.serve import is_loopback

log = logging.getLogger(__name__)

TOKEN_COOKIE = "biofp_dashboard_token"
STATIC = resources.files("server.dashboard") / "static"
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
_SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; "
    "style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",
}


class Guard:
    """ASGI middleware: refuses ``..`` paths, requests without the token (when there is one) and,
    when `loopback_only`, a ``Host`` header that is not a loopback name."""

    def __init__(self, app: ASGIApp, token: str | None, loopback_only: bool = False) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = scope.get("raw_path") or scope["path"].encode()
        if b".." in raw.lower().replace(b"%2e", b".") or ".." in scope["path"]:
            await _plain(400, "bad path")(scope, receive, send)
            return
        request = Request(scope)
        if self.loopback_only and not is_loopback(_host_name(request.headers.get("host", ""))):
            await _plain(400, "invalid host header")(scope, receive, send)
            return
        set_cookie = False
        if self.token is not None:
            given = _given_token(request)
            if given is None or not hmac.compare_digest(given.encode(), self.token):
                await _plain(401, "token required: open the URL printed at start")(
                    scope, receive, send
                )
                return
            set_cookie = request.cookies.get(TOKEN_COOKIE) is None

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for key, value in _SECURITY_HEADERS.items():
                    if key.encode() not in names:
                        headers.append((key.encode(), value.encode()))
                if set_cookie and self.token is not None:
                    cookie = (
                        f"{TOKEN_COOKIE}={self.token.decode()}; HttpOnly; SameSite=Strict; Path=/"
                    )
                    headers.append((b"set-cookie", cookie.encode()))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _host_name(host: str) -> str:
    """The name or address of a ``Host`` header, without its port (IPv6 in brackets)."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _given_token(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)


def _plain(status: int, text: str) -> Response:
    return Response(text + "\n", status_code=status, media_type="text/plain")


def _static_file(name: str) -> Response:
    resource = STATIC.joinpath(*name.split("/"))
    if not resource.is_file():
        return _plain(404, "not found")
    media = _STATIC_TYPES.get(Path(name).suffix, "application/octet-stream")
    return Response(resource.read_bytes(), media_type=media)


def _json_etagged(request: Request, etag: str, build: Any) -> Response:
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"etag": etag})
    try:
        body = json.dumps(build(), allow_nan=False, separators=(",", ":"))
    except Exception:  # files changing under us in a way not foreseen: never a 500 page
        log.exception("dashboard: cannot read %s", request.url.path)
        return JSONResponse({"status": "updating"}, status_code=503, headers={"retry-after": "1"})
    return Response(body, media_type="application/json", headers={"etag": etag})


def render_markdown(text: str, figure_base: str) -> str:
    """report.md as HTML: raw HTML in it is escaped; figure links point at `figure_base`."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    default_image = md.renderer.rules.get("image")

    def image(renderer: Any, tokens: Any, idx: int, options: Any, env: Any) -> str:
        token = tokens[idx]
        src = str(token.attrGet("src") or "")
        name = src.rsplit("/", 1)[-1]
        token.attrSet("src", f"{figure_base}/{name}")
        return default_image(tokens, idx, options, env) if default_image else ""

    md.add_render_rule("image", image)
    return md.render(text)


def create_app(roots: list[Path], *, token: str | None = None, loopback: bool = True) -> Starlette:
    """The dashboard over the run directories under `roots`.

    Parameters
    ----------
    roots : list of Path
        Run directories, or folders holding run directories.
    token : str, optional
        Required on every request when given (see the module docstring).
    loopback : bool
        Bound to a loopback address: serve loopback ``Host`` headers only (when no token).
    """
    reader = RunReader(roots)

    def page(name: str) -> Any:
        async def endpoint(request: Request) -> Response:
            run_id = request.path_params.get("run_id")
            if run_id is not None and reader.find(run_id) is None:
                return _plain(404, "no such run")
            return _static_file(f"{name}.html")

        return endpoint

    async def api_runs(request: Request) -> Response:
        def build() -> dict[str, Any]:
            return {"runs": finite([reader.summary(r) for r in reader.runs()])}

        return _json_etagged(request, reader.etag(), build)

    async def api_run(request: Request) -> Response:
        run = reader.find(request.path_params["run_id"])
        if run is None:
            return JSONResponse({"error": "no such run"}, status_code=404)
        return _json_etagged(request, reader.etag(run), lambda: reader.detail(run))

    async def api_sites(request: Request) -> Response:
        return _json_etagged(request, reader.etag(), lambda: {"sites": reader.sites()})

    async def report(request: Request) -> Response:
        run = reader.find(request.path_params["run_id"])
        text = reader.report_markdown(run) if run is not None else None
        if text is None:
            return _plain(404, "no report")
        base = f"/runs/{run.id}/figures"  # type: ignore[union-attr]
        return HTMLResponse(render_markdown(text, base))

    async def figure(request: Request) -> Response:
        run = reader.find(request.path_params["run_id"])
        path = reader.figure_path(run, request.path_params["name"]) if run else None
        if path is None:
            return _plain(404, "no such figure")
        return FileResponse(path, media_type="image/png")

    async def static(request: Request) -> Response:
        return _static_file(request.path_params["name"])

    routes = [
        Route("/", page("runs")),
        Route("/sites", page("sites")),
        Route("/runs/{run_id}", page("run")),
        Route("/api/runs", api_runs),
        Route("/api/sites", api_sites),
        Route("/api/runs/{run_id}", api_run),
        Route("/runs/{run_id}/report", report),
        Route("/runs/{run_id}/figures/{name}", figure),
        Route("/static/{name:path}", static),
    ]
    guard = Middleware(Guard, token=token, loopback_only=loopback and token is None)
    middleware = [guard, Middleware(GZipMiddleware, minimum_size=1024)]
    return Starlette(routes=routes, middleware=middleware)
