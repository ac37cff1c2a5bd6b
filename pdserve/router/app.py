"""`create_app(backend, config)`: the OpenAI-compatible HTTP gateway, with vLLM's routes and shapes,
so OpenAI/vLLM clients, benchmarks and dashboards work unchanged; behind API keys, the drain gate
and the input limits (middleware, outermost first), with CORS outside them where configured."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import time
from typing import Literal, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdserve.proto.failures import RETRY_AFTER_S
from pdserve.router.admission import Admission
from pdserve.router.auth import APIKeyAuth
from pdserve.router.backend import Backend
from pdserve.router.chat import create_chat_completion, render_chat
from pdserve.router.completions import create_completion
from pdserve.router.config import GatewayConfig
from pdserve.router.drain import Drain, DrainGate
from pdserve.router.errors import APIError, install_error_handlers
from pdserve.router.limits import RequestLimits
from pdserve.router.metrics import Metrics
from pdserve.router.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from pdserve.router.response_store import ResponseStore, StoredResponse, find, item_page, not_stored, open_response_store
from pdserve.router.responses import create_response
from pdserve.router.responses_request import ResponsesRequest
from pdserve.router.serving import Serving, cancel_on_disconnect
from pdserve.router.tools import check_tools

logger = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

PROBE_TIMEOUT_S = 5.0  # /health and /metrics ask the backend; a stuck backend must not hang them
UNAVAILABLE_HEADERS = {"Retry-After": str(RETRY_AFTER_S)}  # every 503, /health's too


def create_app(
    backend: Backend,
    metrics: Metrics | None = None,
    config: GatewayConfig | None = None,
    response_store: ResponseStore | None = None,
) -> FastAPI:
    """Routes: POST /v1/completions, /v1/chat/completions, /v1/responses, /invocations, /tokenize, /detokenize;
    GET/DELETE /v1/responses/{id}, its input_items and cancel; GET /v1/models (and /v1/models/{name}), /health (and /ping),
    /metrics. The caller owns the backend and `response_store` (and closes them; without one, the
    config's in-memory store, none when it says 0) and runs `app.state.drain` on SIGTERM (`deploy/http_server.py`).
    `config.chat_template` replaces the backend tokenizer's."""
    config = config or GatewayConfig()
    if config.chat_template is not None:
        backend.tokenizer.set_chat_template(config.chat_template)
    drain = Drain()
    admission = Admission(config.max_num_queued_reqs, config.max_num_queued_tokens)
    serving = Serving(
        backend,
        metrics or Metrics(backend.model_name),
        config.deadlines,
        admission,
        drain,
        config.model_aliases,
        config.sampling_defaults,
        config.return_tokens_as_token_ids,
    )
    store = response_store if response_store is not None else open_response_store(config)
    app = FastAPI(title="pdserve")
    app.state.serving = serving
    app.state.drain = drain
    install_error_handlers(app)
    app.add_middleware(RequestLimits, max_body_bytes=config.max_request_body_bytes, read_timeout_s=config.request_read_timeout_s)
    app.add_middleware(DrainGate, drain=drain)
    app.add_middleware(APIKeyAuth, api_keys=config.api_keys, protect_metrics=config.protect_metrics)
    app.add_middleware(HTTPMetricsMiddleware, metrics=serving.metrics)  # counts refusals too
    if config.cors is not None:  # outermost: preflights answered before the API key is asked for, 401s readable
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors.allowed_origins,
            allow_methods=config.cors.allowed_methods,
            allow_headers=config.cors.allowed_headers,
            allow_credentials=config.cors.allow_credentials,
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw_request: Request) -> Response:
        return await cancel_on_disconnect(raw_request, create_completion(serving, body, _tenant(raw_request)))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw_request: Request) -> Response:
        return await cancel_on_disconnect(
            raw_request, create_chat_completion(serving, body, config.tool_options, _tenant(raw_request))
        )

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, raw_request: Request) -> Response:
        tenant = _tenant(raw_request)
        return await cancel_on_disconnect(raw_request, create_response(serving, body, config.tool_options, tenant, store))

    async def stored(response_id: str, raw_request: Request) -> StoredResponse:
        if store is None:
            raise not_stored(response_id)
        return await find(store, _tenant(raw_request), response_id)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, raw_request: Request, stream: bool = False) -> JSONResponse:
        if stream:
            raise APIError(400, "only background responses can be streamed again (this server makes none)", "stream")
        return JSONResponse((await stored(response_id, raw_request)).response)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, raw_request: Request) -> JSONResponse:
        await stored(response_id, raw_request)  # a 404 unless this tenant's
        assert store is not None  # else `stored` raised
        await store.delete(_tenant(raw_request), response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

    @app.get("/v1/responses/{response_id}/input_items")
    async def response_input_items(
        response_id: str, raw_request: Request, limit: int = 20, order: Literal["asc", "desc"] = "desc", after: str | None = None
    ) -> JSONResponse:
        return JSONResponse(item_page((await stored(response_id, raw_request)).input_items, limit, order, after))

    @app.post("/v1/responses/{response_id}/cancel")
    async def cancel_response(response_id: str, raw_request: Request) -> Response:
        await stored(response_id, raw_request)
        raise APIError(400, "only background responses can be cancelled (this server makes none)", "response_id")

    @app.post("/invocations")
    async def invocations(raw_request: Request) -> Response:
        """SageMaker's one route, as vLLM serves it: a chat request (`messages`) or a completion
        request (`prompt`), told apart by its fields."""
        body = await _json_body(raw_request)
        if "messages" in body:
            return await chat_completions(_parsed(ChatCompletionRequest, body), raw_request)
        if "prompt" in body:
            return await completions(_parsed(CompletionRequest, body), raw_request)
        raise APIError(400, "/invocations takes a chat request (with `messages`) or a completion request (with `prompt`)")

    def model_card(name: str) -> dict:
        return {
            "id": name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "pdserve",
            "root": config.model_root or backend.model_name,
            "parent": None,
            "max_model_len": backend.max_model_len,
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card(name) for name in serving.model_names]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict:
        """The OpenAI SDKs' `models.retrieve` (a Hub id's "/" included)."""
        serving.check_model(model)
        return model_card(model)

    @app.get("/health")
    @app.get("/ping")  # vLLM's (SageMaker's) name for it, GET or POST
    @app.post("/ping")
    async def health() -> Response:
        if drain.is_draining:
            return Response(status_code=503, headers=UNAVAILABLE_HEADERS)
        try:
            is_healthy = await asyncio.wait_for(backend.is_healthy(), PROBE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a failing probe means unhealthy
            logger.exception("health probe failed")
            is_healthy = False
        return Response(status_code=200) if is_healthy else Response(status_code=503, headers=UNAVAILABLE_HEADERS)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        try:
            serving.metrics.update_stats(await asyncio.wait_for(backend.stats(), PROBE_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - serve the last known values rather than nothing
            logger.exception("backend stats failed; /metrics shows the last known values")
        # Always the text format: prometheus_client's OpenMetrics output (0.26) escapes the colons
        # of vLLM's names (vllm:... -> vllm_...) unless the scraper allows UTF-8 names, which would
        # break the dashboards' queries; Prometheus reads the text format whatever it asks for.
        return Response(serving.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        serving.check_model(body.model)
        token_ids = await _tokenize(serving, body)
        answer = {"count": len(token_ids), "max_model_len": backend.max_model_len, "tokens": token_ids}
        if body.return_token_strs:
            answer["token_strs"] = backend.tokenizer.token_strings(token_ids)
        return JSONResponse(answer)

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        """vLLM's: what a remote client (lm-eval's tokenizer_backend=remote) needs of the tokenizer."""
        info = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **backend.tokenizer.info(),
            "model_max_length": backend.max_model_len,
        }
        return JSONResponse(info)

    @app.get("/version")
    async def version() -> dict:
        return {"version": _version()}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        serving.check_model(body.model)
        vocab_size = backend.tokenizer.vocab_size
        if any(not 0 <= t < vocab_size for t in body.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab_size})", "tokens")
        text = await serving.in_thread(backend.tokenizer.decode, body.tokens, False)
        return JSONResponse({"prompt": text})

    return app


class HTTPMetricsMiddleware:
    """Counts every HTTP response as `http_requests_total{handler, method, status}` (the route's
    path template, as prometheus-fastapi-instrumentator names them). Plain ASGI: streams untouched."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            self.metrics.observe_http(getattr(route, "path", "none"), scope["method"], status[0])


def _version() -> str:
    try:
        return importlib.metadata.version("pdserve")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
        return "unknown"


async def _json_body(request: Request) -> dict:
    """The body as a JSON object; a 400 otherwise (as FastAPI's own parsing says it)."""
    content_type = request.headers.get("content-type", "")
    if "json" not in content_type.lower():
        message = (
            f"the request body must be JSON, sent with `Content-Type: application/json` (this one's: {content_type or 'none'})"
        )
        raise APIError(400, message)
    try:
        body = await request.json()
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep for the parser
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _parsed(model: type[M], body: dict) -> M:
    """`body` as `model`; a validation error is the 400 the route's own parsing would give."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from None


def _tenant(request: Request) -> str | None:
    """The API-key identity `APIKeyAuth` found (None when the server has no keys)."""
    return getattr(request.state, "tenant", None)


async def _tokenize(serving: Serving, body: TokenizeRequest) -> list[int]:
    """vLLM's /tokenize: a prompt (special tokens added by default) or chat messages (not), with
    their tools as the chat endpoint renders them. Any length (within the body limit): clients
    measure long documents with it."""
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "give exactly one of `prompt` and `messages`", "prompt")
    tokenizer = serving.backend.tokenizer
    if body.prompt is not None:
        add_special_tokens = True if body.add_special_tokens is None else body.add_special_tokens
        return await serving.in_thread(tokenizer.encode, body.prompt, add_special_tokens)
    if body.tools is not None:
        check_tools(body.tools)
    text = await serving.in_thread(
        render_chat,
        tokenizer,
        body.messages,
        body.add_generation_prompt,
        body.chat_template_kwargs,
        body.tools,
        body.continue_final_message,
    )
    return await serving.in_thread(tokenizer.encode, text, bool(body.add_special_tokens))
