"""`pdserve serve` end to end on the CPU: a real gateway, Ray-placed prefill and decode workers,
KV over gRPC, driven by the official `openai` client; the in-memory registry and Redis."""

from __future__ import annotations

import contextlib
import json
import shutil
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

from pdserve.deploy.watchdog import alive, session_processes
from pdserve.engine import LLM, SamplingParams
from tests.servers import DASHBOARD_SERIES, free_port, observed_series, redis_server, wait_for_http

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 512  # the checkpoint's longest: a request can run long enough to be caught mid-way
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
def serving(checkpoint: Path, log_path: Path, *extra_args: str, returncode: int = 0) -> Iterator[Server]:
    """`pdserve serve` in a subprocess until the block ends; then SIGTERM must stop it cleanly
    (unless the test stopped it already: with `returncode`), every process of its Ray instance with it."""
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "pdserve.deploy.cli",
        "serve",
        "--model",
        str(checkpoint),
        "--served-model-name",
        "tiny-llama",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--log-level",
        "warning",
        "--shutdown-timeout",
        "10",
        "--admin-token",
        ADMIN_TOKEN,
        *extra_args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent)
    base_url = f"http://127.0.0.1:{port}"
    ray_processes: dict[int, int] = {}
    try:
        wait_for_http(base_url + "/health", timeout_s=240, process=process, log_path=log_path)
        ray_processes = session_processes(process.pid)
        yield Server(base_url, process, "tiny-llama")
    finally:
        process.send_signal(signal.SIGTERM)  # a no-op once it exited
        try:
            exit_status = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            exit_status = None
    assert exit_status == returncode, f"pdserve did not shut down cleanly ({exit_status}):\n{log_path.read_text()[-3000:]}"
    assert_gone(ray_processes)


def assert_gone(processes: dict[int, int], timeout_s: float = 10.0) -> None:
    """No process of `processes` (pid -> start time) still runs after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while alive(processes):
        assert time.monotonic() < deadline, f"Ray processes outlived the gateway: {sorted(alive(processes))}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def tokenizer_dir(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint's tokenizer files alone, with a chat template of their own (vLLM's --tokenizer):
    chats rendered by anything that read the model's directory instead come out otherwise."""
    directory = tmp_path_factory.mktemp("tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (checkpoints["llama"] / name).is_file():
            shutil.copy(checkpoints["llama"] / name, directory / name)
    template = "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}[ASSISTANT]"
    (directory / "chat_template.jinja").write_text(template)
    return directory


@pytest.fixture(scope="module", params=["memory-registry", "redis-registry"])
def server(
    request: pytest.FixtureRequest, checkpoints: dict[str, Path], tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    with redis_server(enabled=request.param == "redis-registry") as redis_url:
        redis = ["--redis-url", redis_url] if redis_url else []
        with serving(checkpoints["llama"], log_path, "--tokenizer", str(tokenizer_dir), *redis) as server:
            yield server


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path], tokenizer_dir: Path) -> LLM:
    return LLM(
        model=str(checkpoints["llama"]), tokenizer=str(tokenizer_dir), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN
    )


def token_ids_of(choice: object) -> list[int]:
    """Completion token ids, from logprobs rendered with return_tokens_as_token_ids."""
    return [int(t.split(":", 1)[1]) for t in choice.logprobs.tokens]


def complete(server: Server, prompt: str, max_tokens: int, **extra: object) -> object:
    return server.client().completions.create(
        model=server.model,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0.0,
        logprobs=1,
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


PENALIZED = dict(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.3)


def test_penalties_and_logit_bias_cross_both_workers_exactly(server: Server, reference: LLM) -> None:
    """The prefill worker samples the first token, the decode worker the rest: both apply the same
    penalties over the same tokens, so the tokens equal one engine's."""
    bias = {str(reference.get_tokenizer().encode(" blocks", add_special_tokens=False)[0]): 4.0}
    for prompt in PROMPTS[1:3]:
        params = SamplingParams(
            temperature=0.0, max_tokens=16, ignore_eos=True, logit_bias={int(k): v for k, v in bias.items()}, **PENALIZED
        )
        [want] = reference.generate(prompt, params)
        got = complete(server, prompt, 16, logit_bias=bias, **PENALIZED)
        assert token_ids_of(got.choices[0]) == want.outputs[0].token_ids
    plain = complete(server, PROMPTS[1], 16)
    assert token_ids_of(plain.choices[0]) != token_ids_of(
        complete(server, PROMPTS[1], 16, logit_bias=bias, **PENALIZED).choices[0]
    )


def test_a_sigkilled_gateway_takes_its_ray_instance_with_it(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """Ray's own processes would notice a dead driver only after 30-90 s; the watchdog stops them."""
    with serving(checkpoints["llama"], tmp_path / "serve.log", returncode=-signal.SIGKILL) as server:
        ray_processes = session_processes(server.process.pid)
        assert len(ray_processes) >= 4  # Ray's own processes and the two workers
        server.process.kill()
        server.process.wait(10)
        assert_gone(ray_processes, timeout_s=5.0)


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


def test_the_stop_token_that_ends_a_reply_adds_no_text_across_both_workers(server: Server, reference: LLM) -> None:
    """vLLM's: the id of the stop token that ends a reply is in its tokens, its text is not, whether
    the prefill worker sampled it (the first token; its finish comes from the decode worker) or the
    decode worker did (its finish comes in a message after it), streamed or not."""
    prompt = PROMPTS[1]
    [full] = reference.generate(prompt, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    tokens, decode = full.outputs[0].token_ids, reference.get_tokenizer().decode
    later = next(i for i in range(1, 16) if decode([tokens[i]]).strip() and tokens[i] not in tokens[:i])
    for first in (0, later):
        got = complete(server, prompt, 16, stop_token_ids=[tokens[first]]).choices[0]
        assert (token_ids_of(got), got.finish_reason, got.stop_reason) == (tokens[: first + 1], "stop", tokens[first])
        assert got.text == decode(tokens[:first])
        chunks = server.client().completions.create(
            model=server.model, prompt=prompt, max_tokens=16, temperature=0.0, stream=True,
            extra_body={"ignore_eos": True, "stop_token_ids": [tokens[first]]},
        )  # fmt: skip
        assert "".join(c.choices[0].text for c in chunks if c.choices) == decode(tokens[:first])
    kept = complete(server, prompt, 16, stop_token_ids=[tokens[later]], include_stop_str_in_output=True).choices[0]
    assert kept.text == decode(tokens[: later + 1])


def test_streamed_text_equals_non_streamed_text_and_reports_usage(server: Server) -> None:
    prompt = PROMPTS[2]
    whole = server.client().completions.create(
        model=server.model, prompt=prompt, max_tokens=20, temperature=0.0, extra_body={"ignore_eos": True}
    )
    stream = server.client().completions.create(
        model=server.model,
        prompt=prompt,
        max_tokens=20,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
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
    assert tokenizer.apply_chat_template(messages).startswith("[SYSTEM] You are terse.\n")  # --tokenizer's template
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
    """Every prompt block the decode worker does not hold crosses, all layers, K and V; the same
    prompt again keeps the full blocks of all but its last token, which do not."""
    prompt = PROMPTS[1] + " and then some more words, so that the prompt fills more than one block"
    num_prompt_tokens = len(reference.get_tokenizer().encode(prompt))
    assert num_prompt_tokens > 16
    num_blocks = -(-num_prompt_tokens // 16)
    bytes_per_block = 16 * reference.engine.core.model_config.kv_bytes_per_token * 4  # 16 tokens, float32
    kept_in_all = []
    for _ in range(2):
        before = server.metric("pdserve:kv_transfer_bytes_total"), server.metric("pdserve:kv_transfer_kept_blocks_total")
        expected = reference.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        assert token_ids_of(complete(server, prompt, 2).choices[0]) == expected[0].outputs[0].token_ids
        grown = server.metric("pdserve:kv_transfer_bytes_total") - before[0]
        kept = int(server.metric("pdserve:kv_transfer_kept_blocks_total") - before[1])
        assert grown == (num_blocks - kept) * bytes_per_block
        kept_in_all.append(kept)
    assert kept_in_all[1] == (num_prompt_tokens - 1) // 16  # the repeat: nothing left to keep only in its last block
    status = {w["role"]: w["status"] for w in server.workers()}
    assert int(status["prefill"]["kv_bytes_sent"]) == int(status["decode"]["kv_bytes_received"]) > 0


@pytest.mark.parametrize(
    "body, status, param, fragment",
    [
        ({"max_tokens": 0}, 400, "max_tokens", "max_tokens"),
        ({"temperature": -1}, 400, "temperature", "temperature"),
        ({"top_p": 1.5}, 400, "top_p", "top_p"),
        ({"model": "no-such-model"}, 404, "model", "no-such-model"),
        ({"prompt": "word " * 700}, 400, "prompt", "maximum context length"),
        ({"max_tokens": MAX_MODEL_LEN}, 400, "max_tokens", "maximum context length"),
        # refused by the workers (the model's vocabulary): the client's error names its field, not a worker
        ({"prompt": [10**6]}, 400, "prompt", "prompt token ids must be in [0,"),
        ({"logit_bias": {"1000000": 1}}, 400, "logit_bias", "must be in [0,"),
        ({"prompt": [-1]}, 400, "prompt", "prompt token ids must be in [0,"),
    ],
)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(
    server: Server, body: dict, status: int, param: str, fragment: str
) -> None:
    payload = {"model": server.model, "prompt": "Hello", "max_tokens": 4, **body}
    response = httpx.post(server.base_url + "/v1/completions", json=payload, timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and set(error) >= {"message", "type", "param", "code"}
    assert error["param"] == param
    assert not any(word in error["message"] for word in ("worker", "127.0.0.1", "INVALID_ARGUMENT")), error
    assert complete(server, "Hello", 3).choices[0].finish_reason == "length"


def test_malformed_json_is_a_400(server: Server) -> None:
    response = httpx.post(
        server.base_url + "/v1/completions",
        content=b'{"prompt": "Hi", ',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400 and "error" in response.json()


def test_client_disconnects_abort_the_request_on_both_workers(server: Server) -> None:
    """Clients that leave stop their requests on the workers at once, long before the requests
    could have run to their length (~440 tokens each: seconds of decoding here)."""
    payload = {
        "model": server.model,
        "prompt": PROMPTS[2],
        "max_tokens": MAX_MODEL_LEN - 64,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }

    def leave_mid_stream(_: int) -> None:
        with httpx.stream("POST", server.base_url + "/v1/completions", json=payload, timeout=60) as response:
            next(response.iter_lines())

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(leave_mid_stream, range(6)))
    assert_all_kv_returned(server, timeout_s=1.0)
    for timeout_s in (0.02, 0.1, 0.2):  # give up on non-streaming requests early: in prefill or decode
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(server.base_url + "/v1/completions", json={**payload, "stream": False}, timeout=timeout_s)
    assert_all_kv_returned(server, timeout_s=1.5)


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


def test_every_dashboard_series_has_samples_after_a_little_load(server: Server) -> None:
    for prompt in [PROMPTS[3], PROMPTS[3]]:  # the second finds the first's blocks cached
        complete(server, prompt, 4)
    time.sleep(1.0)  # one status poll of the workers (iteration counts, cache config)
    series = observed_series(httpx.get(server.base_url + "/metrics", timeout=10).text)
    missing = [name for name in DASHBOARD_SERIES if name not in series]
    assert not missing, missing
    idle_gauges = (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:gpu_cache_usage_perc",
        "vllm:kv_cache_usage_perc",
    )
    empty = [name for name in DASHBOARD_SERIES if series[name] == 0 and name not in idle_gauges]
    assert not empty, empty


def test_sigterm_drains_in_flight_requests_then_stops_every_process(server: Server) -> None:
    """Last in the module: it stops the server. SIGTERM turns /health to 503 and refuses new
    requests (503 + Retry-After) while a stream in flight runs to its end; then the gateway exits 0
    and every process of its Ray instance is gone within seconds."""
    ray_processes = session_processes(server.process.pid)
    assert len(ray_processes) >= 4  # Ray's own processes and the two workers
    events: list[str] = []
    payload = {
        "model": server.model,
        "prompt": PROMPTS[1],
        "max_tokens": 450,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }

    def stream() -> None:
        with httpx.stream("POST", server.base_url + "/v1/completions", json=payload, timeout=60) as response:
            events.extend(line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: "))

    streaming = threading.Thread(target=stream)
    streaming.start()
    deadline = time.monotonic() + 30
    while not events:
        assert time.monotonic() < deadline, "the stream never started"
        time.sleep(0.005)
    server.process.send_signal(signal.SIGTERM)
    while httpx.get(server.base_url + "/health", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "/health never turned 503"
        time.sleep(0.01)
    refused = httpx.post(server.base_url + "/v1/completions", json={**payload, "stream": False, "max_tokens": 2}, timeout=10)
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1" and "shutting down" in refused.text
    assert streaming.is_alive(), "the stream ended before the drain was checked"
    streaming.join(30)
    assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert sum(len(json.loads(e)["choices"]) for e in events[:-1]) > 0 and '"error"' not in "".join(events)
    assert server.process.wait(timeout=60) == 0
    assert_gone(ray_processes)
