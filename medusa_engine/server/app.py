"""The OpenAI-compatible HTTP API over a `Scheduler`: `create_app(scheduler, tokenizer, options)`.

Routes: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions` (the /v1 routes need
the API key when one is set), `GET /health`, `GET /metrics` (open, as vLLM's are).

One request: the body (size-limited, read here rather than by FastAPI so every error is an OpenAI
error object) -> token ids (chat template, or the raw prompt) -> `Scheduler.submit` with a callback
that hands the scheduler thread's events to this request's asyncio queue -> `TextStream` (the one
detokenizer for streamed and whole replies) -> a JSON body or server-sent events. A stop string
ends the reply in the server, at the text level: the text is cut, the request cancelled in the
scheduler (its cache row freed) and the finish reason is "stop". A client that goes away cancels
its request: a stream notices at once (Starlette cancels the response), a whole reply within
`ServerOptions.poll_s`.

The tokenizer is only touched on the event loop's thread (Rust tokenizers refuse concurrent use).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from medusa_engine.config import SamplingConfig
from medusa_engine.hf_adapter import encode_chat, has_chat_template
from medusa_engine.model import ContextOverflowError
from medusa_engine.scheduler import Event, QueueFullError, SchedulerClosedError
from medusa_engine.scheduler import Request as EngineRequest
from medusa_engine.server import protocol
from medusa_engine.server.metrics import RouteMetrics, ServerMetrics
from medusa_engine.server.protocol import APIError, ChatRequest, CompletionRequest
from medusa_engine.server.streaming import TextStream

logger = logging.getLogger(__name__)

FINISH = {"eos": "stop", "length": "length", "context": "length"}  # engine -> OpenAI
ROUTES = ("/v1/models", "/v1/chat/completions", "/v1/completions", "/health", "/metrics")


@dataclass(frozen=True)
class ServerOptions:
    """What the app needs besides the scheduler and tokenizer (the `serve` flags).

    `sampling`: the defaults for what a request leaves out (temperature, top_p, seed) and what it
    cannot set (top_k, the acceptance rule). `max_tokens`: the budget of a request that gives
    none, cut to the room left in the context."""

    model_name: str
    max_context: int
    vocab_size: int
    api_key: str | None = None
    max_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_body_bytes: int = 1 << 20
    poll_s: float = 0.25  # how often a whole-reply request checks that its client is still there

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.max_body_bytes < 1 or self.max_context < 2:
            raise ValueError("max_tokens, max_body_bytes and max_context must be positive")
        if self.api_key == "":
            raise ValueError("the API key is empty")


@dataclass
class Reply:
    """What a finished generation reports."""

    text: str = ""
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    steps: int = 0
    accepted: int = 0

    def usage(self) -> dict[str, int]:
        return protocol.usage(self.prompt_tokens, self.completion_tokens)

    def engine_stats(self) -> dict[str, Any]:
        """The extension field: verification steps and τ (tokens emitted per step)."""
        tau = self.accepted / self.steps if self.steps else 0.0
        return {"steps": self.steps, "accepted_tokens": self.accepted, "tau": round(tau, 4)}


class Generation:
    """One submitted request: its events, read as text deltas (`deltas`), then `reply`."""

    def __init__(
        self,
        app_state: AppState,
        prompt_ids: list[int],
        budget: int,
        params: protocol.GenerationParams,
    ) -> None:
        self.state = app_state
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.text = TextStream(app_state.decode, params.stops)
        self.reply = Reply(prompt_tokens=len(prompt_ids))
        self.arrival = time.perf_counter()
        self.first_text_s: float | None = None
        self.done = False  # the final event arrived
        request = EngineRequest(
            prompt_ids=tuple(prompt_ids),
            max_new_tokens=budget,
            sampling=app_state.sampling_for(params),
        )
        param = "messages" if isinstance(params, ChatRequest) else "prompt"
        try:
            self.request_id = app_state.scheduler.submit(request, self._on_event)
        except ContextOverflowError as err:
            raise APIError(400, str(err), param=param, code="context_length_exceeded") from None
        except QueueFullError:
            raise APIError(
                503, "the server is busy: the queue is full", "server_error", code="queue_full"
            ) from None
        except SchedulerClosedError:
            raise APIError(
                503, "the server is shutting down", "server_error", code="shutting_down"
            ) from None
        except ValueError as err:
            raise APIError(400, str(err)) from None
        app_state.metrics.started()

    def _on_event(self, event: Event) -> None:  # on the scheduler's thread
        if not self.loop.is_closed():  # else the server is gone: nobody waits for this
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def deltas(self, request: Request | None = None) -> AsyncIterator[str]:
        """The reply's text, piece by piece (an empty piece when a stop string ends it: its
        `reply.finish_reason` is then "stop" at once, before the engine's last event). With
        `request`, polls whether its client is still there (and returns early if not)."""
        poll = self.state.options.poll_s
        while not self.done:
            if request is None:
                event = await self.events.get()
            else:
                try:
                    event = await asyncio.wait_for(self.events.get(), poll)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return  # `close` cancels and counts the disconnect
                    continue
            stopped_before = self.text.stopped
            piece = self._take(event)
            if piece and self.first_text_s is None:
                self.first_text_s = time.perf_counter() - self.arrival
            if piece or self.text.stopped != stopped_before:
                yield piece  # a stop string yields at once, even with no text before it

    def _take(self, event: Event) -> str:
        stopped_before = self.text.stopped
        out = "" if stopped_before else self.text.feed(event.tokens).text
        if self.text.stopped and not stopped_before:  # a stop string: end it in the engine too
            self.state.scheduler.cancel(self.request_id)
            self.state.metrics.stop_string()
            self.reply.finish_reason = "stop"
        if event.finish_reason is None:
            return out
        self.done = True
        self.reply.prompt_tokens = event.prompt_tokens or self.reply.prompt_tokens
        self.reply.completion_tokens = event.completion_tokens or 0
        self.reply.steps, self.reply.accepted = event.steps or 0, event.accepted or 0
        if not self.text.stopped:
            if event.finish_reason not in FINISH:  # "cancelled" by shutdown, or "error"
                self.reply.text = self.text.text + out
                raise APIError(
                    500 if event.finish_reason == "error" else 503,
                    f"generation {event.finish_reason}: {event.error or 'server shutting down'}",
                    "server_error",
                    code=event.finish_reason,
                )
            out += self.text.finish().text
            self.reply.finish_reason = "stop" if self.text.stopped else FINISH[event.finish_reason]
        self.reply.text = self.text.text
        return out

    def close(self) -> None:
        """After the response (or the client) is gone: cancel an unfinished request."""
        if not self.done:
            self.state.scheduler.cancel(self.request_id)
        self.state.metrics.finished(
            self.first_text_s, time.perf_counter() - self.arrival, disconnected=not self.done
        )


@dataclass
class AppState:
    scheduler: Any  # medusa_engine.scheduler.Scheduler (or anything with its API)
    tokenizer: Any
    options: ServerOptions
    metrics: ServerMetrics = field(default_factory=ServerMetrics)
    created: int = field(default_factory=protocol.now)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def sampling_for(self, params: protocol.GenerationParams) -> SamplingConfig:
        base = self.options.sampling
        try:
            return replace(
                base,
                temperature=base.temperature if params.temperature is None else params.temperature,
                top_p=base.top_p if params.top_p is None else params.top_p,
                seed=base.seed if params.seed is None else params.seed,
            )
        except ValueError as err:
            raise APIError(400, str(err)) from None

    def budget(self, params: protocol.GenerationParams, prompt_tokens: int, param: str) -> int:
        """max_tokens, or the server's default cut to the room left in the context."""
        room = self.options.max_context - prompt_tokens
        if room < 1:
            raise APIError(
                400,
                f"the prompt has {prompt_tokens} tokens; the model's context is "
                f"{self.options.max_context}",
                param=param,
                code="context_length_exceeded",
            )
        asked = params.token_budget()
        return asked if asked is not None else min(self.options.max_tokens, room)

    def check_model(self, name: str) -> None:
        if name != self.options.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server has {self.options.model_name!r}",
                param="model",
                code="model_not_found",
            )

    def check_key(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not depend on where the key and the guess differ
        ok = hmac.compare_digest(token.strip().encode(), key.encode())
        if not ok or scheme.lower() != "bearer":
            raise APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")

    def chat_ids(self, chat: ChatRequest) -> list[int]:
        """The conversation through the model's chat template; without one, the messages' text
        one per line (a base model continues it)."""
        if has_chat_template(self.tokenizer):
            messages = [
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in chat.messages
            ]
            try:
                return encode_chat(self.tokenizer, messages)
            except Exception as err:  # the template's own checks (jinja raise_exception)
                raise APIError(400, f"chat template: {err}", param="messages") from None
        return list(self.tokenizer("\n".join(m.text() for m in chat.messages))["input_ids"])

    def completion_ids(self, completion: CompletionRequest) -> list[int]:
        prompt = completion.single_prompt()
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        if any(not 0 <= t < self.options.vocab_size for t in prompt):
            raise APIError(400, "token ids outside the vocabulary", param="prompt")
        return list(prompt)


async def read_body(request: Request, limit: int) -> Any:
    """The JSON body, refused (413) beyond `limit` bytes without reading the rest."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON: {err}") from None


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def create_app(scheduler: Any, tokenizer: Any, options: ServerOptions) -> FastAPI:
    """The FastAPI app over a started `Scheduler` (the caller starts and shuts it down)."""
    state = AppState(scheduler, tokenizer, options)
    app = FastAPI(title="medusa-engine", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.medusa = state
    app.add_middleware(RouteMetrics, metrics=state.metrics, routes=ROUTES)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        body = protocol.error_body(str(err.detail), kind, code=str(err.status_code))
        return JSONResponse(body, status_code=err.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s", request.url.path)
        body = protocol.error_body(f"internal error: {type(err).__name__}", "server_error")
        return JSONResponse(body, status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = scheduler.stats()
        return {"status": "ok", "running": stats.running, "queued": stats.queued}

    @app.get("/metrics")
    async def metrics() -> Response:
        text = state.metrics.render(scheduler.stats(), options.model_name)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        state.check_key(request)
        return protocol.model_list(options.model_name, state.created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        state.check_key(request)
        chat = protocol.parse(ChatRequest, await read_body(request, options.max_body_bytes))
        state.check_model(chat.model)
        assert isinstance(chat, ChatRequest)
        return await respond(state, request, chat, state.chat_ids(chat), "messages")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        state.check_key(request)
        completion = protocol.parse(
            CompletionRequest, await read_body(request, options.max_body_bytes)
        )
        state.check_model(completion.model)
        assert isinstance(completion, CompletionRequest)
        return await respond(state, request, completion, state.completion_ids(completion), "prompt")

    return app


async def respond(
    state: AppState,
    request: Request,
    params: protocol.GenerationParams,
    prompt_ids: list[int],
    param: str,
) -> Response:
    """Submit the request; answer with its whole reply or stream it."""
    if not prompt_ids:
        raise APIError(400, "the prompt is empty", param=param)
    budget = state.budget(params, len(prompt_ids), param)
    generation = Generation(state, prompt_ids, budget, params)
    shape = protocol.ReplyShape.new(state.options.model_name, isinstance(params, ChatRequest))
    if params.stream:
        return StreamingResponse(
            stream_events(generation, shape, params.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        async for _ in generation.deltas(request):
            pass
    finally:
        generation.close()
    if not generation.done:  # the client left; nobody reads this
        return Response(status_code=499)
    reply = generation.reply
    body = shape.whole(reply.text, reply.finish_reason, reply.usage(), reply.engine_stats())
    return JSONResponse(body)


async def stream_events(
    generation: Generation, shape: protocol.ReplyShape, include_usage: bool
) -> AsyncIterator[str]:
    """Server-sent events: the role (chat), content deltas, the finish reason, the usage (if
    asked), `[DONE]`. An error after the stream began goes out as an error event."""
    try:
        if shape.chat:
            yield sse(shape.chunk("", role=True, usage=include_usage))
        sent_finish = False
        try:
            async for piece in generation.deltas():
                if piece and not sent_finish:
                    yield sse(shape.chunk(piece, usage=include_usage))
                if generation.reply.finish_reason == "stop" and not sent_finish:
                    # at once: the engine's last event (the usage) may come a step later
                    yield sse(shape.chunk(None, "stop", usage=include_usage))
                    sent_finish = True
        except APIError as err:  # the request ended without a reply (shutdown, error)
            yield sse(err.body())
            yield sse("[DONE]")
            return
        reply = generation.reply
        if not sent_finish:
            yield sse(shape.chunk(None, reply.finish_reason, usage=include_usage))
        if include_usage:
            yield sse(shape.usage_chunk(reply.usage(), reply.engine_stats()))
        yield sse("[DONE]")
    finally:
        generation.close()
