"""The OpenAI-compatible HTTP API over the router: /v1/completions, /v1/chat/completions (both with
server-sent-event streaming), /v1/models, /health and /metrics.

Everything a client sends is checked here, before a worker sees it: the JSON body against strict
schemas (a string where a number belongs is refused, not coerced), the model name, the prompt and
max_tokens against the model's context (runtime/limits.py, the check `accelc run` makes). Every
refusal is a 4xx with OpenAI's error body, {"error": {"message", "type", "param", "code"}}, and
nothing of it reaches a worker; a worker only ever sees token ids it can decode.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from accelc.errors import UsageError
from accelc.serve.batching import Event
from accelc.serve.metrics import Metrics
from accelc.serve.router import QueueFull, Router, WorkerGone

MAX_BODY_BYTES = 4 * 2**20  # a prompt longer than any context fits many times over
UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(
            {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}},
            status_code=self.status,
        )


class _Body(BaseModel):
    # strict: "16" is not a number; unknown fields are ignored, as OpenAI's clients send many
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stop: str | list[str] | None = None
    stream: bool = False

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes at most 4 non-empty strings", param="stop")
        return stops


class CompletionBody(_Body):
    prompt: str | list[str] = Field(description="one prompt (a list must hold exactly one)")

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ApiError(400, f"prompt: give one prompt per request, not {len(self.prompt)}", param="prompt")
        return self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


@dataclass
class Service:
    """What the handlers share: the artifact's tokenizer, limits and plan, the router, the metrics."""

    router: Router
    model_name: str
    tokenizer: object
    eos_ids: tuple[int, ...]
    context: int | None
    plan: object  # loops.plan.DecodePlan: the defaults of max_tokens, temperature, top_p, seed
    timeout_s: float
    vocab_size: int | None = None  # the model's: a tokenizer with more ids than it must not feed them
    created: int = 0

    def __post_init__(self):
        self.created = self.created or int(time.time())
        self.metrics = Metrics(self.router)


class Detokenizer:
    """Text of the tokens so far, cut at the first stop string; `add` returns what may be sent
    now: never a tail that a later token could turn into a stop string, or half a UTF-8 character."""

    def __init__(self, tokenizer, eos_ids: Sequence[int], stops: Sequence[str]):
        self.tokenizer, self.eos, self.stops = tokenizer, frozenset(eos_ids), list(stops)
        self.tokens: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, tokens: Sequence[int], last: bool = False) -> str:
        self.tokens += [t for t in tokens if t not in self.eos]
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            text, self.stopped = text[:cut], True
        self.text = text
        ready = len(text)
        if not (last or self.stopped):
            ready -= max((len(s) - 1 for s in self.stops), default=0)
            while ready > 0 and text[ready - 1] == "\ufffd":  # an incomplete byte sequence so far
                ready -= 1
        delta = text[self.sent : ready] if ready > self.sent else ""
        self.sent = max(self.sent, ready)
        return delta


class Generation:
    """One admitted request: its events from the router, within the server's timeout."""

    def __init__(self, svc: Service, endpoint: str, prompt: list[int], body: _Body, max_tokens: int):
        self.svc, self.endpoint, self.prompt = svc, endpoint, prompt
        self.text = Detokenizer(svc.tokenizer, svc.eos_ids, body.stops())  # refuses bad stops before admission
        plan = svc.plan
        temperature = body.temperature if body.temperature is not None else (plan.temperature if plan.samples else 0.0)
        self.id, self.queue = svc.router.submit(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=body.top_p if body.top_p is not None else plan.top_p,
            top_k=plan.top_k,
            seed=body.seed if body.seed is not None else plan.seed,
        )
        svc.metrics.prompt_tokens.inc(len(prompt))
        self.generated, self.finish, self.ended = 0, None, False
        self.started = time.monotonic()

    async def deltas(self) -> AsyncIterator[str]:
        """Text as it is decoded; afterwards `finish` is "stop" or "length". Raises ApiError on a
        timeout or a worker's failure; the request is cancelled if it ends early for any reason."""
        deadline = self.started + self.svc.timeout_s
        try:
            while self.finish is None:
                try:
                    event: Event = await asyncio.wait_for(self.queue.get(), max(deadline - time.monotonic(), 0))
                except asyncio.TimeoutError:
                    raise ApiError(
                        504, f"the generation took longer than the server's timeout of {self.svc.timeout_s:g} s",
                        kind="timeout",
                    ) from None  # fmt: skip
                self.ended = event.finish is not None
                if event.error is not None:  # a worker that exited: 503, as when none runs; else 500
                    raise ApiError(503 if event.finish == "lost" else 500, event.error, kind="server_error")
                if self.generated == 0 and event.tokens:
                    self.svc.metrics.first_token.observe(time.monotonic() - self.started)
                self.generated += len(event.tokens)
                self.svc.metrics.generated_tokens.inc(len(event.tokens))
                delta = self.text.add(event.tokens, last=event.finish is not None)
                if self.text.stopped:
                    self.finish = "stop"
                elif event.finish is not None:
                    self.finish = "stop" if event.finish == "stop" else "length"
                if delta:
                    yield delta
        finally:
            if not self.ended:  # a stop string, a timeout or a client gone: the worker stops decoding it
                self.svc.router.cancel(self.id)
            if self.finish is not None:
                self.svc.metrics.latency.labels(self.endpoint).observe(time.monotonic() - self.started)

    def usage(self) -> dict:
        n = len(self.prompt)
        return {"prompt_tokens": n, "completion_tokens": self.generated, "total_tokens": n + self.generated}


async def _body(request: Request, schema: type[_Body]) -> _Body:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is larger than {MAX_BODY_BYTES // 2**20} MiB")
        chunks.append(chunk)
    try:
        return schema.model_validate_json(b"".join(chunks))
    except ValidationError as exc:
        first = exc.errors()[0]
        # a union's variants show in the location as type names (prompt.str, prompt.list[str]): drop them
        path = [str(p) for p in first["loc"] if isinstance(p, int) or not (p in UNION_TAGS or "[" in p)]
        where = ".".join(path) or None
        count = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the body is not valid JSON: {first['msg']}") from None
        raise ApiError(400, f"{where or 'body'}: {first['msg']}{count}", param=path[0] if path else None) from None


def _check(svc: Service, body: _Body, prompt: list[int], max_tokens: int | None) -> int:
    """The model is this server's; prompt plus max_tokens fit the context. Returns max_tokens."""
    if body.model != svc.model_name:
        raise ApiError(404, f"model '{body.model}' is not served here; this server serves '{svc.model_name}'",
                       param="model", code="model_not_found")  # fmt: skip
    from accelc.runtime import limits

    if svc.vocab_size is not None:
        outside = next((t for t in prompt if not 0 <= t < svc.vocab_size), None)
        if outside is not None:
            raise ApiError(400, f"the prompt encodes to token id {outside}, outside the model's vocabulary "
                           f"of {svc.vocab_size} (its tokenizer knows more tokens than the model)")  # fmt: skip
    n = svc.plan.max_new_tokens if max_tokens is None else max_tokens
    try:
        limits.check_generation(svc.context, len(prompt), n, "max_tokens")
    except UsageError as exc:
        raise ApiError(400, str(exc), param="max_tokens" if len(prompt) else "prompt") from None
    return n


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return list(tokenizer(text)["input_ids"])
    except Exception as exc:  # e.g. a lone surrogate (valid JSON, not valid Unicode)
        raise ApiError(400, f"the prompt cannot be tokenized ({type(exc).__name__}: {exc})", param="prompt") from None


def _encode_chat(tokenizer, messages: list[Message]) -> list[int]:
    """The model's chat template where it has one; otherwise "role: content" lines and an open
    assistant turn (a base model continues them as a transcript)."""
    turns = [{"role": m.role, "content": m.text()} for m in messages]
    if getattr(tokenizer, "chat_template", None):
        try:
            return list(tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True))
        except Exception as exc:  # the template's own rules (e.g. alternating roles) refuse the turns
            raise ApiError(400, f"messages: the model's chat template refuses them ({exc})", param="messages") from None
    return _encode(tokenizer, "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant:")


def _admit(svc: Service, endpoint: str, prompt: list[int], body: _Body, max_tokens: int | None) -> Generation:
    n = _check(svc, body, prompt, max_tokens)
    try:
        return Generation(svc, endpoint, prompt, body, n)
    except QueueFull as exc:
        raise ApiError(429, f"the server is at capacity ({exc}); retry later", kind="rate_limit_exceeded") from None
    except WorkerGone as exc:
        raise ApiError(503, str(exc), kind="server_error") from None


def _sse(payload) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


async def _stream(gen: Generation, chunk) -> AsyncIterator[bytes]:
    """Server-sent events: one chunk per delta, a last one with finish_reason, then [DONE]; an
    error after the headers went out is sent as an error event."""
    try:
        async for delta in gen.deltas():
            yield _sse(chunk(delta, None))
        yield _sse(chunk("", gen.finish))
    except ApiError as exc:
        yield _sse({"error": {"message": str(exc), "type": exc.kind, "param": None, "code": exc.status}})
    yield _sse("[DONE]")


def build_app(svc: Service) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        svc.router.attach(asyncio.get_running_loop())
        yield

    app = FastAPI(title="accelc serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # a bug of accelc's: still a JSON answer
        message = f"internal error: {type(exc).__name__}: {exc}"
        return ApiError(500, message, kind="server_error").response()

    @app.middleware("http")
    async def count(request: Request, call_next):
        response = await call_next(request)
        endpoint = request.url.path if request.url.path in ENDPOINTS else "other"
        svc.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    @app.get("/health")
    async def health():
        alive, total = svc.router.alive, len(svc.router.workers)
        body = {"status": "ok" if alive == total else "degraded", "workers": total, "workers_alive": alive,
                "worker_pids": [w.info.get("pid") for w in svc.router.workers if w.alive],
                "outstanding": svc.router.outstanding, "capacity": svc.router.capacity}  # fmt: skip
        return JSONResponse(body, status_code=200 if alive == total else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(svc.metrics.render(), media_type=svc.metrics.content_type)

    @app.get("/v1/models")
    async def models():
        card = {"id": svc.model_name, "object": "model", "created": svc.created, "owned_by": "accelc"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body: CompletionBody = await _body(request, CompletionBody)
        prompt = _encode(svc.tokenizer, body.text())
        gen = _admit(svc, "/v1/completions", prompt, body, body.max_tokens)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def choice(text, finish):
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}

        def envelope(choices, **extra):
            return {"id": rid, "object": "text_completion", "created": created, "model": svc.model_name,
                    "choices": choices, **extra}  # fmt: skip

        if body.stream:
            chunks = _stream(gen, lambda delta, finish: envelope([choice(delta, finish)]))
            return StreamingResponse(chunks, media_type="text/event-stream")
        text = "".join([d async for d in gen.deltas()])
        return envelope([choice(text, gen.finish)], usage=gen.usage())

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body: ChatBody = await _body(request, ChatBody)
        prompt = _encode_chat(svc.tokenizer, body.messages)
        gen = _admit(svc, "/v1/chat/completions", prompt, body, body.max_completion_tokens or body.max_tokens)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def envelope(kind, choice, **extra):
            return {"id": rid, "object": kind, "created": created, "model": svc.model_name,
                    "choices": [{"index": 0, **choice}], **extra}  # fmt: skip

        if body.stream:
            first = [True]

            def chunk(delta, finish):
                content = {"content": delta} if finish is None else {}
                if first[0]:
                    content, first[0] = {"role": "assistant", **content}, False
                return envelope("chat.completion.chunk", {"delta": content, "finish_reason": finish})

            return StreamingResponse(_stream(gen, chunk), media_type="text/event-stream")
        text = "".join([d async for d in gen.deltas()])
        message = {"role": "assistant", "content": text}
        return envelope("chat.completion", {"message": message, "finish_reason": gen.finish}, usage=gen.usage())

    return app
