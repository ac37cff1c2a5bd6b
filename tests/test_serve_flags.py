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
        (["--max-model-len", "0"], "pdserve: --max-model-len must be >= 1; got 0"),
        (["--max-model-len", "-5"], "pdserve: --max-model-len must be >= 1; got -5"),
        (["--max-model-len", "999999"], "pdserve: --max-model-len 999999 exceeds the model's context length"),
        (["--kv-cache-memory-gib", "-1"], "pdserve: --kv-cache-memory-gib must be > 0"),
        (["--max-num-seqs", "0"], "pdserve: --max-num-seqs and --max-num-batched-tokens must be >= 1"),
        (["--max-logprobs", "-2"], "pdserve: --max-logprobs must be >= 0, or -1 for the whole vocabulary; got -2"),
        (["--gpu-memory-utilization", "1.5"], "pdserve: --gpu-memory-utilization must be in (0, 1]"),
        (["--shutdown-timeout", "-1"], "pdserve: --shutdown-timeout must be >= 0"),
        (["--request-timeout", "0"], "--request-timeout must be a positive number of seconds"),
        (["--max-num-queued-reqs", "0"], "pdserve: --max-num-queued-reqs must be at least 1"),
        (["--responses-store-max-entries", "-1"], "pdserve: --responses-store-max-entries must be >= 0"),
        (["--responses-store-ttl", "0"], "pdserve: --responses-store-ttl must be positive"),
        (["--responses-store-ttl", "inf"], "pdserve: --responses-store-ttl must be positive and finite"),
        (["--responses-store-redis-url", "nonsense://x"], "--responses-store-redis-url 'nonsense://x'"),
        (["--port", "70000"], "--port must be in 0..65535; got 70000"),
        (["--port", "-1"], "--port must be in 0..65535"),
        (["--host", "no.such.host.invalid"], "cannot listen on no.such.host.invalid"),
        (["--redis-url", "nonsense://x"], "--redis-url 'nonsense://x'"),
        (["--quantization", "awq"], "--quantization awq needs a checkpoint quantized with awq"),
        (["--log-level", "nonsense"], "--log-level must be one of debug, info"),
        (["--worker-host", "203.0.113.7"], "cannot listen on 203.0.113.7:0 (--worker-host)"),
        (["--ray-address", "127.0.0.1:1"], "no Ray cluster answers at 127.0.0.1:1 (--ray-address)"),
        (["--ray-address", "ray://127.0.0.1:1"], "no Ray cluster answers at ray://127.0.0.1:1"),
        (["-tp", "2"], "pdserve: --tensor-parallel-size 2: pdserve has no tensor or pipeline parallelism"),
        (["--pipeline_parallel_size=2"], "pdserve: --pipeline-parallel-size 2: pdserve has no tensor"),
        (["-dp", "4"], "pdserve: --data-parallel-size 4: pdserve's replicas are its workers"),
        (["org/other-model"], "pdserve: the model is given twice: 'org/other-model' and --model"),
        (["--chat-template", "no/such/template.jinja"], "--chat-template 'no/such/template.jinja' looks like a file"),
        (["--chat-template", "{% for m in messages %}"], "--chat-template: the chat template does not compile (line 1)"),
        (["--generation-config", "nonsense"], "--generation-config must be auto, vllm or a directory"),
        (["--revision", "v1.0"], "revision 'v1.0' is for a Hub id"),
        (["--no-enable-chunked-prefill"], "prefill is always chunked here"),
        (["--allowed-methods", '["GET"]'], "--allowed-methods applies to cross-origin requests: give --allowed-origins"),
        (["--allow-credentials"], "--allow-credentials applies to cross-origin requests: give --allowed-origins"),
        (["--ssl-certfile", "no/such/cert.pem"], "HTTPS needs both --ssl-keyfile and --ssl-certfile"),
        (["--ssl-keyfile", "no/such/key.pem", "--ssl-certfile", "x"], "--ssl-keyfile no/such/key.pem: no such file"),
        (["--ssl-cert-reqs", "2"], "--ssl-ca-certs and --ssl-cert-reqs need HTTPS"),
        (["--root-path", "llm"], "--root-path must start with '/'"),
        (["--tokenizer", "no/such/tokenizer"], "tokenizer directory 'no/such/tokenizer' does not exist"),
        (["--tokenizer-revision", "v1"], "--tokenizer-revision is the revision of --tokenizer: give --tokenizer too"),
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


def test_the_router_names_the_flag_too(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("PDSERVE_CLUSTER_SECRET", "s" * 40)
    assert main(["router", "--redis-url", "redis://127.0.0.1:1/0", "--port", "0", "--stall-timeout", "-1"]) == 2
    err = capsys.readouterr().err
    assert "pdserve router: deadline --stall-timeout must be a positive number" in err and "Traceback" not in err, err


def test_only_field_names_standing_alone_become_flags() -> None:
    from pdserve.deploy.cli import build_parser, in_flag_terms

    names = build_parser().parse_args(["serve"]).flag_names
    assert names["enforce_eager"] == "--enforce-eager" and names["enable_prefix_caching"] == "--enable-prefix-caching"
    message = "max_num_seqs must be >= 1; model 'org/max_num_seqs' and config.max_model_len are values"
    assert (
        in_flag_terms(message, names)
        == "--max-num-seqs must be >= 1; model 'org/max_num_seqs' and config.max_model_len are values"
    )


def test_a_vllm_serve_command_line_means_the_same_here(demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What operators' `vllm serve` lines carry: the model as an argument, underscored flags, vLLM's
    names for dtypes and quantizations, parallel sizes of 1, flags with nothing to change here, and
    the API key in $VLLM_API_KEY, which must not leave the server open."""
    from pdserve.deploy.cli import build_parser, check_vllm_arguments, gateway_config, serve_config, vllm_spellings

    monkeypatch.setenv("VLLM_API_KEY", "vllm-key")
    monkeypatch.delenv("PDSERVE_API_KEY", raising=False)
    argv = vllm_spellings(
        ["serve", str(demo_model_dir), "--max_model_len", "256", "--dtype", "half", "-tp", "1", "--trust-remote-code"]
        + ["--disable-log-requests", "-q", "fp8", "--kv-cache-dtype", "fp8_e4m3", "--gpu_memory_utilization=0.8"]
        + ["--uvicorn-log-level", "debug", "--disable-uvicorn-access-log", "--enable-chunked-prefill"]
        + ["--swap-space", "4", "--disable-frontend-multiprocessing", "--enable-prompt-tokens-details"]
        + ["--tokenizer-mode", "auto", "--load-format", "safetensors", "--num-gpu-blocks-override", "512", "-dp", "1"]
    )
    args = build_parser().parse_args(argv)
    check_vllm_arguments(args, argv)
    engine = serve_config(args).engine
    assert Path(engine.model) == demo_model_dir and engine.max_model_len == 256 and engine.dtype == "float16"
    assert (engine.quantization, engine.kv_cache_dtype, engine.gpu_memory_utilization) == ("fp8", "fp8", 0.8)
    assert (engine.load_format, engine.num_kv_blocks) == ("auto", 512)
    assert gateway_config(args).api_keys == ("vllm-key",)
    line = ["serve", "--allowed-origins", '["https://a.example", "https://b.example"]', "--allowed_methods", '["GET","POST"]']
    args = build_parser().parse_args(vllm_spellings([*line, "--root-path", "/llm/", "--seed", "3"]))
    cors = gateway_config(args).cors
    assert cors is not None and cors.allowed_origins == ("https://a.example", "https://b.example")
    assert (cors.allowed_methods, cors.allowed_headers, cors.allow_credentials) == (("GET", "POST"), ("*",), False)
    assert gateway_config(args).root_path == "/llm" and serve_config(args).engine.seed == 3
    assert build_parser().parse_args(["serve", "--allowed-origins", "https://a.example,*"]).allowed_origins == (
        "https://a.example",
        "*",
    )
    # as on vLLM, a key given otherwise replaces it (a rotated key does not leave the old one valid)
    assert gateway_config(build_parser().parse_args(["serve", "--api-key", "new"])).api_keys == ("new",)


def test_the_generation_config_gives_requests_their_sampling_defaults(tmp_path: Path) -> None:
    """`--generation-config auto` (vLLM's default) reads the checkpoint's generation_config.json;
    `vllm` reads nothing; a directory is read instead of the checkpoint's."""
    import json

    from pdserve.deploy.cli import build_parser, gateway_config

    checkpoint, other = tmp_path / "checkpoint", tmp_path / "other"
    for directory, config in (
        (checkpoint, {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": 512, "do_sample": True}),
        (other, {"temperature": 0.2}),
    ):
        directory.mkdir()
        (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": 2, **config}))

    def defaults(*flags: str) -> dict:
        return dict(gateway_config(build_parser().parse_args(["serve", *flags]), str(checkpoint)).sampling_defaults)

    assert defaults() == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_tokens": 512}
    assert defaults("--generation-config", "vllm") == {}
    assert defaults("--generation-config", str(other)) == {"temperature": 0.2}
    with pytest.raises(ValueError, match="--generation-config must be auto, vllm or a directory"):
        defaults("--generation-config", "nonsense")


def test_a_chat_template_is_a_file_or_the_template_itself(tmp_path: Path) -> None:
    """vLLM's reading of --chat-template: a file's text, else the template with its escapes read."""
    from pdserve.deploy.cli import chat_template

    path = tmp_path / "template.jinja"
    path.write_text("{{ messages[0]['content'] }}\n")
    assert chat_template(str(path)) == "{{ messages[0]['content'] }}\n"
    assert chat_template("{{ messages[0]['content'] }}\\n") == "{{ messages[0]['content'] }}\n"
    assert chat_template(None) is None


def test_token_counts_read_as_vllm_reads_them() -> None:
    from pdserve.deploy.cli import build_parser

    args = build_parser().parse_args(["serve", "--max-model-len", "32k", "--max-num-batched-tokens", "8K"])
    assert (args.max_model_len, args.max_num_batched_tokens) == (32_000, 8192)
    assert build_parser().parse_args(["serve", "--max-model-len", "1.5M"]).max_model_len == 1_572_864
    for bad in ("12x", "infk"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--max-model-len", bad])


def test_download_dir_is_the_hub_cache_a_model_id_is_read_from(offline_hub_cache: Path) -> None:
    """--download-dir (vLLM's): a Hub id is downloaded into, and read from, that cache; offline here,
    so a snapshot laid out as huggingface_hub lays it out is found there, and only there."""
    from pdserve.deploy.cli import build_parser, serve_config
    from pdserve.engine.config import ConfigError
    from tests.conftest import HUB_COMMIT

    args = build_parser().parse_args(["serve", "--model", "org/demo", "--download-dir", str(offline_hub_cache)])
    assert Path(serve_config(args).engine.model) == offline_hub_cache / "models--org--demo" / "snapshots" / HUB_COMMIT
    with pytest.raises(ConfigError, match="model 'org/demo' is not a local directory and could not be fetched"):
        serve_config(build_parser().parse_args(["serve", "--model", "org/demo"]))
