"""`awqc serve`: an OpenAI-compatible HTTP server for one artifact (FastAPI on uvicorn).

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events with
"stream": true), GET /v1/models, GET /health. Errors are OpenAI-style JSON bodies with a 4xx
status: unknown model, malformed JSON or fields, max_tokens out of range, a prompt that does not
fit the context window, a missing or wrong API key.

One scheduler thread owns the engine. Requests wait in a queue; up to `max_batch` of them are
active at once, each a sequence of the shared paged KV cache: a new one is prefilled on its own,
then every active sequence advances by one token per step, all of them in one batched call."""

import asyncio
import dataclasses
import json
import queue
import secrets
import threading
import time
from typing import Any, Literal

from .engine import Engine
from .sampling import Sampler, SamplingParams
from .text_stream import TextStream


@dataclasses.dataclass
class Request:
    """One completion being generated; `emit` is called from the scheduler thread."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    emit: Any  # emit(piece: str | None, finish_reason: str | None); a reason ends the request
    cancelled: bool = False
    # filled in by the scheduler
    seq: int = -1
    stream: TextStream | None = None
    sampler: Sampler | None = None
    history: list[int] = dataclasses.field(default_factory=list)
    generated: int = 0


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int):
        self.engine, self.max_batch = engine, max_batch
        self.pending: queue.Queue[Request] = queue.Queue()
        self.free = list(range(max_batch, 0, -1))  # sequence ids; 0 is the engine's own
        self.active: list[Request] = []
        self.error: Exception | None = None  # the last one a request failed with
        threading.Thread(target=self._loop, name="awqc-scheduler", daemon=True).start()

    def submit(self, req: Request) -> None:
        self.pending.put(req)

    def _loop(self) -> None:
        while True:
            try:
                self._admit(block=not self.active)
                if self.active:
                    self._step()
            except Exception as err:  # noqa: BLE001  (the requests in flight fail with a 500; the server goes on)
                self.error = err
                for r in list(self.active):
                    self._end(r, "error")

    def _admit(self, block: bool) -> None:
        while self.free:
            try:
                req = self.pending.get(block=block)
            except queue.Empty:
                return
            block = False
            if req.cancelled:
                continue
            req.seq = self.free.pop()
            self.active.append(req)
            self.engine.add_sequence(req.seq)
            req.stream = TextStream(self.engine.decode_text, req.stop)
            req.sampler = Sampler(req.sampling)
            req.history = list(req.ids)
            self._advance(req, self.engine.prefill_sequence(req.seq, req.ids))

    def _step(self) -> None:
        batch = list(self.active)
        logits = self.engine.decode_batch([r.seq for r in batch], [r.history[-1] for r in batch])
        for r, row in zip(batch, logits):
            self._advance(r, row)

    def _advance(self, r: Request, logits) -> None:
        """Draw r's next token; end r on EOS, a stop string, max_tokens, a full window or a cancel."""
        reason = "cancelled" if r.cancelled else None
        if reason is None:
            token = r.sampler(logits, r.history)
            if token in self.engine.eos_token_ids:
                reason = "stop"
            else:
                r.history.append(token)
                r.generated += 1
                piece = r.stream.feed(token)
                if piece:
                    r.emit(piece, None)
                if r.stream.stopped:
                    reason = "stop"
                elif r.generated >= r.max_tokens or len(r.history) >= self.engine.context_window:
                    reason = "length"
        if reason is None:
            return
        tail = r.stream.finish()
        if tail:
            r.emit(tail, None)
        self._end(r, reason)

    def _end(self, r: Request, reason: str) -> None:
        r.emit(None, reason)
        self.active.remove(r)
        try:
            self.engine.remove_sequence(r.seq)
        except Exception:  # noqa: BLE001  (it failed before its sequence was added)
            pass
        self.free.append(r.seq)


# ---------------------------------------------------------------------------------------- the API
class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def make_app(engine: Engine, model_id: str, max_batch: int = 4, api_key: str | None = None):
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field

    scheduler = Scheduler(engine, max_batch)
    created = int(time.time())
    app = FastAPI(title="awqc", docs_url=None, redoc_url=None, openapi_url=None)

    class Message(BaseModel):
        role: Literal["system", "user", "assistant"]
        content: str

    class Sampling(BaseModel):
        model_config = ConfigDict(extra="ignore")  # OpenAI fields awqc does not implement are ignored
        model: str
        max_tokens: int | None = None
        max_completion_tokens: int | None = None
        temperature: float | None = Field(None, ge=0, le=2)
        top_p: float | None = Field(None, gt=0, le=1)
        top_k: int | None = Field(None, ge=0)
        min_p: float | None = Field(None, ge=0, lt=1)
        repetition_penalty: float | None = Field(None, gt=0)
        seed: int | None = None
        stop: str | list[str] | None = None
        stream: bool = False
        n: int = 1

    class ChatBody(Sampling):
        messages: list[Message] = Field(min_length=1)

    class CompletionBody(Sampling):
        prompt: str

    @app.exception_handler(APIError)
    async def api_error(_req, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_req, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        message = "the request body is not valid JSON" if first.get("type") == "json_invalid" else \
            f"{where or 'body'}: {first.get('msg')}"
        return JSONResponse(APIError(400, message, where).body(), status_code=400)

    @app.middleware("http")
    async def check_key(req: HTTPRequest, call_next):
        if api_key is not None and req.url.path.startswith("/v1/"):
            given = req.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                             code="invalid_api_key").body(), status_code=401)
        return await call_next(req)

    @app.get("/health")
    async def health():
        return {"status": "ok", "active": len(scheduler.active), "queued": scheduler.pending.qsize()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "awqc"}]}

    def prepare(body: Sampling, ids: list[int]) -> Request:
        if body.model != model_id:
            raise APIError(404, f"the model {body.model!r} does not exist; this server has {model_id!r}", "model",
                           "model_not_found")
        if body.n != 1:
            raise APIError(400, "only n = 1 is supported", "n")
        window = engine.context_window
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and not 1 <= max_tokens <= window:
            raise APIError(400, f"max_tokens must be in 1..{window} (the context window)", "max_tokens")
        if len(ids) >= window:
            raise APIError(400, f"the prompt is {len(ids)} tokens; the context window is {window}", "messages",
                           "context_length_exceeded")
        given = dict(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                     repeat_penalty=body.repetition_penalty, seed=body.seed)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Request(ids, max_tokens or window, SamplingParams.with_defaults(engine.generation, **given), stop, None)

    async def run(req: Request, kind: str, stream: bool, prompt_tokens: int):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req.emit = lambda piece, reason: loop.call_soon_threadsafe(events.put_nowait, (piece, reason))
        scheduler.submit(req)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        now = int(time.time())

        def chunk(piece: str | None, reason: str | None, first: bool = False) -> str:
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason}
                obj = "chat.completion.chunk"
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": reason}
                obj = "text_completion"
            return "data: " + json.dumps({"id": rid, "object": obj, "created": now, "model": model_id,
                                          "choices": [choice]}) + "\n\n"

        if stream:
            async def events_stream():
                try:
                    if kind == "chat":
                        yield chunk(None, None, first=True)
                    while True:
                        piece, reason = await events.get()
                        if piece is not None:
                            yield chunk(piece, None)
                        if reason is not None:
                            yield chunk(None, reason if reason in ("stop", "length") else "stop")
                            yield "data: [DONE]\n\n"
                            return
                finally:
                    req.cancelled = True  # the client left: the scheduler frees the sequence

            return StreamingResponse(events_stream(), media_type="text/event-stream")
        parts, reason = [], None
        try:
            while reason is None:
                piece, reason = await events.get()
                if piece is not None:
                    parts.append(piece)
        finally:
            req.cancelled = True
        if reason == "error":
            raise APIError(500, f"the engine failed: {scheduler.error}", kind="server_error")
        text = "".join(parts)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": req.generated,
                 "total_tokens": prompt_tokens + req.generated}
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_id, "choices": [choice],
                    "usage": usage}
        return {"id": rid, "object": "text_completion", "created": now, "model": model_id,
                "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}], "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        try:
            ids = engine.encode_messages([m.model_dump() for m in body.messages])
        except ValueError as err:  # no chat template, or the template refused the conversation
            raise APIError(400, str(err), "messages") from None
        return await run(prepare(body, ids), "chat", body.stream, len(ids))

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        ids = engine.encode(body.prompt)
        if not ids:
            raise APIError(400, "the prompt is empty", "prompt")
        return await run(prepare(body, ids), "completion", body.stream, len(ids))

    return app


def serve(engine: Engine, model_id: str, host: str, port: int, max_batch: int, api_key: str | None) -> None:
    import uvicorn

    uvicorn.run(make_app(engine, model_id, max_batch, api_key), host=host, port=port, log_level="warning")
