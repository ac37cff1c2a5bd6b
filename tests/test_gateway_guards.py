"""The gateway's guards, in one process over a real HTTP server built as `pdserve serve` builds it:
API keys (401 in OpenAI's shape), per-tenant prefix-cache isolation (usage's cached tokens),
admission (503 + Retry-After), the drain, input limits (body size, read timeouts, lone surrogates,
prompt length in characters) and tokenizing off the event loop. A colocated engine where tokens
matter; a paced backend where timing must be controlled."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest

from pdserve.engine.async_engine import AsyncEngine
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.outputs import RequestDelta
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto.deadlines import Deadlines
from pdserve.router.app import create_app
from pdserve.router.backend import BackendStats, ColocatedBackend
from pdserve.router.config import CorsOptions, GatewayConfig, TLSOptions
from tests.servers import gateway_in_thread

MODEL = "demo"
KEYS = ("key-a", "key-b")
PROMPT = "The key value cache is stored in fixed size blocks; a block table maps every request to its blocks."


# ---- a colocated engine behind API keys ---------------------------------------------------------


@pytest.fixture(scope="module")
def engine(demo_model_dir: Path) -> Iterator[AsyncEngine]:
    config = EngineConfig(model=str(demo_model_dir), device="cpu", max_model_len=128, num_kv_blocks=64)
    async_engine = AsyncEngine(LLMEngine.from_config(config))
    try:
        yield async_engine
    finally:
        async_engine.shutdown()


@pytest.fixture(scope="module")
def keyed(engine: AsyncEngine) -> Iterator[str]:
    app = create_app(ColocatedBackend(engine, MODEL), config=GatewayConfig(api_keys=KEYS))
    with gateway_in_thread(app) as (url, _):
        yield url


def cached_tokens(url: str, key: str | None, **extra: object) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, "temperature": 0, **extra}
    response = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)


def test_v1_without_a_valid_key_is_401_in_openai_shape_and_probes_stay_open(keyed: str) -> None:
    for headers in ({}, {"Authorization": "Bearer key-c"}, {"Authorization": "key-a"}, {"Authorization": "Basic key-a"}):
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"), ("POST", "/tokenize"), ("POST", "/invocations")):
            response = httpx.request(method, keyed + path, json={"prompt": "hi"}, headers=headers, timeout=10)
            assert response.status_code == 401, (path, headers, response.text)
            assert response.json() == {
                "error": {
                    "message": response.json()["error"]["message"],
                    "type": "AuthenticationError",
                    "param": None,
                    "code": 401,
                }
            }
            assert response.headers["www-authenticate"] == "Bearer"
    assert httpx.get(keyed + "/health", timeout=10).status_code == 200
    assert httpx.get(keyed + "/metrics", timeout=10).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=keyed + "/v1", api_key="key-b", max_retries=0)
    assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=2).usage.completion_tokens == 2


def test_protect_metrics_puts_metrics_and_health_behind_the_keys(engine: AsyncEngine) -> None:
    app = create_app(ColocatedBackend(engine, MODEL), config=GatewayConfig(api_keys=KEYS, protect_metrics=True))
    with gateway_in_thread(app) as (url, _):
        for path in ("/metrics", "/health", "/ping"):
            assert httpx.get(url + path, timeout=10).status_code == 401
            assert httpx.get(url + path, headers={"Authorization": "Bearer key-a"}, timeout=10).status_code == 200


APP_ORIGIN = "https://app.example"
PREFLIGHT = {"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}


def test_browser_pages_of_the_allowed_origins_may_call_the_api_and_no_others(engine: AsyncEngine, keyed: str) -> None:
    """CORS (--allowed-origins): an allowed origin's preflight is answered without an API key, and
    its replies, a 401 included, carry the header that lets the page read them; another origin's
    get nothing. Without the flag no CORS header is sent (vLLM sends them for any origin)."""
    config = GatewayConfig(api_keys=KEYS, cors=CorsOptions((APP_ORIGIN,)))
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2}
    with gateway_in_thread(create_app(ColocatedBackend(engine, MODEL), config=config)) as (url, _):
        preflight = httpx.options(url + "/v1/completions", headers=PREFLIGHT, timeout=10)
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == APP_ORIGIN
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        for key, status in (("key-a", 200), ("wrong", 401)):
            headers = {"Origin": APP_ORIGIN, "Authorization": f"Bearer {key}"}
            reply = httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60)
            assert reply.status_code == status and reply.headers["access-control-allow-origin"] == APP_ORIGIN, reply.text
        other = httpx.options(url + "/v1/completions", headers={**PREFLIGHT, "Origin": "https://other.example"}, timeout=10)
        assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
        headers = {"Origin": "https://other.example", "Authorization": "Bearer key-a"}
        assert (
            "access-control-allow-origin"
            not in httpx.post(url + "/v1/completions", json=body, headers=headers, timeout=60).headers
        )
    for reply in (
        httpx.options(keyed + "/v1/completions", headers=PREFLIGHT, timeout=10),
        httpx.post(
            keyed + "/v1/completions", json=body, headers={"Origin": APP_ORIGIN, "Authorization": "Bearer key-a"}, timeout=60
        ),
    ):
        assert "access-control-allow-origin" not in reply.headers


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_under_a_proxy_root_path_still_asks_for_the_key(engine: AsyncEngine, tmp_path: Path) -> None:
    """--ssl-keyfile/--ssl-certfile and --root-path (a proxy serving the API under /llm, passing on
    paths without it): the openai client over HTTPS, the key still required although uvicorn
    puts the root path in front of every request's path, and the API's schema names the prefix."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "1"]
        + ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    config = GatewayConfig(api_keys=KEYS, tls=TLSOptions(str(key), str(cert)), root_path="/llm")
    with gateway_in_thread(create_app(ColocatedBackend(engine, MODEL), config=config), gateway=config) as (url, _):
        assert url.startswith("https://")
        client = openai.OpenAI(base_url=url + "/v1", api_key="key-a", max_retries=0, http_client=httpx.Client(verify=str(cert)))
        assert client.completions.create(model=MODEL, prompt="Hello", max_tokens=2).usage.completion_tokens == 2
        for path in ("/v1/models", "/tokenize"):
            assert (
                httpx.request("GET" if path == "/v1/models" else "POST", url + path, verify=str(cert), timeout=10).status_code
                == 401
            )
        assert httpx.get(url + "/openapi.json", verify=str(cert), timeout=10).json()["servers"] == [{"url": "/llm"}]
        with pytest.raises(httpx.HTTPError):  # HTTPS only
            httpx.get(url.replace("https", "http") + "/health", timeout=5)


def test_cached_prefixes_and_cached_token_counts_stay_within_a_tenant(keyed: str) -> None:
    assert cached_tokens(keyed, "key-a") == 0
    assert cached_tokens(keyed, "key-a") >= 16  # its own prompt: a hit
    assert cached_tokens(keyed, "key-b") == 0  # another tenant learns nothing about it
    assert cached_tokens(keyed, "key-b") >= 16
    assert cached_tokens(keyed, "key-a", cache_salt="secret-1") == 0  # a salt splits a tenant's cache further
    assert cached_tokens(keyed, "key-a", cache_salt="secret-1") >= 16


def test_without_keys_a_cache_salt_still_separates_requests(engine: AsyncEngine) -> None:
    app = create_app(ColocatedBackend(engine, MODEL), config=GatewayConfig())
    prompt = PROMPT + " Unsalted and salted requests do not share it."
    with gateway_in_thread(app) as (url, _):
        assert cached_tokens(url, None, prompt=prompt) == 0
        assert cached_tokens(url, None, prompt=prompt) >= 16  # unsalted requests share the cache
        assert cached_tokens(url, None, prompt=prompt, cache_salt="s1") == 0
        assert cached_tokens(url, None, prompt=prompt, cache_salt="s1") >= 16
        response = httpx.post(
            url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "cache_salt": ""}
        )
        assert response.status_code == 400 and response.json()["error"]["param"] == "cache_salt"


# ---- a paced backend: requests whose timing the test decides ------------------------------------


class PacedBackend:
    """A Backend whose request is led by its prompt's first word: `wait` (no token until `gate` is
    set), `slow` (4 tokens, 0.1 s apart), `forever` (one token, then nothing), else 2 tokens."""

    model_name = MODEL
    max_model_len = 64
    max_logprobs = 20

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.gate = threading.Event()
        self.num_encoded = 0
        self.token = tokenizer.encode(" the", add_special_tokens=False)[0]
        self.started: list[str] = []  # the prompts of the requests run

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestDelta]:
        self.started.append(self.tokenizer.decode(prompt_token_ids))
        mode = self.started[-1].split()[0]
        if mode == "wait":
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
        num_tokens = {"slow": 4, "forever": 1}.get(mode, 2)
        for i in range(num_tokens):
            if mode == "slow" and i:
                await asyncio.sleep(0.1)
            yield RequestDelta(
                request_id, [self.token], finish_reason="length" if i == num_tokens - 1 and mode != "forever" else None
            )
        if mode == "forever":
            await asyncio.sleep(3600)

    async def stats(self) -> BackendStats:
        return BackendStats(0, 0, 0.0, 0)

    async def is_healthy(self) -> bool:
        return True

    async def close(self) -> None:
        pass


@pytest.fixture
def paced(demo_model_dir: Path) -> PacedBackend:
    return PacedBackend(Tokenizer.from_pretrained(demo_model_dir))


def post(url: str, prompt: str, stream: bool = False, timeout: float = 30, n: int = 1) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 8, "stream": stream, "n": n}
    return httpx.post(url + "/v1/completions", json=body, timeout=timeout)


def stream_events(url: str, prompt: str, out: list) -> None:
    """Appends the stream's HTTP status, then its decoded `data:` payloads (`[DONE]` as a string)."""
    with httpx.stream("POST", url + "/v1/completions", json={"prompt": prompt, "max_tokens": 8, "stream": True}, timeout=30) as r:
        out.append(r.status_code)
        for line in r.iter_lines():
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                out.append(payload if payload == "[DONE]" else json.loads(payload))


def in_background(fn: object, *args: object) -> threading.Thread:
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    return thread


def test_admission_answers_503_with_retry_after_beyond_the_queue_then_admits_again(paced: PacedBackend) -> None:
    app = create_app(paced, config=GatewayConfig(max_num_queued_reqs=2, max_num_queued_tokens=10_000))
    with gateway_in_thread(app) as (url, _):
        waiting = [[], []]
        threads = [in_background(stream_events, url, "wait for the gate", out) for out in waiting]
        admission = app.state.serving.admission
        deadline = time.monotonic() + 10
        while admission.num_queued_reqs < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for is_stream in (False, True):
            for n in (1, 3):  # a request's n sequences are admitted, or refused, as one
                refused = post(url, "one too many", stream=is_stream, n=n)
                assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
                assert (
                    refused.json()["error"]["type"] == "ServiceUnavailableError"
                    and "overloaded" in refused.json()["error"]["message"]
                )
        assert not [p for p in paced.started if p.startswith("one too many")]  # refused: none of it ran
        paced.gate.set()
        for thread in threads:
            thread.join(10)
        assert [out[0] for out in waiting] == [200, 200] and all(out[-1] == "[DONE]" for out in waiting)
        assert admission.num_queued_reqs == 0 and admission.num_queued_tokens == 0
        assert post(url, "admitted again").status_code == 200


def test_the_token_bound_refuses_a_second_long_prompt_but_admits_one_alone(paced: PacedBackend) -> None:
    app = create_app(paced, config=GatewayConfig(max_num_queued_reqs=8, max_num_queued_tokens=5))
    with gateway_in_thread(app) as (url, _):
        out: list = []
        thread = in_background(stream_events, url, "wait for the gate with a prompt longer than five tokens", out)
        admission = app.state.serving.admission
        deadline = time.monotonic() + 10
        while admission.num_queued_reqs < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert post(url, "another prompt of more than five tokens here").status_code == 503
        paced.gate.set()
        thread.join(10)
        assert out[0] == 200 and out[-1] == "[DONE]"


def test_sigterm_drain_finishes_what_fits_the_timeout_and_ends_the_rest_with_an_error(paced: PacedBackend) -> None:
    app = create_app(paced, config=GatewayConfig(shutdown_timeout_s=1.0))
    with gateway_in_thread(app, shutdown_timeout_s=1.0) as (url, server):
        short, endless = [], []
        threads = [
            in_background(stream_events, url, "slow stream", short),
            in_background(stream_events, url, "forever stream", endless),
        ]
        whole: list[httpx.Response] = []
        threads.append(in_background(lambda: whole.append(post(url, "forever whole"))))
        deadline = time.monotonic() + 10
        while len(endless) < 2 or app.state.drain.num_in_flight < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.handle_exit(15, None)  # what SIGTERM calls
        signalled = time.monotonic()
        while not app.state.drain.is_draining:
            time.sleep(0.01)
        for probe in (httpx.get(url + "/health", timeout=5), httpx.post(url + "/ping", timeout=5)):
            assert probe.status_code == 503 and probe.headers["retry-after"] == "1"
        refused = post(url, "too late")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1" and "shutting down" in refused.text
        for thread in threads:
            thread.join(15)
        ended = time.monotonic() - signalled
        assert short[0] == 200 and short[-2]["choices"][0]["finish_reason"] == "length" and short[-1] == "[DONE]"
        assert endless[0] == 200 and endless[-1] == "[DONE]"  # cut at the timeout, with an error event and [DONE]
        assert endless[-2]["error"]["code"] == 503 and "shutting down" in endless[-2]["error"]["message"]
        assert whole[0].status_code == 503 and "shutting down" in whole[0].json()["error"]["message"]
        assert 0.9 < ended < 5
        deadline = time.monotonic() + 10
        while not server.should_exit:  # then uvicorn stops
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_second_signal_ends_the_requests_in_flight_at_once_with_an_error_and_done(paced: PacedBackend) -> None:
    app = create_app(paced, config=GatewayConfig(shutdown_timeout_s=60.0))
    with gateway_in_thread(app, shutdown_timeout_s=60.0) as (url, server):
        endless: list = []
        thread = in_background(stream_events, url, "forever stream", endless)
        deadline = time.monotonic() + 10
        while len(endless) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.handle_exit(15, None)  # the first SIGTERM: drain, for up to 60 s
        while not app.state.drain.is_draining:
            time.sleep(0.01)
        time.sleep(0.3)
        assert thread.is_alive() and not server.should_exit
        server.handle_exit(15, None)  # the second: now
        signalled = time.monotonic()
        thread.join(10)
        assert endless[-1] == "[DONE]" and endless[-2]["error"]["code"] == 503, endless[-3:]
        assert "shutting down" in endless[-2]["error"]["message"]
        while not server.should_exit:  # then uvicorn stops
            time.sleep(0.05)
        assert time.monotonic() - signalled < 3


# ---- input limits ----------------------------------------------------------------------------------


def raw_request(url: str, head: bytes, body: bytes = b"", timeout_s: float = 10) -> bytes:
    """Sends `head` (request line and headers) and `body` on a fresh socket; returns what comes back
    until the server closes the connection (it may do so before the body is all sent)."""
    host, port = url.removeprefix("http://").split(":")
    chunks = []
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        try:
            sock.sendall(head + body)
        except OSError:  # the server answered and closed early
            pass
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def post_head(length: int | None = None, chunked: bool = False) -> bytes:
    framing = b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % length
    return b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + framing + b"\r\n"


def test_a_body_over_the_limit_is_413_before_it_is_read(paced: PacedBackend) -> None:
    app = create_app(paced, config=GatewayConfig(max_request_body_bytes=2**20))
    with gateway_in_thread(app) as (url, _):
        started = time.monotonic()
        answer = raw_request(url, post_head(length=50_000_000), b'{"prompt": "')  # 50 MB announced, none sent
        assert answer.startswith(b"HTTP/1.1 413") and b'"code":413' in answer and time.monotonic() - started < 2
        chunk = b"x" * 65536
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(40))  # 2.5 MB, no length announced
        assert raw_request(url, post_head(chunked=True), chunked).startswith(b"HTTP/1.1 413")
        assert post(url, "still serving").status_code == 200


def test_a_body_that_trickles_past_the_read_timeout_is_408_and_silent_connections_are_closed(paced: PacedBackend) -> None:
    app = create_app(paced, config=GatewayConfig(request_read_timeout_s=1.0))
    with gateway_in_thread(app, header_timeout_s=1.0) as (url, _):
        host, port = url.removeprefix("http://").split(":")
        half_open = []
        for _ in range(20):  # headers never finished
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            half_open.append(sock)
        idle = socket.create_connection((host, int(port)), timeout=5)  # nothing sent at all
        trickle = socket.create_connection((host, int(port)), timeout=5)
        trickle.sendall(post_head(length=100) + b'{"prompt"')
        started = time.monotonic()
        assert b"HTTP/1.1 408" in trickle.recv(65536)
        for sock in [*half_open, idle]:
            assert sock.recv(1024) == b""  # closed by the server
            sock.close()
        assert time.monotonic() - started < 4
        assert post(url, "still serving").status_code == 200


@pytest.mark.parametrize(
    "text, status",
    [
        (rb'"a \ud800 b"', 400),  # a lone high surrogate
        (rb'"a \udc00 b"', 400),  # a lone low surrogate
        (rb'"a \ud83d"', 400),  # a high surrogate at the end
        (rb'"a \ud83d\u0041"', 400),  # a high surrogate followed by no low one
        (rb'"a \ud83d\ude00 b"', 200),  # a pair: an emoji
        (rb'"a \\ud800 b"', 200),  # an escaped backslash: the text "\ud800", no surrogate
    ],
)
def test_a_lone_utf16_surrogate_is_a_400(paced: PacedBackend, text: bytes, status: int) -> None:
    app = create_app(paced, config=GatewayConfig())
    with gateway_in_thread(app) as (url, _):
        for path, body in (
            ("/v1/completions", b'{"max_tokens": 2, "prompt": ' + text + b"}"),
            ("/v1/completions", b'{"max_tokens": 2, "prompt": "go", "user": ' + text + b"}"),  # any field
            ("/v1/chat/completions", b'{"max_tokens": 2, "messages": [{"role": "user", "content": ' + text + b"}]}"),
        ):
            response = httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=10)
            assert response.status_code == status, (body, response.text)
            if status == 400:
                assert (
                    response.json()["error"]["type"] == "BadRequestError" and "surrogate" in response.json()["error"]["message"]
                )


class CountingTokenizer:
    """The demo tokenizer, counting calls to `encode` and taking `delay_s` for each."""

    def __init__(self, tokenizer: Tokenizer, delay_s: float = 0.0) -> None:
        self._tokenizer = tokenizer
        self.delay_s = delay_s
        self.num_calls = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.num_calls += 1
        time.sleep(self.delay_s)
        return self._tokenizer.encode(text, add_special_tokens)

    def __getattr__(self, name: str) -> object:
        return getattr(self._tokenizer, name)


def test_a_prompt_longer_than_any_that_fits_is_refused_without_tokenizing(paced: PacedBackend) -> None:
    counting = CountingTokenizer(paced.tokenizer)
    paced.tokenizer = counting
    app = create_app(paced, config=GatewayConfig())
    limit = app.state.serving.max_prompt_chars
    assert limit < 100_000  # 64 tokens of the demo vocabulary
    with gateway_in_thread(app) as (url, _):
        for path, body in (
            ("/v1/completions", {"prompt": "x" * (limit + 1)}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * (limit + 1)}]}),
        ):
            response = httpx.post(url + path, json=body, timeout=10)
            assert response.status_code == 400 and "maximum context length" in response.json()["error"]["message"]
        assert counting.num_calls == 0


def test_tokenizing_runs_off_the_event_loop(paced: PacedBackend) -> None:
    paced.tokenizer = CountingTokenizer(paced.tokenizer, delay_s=2.0)  # a tokenizer busy with a huge prompt
    app = create_app(paced, config=GatewayConfig())
    with gateway_in_thread(app) as (url, _):
        busy = in_background(post, url, "slow to tokenize")
        time.sleep(0.3)
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - started < 1.0  # not 2 s behind the tokenizer
        busy.join(10)


def test_gateway_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="first-token deadline"):
        Deadlines(first_token_s=20, request_s=10)
    with pytest.raises(ValueError, match="positive"):
        Deadlines(stall_s=0)
    with pytest.raises(ValueError, match="API key"):
        GatewayConfig(api_keys=("",))
