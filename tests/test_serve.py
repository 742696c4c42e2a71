"""`awqc serve` through the official `openai` client: chat and completions, streamed and not,
against the engine run directly; 8 concurrent streams against the same prompts one at a time;
the API key; bad requests as OpenAI-style 4xx errors."""
from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest

import openai

from awqc.runtime.engine import Engine
from awqc.runtime.sampling import SamplingParams

KEY = "test-key-123"


def _start(app) -> tuple[str, object]:
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}/v1", server


@pytest.fixture(scope="module")
def server(tiny_artifact: Path):
    from awqc.runtime.serve import make_app

    url, srv = _start(make_app(Engine(tiny_artifact, max_batch=8), "tiny", max_batch=8))
    yield url
    srv.should_exit = True


@pytest.fixture(scope="module")
def reference(tiny_artifact: Path):
    """Greedy text of the engine itself, one sequence, from an empty cache."""
    engine = Engine(tiny_artifact)

    def run(ids: list[int], n: int) -> str:
        return engine.decode_text(list(engine.generate(ids, n, SamplingParams())))

    return engine, run


def _client(url: str, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=60)


def test_models_and_health(server: str) -> None:
    models = _client(server).models.list()
    assert [m.id for m in models.data] == ["tiny"]
    import urllib.request

    with urllib.request.urlopen(server.removesuffix("/v1") + "/health") as r:
        assert r.status == 200


def test_chat_completion_equals_the_engine(server: str, reference) -> None:
    engine, greedy = reference
    messages = [{"role": "user", "content": "the quick brown fox"}]
    res = _client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    expected = greedy(engine.encode_messages(messages), 6)
    assert res.choices[0].message.content == expected and res.choices[0].message.role == "assistant"
    assert res.usage.prompt_tokens == len(engine.encode_messages(messages)) and res.usage.completion_tokens <= 6
    assert res.choices[0].finish_reason in ("length", "stop")


def test_streamed_chat_equals_the_whole_answer(server: str) -> None:
    client = _client(server)
    messages = [{"role": "user", "content": "jumps over"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_completion_and_stop(server: str, reference) -> None:
    engine, greedy = reference
    client = _client(server)
    res = client.completions.create(model="tiny", prompt="the lazy dog", max_tokens=10, temperature=0)
    expected = greedy(engine.encode("the lazy dog"), 10)
    assert res.choices[0].text == expected
    stop = expected[len(expected) // 2:len(expected) // 2 + 2]
    cut = client.completions.create(model="tiny", prompt="the lazy dog", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == expected[:expected.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_eight_concurrent_streams_equal_one_at_a_time(server: str) -> None:
    prompts = [f"the {w} fox" for w in ("quick", "lazy", "brown", "red", "old", "small", "big", "grey")]
    client = _client(server)
    one_by_one = [client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0).choices[0].text
                  for p in prompts]

    async def all_at_once() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=server, api_key="none", max_retries=0, timeout=60)

        async def one(p: str) -> str:
            stream = await aclient.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0,
                                                      stream=True)
            return "".join([c.choices[0].text async for c in stream])

        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(all_at_once()) == one_by_one


def test_api_key(tiny_artifact: Path) -> None:
    from awqc.runtime.serve import make_app

    url, srv = _start(make_app(Engine(tiny_artifact), "tiny", max_batch=1, api_key=KEY))
    try:
        with pytest.raises(openai.AuthenticationError):
            _client(url, "wrong").models.list()
        import json
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as info:  # no Authorization header at all
            urllib.request.urlopen(urllib.request.Request(url + "/completions", data=b'{"model": "tiny", "prompt": "hi"}',
                                                          headers={"Content-Type": "application/json"}))
        assert info.value.code == 401 and json.loads(info.value.read())["error"]["code"] == "invalid_api_key"
        assert _client(url, KEY).models.list().data[0].id == "tiny"
    finally:
        srv.should_exit = True


@pytest.mark.parametrize("kwargs, error, code", [
    (dict(model="gpt-4", prompt="hi"), "NotFoundError", "model_not_found"),
    (dict(model="tiny", prompt="hi", max_tokens=0), "BadRequestError", None),
    (dict(model="tiny", prompt="hi", max_tokens=100000), "BadRequestError", None),
    (dict(model="tiny", prompt="fox " * 300), "BadRequestError", "context_length_exceeded"),
    (dict(model="tiny", prompt="hi", temperature=-1), "BadRequestError", None),
    (dict(model="tiny", prompt="hi", n=2), "BadRequestError", None)])
def test_bad_requests_are_4xx_with_an_error_body(server: str, kwargs: dict, error: str, code: str | None) -> None:
    with pytest.raises(getattr(openai, error)) as info:
        _client(server).completions.create(**kwargs)
    body = info.value.body
    assert body["message"] and body["type"] == "invalid_request_error"
    if code:
        assert body["code"] == code


@pytest.mark.parametrize("raw, status", [(b"{not json", 400), (b'{"model": "tiny"}', 400),
                                         (b'{"model": "tiny", "messages": []}', 400),
                                         (b'{"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}', 400)])
def test_malformed_bodies(server: str, raw: bytes, status: int) -> None:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(server + "/chat/completions", data=raw, headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req)
    assert info.value.code == status
    assert json.loads(info.value.read())["error"]["message"]
