"""`pdserve serve` end to end on the CPU: a real gateway, Ray-placed prefill and decode workers,
KV over gRPC, driven by the official `openai` client; the in-memory registry and Redis."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from engine import LLM, SamplingParams
from tests.servers import free_port, redis_server, wait_for_http

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 256
ADMIN_TOKEN = "e2e-admin"
PROMPTS = [
    "Hello",
    "The key value cache is stored in fixed size blocks",
    "Questions and answers: Who wrote the letter? Where did they go? Why is the sky blue?",
    "def add(a, b):\n    return a + b\nfor i in range(10):\n    print(i, add(i, 1))\n" * 2,
]


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen
    model: str

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def workers(self) -> list[dict]:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        return httpx.get(self.base_url + "/admin/workers", headers=headers, timeout=10).json()["workers"]

    def metric(self, name: str) -> float:
        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextlib.contextmanager
def serving(checkpoint: Path, log_path: Path, *extra_args: str) -> Iterator[Server]:
    """`pdserve serve` in a subprocess until the block ends; then SIGTERM must stop it cleanly."""
    port = free_port()
    args = [
        sys.executable, "-m", "deploy.cli", "serve", "--model", str(checkpoint),
        "--served-model-name", "tiny-llama", "--port", str(port), "--device", "cpu",
        "--max-model-len", str(MAX_MODEL_LEN), "--log-level", "warning", "--admin-token", ADMIN_TOKEN, *extra_args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(base_url + "/health", timeout_s=240, process=process, log_path=log_path)
        yield Server(base_url, process, "tiny-llama")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            returncode = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            returncode = None
    assert returncode == 0, f"pdserve did not shut down cleanly ({returncode}):\n{log_path.read_text()[-3000:]}"


@pytest.fixture(scope="module", params=["memory-registry", "redis-registry"])
def server(request: pytest.FixtureRequest, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with redis_server(enabled=request.param == "redis-registry") as redis_url:
        with serving(checkpoints["llama"], log_path, *(["--redis-url", redis_url] if redis_url else [])) as server:
            yield server


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path]) -> LLM:
    return LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)


def token_ids_of(choice: object) -> list[int]:
    """Completion token ids, from logprobs rendered with return_tokens_as_token_ids."""
    return [int(t.split(":", 1)[1]) for t in choice.logprobs.tokens]


def complete(server: Server, prompt: str, max_tokens: int, **extra: object) -> object:
    return server.client().completions.create(
        model=server.model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, logprobs=1,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True, **extra},
    )


@pytest.mark.parametrize("kv_transport", ["nccl", "grpc", "local"])
def test_every_cpu_kv_transport_serves_greedy_completions_equal_to_the_offline_engine(
    kv_transport: str, checkpoints: dict[str, Path], reference: LLM, tmp_path: Path
) -> None:
    """`--kv-transport nccl` runs over gloo on CPU workers; `local` puts both workers in one process."""
    expected = reference.generate(PROMPTS * 2, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    with serving(checkpoints["llama"], tmp_path / "serve.log", "--kv-transport", kv_transport) as server:
        with ThreadPoolExecutor(8) as pool:  # several hand-offs at once: one pair's transfers go in order
            results = list(pool.map(lambda prompt: complete(server, prompt, 12), PROMPTS * 2))
        for got, want in zip(results, expected):
            assert token_ids_of(got.choices[0]) == want.outputs[0].token_ids
        num_bytes = server.metric(f'pdserve:kv_transfer_bytes_total{{model_name="tiny-llama",transport="{kv_transport}"}}')
        assert num_bytes > 0 and server.metric("pdserve:kv_transfer_seconds_count") == len(expected)
        transports = {w["status"]["kv_transports"] for w in server.workers() if w["role"] == "decode"}
        assert transports == {kv_transport}


def test_greedy_completions_equal_the_offline_engine(server: Server, reference: LLM) -> None:
    expected = reference.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    for prompt, want in zip(PROMPTS, expected):
        got = complete(server, prompt, 16)
        assert token_ids_of(got.choices[0]) == want.outputs[0].token_ids
        assert got.choices[0].text == want.outputs[0].text
        assert got.choices[0].finish_reason == "length"
        assert got.usage.prompt_tokens == len(want.prompt_token_ids)
        assert got.usage.completion_tokens == 16
        assert got.usage.total_tokens == len(want.prompt_token_ids) + 16


def test_streamed_text_equals_non_streamed_text_and_reports_usage(server: Server) -> None:
    prompt = PROMPTS[2]
    whole = server.client().completions.create(
        model=server.model, prompt=prompt, max_tokens=20, temperature=0.0, extra_body={"ignore_eos": True}
    )
    stream = server.client().completions.create(
        model=server.model, prompt=prompt, max_tokens=20, temperature=0.0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[0].choices and chunks[0].choices[0].text  # the first chunk carries the first token
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_completion_applies_the_chat_template(server: Server, reference: LLM) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    got = server.client().chat.completions.create(
        model=server.model, messages=messages, max_tokens=12, temperature=0.0, extra_body={"ignore_eos": True}
    )
    tokenizer = reference.get_tokenizer()
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
    [want] = reference.generate({"prompt_token_ids": prompt_ids}, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.outputs[0].text
    assert got.usage.prompt_tokens == len(prompt_ids)


def test_sixteen_concurrent_requests_all_come_back_correct(server: Server, reference: LLM) -> None:
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(16)]
    lengths = [4 + (i * 5) % 17 for i in range(16)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lengths]
    expected = reference.generate(prompts, params)
    results: dict[int, list[int]] = {}

    def run(i: int) -> None:
        results[i] = token_ids_of(complete(server, prompts[i], lengths[i]).choices[0])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {i: results.get(i) for i in range(16)} == {i: e.outputs[0].token_ids for i, e in enumerate(expected)}


def test_kv_really_crosses_between_the_worker_processes(server: Server, reference: LLM) -> None:
    prompt = PROMPTS[1] + " and then some more words, so that the prompt fills more than one block"
    num_prompt_tokens = len(reference.get_tokenizer().encode(prompt))
    assert num_prompt_tokens > 16
    before = server.metric("pdserve:kv_transfer_bytes_total")
    complete(server, prompt, 2)
    grown = server.metric("pdserve:kv_transfer_bytes_total") - before
    bytes_per_block = 16 * reference.engine.core.model_config.kv_bytes_per_token * 4  # 16 tokens, float32
    assert grown == -(-num_prompt_tokens // 16) * bytes_per_block  # every prompt block, all layers, K and V
    status = {w["role"]: w["status"] for w in server.workers()}
    assert int(status["prefill"]["kv_bytes_sent"]) == int(status["decode"]["kv_bytes_received"]) > 0


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"temperature": -1}, 400, "temperature"),
        ({"top_p": 1.5}, 400, "top_p"),
        ({"model": "no-such-model"}, 404, "no-such-model"),
        ({"prompt": "word " * 400}, 400, "maximum context length"),
        ({"max_tokens": MAX_MODEL_LEN}, 400, "maximum context length"),
    ],
)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server: Server, body: dict, status: int, fragment: str) -> None:
    payload = {"model": server.model, "prompt": "Hello", "max_tokens": 4, **body}
    response = httpx.post(server.base_url + "/v1/completions", json=payload, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and set(error) >= {"message", "type", "param", "code"}
    assert complete(server, "Hello", 3).choices[0].finish_reason == "length"


def test_malformed_json_is_a_400(server: Server) -> None:
    response = httpx.post(
        server.base_url + "/v1/completions", content=b'{"prompt": "Hi", ', headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 400 and "error" in response.json()


def test_client_disconnects_abort_the_request_on_both_workers(server: Server) -> None:
    payload = {"model": server.model, "prompt": PROMPTS[2], "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    for _ in range(3):  # leave mid-stream
        with httpx.stream("POST", server.base_url + "/v1/completions", json=payload, timeout=60) as response:
            next(response.iter_lines())
    for timeout_s in (0.02, 0.1, 0.2):  # give up on non-streaming requests early: in prefill or decode
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(server.base_url + "/v1/completions", json={**payload, "stream": False, "max_tokens": 230}, timeout=timeout_s)
    assert_all_kv_returned(server)


def test_all_kv_blocks_are_returned_after_everything(server: Server) -> None:
    assert_all_kv_returned(server)


def assert_all_kv_returned(server: Server, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        workers = server.workers()
        busy = {w["worker_id"]: (w["status"]["num_used_blocks"], w["status"]["num_running"]) for w in workers}
        if len(workers) == 2 and all(used == 0 and running == 0 for used, running in busy.values()):
            return
        assert time.monotonic() < deadline, f"KV blocks still held: {json.dumps(busy)}"
        time.sleep(0.2)


def test_sigterm_stops_everything(server: Server) -> None:
    """Checked in the fixture's teardown (exit code 0); here: the server is up to be stopped."""
    assert server.process.poll() is None
    assert os.path.exists("/proc/%d" % server.process.pid)
