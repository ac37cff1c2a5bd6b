"""`pdserve bench`: its statistics on hand-made request results, its SSE reading, and whole runs
against a real `pdserve serve` on the CPU (demo model) through both endpoints, a wrong model included."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from pdserve.bench.serve import arrival_offsets, read_stream
from pdserve.bench.serve_metrics import RequestResult, calculate_metrics, distinct_errors, distribution
from tests.servers import free_port, wait_for_http

ROOT = Path(__file__).resolve().parent.parent
NUM_PROMPTS, INPUT_LEN, OUTPUT_LEN = 12, 24, 8
LATENCY_NAMES = ("ttft", "tpot", "itl", "e2el")


# -- statistics, no server ------------------------------------------------------------------------
def hand_made_results() -> list[RequestResult]:
    return [
        RequestResult(10, 5, ttft_s=0.1, itls_s=[0.02] * 4, latency_s=0.18),  # tpot 20 ms
        RequestResult(10, 3, ttft_s=0.3, itls_s=[0.05] * 2, latency_s=0.4),  # tpot 50 ms
        RequestResult(10, 1, ttft_s=0.2, latency_s=0.2),  # one token: no tpot
        RequestResult(error="HTTP 500: boom"),
        RequestResult(error="HTTP 500: boom"),
        RequestResult(error="ReadTimeout: timed out"),
    ]


def test_metrics_count_only_successful_requests() -> None:
    m = calculate_metrics(hand_made_results(), duration_s=2.0)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (3, 3, 30, 9)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_throughput"] == pytest.approx(4.5)
    assert m["total_token_throughput"] == pytest.approx(19.5)
    assert m["mean_ttft_ms"] == pytest.approx(200) and m["p50_ttft_ms"] == pytest.approx(200)
    assert m["mean_tpot_ms"] == pytest.approx(35)  # the single-token request has no TPOT
    assert m["mean_itl_ms"] == pytest.approx((4 * 20 + 2 * 50) / 6)  # every gap of every request
    assert m["mean_e2el_ms"] == pytest.approx(260) and m["p99_e2el_ms"] == pytest.approx(400 - 0.02 * 200)
    assert distinct_errors(hand_made_results()) == ["HTTP 500: boom", "ReadTimeout: timed out"]


@pytest.mark.parametrize(
    "slo_ttft_ms, slo_tpot_ms, goodput",
    [(None, None, 1.5), (250, None, 1.0), (None, 30, 1.0), (150, 30, 0.5), (50, None, 0.0)],
)
def test_goodput_counts_requests_within_every_given_slo(
    slo_ttft_ms: float | None, slo_tpot_ms: float | None, goodput: float
) -> None:
    m = calculate_metrics(hand_made_results(), 2.0, slo_ttft_ms, slo_tpot_ms)
    assert m["request_goodput"] == pytest.approx(goodput)


def test_an_empty_distribution_is_zeros_and_percentiles_interpolate() -> None:
    assert set(distribution("itl", []).values()) == {0.0}
    stats = distribution("ttft", [0.001 * i for i in range(1, 101)])  # 1..100 ms
    assert stats["p50_ttft_ms"] == pytest.approx(50.5) and stats["p90_ttft_ms"] == pytest.approx(90.1)


def test_arrivals_are_all_at_once_or_gamma_gaps_of_mean_one_over_rate() -> None:
    assert arrival_offsets(5, float("inf"), 1.0, seed=0) == [0.0] * 5
    offsets = arrival_offsets(4000, 50.0, 0.5, seed=3)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert offsets[0] == 0.0 and min(gaps) >= 0
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50, rel=0.1)
    assert offsets == arrival_offsets(4000, 50.0, 0.5, seed=3)


async def _lines(*chunks: object) -> AsyncIterator[str]:
    for chunk in chunks:
        yield chunk if isinstance(chunk, str) else "data: " + json.dumps(chunk)
        yield ""


def _read(*chunks: object) -> RequestResult:
    return asyncio.run(read_stream(_lines(*chunks), start=0.0))


def test_ttft_starts_at_the_first_token_and_usage_gives_the_counts() -> None:
    role_only = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    token = {"choices": [{"index": 0, "delta": {"content": "x"}}]}
    usage = {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    result = _read(role_only, token, token, token, usage, "data: [DONE]")
    assert result.is_success and (result.num_prompt_tokens, result.num_output_tokens) == (7, 3)
    assert len(result.itls_s) == 2 and 0 < result.ttft_s <= result.latency_s
    assert "usage" in _read(token, "data: [DONE]").error
    assert _read(token, {"error": {"message": "generation failed: boom"}}).error == "generation failed: boom"


# -- against a real server ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`pdserve serve` on the CPU with the default demo model (written under $PDSERVE_CACHE)."""
    workdir = tmp_path_factory.mktemp("bench-serve")
    env = {**os.environ, "PDSERVE_CACHE": os.environ.get("PDSERVE_CACHE") or str(workdir / "cache")}
    port, log_path = free_port(), workdir / "serve.log"
    args = [sys.executable, "-m", "pdserve.deploy.cli", "serve", "--device", "cpu", "--port", str(port), "--log-level", "warning"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/health", timeout_s=240, process=process, log_path=log_path)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


def run_bench(url: str, json_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    args = [
        sys.executable,
        "-m",
        "pdserve.deploy.cli",
        "bench",
        "--url",
        url,
        "--num-prompts",
        str(NUM_PROMPTS),
        "--input-len",
        str(INPUT_LEN),
        "--output-len",
        str(OUTPUT_LEN),
        "--max-concurrency",
        "4",
        "--json",
        str(json_path),
        *extra,
    ]
    process = subprocess.run(args, check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert "Traceback" not in process.stderr, process.stderr
    return process, json.loads(json_path.read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    "endpoint, slos, is_all_good",
    [("completions", ["--slo-ttft-ms", "60000", "--slo-tpot-ms", "60000"], True), ("chat", ["--slo-tpot-ms", "0.001"], False)],
)
def test_bench_reports_exact_counts_and_consistent_figures(
    server_url: str, tmp_path: Path, endpoint: str, slos: list[str], is_all_good: bool
) -> None:
    process, report = run_bench(server_url, tmp_path / "report.json", "--endpoint", endpoint, *slos)
    assert process.returncode == 0, process.stdout + process.stderr
    assert (report["model"], report["completed"], report["failed"]) == ("pdserve-demo", NUM_PROMPTS, 0)
    assert report["input_lens"] == [INPUT_LEN] * NUM_PROMPTS  # exact prompt lengths, as the server counted them
    assert report["total_input_tokens"] == NUM_PROMPTS * INPUT_LEN
    assert report["total_output_tokens"] == NUM_PROMPTS * OUTPUT_LEN
    assert all(0 < ttft <= e2el for ttft, e2el in zip(report["ttfts"], report["e2els"], strict=True))
    assert all(len(itls) <= OUTPUT_LEN - 1 for itls in report["itls"])
    for name in LATENCY_NAMES:
        assert 0 <= report[f"p50_{name}_ms"] <= report[f"p90_{name}_ms"] <= report[f"p99_{name}_ms"], name
    duration = report["duration"]
    assert report["request_throughput"] == pytest.approx(NUM_PROMPTS / duration)
    assert report["output_throughput"] == pytest.approx(NUM_PROMPTS * OUTPUT_LEN / duration)
    expected_goodput = report["request_throughput"] if is_all_good else 0.0
    assert report["request_goodput"] == pytest.approx(expected_goodput)
    assert f"completed {NUM_PROMPTS}   failed 0" in process.stdout and "TTFT" in process.stdout


@pytest.mark.slow
def test_server_errors_are_reported_as_failures_not_a_crash(server_url: str, tmp_path: Path) -> None:
    process, report = run_bench(server_url, tmp_path / "report.json", "--model", "no-such-model")
    assert process.returncode == 1  # nothing completed
    assert (report["completed"], report["failed"], report["request_goodput"]) == (0, NUM_PROMPTS, 0.0)
    assert all(error.startswith("HTTP 404") and "no-such-model" in error for error in report["errors"])
    assert process.stdout.count("error: HTTP 404") == 1  # distinct errors, once each


@pytest.mark.slow
def test_shared_prefixes_keep_exact_lengths_and_show_as_prefix_cache_hits(server_url: str, tmp_path: Path) -> None:
    """`--prefix-len 20 --num-prefixes 2`: every prompt still counts exactly --input-len tokens, and
    the prompts after the first of each prefix find its first block (16 tokens) in the cache."""
    process, report = run_bench(
        server_url, tmp_path / "report.json", "--prefix-len", "20", "--num-prefixes", "2", "--max-concurrency", "1"
    )
    assert process.returncode == 0, process.stdout + process.stderr
    assert report["input_lens"] == [INPUT_LEN] * NUM_PROMPTS
    assert report["total_cached_tokens"] >= 16 * (NUM_PROMPTS - 2), report["total_cached_tokens"]
    assert f"({report['total_cached_tokens']} from the prefix cache)" in process.stdout
    for flags in (["--prefix-len", "24"], ["--prefix-len", "-1"], ["--num-prefixes", "0"]):
        bad = subprocess.run(
            [sys.executable, "-m", "pdserve.deploy.cli", "bench", "--url", server_url, "--input-len", "24", *flags],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
        assert bad.returncode == 2 and ("--prefix-len" in bad.stderr or "--num-prefixes" in bad.stderr), bad.stderr
