"""`pdserve serve`'s bad flags are refused at once, naming the flag, before Ray or any worker
starts: what the workers or the HTTP server would otherwise refuse only after loading the model."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from pdserve.deploy.cli import main


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener.getsockname()[1]


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--max-model-len", "0"], "max_model_len must be >= 1; got 0"),
        (["--max-model-len", "-5"], "max_model_len must be >= 1; got -5"),
        (["--max-model-len", "999999"], "max_model_len 999999 exceeds the model's context length"),
        (["--kv-cache-memory-gib", "-1"], "kv_cache_memory_gib must be > 0"),
        (["--port", "70000"], "--port must be in 0..65535; got 70000"),
        (["--port", "-1"], "--port must be in 0..65535"),
        (["--host", "no.such.host.invalid"], "cannot listen on no.such.host.invalid"),
        (["--redis-url", "nonsense://x"], "--redis-url 'nonsense://x'"),
        (["--quantization", "awq"], "--quantization awq needs a checkpoint quantized with awq"),
        (["--log-level", "nonsense"], "--log-level must be one of debug, info"),
    ],
)
def test_a_bad_flag_is_refused_before_anything_starts(
    demo_model_dir: Path, flags: list[str], fragment: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["serve", "--model", str(demo_model_dir), "--port", "0", *flags]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err
    assert not ray.is_initialized()


def test_a_port_in_use_is_refused_before_anything_starts(
    demo_model_dir: Path, busy_port: int, capsys: pytest.CaptureFixture
) -> None:
    for flags in (["--port", str(busy_port)], ["--port", str(busy_port), "--colocated"]):
        assert main(["serve", "--model", str(demo_model_dir), *flags]) == 2
        assert f"cannot listen on 127.0.0.1:{busy_port}" in capsys.readouterr().err
    assert not ray.is_initialized()
