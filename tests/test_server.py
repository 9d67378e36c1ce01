"""`medusa-engine serve`: the OpenAI-compatible server, spoken to through the real `openai` client.

In-process: uvicorn in a thread on a free localhost port, over the real `Scheduler` on stories260k
in fp32 with its bundled heads (greedy output is exactly plain greedy decoding, so every reply is
compared with plain `generate` of the same prompt). A subprocess runs `medusa-engine serve` for the
signal tests. Unit tests cover the detokenizer and stop matcher token by token.
"""

from __future__ import annotations

import http.client
import json
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from medusa_engine.config import EngineConfig  # noqa: E402
from medusa_engine.engine import build_engine, load_engine  # noqa: E402
from medusa_engine.hf_adapter import HFModel  # noqa: E402
from medusa_engine.scheduler import Event, Request, Scheduler  # noqa: E402
from medusa_engine.server.app import ServerOptions, create_app  # noqa: E402
from medusa_engine.server.metrics import Histogram  # noqa: E402
from medusa_engine.server.streaming import StopMatcher, TextStream  # noqa: E402
from tests.conftest import PROMPTS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = "stories260k"
KEY = "s3cret-key"
LONG_PROMPT = "Timmy saw a big truck"  # greedy stories260k runs past 400 tokens without an EOS


# ---- fixtures -----------------------------------------------------------------------------------


class Served:
    """A uvicorn server in a thread on a free localhost port."""

    def __init__(self, app) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def client(self, api_key: str = "unused"):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture(scope="module")
def engine():
    return load_engine(EngineConfig(model=MODEL, dtype="fp32", attention="sdpa"))


@pytest.fixture(scope="module")
def scheduler(engine):
    scheduler = Scheduler(engine, max_batch=16)
    scheduler.start()
    yield scheduler
    scheduler.shutdown(drain=False, timeout=10)


@pytest.fixture(scope="module")
def tokenizer(engine):
    return engine.model.tokenizer


def options(engine, **kw) -> ServerOptions:
    return ServerOptions(
        model_name=MODEL,
        max_context=engine.model.max_context,
        vocab_size=engine.model.vocab_size,
        max_tokens=32,
        **kw,
    )


@pytest.fixture(scope="module")
def server(engine, scheduler) -> Iterator[Served]:
    served = Served(create_app(scheduler, engine.model.tokenizer, options(engine)))
    yield served
    served.close()


@pytest.fixture(scope="module")
def reference(stories260k):
    """Plain greedy decoding (no heads, no tree) of a prompt's ids: the answer to match."""
    plain = build_engine(stories260k, None, "plain")
    cache: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def answer(ids: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(ids), max_new_tokens)
        if key not in cache:
            cache[key] = plain.generate(ids, max_new_tokens).token_ids
        return cache[key]

    return answer


def text_of(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def metrics(url: str) -> dict[str, float]:
    """The /metrics samples without labels (and labelled ones by their full name)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        assert response.headers["content-type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def raw(url: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, parsed JSON body) of one request, errors included."""
    request = urllib.request.Request(url + path, data=body, headers=headers or {})
    if body is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def chat(client, content: str, **kw):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": content}], **kw
    )


# ---- the detokenizer and stop strings (unit) -----------------------------------------------------


def test_streamed_text_equals_the_whole_decode_for_any_chunking(tokenizer):
    """Random replies of word pieces and multi-byte characters (several byte-fallback tokens
    each), fed in random step sizes. (Bytes that are not UTF-8 at all decode differently with
    context, so there the stream is only equal to the whole reply: see streaming.py.)"""
    rng = random.Random(0)
    byte_tokens = 3 + 256  # stories260k: <unk> <s> </s>, then <0x00>..<0xFF>, then pieces
    characters = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in "日本é🙂✓"]
    assert any(len(c) > 2 for c in characters)
    for _ in range(200):
        ids = []
        for _ in range(rng.randrange(1, 30)):
            if rng.random() < 0.3:
                ids += rng.choice(characters)
            else:
                ids.append(rng.randrange(byte_tokens, len(tokenizer)))
        stream = TextStream(lambda t: text_of(tokenizer, t))
        pieces, i = [], 0
        while i < len(ids):
            n = rng.randrange(1, 5)
            pieces.append(stream.feed(ids[i : i + n]).text)
            i += n
        pieces.append(stream.finish().text)
        assert "".join(pieces) == text_of(tokenizer, ids), ids


def test_incomplete_utf8_is_held_back_until_the_character_is_whole(tokenizer):
    ids = tokenizer("héllo 日本", add_special_tokens=False)["input_ids"]
    assert len(ids) > len("héllo 日本") - 1  # the CJK characters are byte-fallback tokens
    stream = TextStream(lambda t: text_of(tokenizer, t))
    pieces = [stream.feed([t]).text for t in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.finish().text == "héllo 日本"
    assert "日" in pieces and "本" in pieces  # each went out whole, once its last byte came


def test_a_stop_string_split_across_steps_is_never_half_sent():
    texts = ["Once up", "on a ti", "me there", " was"]
    stream = TextStream(lambda ids: "".join(texts[i] for i in ids), stops=["a time"])
    pieces = [stream.feed([i]) for i in range(len(texts))]
    assert [p.text for p in pieces] == ["Once up", "on ", "", ""]  # "a ti" held, then cut
    assert [p.stopped for p in pieces] == [False, False, True, True]
    assert stream.text == "Once upon "


def test_a_held_back_prefix_that_never_becomes_a_stop_is_sent_at_the_end():
    matcher = StopMatcher(["cats!", "dog"])
    assert matcher.push("hot do") == "hot "  # "do" may start "dog"
    assert matcher.push("ts and ca") == "dots and "  # "ca" may start "cats!"
    assert matcher.push("ts") == ""
    assert matcher.flush() == "cats"
    assert not matcher.stopped
    earliest = StopMatcher(["b c", "a"])
    assert earliest.push("x b c a") == "x " and earliest.stopped  # the first match wins


def test_histogram_buckets_are_cumulative():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    assert h.lines("x")[:3] == [
        'x_bucket{le="0.1"} 1',
        'x_bucket{le="1.0"} 2',
        'x_bucket{le="+Inf"} 3',
    ]


# ---- the API through the openai client ------------------------------------------------------------


def test_models_and_health(server):
    assert [m.id for m in server.client().models.list()] == [MODEL]
    assert raw(server.url, "/health") == (200, {"status": "ok", "running": 0, "queued": 0})
    status, body = raw(server.url, "/v1/no-such-route")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    samples = metrics(server.url)
    for name in (
        "requests_total",
        "generated_tokens_total",
        "tau",
        "step_latency_seconds",
        "batch_size",
        "queue_length",
        "kv_cache_bytes_in_use",
        "time_to_first_token_seconds_count",
    ):
        assert f"medusa_{name}" in samples, name
    assert samples['medusa_http_responses_total{route="other",code="404"}'] >= 1


def test_chat_whole_and_streamed_equal_generate(server, tokenizer, reference):
    client = server.client()
    expected_ids = reference(tokenizer(PROMPTS[0])["input_ids"], 40)
    expected = text_of(tokenizer, expected_ids)
    whole = chat(client, PROMPTS[0], max_tokens=40, temperature=0)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 40
    assert whole.usage.prompt_tokens == len(tokenizer(PROMPTS[0])["input_ids"])
    assert whole.medusa["steps"] < 40 and whole.medusa["tau"] > 1  # the heads' drafts were kept

    chunks = list(
        chat(
            client,
            PROMPTS[0],
            max_completion_tokens=40,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(content) == expected
    assert sum(1 for piece in content if piece) > 3  # it did stream, in several pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_completions_text_and_token_ids(server, tokenizer, reference):
    client = server.client()
    ids = tokenizer(PROMPTS[2])["input_ids"]
    expected = text_of(tokenizer, reference(ids, 24))
    got = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=24)
    assert got.choices[0].text == expected and got.usage.completion_tokens == 24
    streamed = client.completions.create(model=MODEL, prompt=ids, max_tokens=24, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected
    sampled = [
        client.completions.create(
            model=MODEL, prompt=PROMPTS[2], max_tokens=24, temperature=1.0, seed=7
        )
        .choices[0]
        .text
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]  # a seed makes a sampled reply reproducible
    assert sampled[0] != expected  # and it was sampled (deterministic for this seed)


def test_stop_strings_cut_the_text_and_end_the_request(server, scheduler, tokenizer, reference):
    client = server.client()
    ids = tokenizer(PROMPTS[0])["input_ids"]
    # The same request straight to the scheduler: where its steps' tokens end in the text.
    events: list[Event] = []
    done = threading.Event()

    def on_event(event: Event) -> None:
        events.append(event)
        if event.finish_reason:
            done.set()

    scheduler.submit(Request(tuple(ids), 60), on_event)
    assert done.wait(60)
    all_ids = [t for e in events for t in e.tokens]
    assert all_ids == reference(ids, 60)
    full = text_of(tokenizer, all_ids)
    ends = [len(text_of(tokenizer, all_ids[:n])) for n in _cumulative(events)]
    cut = next(
        b for b in ends if 10 < b < len(full) - 3 and full.find(full[b - 2 : b + 2]) == b - 2
    )
    stop = full[cut - 2 : cut + 2]  # two characters from one step, two from the next

    before = metrics(server.url)
    whole = chat(client, PROMPTS[0], max_tokens=60, stop=[stop, "never appears"])
    assert whole.choices[0].message.content == full[: cut - 2]
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage.completion_tokens < 60  # cancelled in the engine, not run to the end
    stream = chat(client, PROMPTS[0], max_tokens=60, stop=stop, stream=True)
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full[: cut - 2]
    assert chunks[-1].choices[0].finish_reason == "stop"
    after = metrics(server.url)
    assert (
        after["medusa_stop_string_finishes_total"] - before["medusa_stop_string_finishes_total"]
        == 2
    )


def _cumulative(events: list[Event]) -> list[int]:
    total, out = 0, []
    for e in events:
        total += len(e.tokens)
        out.append(total)
    return out


def test_bad_requests_are_openai_errors(server, engine):
    client = server.client()
    cases = [
        dict(temperature=5),
        dict(n=2),
        dict(max_tokens=0),
        dict(stop=[""]),
        dict(top_p=0),
        dict(logprobs=True),
        dict(seed=2**64),
    ]
    for kw in cases:
        with pytest.raises(openai.BadRequestError) as err:
            chat(client, "hi", **kw)
        assert err.value.status_code == 400 and err.value.body["param"], kw
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=[5] * (engine.model.max_context + 8))
    assert err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "model_not_found"
    status, body = raw(server.url, "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    # A body over the limit is refused from its Content-Length, before it is read.
    connection = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(64 << 20))
    connection.endheaders(b'{"prompt": "aaaa')
    response = connection.getresponse()
    assert response.status == 413
    assert json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()


def test_queue_full_and_shutting_down_are_503(engine):
    # A scheduler that was never started, over its own model: nothing is ever admitted.
    model = HFModel.load(MODEL, dtype="fp32", attention="sdpa")
    idle = Scheduler(build_engine(model, None, "plain"), max_queue=1)
    served = Served(create_app(idle, model.tokenizer, options(engine)))
    try:
        client = served.client()
        idle.submit(Request((1, 2, 3), 4), lambda event: None)  # fills the queue
        with pytest.raises(openai.APIStatusError) as err:
            chat(client, "hi")
        assert err.value.status_code == 503 and err.value.body["code"] == "queue_full"
        idle.shutdown(drain=False)
        with pytest.raises(openai.APIStatusError) as err:
            chat(client, "hi")
        assert err.value.status_code == 503 and err.value.body["code"] == "shutting_down"
    finally:
        served.close()


def test_api_key_on_and_off(server, engine, scheduler):
    assert server.client(api_key="anything").models.list().data  # off: any key, or none
    assert raw(server.url, "/v1/models")[0] == 200
    secured = Served(create_app(scheduler, engine.model.tokenizer, options(engine, api_key=KEY)))
    try:
        with pytest.raises(openai.AuthenticationError) as err:
            secured.client(api_key=KEY + "x").models.list()
        assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
        assert raw(secured.url, "/v1/models")[0] == 401
        basic = {"Authorization": f"Basic {KEY}"}
        assert raw(secured.url, "/v1/models", headers=basic)[0] == 401
        assert [m.id for m in secured.client(api_key=KEY).models.list()] == [MODEL]
        assert chat(secured.client(api_key=KEY), "hi", max_tokens=2).usage.completion_tokens == 2
        assert raw(secured.url, "/health")[0] == 200  # health and metrics stay open
    finally:
        secured.close()


def test_sixteen_concurrent_requests_each_equal_their_solo_answer(server, tokenizer, reference):
    client = server.client()
    prompts = PROMPTS[:16]
    expected = [text_of(tokenizer, reference(tokenizer(p)["input_ids"], 24)) for p in prompts]

    def ask(i: int) -> str:
        if i % 2:
            reply = chat(client, prompts[i], max_tokens=24)
            return reply.choices[0].message.content or ""
        stream = chat(client, prompts[i], max_tokens=24, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    before = metrics(server.url)
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16)))
    assert got == expected
    after = metrics(server.url)
    assert after["medusa_requests_total"] - before["medusa_requests_total"] == 16
    assert (
        after['medusa_http_responses_total{route="/v1/chat/completions",code="200"}']
        - before.get('medusa_http_responses_total{route="/v1/chat/completions",code="200"}', 0)
        == 16
    )


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    before = metrics(server.url)
    stream = server.client().completions.create(
        model=MODEL, prompt=LONG_PROMPT, max_tokens=400, stream=True
    )
    first = next(iter(stream))
    assert first.choices[0].text
    assert metrics(server.url)["medusa_requests_running"] == 1  # still generating
    stream.close()
    deadline = time.monotonic() + 20
    while (now := metrics(server.url))["medusa_requests_running"] > 0:
        assert time.monotonic() < deadline, "the request kept its row"
        time.sleep(0.05)
    assert now["medusa_kv_cache_bytes_in_use"] == 0
    assert now["medusa_client_disconnects_total"] - before["medusa_client_disconnects_total"] == 1
    generated = now["medusa_generated_tokens_total"] - before["medusa_generated_tokens_total"]
    assert generated < 400  # cancelled, not finished


# ---- the command: signals ------------------------------------------------------------------------


def start_serve(*flags: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "medusa_engine.cli",
            "serve",
            "--model",
            MODEL,
            "--dtype",
            "fp32",
            "--port",
            "0",
            *flags,
        ],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if match := re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line):
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, match.group(1)
    proc.wait(10)
    raise AssertionError(f"serve did not start (exit {proc.returncode})")


def test_sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_0(tokenizer, reference):
    proc, url = start_serve("--max-new-tokens", "120")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        expected = text_of(tokenizer, reference(tokenizer(LONG_PROMPT)["input_ids"], 120))
        stream = client.completions.create(model=MODEL, prompt=LONG_PROMPT, stream=True)
        pieces, after_signal = [], 0
        for chunk in stream:
            pieces.append(chunk.choices[0].text)
            if len(pieces) == 1:
                proc.send_signal(signal.SIGTERM)
                time.sleep(0.5)  # uvicorn notices within 0.1 s and closes its socket
                with pytest.raises(openai.APIConnectionError):
                    client.models.list()
            else:
                after_signal += 1
            finish = chunk.choices[0].finish_reason
        assert "".join(pieces) == expected and finish == "length"
        assert after_signal > 1  # the stream went on after the signal
        assert proc.wait(30) == 0
    finally:
        proc.kill()


@pytest.mark.slow
def test_sigint_when_idle_exits_0():
    proc, url = start_serve()
    try:
        assert raw(url, "/health")[0] == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        proc.kill()


# ---- layering ---------------------------------------------------------------------------------------


def test_only_the_server_package_imports_the_web_stack():
    import ast

    web = {"fastapi", "starlette", "uvicorn"}
    offenders = []
    for package in ("medusa_engine", "attention", "diffusion_ext", "eval"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path.is_relative_to(ROOT / "medusa_engine" / "server"):
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else []
                )
                offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in web]
    assert offenders == []


@pytest.mark.slow
def test_the_command_lists_serve_without_importing_the_web_stack():
    code = (
        "import sys\n"
        "from medusa_engine import cli\n"
        "names = cli.build_parser()._subparsers._group_actions[0].choices\n"
        "print('serve' in names, sorted(m for m in ('fastapi', 'uvicorn') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "True []"
