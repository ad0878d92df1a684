"""`clone serve-model`: the clone behind OpenAI's chat-completions API, for any OpenAI client.

Bots on other machines reach it with OpenAIBackend; any OpenAI client works (the official
`openai` package is tested). `POST /v1/chat/completions` honours `max_tokens` (or
`max_completion_tokens`), `temperature` (0 is greedy), `top_p`, `n`, `stop` and `stream`;
omitted ones take the server's GenerationSettings. Requests that ask for different settings
still share one batch: each row of a batch samples with its own temperature and top-p (a logits
processor) and ends at its own token cap, stop string or end of turn (a stopping criterion).

`stream: true` sends each choice's text as the batch produces it (server-sent events, OpenAI's
`chat.completion.chunk` objects, then `data: [DONE]`). A few characters are held back while they
could still turn into a template marker, a stop string or a whole character, so the streamed
text always equals what the same request would get without streaming.

A full queue answers 429 (OpenAIBackend turns it into `Busy`). An unknown `model` is a 404
(`model_not_found`). With an API key, every `/v1` request needs `Authorization: Bearer <key>`
(compared in constant time; the key is never logged); `/health` stays open. Errors have
OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, and never quote message text.

A request's conversation is cut to PROMPT_TOKENS before it is encoded (each text by characters
first, its end kept; then the oldest turns after the system prompt go), so that the 1 MB a body
may hold costs what a full prompt costs, not minutes of attention.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from aiohttp import web
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from bot.engine import Busy, Generated
from bot.generation import GenerationSettings, LocalBackend
from training.base_model import token_counter
from training.encode import encode
from training.generate import end_token_ids
from training.prompt import (
    CHARS_PER_TOKEN,
    TURN_END,
    TURN_OVERHEAD,
    keep_end,
    keep_end_within,
    prompt_tokens,
    turn_tokens,
)

log = logging.getLogger(__name__)
ROLES = {"system", "developer", "user", "assistant"}  # "developer" is newer clients' "system"
PROMPT_TOKENS = 2048  # four times a bot's own prompt budget: room for clients that keep more
MAX_TOKENS = 2048  # the most a request may ask for: more is a 400, not a minutes-long batch
MAX_STOPS = 4  # as OpenAI
MARKER_CHARS = 32  # a template marker is shorter: a longer unclosed "<…" is plain text
# Parameters that would change the answer and that this server cannot honour: refused, not ignored.
UNSUPPORTED = ("tools", "functions", "response_format", "logprobs", "top_logprobs", "logit_bias",
               "presence_penalty", "frequency_penalty", "audio", "prediction")


# -- generation: each row of a batch with its own sampling ---------------------------------------


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    stop: tuple[str, ...] = ()


class Prompt(list):
    """One row of a batch: its messages (the list itself, so whatever takes a conversation takes
    a Prompt), how its reply is sampled, and `sink`, called from the generation thread with each
    new piece of the reply's text. Setting `cancelled` (the client left) ends the row early."""

    def __init__(self, messages: list[dict[str, str]], sampling: Sampling,
                 sink: Callable[[str], None] | None = None) -> None:
        super().__init__(messages)
        self.sampling, self.sink, self.cancelled = sampling, sink, False


@dataclass(frozen=True)
class Completion(Generated):
    """A row's reply, already cut at its end; why it ended, and how many tokens it took."""

    finish_reason: str = "stop"
    tokens: int = 0


def cut(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the end of the turn (the first template marker) or the first stop string,
    whichever comes first; and whether either was found."""
    ends = [found.start()] if (found := TURN_END.search(text)) else []
    ends += [at for s in stops if (at := text.find(s)) >= 0]
    return (text[: min(ends)], True) if ends else (text, False)


def unsettled(text: str, stops: Sequence[str]) -> int:
    """How many characters at the end of `text` the next tokens could still change or cut: a
    character whose bytes are not all there, the start of a template marker or of a stop string."""
    hold = len(text) - len(text.rstrip("\ufffd"))
    opener = max(text.rfind("<"), text.rfind("["))
    if opener >= 0 and len(text) - opener <= MARKER_CHARS and not {">", "]"} & set(text[opener:]):
        hold = max(hold, len(text) - opener)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if stop.startswith(text[-k:]):
                hold = k
                break
    return hold


class _Row:
    """A row's reply so far: decoded after each token, sent on as it settles, ended when done."""

    def __init__(self, prompt: Prompt, tokenizer, ends: set[int]) -> None:
        self.prompt, self.tokenizer, self.ends = prompt, tokenizer, ends
        self.tokens: list[int] = []
        self.text, self.sent = "", 0
        self.finish: str | None = None

    def advance(self, tokens: list[int]) -> None:
        """`tokens`: all this row has generated so far (the newest last)."""
        sampling = self.prompt.sampling
        self.tokens = tokens
        ended = tokens[-1] in self.ends
        raw = self.tokenizer.decode(tokens[:-1] if ended else tokens, skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
        self.text, found = cut(raw, sampling.stop)
        if ended or found or self.prompt.cancelled:
            self.finish = "stop"
        elif len(tokens) >= sampling.max_tokens:
            self.finish = "length"
        ready = len(self.text) - (0 if self.finish else unsettled(self.text, sampling.stop))
        if ready > self.sent and self.prompt.sink is not None:
            self.prompt.sink(self.text[self.sent : ready])
        self.sent = max(self.sent, ready)

    def result(self) -> Completion:
        finish = self.finish or "length"  # only the model's own length limit ends a row otherwise
        return Completion(self.text, finish == "length", finish, len(self.tokens))


class _Rows(StoppingCriteria):
    """Follows every row after each token and stops the rows that are done."""

    def __init__(self, prompts: Sequence[Prompt], tokenizer, ends: set[int], width: int) -> None:
        self.rows = [_Row(p, tokenizer, ends) for p in prompts]
        self.width = width  # the (left-padded) prompts' length: generated tokens come after it

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        for row, tokens in zip(self.rows, input_ids[:, self.width :].tolist(), strict=True):
            if row.finish is None:  # a finished row only gets padding from here on
                row.advance(tokens)
        return torch.tensor([r.finish is not None for r in self.rows], device=input_ids.device)


class _RowSampling(LogitsProcessor):
    """Each row's own temperature and top-p. Temperature 0 (or top-p 0) keeps the most likely
    token alone: greedy. Only the rows with a top-p below 1 pay for sorting the vocabulary."""

    def __init__(self, samplings: Sequence[Sampling], device: torch.device) -> None:
        self.temperature = torch.tensor([[s.temperature or 1.0] for s in samplings], device=device)
        self.top_p = torch.tensor([[s.top_p] for s in samplings], device=device)
        greedy = [s.temperature == 0 or s.top_p == 0 for s in samplings]
        self.greedy = torch.tensor([[g] for g in greedy], device=device)
        self.nucleus = torch.tensor([i for i, s in enumerate(samplings) if not greedy[i] and s.top_p < 1],
                                    dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores / self.temperature
        if len(self.nucleus):
            ranked, order = scores[self.nucleus].sort(dim=-1, descending=True)
            probs = ranked.softmax(dim=-1)
            beyond = probs.cumsum(dim=-1) - probs > self.top_p[self.nucleus]  # the likeliest stays
            kept = ranked.masked_fill(beyond, -torch.inf)
            scores[self.nucleus] = torch.full_like(kept, -torch.inf).scatter(-1, order, kept)
        if self.greedy.any():
            best = scores.argmax(dim=-1, keepdim=True)
            alone = torch.full_like(scores, -torch.inf).scatter(-1, best, scores.gather(-1, best))
            scores = torch.where(self.greedy, alone, scores)
        return scores


def _per_row(prompts: Sequence[Prompt]) -> dict[str, Any]:
    """generate()'s own sampling switched off: _RowSampling samples each row its own way (and
    when every row is greedy, generate's argmax is what it leaves to pick)."""
    if all(p.sampling.temperature == 0 or p.sampling.top_p == 0 for p in prompts):
        return {"do_sample": False}
    return {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}


@torch.no_grad()
def generate_rows(model, tokenizer, prompts: Sequence[Prompt], repetition_penalty: float = 1.0,
                  ) -> list[Completion]:
    """One batch, each row sampled and ended by its own Sampling; left-padded like training's
    generate_turns, through the same injection-safe encoding."""
    encoded = [encode(p, tokenizer, add_generation_prompt=True).input_ids for p in prompts]
    width = max(len(e) for e in encoded)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    device = next(model.parameters()).device
    rows = _Rows(prompts, tokenizer, end_token_ids(model, tokenizer), width)
    model.generate(
        input_ids=ids.to(device), attention_mask=mask.to(device),
        max_new_tokens=max(p.sampling.max_tokens for p in prompts),
        **_per_row(prompts),
        repetition_penalty=repetition_penalty, pad_token_id=pad,
        logits_processor=LogitsProcessorList([_RowSampling([p.sampling for p in prompts], device)]),
        stopping_criteria=StoppingCriteriaList([rows]),
    )
    return [row.result() for row in rows.rows]


class ServingBackend(LocalBackend):
    """A LocalBackend whose batches honour each Prompt's own Sampling (a plain conversation gets
    the settings'); still one batch, however differently its requests sample."""

    def default_sampling(self) -> Sampling:
        s = self.settings
        return Sampling(s.max_new_tokens, s.temperature, s.top_p)

    def generate_batch(self, conversations: list[list[dict[str, str]]]) -> list[Generated]:
        prompts = [c if isinstance(c, Prompt) else Prompt(c, self.default_sampling()) for c in conversations]
        model, tokenizer = self.model, self.tokenizer  # one pair for the whole batch, even across a swap
        return list(generate_rows(model, tokenizer, prompts, self.settings.repetition_penalty))


_BACKEND = web.AppKey("backend", ServingBackend)
_MODEL = web.AppKey("model_name", str)
_KEY = web.AppKey("api_key", str)


# -- the request ----------------------------------------------------------------------------------


class Refused(Exception):
    """A request answered with an error in OpenAI's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> web.Response:
        return web.json_response({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                            "code": self.code}}, status=self.status)


def _busy() -> web.Response:
    return Refused(429, "the model is busy; try again shortly", "rate_limit_error").response()


@dataclass(frozen=True)
class Job:
    messages: list[dict[str, str]]
    sampling: Sampling
    n: int = 1
    stream: bool = False
    include_usage: bool = False


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise Refused(400, f"messages[{i}].content must be a string or a list of text parts",
                  param=f"messages[{i}].content")


def parse_messages(body: dict) -> list[dict[str, str]]:
    """The messages, each {"role", "content"} with text content (never quoting it when refused)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Refused(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise Refused(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise Refused(400, f"messages[{i}].role must be one of {sorted(ROLES)}",
                          param=f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m, i)})
    return out


def _number(body: dict, name: str, default: float, low: float, high: float, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise Refused(400, f"'{name}' must be {what} from {low} to {high}", param=name)
    return value


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value if isinstance(value, list) else None
    if stops is None or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise Refused(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOPS}",
                      param="stop")
    return tuple(stops)


def parse_sampling(body: dict, settings: GenerationSettings) -> Sampling:
    cap = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    return Sampling(
        max_tokens=_number(body, cap, settings.max_new_tokens, 1, MAX_TOKENS, integer=True),
        temperature=float(_number(body, "temperature", settings.temperature, 0, 2)),
        top_p=float(_number(body, "top_p", settings.top_p, 0, 1)),
        stop=_stops(body.get("stop")),
    )


def parse_job(body: Any, settings: GenerationSettings, model_name: str) -> Job:
    """What a request asks for, or Refused saying what is wrong with it."""
    if not isinstance(body, dict):
        raise Refused(400, "the body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise Refused(400, "'model' must be a string", param="model")
    if model is not None and model != model_name:
        raise Refused(404, f"The model `{model[:100]}` does not exist; this server serves `{model_name}`",
                      param="model", code="model_not_found")
    messages = parse_messages(body)
    for name in UNSUPPORTED:
        if body.get(name) and body[name] != {"type": "text"}:
            raise Refused(400, f"'{name}' is not supported by this server", param=name)
    stream, options = body.get("stream") or False, body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise Refused(400, "'stream' must be true or false and 'stream_options' an object", param="stream")
    n = _number(body, "n", 1, 1, settings.max_batch, integer=True)
    return Job(messages, parse_sampling(body, settings), n, stream, bool(options.get("include_usage")))


def fit(messages: list[dict[str, str]], count_tokens: Callable[[str], int],
        budget: int = PROMPT_TOKENS) -> list[dict[str, str]]:
    """The system prompt (when first) and the latest messages that fit `budget` tokens, counted
    from the newest back so a long conversation is never tokenized whole; the newest alone over
    the budget keeps its end. Each text is cut by characters first (see keep_end)."""
    messages = [{**m, "content": keep_end(m["content"], budget * CHARS_PER_TOKEN)} for m in messages]
    head = messages[:1] if len(messages) > 1 and messages[0]["role"] == "system" else []
    used = prompt_tokens(head, count_tokens)
    kept: list[dict[str, str]] = []
    for m in reversed(messages[len(head):]):
        size = turn_tokens(m["content"], count_tokens)
        if used + size > budget:
            if not kept:
                room = budget - used - TURN_OVERHEAD
                kept.append({**m, "content": keep_end_within(m["content"], count_tokens, room)})
            break
        kept.append(m)
        used += size
    return head + kept[::-1]


# -- the answer -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """One choice: its text, why it ended, and its token count (None: count it from the text)."""

    content: str
    finish_reason: str
    tokens: int | None = None

    @classmethod
    def of(cls, raw: Generated | str, stops: Sequence[str]) -> Answer:
        if isinstance(raw, Completion):
            return cls(raw.text, raw.finish_reason, raw.tokens)
        content, stopped = cut(raw.text if isinstance(raw, Generated) else raw, stops)
        truncated = isinstance(raw, Generated) and raw.truncated and not stopped
        return cls(content, "length" if truncated else "stop")


@dataclass(frozen=True)
class Meta:
    """What every object of one response repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str) -> Meta:
        return cls(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model)

    def head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chunk(self, index: int, delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        return {**self.head("chat.completion.chunk"),
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage(tokenizer, messages: list[dict[str, str]], answers: Sequence[Answer]) -> dict[str, int]:
    prompt = len(encode(messages, tokenizer, add_generation_prompt=True).input_ids)
    completion = sum(a.tokens if a.tokens is not None
                     else len(tokenizer(a.content, add_special_tokens=False)["input_ids"]) for a in answers)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _submit(backend: LocalBackend, prompts: list[Prompt]) -> asyncio.Future:
    """Queue every choice of a request, all or none: Busy when the queue cannot hold them all."""
    tasks = [asyncio.ensure_future(backend.generate(p)) for p in prompts]
    await asyncio.sleep(0)  # each has now queued its row, or found the queue full
    busy = [t for t in tasks if t.done() and isinstance(t.exception(), Busy)]  # each one retrieved
    if busy:
        for task, prompt in zip(tasks, prompts, strict=True):
            prompt.cancelled = True  # a row already queued ends after its first token
            task.cancel()
        raise Busy
    return asyncio.gather(*tasks, return_exceptions=True)


async def _answers(pending: asyncio.Future, stops: Sequence[str]) -> list[Answer]:
    results = await pending
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return [Answer.of(r, stops) for r in results]


def _failed(e: BaseException) -> None:
    # LocalBackend logged the batch; the class only here: its text could quote a prompt.
    log.warning("A chat completion failed (%s)", type(e).__name__)


async def _complete(backend: LocalBackend, job: Job, meta: Meta) -> web.Response:
    try:
        answers = await _answers(await _submit(backend, [Prompt(job.messages, job.sampling)
                                                         for _ in range(job.n)]), job.sampling.stop)
    except Busy:
        return _busy()
    except Exception as e:
        _failed(e)
        return Refused(500, "generation failed", "server_error").response()
    return web.json_response({
        **meta.head("chat.completion"),
        "choices": [{"index": i, "message": {"role": "assistant", "content": a.content}, "logprobs": None,
                     "finish_reason": a.finish_reason} for i, a in enumerate(answers)],
        "usage": usage(backend.tokenizer, job.messages, answers),
    })


async def _event(response: web.StreamResponse, data: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n")


def _put(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int, text: str) -> None:
    """A row's sink: from the generation thread onto the event loop (gone at shutdown: dropped)."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(queue.put_nowait, (index, text))


async def _relay(response: web.StreamResponse, backend: LocalBackend, job: Job, meta: Meta,
                 pieces: asyncio.Queue, pending: asyncio.Future) -> None:
    """The stream's events: a role first, text as it comes, the rest and the finish of each
    choice once it is done, usage when asked for, then [DONE]."""
    sent = [0] * job.n
    for i in range(job.n):
        await _event(response, meta.chunk(i, {"role": "assistant", "content": ""}))
    while (piece := await pieces.get()) is not None:
        index, text = piece
        sent[index] += len(text)
        await _event(response, meta.chunk(index, {"content": text}))
    try:
        answers = await _answers(pending, job.sampling.stop)
    except Exception as e:  # the status is sent already: the error goes in the stream
        _failed(e)
        await _event(response, {"error": {"message": "generation failed", "type": "server_error",
                                          "param": None, "code": None}})
        return
    for i, answer in enumerate(answers):
        if rest := answer.content[sent[i]:]:  # all of it when the backend does not stream
            await _event(response, meta.chunk(i, {"content": rest}))
        await _event(response, meta.chunk(i, {}, answer.finish_reason))
    if job.include_usage:
        await _event(response, {**meta.head("chat.completion.chunk"), "choices": [],
                                "usage": usage(backend.tokenizer, job.messages, answers)})
    await response.write(b"data: [DONE]\n\n")


async def _stream(request: web.Request, backend: LocalBackend, job: Job, meta: Meta) -> web.StreamResponse:
    pieces: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    prompts = [Prompt(job.messages, job.sampling, partial(_put, loop, pieces, i)) for i in range(job.n)]
    try:
        pending = await _submit(backend, prompts)
    except Busy:
        return _busy()
    # After the rows' last pieces: the generation thread queued those before it returned.
    pending.add_done_callback(lambda _: pieces.put_nowait(None))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:
        await response.prepare(request)
        await _relay(response, backend, job, meta, pieces, pending)
    except ConnectionError:  # the client left; its rows end at their next token
        log.info("A streaming client disconnected")
    finally:
        for p in prompts:
            p.cancelled = True
    return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    backend = request.app[_BACKEND]
    try:
        body = await request.json()
    except ValueError:
        return Refused(400, "the body is not valid JSON").response()
    try:
        job = parse_job(body, backend.settings, request.app[_MODEL])
    except Refused as refused:
        return refused.response()
    job = replace(job, messages=fit(job.messages, token_counter(backend.tokenizer)))
    meta = Meta.new(request.app[_MODEL])
    return await (_stream(request, backend, job, meta) if job.stream else _complete(backend, job, meta))


# -- the server -----------------------------------------------------------------------------------


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "clone"}


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model(request.app[_MODEL])]})


async def one_model(request: web.Request) -> web.Response:
    name = request.app[_MODEL]
    if request.match_info["name"] != name:
        return Refused(404, f"The model `{request.match_info['name'][:100]}` does not exist", param="model",
                       code="model_not_found").response()
    return web.json_response(_model(name))


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def authorized(header: str, key: str) -> bool:
    """Whether an Authorization header carries `key` as its bearer token, in constant time."""
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


@web.middleware
async def _require_key(request: web.Request, handler: Any) -> web.StreamResponse:
    key, given = request.app[_KEY], request.headers.get("Authorization", "")
    if key and request.path.startswith("/v1") and not authorized(given, key):
        return Refused(401, "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'",
                       code="invalid_api_key").response()
    return await handler(request)


def make_app(backend: ServingBackend, model_name: str, api_key: str | None = None) -> web.Application:
    """The API around `backend`; given `api_key`, every /v1 request must carry it."""
    app = web.Application(middlewares=[_require_key])
    app[_BACKEND] = backend
    app[_MODEL] = model_name
    app[_KEY] = api_key or ""
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{name}", one_model)
    app.router.add_get("/health", health)
    return app


async def serve(backend: ServingBackend, host: str, port: int, model_name: str,
                api_key: str | None = None) -> None:
    """Serve until cancelled; then stop listening and stop the generation worker."""
    runner = web.AppRunner(make_app(backend, model_name, api_key), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        log.info("Serving model %r on http://%s:%d/v1 (%s)", model_name, host, port,
                 "an API key is required" if api_key else "no API key")
        if not api_key and host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("Listening on %s without an API key: anyone who can reach it can use the model "
                        "(set CLONE_API_KEY)", host)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await backend.close()
