"""The ASGI app: A1111's `/sdapi/v1/*` routes over a `Scheduler`, auth, size limits, the page.

`create_app(pipe, ...)` returns a FastAPI app and starts its generation thread; run it with
uvicorn (`sdjax serve`) or any ASGI server. Status codes: 422 for a bad value (the message
names the field), 401 without the `api_auth` credentials, 413 for a body over
`max_body_bytes`, 503 when the queue is full or the server is stopping, 500 for a failure
inside generation (the server keeps serving).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

from sdjax.errors import SdjaxError
from sdjax.serve import a1111
from sdjax.serve.scheduler import QueueFull, Scheduler

PAGE = Path(__file__).resolve().parent / "page.html"


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes (declared or streamed)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _too_large(self.limit, scope, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge()
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await _too_large(self.limit, scope, send)


class _TooLarge(Exception):
    pass


async def _too_large(limit: int, scope, send) -> None:
    await JSONResponse({"error": "PayloadTooLarge", "detail": f"the request body is over {limit} bytes "
                        "(raise the limit with --max-body-mb)"}, status_code=413)(scope, None, send)


def _parse_auth(api_auth: str | None) -> dict[str, str]:
    """'user:pass[,user2:pass2]' -> {user: pass}."""
    users = {}
    for item in (api_auth or "").split(","):
        if item.strip():
            user, sep, password = item.strip().partition(":")
            if not sep or not user:
                raise SdjaxError(f"--api-auth wants user:password[,user2:password2], got {item!r}")
            users[user] = password
    return users


def _authorized(header: str | None, users: dict[str, str]) -> bool:
    if not header or not header.lower().startswith("basic "):
        return False
    try:
        user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    wanted = users.get(user)
    return wanted is not None and secrets.compare_digest(wanted.encode(), password.encode())


def create_app(pipe, *, ctx: a1111.Context | None = None, max_batch: int = 32, batch_wait_ms: float = 50,
               max_queue: int = 64, max_body_bytes: int = 32 << 20, api_auth: str | None = None,
               device_kw: dict | None = None, outdir: Path | None = None, models_dir: Path | None = None,
               load: Callable[[Path], Any] | None = None, scheduler: Scheduler | None = None) -> FastAPI:
    """A FastAPI app serving A1111's API on `pipe`; its Scheduler (`app.state.scheduler`) starts
    with the app and stops (finishing the running batch) at shutdown."""
    users = _parse_auth(api_auth)
    sched = scheduler or Scheduler(pipe, ctx or a1111.Context(), max_batch=max_batch,
                                   batch_wait_s=batch_wait_ms / 1000, max_queue=max_queue, device_kw=device_kw,
                                   outdir=outdir, load=load, models_dir=models_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if sched.thread is None:
            sched.start()
        yield
        await run_in_threadpool(sched.stop, 600)  # the running batch finishes; queued requests get 503

    app = FastAPI(title="sdjax", docs_url="/docs", lifespan=lifespan)
    app.state.scheduler = sched

    @app.middleware("http")
    async def _auth(request: HttpRequest, call_next):
        if users and not _authorized(request.headers.get("authorization"), users):
            return JSONResponse({"error": "Unauthorized", "detail": "Incorrect username or password"},
                                status_code=401, headers={"WWW-Authenticate": "Basic"})
        return await call_next(request)

    @app.exception_handler(SdjaxError)
    async def _bad_value(request, e):
        return JSONResponse(a1111.error_body(e), status_code=422)

    @app.exception_handler(QueueFull)
    async def _full(request, e):
        return JSONResponse(a1111.error_body(e), status_code=503)

    async def _body(request: HttpRequest) -> dict:
        try:
            payload = await request.json()
        except ValueError as e:
            raise SdjaxError(f"the request body is not JSON ({e})") from None
        if not isinstance(payload, dict):
            raise SdjaxError("the request body must be a JSON object")
        return payload

    async def _generate(task: str, request: HttpRequest):
        payload = await _body(request)
        job = await run_in_threadpool(sched.submit, task, payload)
        outcome = await run_in_threadpool(job.future.result)
        if outcome.error is not None:
            status = 422 if isinstance(outcome.error, SdjaxError) else 500
            return JSONResponse(a1111.error_body(outcome.error), status_code=status)
        name, short_hash = sched.model_info()
        return a1111.response(job.payload, outcome.result, job.request, name, short_hash, outcome.interrupted)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: HttpRequest):
        return await _generate("txt2img", request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: HttpRequest):
        return await _generate("img2img", request)

    @app.get("/sdapi/v1/samplers")
    def samplers():
        return a1111.samplers()

    @app.get("/sdapi/v1/schedulers")
    def schedulers():
        return a1111.schedulers()

    @app.get("/sdapi/v1/sd-models")
    def sd_models():
        current = Path(sched.pipe.model_dir)
        items = [a1111.model_item(current, sched.model_info()[1])]
        items += [a1111.model_item(p) for p in a1111.list_models(models_dir) if p.resolve() != current.resolve()]
        return items

    @app.get("/sdapi/v1/loras")
    def loras():
        return a1111.list_loras(sched.ctx.lora_dir)

    @app.get("/sdapi/v1/embeddings")
    def embeddings():
        return {"loaded": {}, "skipped": {}}

    @app.get("/sdapi/v1/scripts")
    def scripts():
        return {"txt2img": [], "img2img": []}

    @app.get("/sdapi/v1/options")
    def get_options():
        name, short_hash = sched.model_info()
        return {"sd_model_checkpoint": a1111.model_item(Path(sched.pipe.model_dir), short_hash)["title"],
                "CLIP_stop_at_last_layers": 1, "samples_format": "png", "sd_checkpoint_hash": short_hash}

    @app.post("/sdapi/v1/options")
    async def set_options(request: HttpRequest):
        payload = await _body(request)
        wanted = payload.get("sd_model_checkpoint")
        if wanted is None:
            return None
        matches = [p for p in a1111.list_models(models_dir) if wanted in (p.name, p.stem, str(p))
                   or a1111.model_item(p)["title"] == wanted.split(" [")[0]]
        if not matches:
            raise SdjaxError(f"sd_model_checkpoint {wanted!r} is not in --models-dir {models_dir} "
                             "(GET /sdapi/v1/sd-models lists them)")
        future = sched.switch_model(matches[0])
        await run_in_threadpool(future.result)
        return None

    @app.get("/sdapi/v1/progress")
    def progress(skip_current_image: bool = False):
        p = sched.progress
        done = p["sampling_step"] / p["sampling_steps"] if p["sampling_steps"] else 0.0
        elapsed = time.monotonic() - p["started"] if p["sampling_steps"] else 0.0
        eta = elapsed / done - elapsed if done > 0 else 0.0
        state = {"skipped": False, "interrupted": sched.interrupt.is_set(), "job": "", "job_count": len(sched.waiting),
                 "job_timestamp": "0", "job_no": 0, "sampling_step": p["sampling_step"],
                 "sampling_steps": p["sampling_steps"]}
        return {"progress": done, "eta_relative": eta, "state": state, "current_image": None, "textinfo": None}

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        if sched.progress["sampling_steps"]:
            sched.interrupt.set()
        return {}

    @app.post("/sdapi/v1/skip")
    def skip():
        return interrupt()

    @app.post("/sdapi/v1/png-info")
    async def png_info(request: HttpRequest):
        return a1111.png_info(await _body(request))

    @app.get("/sdjax/v1/stats")
    def stats():
        return {**sched.stats, "queued": len(sched.waiting)}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text()

    app.add_middleware(BodyLimit, limit=max_body_bytes)
    return app


__all__ = ["create_app"]
