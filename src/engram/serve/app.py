"""The HTTP API: OpenAI-style completions per tenant, admin endpoints, health and metrics.

Endpoints (keys as ``Authorization: Bearer <key>``):

- ``POST /v1/completions`` (tenant key): OpenAI's completion fields ``model``, ``prompt`` (a string),
  ``max_tokens``, ``temperature``, ``top_p``, ``stream``, ``stop``, ``seed``; any other field is refused (422).
  ``stream: true`` answers with server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``).
- ``GET /v1/models`` (tenant key): the one model id of this tenant, ``<model name>:<tenant>``.
- ``GET /health`` (no key): 200 while the engine's worker runs, else 503.
- ``GET /metrics`` (admin key): Prometheus text. Admin only, because its series name the tenants and their
  traffic, which one tenant should not learn about another.
- ``GET /admin/tenants``, ``POST /admin/tenants/{name}/patch`` (``{"path": ...}``, a file on the server's disk),
  ``DELETE /admin/tenants/{name}/patch`` (admin key): changes apply to the running server only.

A missing or unknown key gets 401; a valid key on the wrong side (a tenant key on an admin endpoint, the admin
key on a tenant endpoint) 403. Errors have OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from engram.serve.engine import Engine, EngineBusy, EngineClosed, GenerationEvent, Job
from engram.serve.metrics import Metrics
from engram.serve.tenants import Tenant, TenantRegistry


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


class CompletionBody(BaseModel):
    """The fields of ``POST /v1/completions`` this server understands (others are refused)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None


class PatchBody(BaseModel):
    """``POST /admin/tenants/{name}/patch``: a patch file on the server's disk."""

    model_config = ConfigDict(extra="forbid", strict=True)

    path: str


BodyModel = TypeVar("BodyModel", bound=BaseModel)


def _parse_body(model: type[BodyModel], raw: bytes) -> BodyModel:
    """The JSON ``raw`` as ``model``; an :class:`APIError` 422 naming every problem (and OpenAI's ``param``: the
    first bad field) otherwise. Bodies are parsed here, after the key was checked, so that a caller without a
    valid key learns nothing about the API but 401."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as err:
        # known fields' errors first, whatever order this pydantic version reports them in
        errors = sorted(err.errors(), key=lambda error: error["type"] == "extra_forbidden")
    parts = []
    for error in errors:
        where = ".".join(str(part) for part in error["loc"])
        if error["type"] == "json_invalid":
            parts.append(f"invalid JSON body: {error['msg'].removeprefix('Invalid JSON: ')}")
        elif not where:
            parts.append("the body must be a JSON object")
        elif error["type"] == "extra_forbidden":
            parts.append(f"unknown field {where!r}: this server does not support it")
        else:
            parts.append(f"{where}: {error['msg']}")
    params = [str(error["loc"][0]) for error in errors if error["loc"]]
    raise APIError(422, "; ".join(parts), param=params[0] if params else None)


def _choice(text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}


def _usage(event: GenerationEvent) -> dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def _tenant_view(tenant: Tenant) -> dict[str, Any]:
    return {"name": tenant.name, "patch": str(tenant.patch) if tenant.patch is not None else None,
            "overlay_rows": tenant.overlay.num_rows if tenant.overlay is not None else 0}


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body; 413 as soon as it passes ``limit`` bytes (before it is all in memory or tokenised)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body larger than this server's limit of {limit} bytes",
                           code="body_too_large")
    return bytes(body)


def create_app(engine: Engine, tenants: TenantRegistry, max_body_bytes: int = 8 << 20) -> FastAPI:
    """The FastAPI app serving ``engine`` to ``tenants``; the caller starts and closes the engine.

    ``max_body_bytes``: larger request bodies get 413 (the default is far past any prompt that fits a context).

    Example:
        >>> with Engine.from_checkpoint("ckpt") as engine:  # doctest: +SKIP
        ...     app = create_app(engine, TenantRegistry.from_file("tenants.toml", engine.load_overlay))
        ...     uvicorn.run(app, host="127.0.0.1", port=8000)
    """
    app = FastAPI(title="Engram server", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = engine.metrics
    started = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return APIError(err.status_code, str(err.detail), "not_found_error" if err.status_code == 404
                        else "invalid_request_error").response()

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.inc("engram_requests_total", endpoint=getattr(route, "path", "unmatched"),
                    tenant=getattr(request.state, "tenant", ""), status=str(response.status_code))
        return response

    def bearer_key(request: Request) -> str:
        header = request.headers.get("authorization")
        if not header:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           "authentication_error", code="missing_api_key")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "the Authorization header must be 'Bearer <key>'", "authentication_error",
                           code="invalid_api_key")
        return key.strip()

    def tenant_key(request: Request, key: str = Depends(bearer_key)) -> Tenant:
        tenant = tenants.identify(key)
        if tenant is None:
            if tenants.is_admin(key):
                raise APIError(403, "the admin key cannot call tenant endpoints: use a tenant's key",
                               "permission_error")
            raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")
        request.state.tenant = tenant.name
        return tenant

    def admin_key(request: Request, key: str = Depends(bearer_key)) -> None:
        if tenants.is_admin(key):
            request.state.tenant = "admin"
            return
        tenant = tenants.identify(key)
        if tenant is not None:
            request.state.tenant = tenant.name  # counted: a tenant probing admin endpoints shows in the metrics
            raise APIError(403, "this endpoint needs the admin key", "permission_error")
        raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")

    def model_id(tenant: Tenant) -> str:
        return f"{engine.model_name}:{tenant.name}"

    def find_tenant(name: str) -> Tenant:
        try:
            return tenants.get(name)
        except KeyError as err:
            raise APIError(404, err.args[0], "not_found_error", param="name") from None

    @app.get("/health")
    def health() -> JSONResponse:
        alive = engine.alive
        return JSONResponse({"status": "ok" if alive else "unavailable", "model": engine.model_name,
                             "queue_depth": engine.queue_depth}, status_code=200 if alive else 503)

    @app.get("/metrics", dependencies=[Depends(admin_key)])
    def metrics_text() -> PlainTextResponse:
        metrics.set("engram_queue_depth", engine.queue_depth)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    def models(tenant: Tenant = Depends(tenant_key)) -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_id(tenant), "object": "model", "created": started,
                                            "owned_by": tenant.name}]}

    @app.post("/v1/completions")
    async def completions(request: Request, tenant: Tenant = Depends(tenant_key)) -> Any:
        arrived = time.perf_counter()
        body = _parse_body(CompletionBody, await _read_body(request, max_body_bytes))
        name = model_id(tenant)
        if body.model is not None and body.model != name:
            raise APIError(404, f"model {body.model!r} does not exist for this key; GET /v1/models lists {name!r}",
                           param="model", code="model_not_found")
        try:  # tokenising takes a while: off the event loop (prepare bounds the prompt's characters first)
            generation = await run_in_threadpool(
                engine.prepare, body.prompt, body.max_tokens, body.temperature, body.top_p, body.stop, body.seed,
                overlay=tenant.overlay, tenant=tenant.name)
        except ValueError as err:
            raise APIError(400, str(err), code="invalid_value") from None
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent] = asyncio.Queue()
        try:
            job = engine.submit(generation, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        except EngineBusy as err:
            raise APIError(429, str(err), "rate_limit_error") from None
        except EngineClosed as err:
            raise APIError(503, str(err), "server_error") from None
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": name}
        if body.stream:
            return StreamingResponse(_sse(job, events, head, arrived, metrics), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        pieces = []
        try:
            while (event := await events.get()).finish_reason is None:
                pieces.append(event.text)
        finally:
            job.cancel()  # a no-op once finished; stops the row if this client went away
        metrics.observe("engram_request_seconds", time.perf_counter() - arrived)
        if event.finish_reason == "error":
            raise APIError(500, f"generation failed: {event.error}", "server_error")
        pieces.append(event.text)
        return {**head, "choices": [_choice("".join(pieces), event.finish_reason)], "usage": _usage(event)}

    @app.get("/admin/tenants", dependencies=[Depends(admin_key)])
    def list_tenants() -> dict[str, Any]:
        return {"tenants": [_tenant_view(tenant) for tenant in tenants.tenants()]}

    @app.post("/admin/tenants/{name}/patch", dependencies=[Depends(admin_key)])
    async def load_patch(name: str, request: Request) -> dict[str, Any]:
        body = _parse_body(PatchBody, await _read_body(request, max_body_bytes))
        find_tenant(name)
        try:  # reading and checking a patch takes a while: off the event loop
            return _tenant_view(await run_in_threadpool(tenants.set_patch, name, body.path))
        except (ValueError, OSError) as err:
            raise APIError(400, f"patch {body.path} refused: {err}", param="path", code="patch_refused") from None

    @app.delete("/admin/tenants/{name}/patch", dependencies=[Depends(admin_key)])
    def unload_patch(name: str) -> dict[str, Any]:
        find_tenant(name)
        return _tenant_view(tenants.clear_patch(name))

    return app


async def _sse(job: Job, events: asyncio.Queue[GenerationEvent], head: dict[str, Any], arrived: float,
               metrics: Metrics) -> AsyncIterator[str]:
    """Server-sent events of one completion: a chunk (``head`` + ``choices``) per piece of text, the last with
    ``finish_reason`` and ``usage`` (or an ``error`` object instead), then ``data: [DONE]``."""
    try:
        while True:
            event = await events.get()
            if event.finish_reason == "error":
                error = {"message": f"generation failed: {event.error}", "type": "server_error", "param": None,
                         "code": None}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            if event.text or event.finish_reason is not None:
                chunk = {**head, "choices": [_choice(event.text, event.finish_reason)]}
                if event.finish_reason is not None:
                    chunk["usage"] = _usage(event)
                yield f"data: {json.dumps(chunk)}\n\n"
            if event.finish_reason is not None:
                break
        yield "data: [DONE]\n\n"
        metrics.observe("engram_request_seconds", time.perf_counter() - arrived)
    finally:
        job.cancel()  # a no-op once finished; stops the row when the client disconnected mid-stream
