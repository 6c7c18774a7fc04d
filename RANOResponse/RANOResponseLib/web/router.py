"""The front door of ``rano-response review serve``: token check, one station process per browser
session, a reverse proxy to it, and the shared prediction service.

Why a process per session: a trame server holds one scene and one state, so two browsers on one
process would see each other's clicks. Here each browser session (a random cookie set when the
page is first opened with the token) gets its own station (:mod:`.station`), listening on
127.0.0.1 only, with its own scene, case and slice position. Verdicts of all stations go to the
one SQLite review store, which is safe for several processes.

Requests reach a station only through this router: a request without a valid session cookie
must carry the token (``?token=`` or ``Authorization: Bearer``) when one is set, else it is
refused with 403. A token is required whenever the server listens beyond loopback. The
stations call the router's ``/internal/`` endpoints (predict, worklist status) with a secret of
their own; the page only ever names case ids of the worklist, never paths.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from aiohttp import ClientSession, ClientTimeout, WSMsgType, web

from RANOResponseLib.core.errors import RANOInputError
from RANOResponseLib.review.store import Case, ReviewStore, load_worklist
from RANOResponseLib.web.predictions import PredictionService, worklist_status

COOKIE = "rano_review_session"
INTERNAL_HEADER = "X-RANO-Internal"
SECRET_ENV = "RANO_REVIEW_INTERNAL_SECRET"
_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "upgrade", "content-length", "content-encoding",
                "host", "te", "trailer", "proxy-authorization", "proxy-authenticate"}


def is_loopback(host: str) -> bool:
    """True for 127.0.0.1, ::1 and localhost."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Station:
    """One browser session's station process."""

    process: subprocess.Popen
    port: int
    last_seen: float = field(default_factory=time.monotonic)
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Router:
    """The aiohttp application behind ``review serve``.

    Args:
        db, worklist: the review store and its worklist (CSV or LUMIERE folder).
        cases: the worklist's cases (already registered in ``db``).
        service: the prediction service shared by all sessions.
        token: the secret a new session must present (None: none needed; only allowed on loopback).
        max_sessions: stations at most at once (each holds a scene: ~0.7 GB).
        idle_s: a station without requests for this long is stopped.
    """

    def __init__(self, db: Path, worklist: Path, cases: Sequence[Case], service: PredictionService,
                 token: str | None, port: int, max_sessions: int = 16, idle_s: float = 4 * 3600.0) -> None:
        self.db, self.worklist, self.cases, self.service = db, worklist, list(cases), service
        self.token, self.port = token, port
        self.max_sessions, self.idle_s = max_sessions, idle_s
        self.secret = secrets.token_urlsafe(32)
        self.stations: dict[str, Station] = {}
        self._client: ClientSession | None = None

    # -- application
    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/internal/status", self.internal_status)
        app.router.add_route("*", "/internal/predict/{case_id}", self.internal_predict)
        app.router.add_route("*", "/{tail:.*}", self.front)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        self._client = ClientSession(timeout=ClientTimeout(total=None, sock_connect=5), auto_decompress=False)
        app["reaper"] = asyncio.create_task(self._reap())

    async def _cleanup(self, app: web.Application) -> None:
        app["reaper"].cancel()
        for sid in list(self.stations):
            self._stop(sid)
        if self._client is not None:
            await self._client.close()
        self.service.shutdown()

    def _stop(self, sid: str) -> None:
        station = self.stations.pop(sid, None)
        if station is not None and station.process.poll() is None:
            station.process.terminate()
            try:
                station.process.wait(10)
            except subprocess.TimeoutExpired:
                station.process.kill()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(60)
            now = time.monotonic()
            for sid, st in list(self.stations.items()):
                if st.process.poll() is not None or now - st.last_seen > self.idle_s:
                    self._stop(sid)

    # -- internal endpoints (stations only)
    def _internal_ok(self, request: web.Request) -> bool:
        remote = request.remote or ""
        given = request.headers.get(INTERNAL_HEADER, "")
        return is_loopback(remote) and hmac.compare_digest(given, self.secret)

    async def internal_status(self, request: web.Request) -> web.Response:
        if not self._internal_ok(request):
            raise web.HTTPForbidden(text="forbidden")

        def rows() -> list[dict]:
            with ReviewStore(self.db) as store:
                return worklist_status(store, self.service)

        return web.json_response(await asyncio.to_thread(rows))

    async def internal_predict(self, request: web.Request) -> web.Response:
        if not self._internal_ok(request):
            raise web.HTTPForbidden(text="forbidden")
        case_id = request.match_info["case_id"]
        try:
            if request.method == "POST":
                progress = self.service.request(case_id)
            else:
                progress = self.service.progress(case_id)
        except RANOInputError as e:
            raise web.HTTPNotFound(text=str(e)) from None
        return web.json_response({**progress.as_dict(), "folder": str(self.service.folder(case_id))})

    # -- the front door
    def _token_ok(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        given = request.query.get("token", "")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[len("Bearer "):]
        return bool(given) and hmac.compare_digest(given.encode(), self.token.encode())

    async def front(self, request: web.Request) -> web.StreamResponse:
        sid = request.cookies.get(COOKIE, "")
        station = self.stations.get(sid) if sid else None
        if station is None:
            if not self._token_ok(request):
                raise web.HTTPForbidden(text="403: this review station needs its token (open the address "
                                             "printed by `rano-response review serve`, with ?token=...)\n")
            if request.method != "GET" or request.headers.get("Upgrade", "").lower() == "websocket":
                raise web.HTTPForbidden(text="403: no review session; open the page first\n")
            if len(self.stations) >= self.max_sessions:
                raise web.HTTPServiceUnavailable(text=f"503: {self.max_sessions} review sessions are open; "
                                                      "try again later\n")
            sid = secrets.token_urlsafe(32)
            self.stations[sid] = self._start_station()
            response = web.HTTPFound(request.rel_url.path or "/")
            response.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", path="/")
            raise response
        station.last_seen = time.monotonic()
        await self._wait_ready(sid, station)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await self._proxy_ws(request, station)
        return await self._proxy_http(request, station)

    def _start_station(self) -> Station:
        port = free_port()
        cmd = [sys.executable, "-m", "RANOResponseLib.web.station", "--db", str(self.db),
               "--worklist", str(self.worklist), "--port", str(port), "--router", f"http://127.0.0.1:{self.port}"]
        env = {**os.environ, SECRET_ENV: self.secret}
        return Station(subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL), port)

    async def _wait_ready(self, sid: str, station: Station, timeout_s: float = 180.0) -> None:
        if station.ready.is_set():
            return
        deadline = time.monotonic() + timeout_s
        assert self._client is not None
        while time.monotonic() < deadline:
            if station.process.poll() is not None:
                self.stations.pop(sid, None)
                raise web.HTTPInternalServerError(text="the review station did not start; see the server log\n")
            try:
                async with self._client.get(f"http://127.0.0.1:{station.port}/", timeout=ClientTimeout(total=2)) as r:
                    if r.status == 200:
                        station.ready.set()
                        return
            except (OSError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.3)
        raise web.HTTPGatewayTimeout(text="the review station is still starting; reload the page\n")

    async def _proxy_http(self, request: web.Request, station: Station) -> web.StreamResponse:
        assert self._client is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        body = await request.read()
        async with self._client.request(request.method, f"http://127.0.0.1:{station.port}{request.rel_url}",
                                        headers=headers, data=body or None, allow_redirects=False) as upstream:
            data = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_HEADERS}
            if upstream.headers.get("Content-Encoding"):
                out["Content-Encoding"] = upstream.headers["Content-Encoding"]
            return web.Response(status=upstream.status, body=data, headers=out)

    async def _proxy_ws(self, request: web.Request, station: Station) -> web.StreamResponse:
        assert self._client is not None
        client_ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
        await client_ws.prepare(request)
        async with self._client.ws_connect(f"ws://127.0.0.1:{station.port}{request.rel_url}",
                                           max_msg_size=0) as station_ws:
            async def pump(src, dst) -> None:
                async for msg in src:
                    station.last_seen = time.monotonic()
                    if msg.type == WSMsgType.TEXT:
                        await dst.send_str(msg.data)
                    elif msg.type == WSMsgType.BINARY:
                        await dst.send_bytes(msg.data)
                    else:
                        break
                await dst.close()

            tasks = [asyncio.create_task(pump(client_ws, station_ws)), asyncio.create_task(pump(station_ws, client_ws))]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in tasks:
                t.cancel()
        return client_ws


def serve(db: Path | str, worklist: Path | str, host: str = "127.0.0.1", port: int = 8090,
          token: str | None = None, outputs: Path | str | None = None, bundle: Path | str | None = None,
          device: str = "auto", max_sessions: int = 16) -> int:
    """``rano-response review serve``: register the worklist, start the router, serve until interrupted.

    A token is generated (and printed) when the server listens beyond loopback and none is given.
    """
    db, worklist = Path(db).absolute(), Path(worklist).absolute()
    cases = load_worklist(worklist)
    with ReviewStore(db) as store:
        store.add_cases(cases)
    if token is None and not is_loopback(host):
        token = secrets.token_urlsafe(24)
    if token is not None and len(token) < 12:
        raise RANOInputError("--token: use at least 12 characters (or leave it out to get a generated one)")
    port = port or free_port(host)
    outputs = Path(outputs).absolute() if outputs else db.with_name(db.stem + "-predictions")
    service = PredictionService(cases, outputs, bundle, device)
    router = Router(db, worklist, cases, service, token, port, max_sessions)
    shown = "localhost" if host in ("127.0.0.1", "::1") else host
    address = f"http://{shown}:{port}/" + (f"?token={token}" if token else "")
    print(f"review station for {len(cases)} cases ({worklist}); verdicts in {db}", flush=True)
    print(f"open: {address}", flush=True)
    web.run_app(router.app(), host=host, port=port, print=None, handle_signals=True)
    return 0
