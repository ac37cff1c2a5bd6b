"""`pdserve serve --config FILE.yaml`: the file takes every flag plus per-pool replicas, bounds and
resources and the autoscaler's settings; flags given on the command line override it; a mistake in
the file is an error naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdserve.deploy.cli import build_parser, gateway_config, main, serve_config
from pdserve.deploy.config import PoolConfig
from pdserve.deploy.config_file import ConfigFileError

ROOT = Path(__file__).resolve().parent.parent


def config_of(tmp_path: Path, text: str, *flags: str) -> object:
    path = tmp_path / "pdserve.yaml"
    path.write_text(text)
    argv = ["serve", "--config", str(path), *flags]
    return serve_config(build_parser(str(path)).parse_args(argv))


def test_the_file_sets_flags_pools_and_the_autoscaler(tmp_path: Path, demo_model_dir: Path) -> None:
    config = config_of(
        tmp_path,
        f"""
model: {demo_model_dir}
served-model-name: demo
port: 9100
max_num_seqs: 32
kv-transport: grpc
no-prefix-caching: true
autoscale: true
admin_token: from-file
pools:
  prefill: {{replicas: 2, min: 1, max: 4, resources: {{num_cpus: 2, "accelerator_type:H100": 0.001}}}}
  decode: {{replicas: 3, max: 6}}
autoscaler: {{interval_s: 1, cooldown_s: 10, ttft_high_s: 0.3, ttft_low_s: 0.1}}
drain: {{quiet_s: 2}}
""",
    )
    assert (config.served_model_name, config.port, config.kv_transport) == ("demo", 9100, "grpc")
    assert config.engine.max_num_seqs == 32 and not config.engine.enable_prefix_caching
    assert (config.num_prefill_workers, config.num_decode_workers) == (2, 3)
    assert config.prefill_pool == PoolConfig(1, 4, {"num_cpus": 2, "accelerator_type:H100": 0.001})
    assert config.decode_pool == PoolConfig(1, 6)
    assert config.autoscale.enabled and config.autoscale.interval_s == 1 and config.autoscale.ttft_high_s == 0.3
    assert config.autoscale.prefill_queue_high == 4.0  # untouched settings keep their defaults
    assert config.drain.quiet_s == 2 and config.admin_token == "from-file"


def test_flags_override_the_file(tmp_path: Path, demo_model_dir: Path) -> None:
    text = f"model: {demo_model_dir}\nport: 9100\nautoscale: true\npools: {{decode: {{replicas: 3, max: 6}}}}\n"
    config = config_of(tmp_path, text, "--port", "9200", "--decode-workers", "2", "--no-autoscale")
    assert config.port == 9200 and config.num_decode_workers == 2 and not config.autoscale.enabled
    assert config.decode_pool.max_replicas == 6


def test_several_served_model_names_from_the_file_or_the_flag(tmp_path: Path, demo_model_dir: Path) -> None:
    """`--served-model-name a b` (vLLM's): requests may name any, the first is the default; in the
    file a list, or one name."""
    text = f"model: {demo_model_dir}\nserved-model-name: [demo, org/demo-v1]\n"
    path = tmp_path / "pdserve.yaml"
    path.write_text(text)
    args = build_parser(str(path)).parse_args(["serve", "--config", str(path)])
    assert serve_config(args).served_model_name == "demo" and gateway_config(args).model_aliases == ("org/demo-v1",)
    args = build_parser(str(path)).parse_args(["serve", "--config", str(path), "--served-model-name", "x", "y", "x"])
    assert serve_config(args).served_model_name == "x" and gateway_config(args).model_aliases == ("y",)
    args = build_parser().parse_args(["serve", "--model", str(demo_model_dir)])
    assert serve_config(args).served_model_name == str(demo_model_dir) and gateway_config(args).model_aliases == ()
    assert gateway_config(args).model_root == str(demo_model_dir)  # /v1/models' root, as vLLM's
    path.write_text(f"model: {demo_model_dir}\nserved-model-name: null\n")  # null: as if not given
    args = build_parser(str(path)).parse_args(["serve", "--config", str(path)])
    assert serve_config(args).served_model_name == str(demo_model_dir)


def test_a_switch_set_in_the_file_can_be_turned_back_off_by_a_flag(tmp_path: Path, demo_model_dir: Path) -> None:
    text = f"model: {demo_model_dir}\nno-prefix-caching: true\nenforce-eager: true\nprotect-metrics: true\n"
    config = config_of(tmp_path, text)
    assert not config.engine.enable_prefix_caching and config.engine.enforce_eager
    config = config_of(tmp_path, text, "--enable-prefix-caching", "--no-enforce-eager")
    assert config.engine.enable_prefix_caching and not config.engine.enforce_eager
    args = build_parser(str(tmp_path / "pdserve.yaml")).parse_args(["serve", "--no-protect-metrics"])
    assert not args.protect_metrics
    # vLLM's spelling, in a file and as a flag; false means the other way
    assert not config_of(tmp_path, f"model: {demo_model_dir}\nenable-prefix-caching: false\n").engine.enable_prefix_caching
    assert config_of(tmp_path, f"model: {demo_model_dir}\nno-prefix-caching: false\n").engine.enable_prefix_caching
    assert not config_of(tmp_path, f"model: {demo_model_dir}\n", "--no-enable-prefix-caching").engine.enable_prefix_caching


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("max_num_sequences: 4\n", "unknown setting 'max_num_sequences'"),
        ("max-num-seqs: 4\nmax_num_seqs: 8\n", "max_num_seqs sets what another key of the file already set"),
        ("enforce-eager: true\nno-enforce-eager: true\n", "no-enforce-eager sets what another key"),
        # pools.decode.replicas is decode-workers: refused whichever comes first, never one dropped
        ("decode-workers: 4\npools: {decode: {replicas: 2}}\n", "pools sets what another key of the file already set"),
        ("pools: {decode: {replicas: 2}}\ndecode-workers: 4\n", "decode-workers sets what another key of the file already set"),
        ("kv_transport: carrier-pigeon\n", "kv_transport must be one of"),
        ("autoscale: yes please\n", "autoscale must be true or false"),
        ("pools: {prefill: {replicas: 2, size: 3}}\n", "pools.prefill: unknown size"),
        ("pools: {embedding: {replicas: 1}}\n", "pools must map prefill and/or decode"),
        ("pools: {prefill: {min: 3, max: 2}}\n", "0 <= min <= max"),
        ("autoscaler: {cooldown: 5}\n", "autoscaler: unknown cooldown"),
        ("- a list\n", "expected a mapping"),
        # a value of the wrong type is refused here, not after the workers have started
        ("max-num-seqs: 8.7\n", "max-num-seqs must be an integer, got 8.7"),
        ("max-num-seqs: eight\n", "max-num-seqs must be an integer, got 'eight'"),
        ("port: [1, 2]\n", "port must be an integer, got [1, 2]"),
        ("gpu-memory-utilization: true\n", "gpu-memory-utilization must be a number"),
        ("host: {a: 1}\n", "host must be text"),
        ("api-key: [k1, {a: 1}]\n", "api-key must be text"),
        ("pools: {prefill: {replicas: two}}\n", "pools.prefill.replicas must be an integer, got 'two'"),
        ("pools: {prefill: {min: '1'}}\n", "pools.prefill.min must be an integer"),
        ("pools: {prefill: {resources: [1]}}\n", "pools.prefill.resources must map resource names"),
        ("autoscaler: {interval_s: abc}\n", "autoscaler.interval_s must be a number, got 'abc'"),
        ("autoscaler: {interval_s: 0}\n", "interval_s > 0"),
        ("drain: {timeout_s: abc}\n", "drain.timeout_s must be a number, got 'abc'"),
        ("drain: {quiet_s: -5}\n", "0 <= quiet_s <= timeout_s"),
    ],
)
def test_mistakes_in_the_file_are_errors_naming_it(
    tmp_path: Path, text: str, fragment: str, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert main(["serve", "--config", str(path)]) == 2
    stderr = capsys.readouterr().err
    assert fragment in stderr and str(path) in stderr, stderr


def test_a_string_api_key_is_one_key_and_a_list_is_several(tmp_path: Path, demo_model_dir: Path) -> None:
    from pdserve.deploy.cli import gateway_config

    for text, keys in (("api-key: sekret\n", ("sekret",)), ("api-key: [k1, k2]\n", ("k1", "k2"))):
        path = tmp_path / "keys.yaml"
        path.write_text(f"model: {demo_model_dir}\n{text}")
        args = build_parser(str(path)).parse_args(["serve", "--config", str(path)])
        assert gateway_config(args).api_keys == keys


def test_allowed_origins_in_the_file_are_a_list_or_text(tmp_path: Path, demo_model_dir: Path) -> None:
    from pdserve.deploy.cli import gateway_config

    for text in ("allowed-origins: [https://a.example, '*']\n", "allowed-origins: https://a.example,*\n"):
        path = tmp_path / "cors.yaml"
        path.write_text(f"model: {demo_model_dir}\n{text}")
        cors = gateway_config(build_parser(str(path)).parse_args(["serve", "--config", str(path)])).cors
        assert cors is not None and cors.allowed_origins == ("https://a.example", "*")
    with pytest.raises(ConfigFileError, match="allowed-origins: not a list of names"):
        config_of(tmp_path, f"model: {demo_model_dir}\nallowed-origins: [1, 2]\n")


def test_numbers_in_the_file_take_the_flags_types(tmp_path: Path, demo_model_dir: Path) -> None:
    text = f"model: {demo_model_dir}\nkv-cache-memory-gib: 1\nmax-num-seqs: '16'\ndrain: {{quiet_s: 1, timeout_s: 30}}\n"
    config = config_of(tmp_path, text)
    assert config.engine.kv_cache_memory_gib == 1.0 and isinstance(config.engine.kv_cache_memory_gib, float)
    assert config.engine.max_num_seqs == 16 and (config.drain.quiet_s, config.drain.timeout_s) == (1, 30)


def test_replicas_outside_the_pools_bounds_are_refused(tmp_path: Path, demo_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="decode replicas"):
        config_of(tmp_path, f"model: {demo_model_dir}\npools: {{decode: {{replicas: 5, max: 4}}}}\n")


def test_the_example_config_in_deploy_loads(demo_model_dir: Path) -> None:
    example = ROOT / "pdserve" / "deploy" / "pdserve.example.yaml"
    args = build_parser(str(example)).parse_args(["serve", "--config", str(example), "--model", str(demo_model_dir)])
    config = serve_config(args)
    assert config.autoscale.enabled and config.prefill_pool.max_replicas >= config.num_prefill_workers


def test_token_counts_in_the_file_are_numbers_or_vllm_s_text(tmp_path: Path, demo_model_dir: Path) -> None:
    assert config_of(tmp_path, f"model: {demo_model_dir}\nmax-model-len: 256\n").engine.max_model_len == 256
    assert config_of(tmp_path, f"model: {demo_model_dir}\nmax-num-batched-tokens: 8K\n").engine.max_num_batched_tokens == 8192
    with pytest.raises(ConfigFileError, match="max-model-len: not a number of tokens: 'lots'"):
        config_of(tmp_path, f"model: {demo_model_dir}\nmax-model-len: lots\n")


def test_the_scheduling_policy_reaches_every_worker_engine(tmp_path: Path, demo_model_dir: Path) -> None:
    assert config_of(tmp_path, f"model: {demo_model_dir}\nscheduling-policy: priority\n").engine.scheduling_policy == "priority"
    assert config_of(tmp_path, f"model: {demo_model_dir}\n").engine.scheduling_policy == "fcfs"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--scheduling-policy", "lifo"])
