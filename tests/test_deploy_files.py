"""The files in deploy/ are checked, not just shipped: `ray-cluster.yaml` against the Ray autoscaler's
own JSON schema (from the installed ray package) and its node types, a variant of it brought up
by Ray's autoscaler with the `fake_multinode` provider (both pool node types really start), the
KubeRay manifest's worker groups, and the Grafana dashboard's queries against the metric names
the gateway exports (the controller's series, the same on every gateway, taken with max)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "pdserve" / "deploy"


@pytest.fixture(scope="module")
def ray_cluster_config() -> dict:
    return yaml.safe_load((DEPLOY / "ray-cluster.yaml").read_text())


def test_ray_cluster_yaml_follows_the_autoscalers_schema(ray_cluster_config: dict) -> None:
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(ray_cluster_config, schema)
    # As `ray up` does: the provider's defaults filled in, then the schema and Ray's own checks.
    validate_config(prepare_config(json.loads(json.dumps(ray_cluster_config))))


def test_ray_cluster_yaml_has_a_cpu_head_running_the_gateway_and_a_node_type_per_pool(ray_cluster_config: dict) -> None:
    types = ray_cluster_config["available_node_types"]
    head = types[ray_cluster_config["head_node_type"]]["resources"]
    assert not head.get("GPU") and not any(name.endswith("_pool") for name in head)
    for pool in ("prefill_pool", "decode_pool"):
        [node_type] = [t for t in types.values() if pool in t["resources"]]
        assert node_type["resources"]["GPU"] >= 1 and node_type["resources"][pool] == node_type["resources"]["GPU"]
        assert node_type["max_workers"] >= node_type.get("min_workers", 0) >= 1
    head_commands = " ".join(ray_cluster_config["head_start_ray_commands"])
    assert "pdserve serve" in head_commands and "--ray-address auto" in head_commands
    assert any("pip install" in c and "pdserve" in c for c in ray_cluster_config["setup_commands"])
    mounted = ray_cluster_config["file_mounts"]["~/pdserve.yaml"]
    assert (ROOT / mounted).is_file()


def fake_variant(config: dict, gcs_address: str) -> dict:
    """ray-cluster.yaml for Ray's fake_multinode provider: the same node types and resources, nodes
    started as local processes (no cloud, no SSH: no node configs, no setup or start commands)."""
    variant = json.loads(json.dumps(config))
    variant["provider"] = {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
        "gcs_address": gcs_address,
    }
    types = variant["available_node_types"]
    head = types.pop(variant["head_node_type"])
    types["ray.head.default"] = head  # the provider's built-in head node type
    variant["head_node_type"] = "ray.head.default"
    for node_type in types.values():
        node_type["node_config"] = {}
        node_type["resources"] = {**node_type["resources"], "CPU": 1, "object_store_memory": 100 * 2**20}
    head["max_workers"] = 0
    variant.update(
        auth={},
        docker={},
        file_mounts={},
        setup_commands=[],
        head_setup_commands=[],
        worker_setup_commands=[],
        head_start_ray_commands=[],
        worker_start_ray_commands=[],
        initialization_commands=[],
        cluster_synced_files=[],
        file_mounts_sync_continuously=False,
        rsync_exclude=[],
        rsync_filter=[],
        idle_timeout_minutes=5,
    )
    return variant


@pytest.fixture
def fake_cluster(ray_cluster_config: dict) -> Iterator[tuple[str, dict[str, str]]]:
    """`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=<variant>`: Ray's autoscaler with the
    fake provider, every process under a private RAY_TMPDIR; stopped by its own process ids."""
    import ray

    from tests.servers import free_port

    ray_tmp = tempfile.mkdtemp(prefix="pdfake", dir="/tmp")
    port = free_port()
    address = f"{ray._private.services.get_node_ip_address()}:{port}"
    variant = Path(ray_tmp) / "cluster.yaml"
    variant.write_text(yaml.safe_dump(fake_variant(ray_cluster_config, address)))
    # Token auth off on both ends: `ray start` turns it on whenever ~/.ray/auth_token exists, a client not.
    env = {
        **os.environ,
        "RAY_TMPDIR": ray_tmp,
        "RAY_FAKE_CLUSTER": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }
    log_path = Path(ray_tmp) / "ray-start.log"
    with open(log_path, "wb") as log:
        head = subprocess.Popen(
            [
                "ray",
                "start",
                "--head",
                f"--port={port}",
                "--num-cpus=1",
                f"--object-store-memory={100 * 2**20}",
                "--include-dashboard=false",
                f"--autoscaling-config={variant}",
                "--block",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while b"Ray runtime started" not in log_path.read_bytes():
            assert head.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            head.kill()
        _kill_processes_under(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _kill_processes_under(directory: str) -> None:
    """Nodes the fake provider started outlive `ray start`; they are ours: their command lines name
    our private directory."""
    for _ in range(3):
        pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and directory in _cmdline(p)]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not pids:
            return
        time.sleep(1)


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow
def test_rays_autoscaler_brings_up_both_pool_node_types_of_ray_cluster_yaml(
    fake_cluster: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """`ray up` itself cannot run this variant here (see deploy/README.md): this is the same node
    types launched by Ray's autoscaler monitor, which is what `ray up` starts on the head."""
    address, env = fake_cluster
    found = tmp_path / "pools.json"  # a file, not stdout: Ray's log monitor writes there too, unaligned to lines
    probe = (
        "import ray, json, time\n"
        f"ray.init(address='{address}', logging_level='ERROR')\n"
        "deadline = time.time() + 120\n"
        "while time.time() < deadline:\n"
        "    pools = sorted(k for n in ray.nodes() if n['Alive'] for k in n['Resources'] if k.endswith('_pool'))\n"
        "    if pools == ['decode_pool', 'prefill_pool']:\n"
        "        break\n"
        "    time.sleep(1)\n"
        f"open({str(found)!r}, 'w').write(json.dumps(pools))\n"
    )
    env = {k: v for k, v in env.items() if k != "RAY_FAKE_CLUSTER"}
    result = subprocess.run(["python", "-c", probe], capture_output=True, text=True, timeout=180, env=env, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(found.read_text()) == ["decode_pool", "prefill_pool"], result.stdout[-2000:]


def test_the_kuberay_manifest_has_one_worker_group_per_pool_and_runs_the_gateway_on_the_head() -> None:
    from pdserve.deploy.cli import build_parser

    docs = {d["kind"]: d for d in yaml.safe_load_all((DEPLOY / "kuberay-raycluster.yaml").read_text())}
    cluster = docs["RayCluster"]["spec"]
    groups = {}
    for group in cluster["workerGroupSpecs"]:
        resources = json.loads(json.loads(group["rayStartParams"]["resources"]))  # the flag's value, then its JSON
        groups[group["groupName"]] = resources
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        [container] = group["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert groups == {"prefill": {"prefill_pool": 1}, "decode": {"decode_pool": 1}}
    [head] = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert "pdserve serve --config /etc/pdserve/pdserve.yaml" in head["args"][0]
    assert docs["RayCluster"]["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    config = Path(tempfile.mkdtemp()) / "pdserve.yaml"
    config.write_text(docs["ConfigMap"]["data"]["pdserve.yaml"])
    args = build_parser(str(config)).parse_args(["serve", "--config", str(config)])
    assert (
        args.prefill_pool.max_replicas
        <= next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "prefill")["maxReplicas"]
    )


def test_the_grafana_dashboard_queries_only_metrics_the_gateway_exports() -> None:
    from pdserve.router.metrics import Metrics
    from pdserve.router.pool_metrics import PoolCollector
    from pdserve.router.registry import InMemoryRegistry
    from pdserve.router.workers import WorkerPool
    from tests.servers import CLUSTER_SECRET

    metrics = Metrics("m")
    view = {
        "pools": {p: {"desired": 1, "num_workers": {"starting": 0, "ready": 1, "draining": 0}} for p in ("prefill", "decode")},
        "autoscaler": {"num_decisions": {}},
    }
    metrics.registry.register(PoolCollector(WorkerPool(InMemoryRegistry(), CLUSTER_SECRET), "m", lambda: view))
    metrics.observe_kv_transfer(1, 0.01, "grpc")
    exported = {
        line.split("{")[0].split(" ")[0] for line in metrics.render().decode().splitlines() if line and not line.startswith("#")
    }
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    queried = {name for p in panels for t in p["targets"] for name in re.findall(r"\b((?:vllm|pdserve):[a-z0-9_:]+)", t["expr"])}
    assert queried and queried <= exported, sorted(queried - exported)
    for metric in (
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:kv_cache_usage_perc",
        "pdserve:kv_transfer_bytes_total",
        "pdserve:pool_replicas",
        "pdserve:pool_num_requests_waiting",
    ):
        assert metric in queried, metric


def test_the_grafana_dashboard_takes_the_max_of_the_controllers_series_over_the_gateways() -> None:
    """Every gateway that reaches the controller exports the same pool sizes and decisions: a sum over
    the scraped gateways would show N gateways' worth of workers."""
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] if p.get("type") != "row" for t in p["targets"]]
    expected = {
        "pdserve:pool_replicas": r"^max by\(pool, state\) \(pdserve:pool_replicas\{",
        "pdserve:pool_desired_replicas": r"^max by\(pool\) \(pdserve:pool_desired_replicas\{",
        "pdserve:autoscaler_decisions_total": r"^max by\(pool, direction\) \((increase|rate)\(pdserve:autoscaler_decisions_total\{",
    }
    for metric, pattern in expected.items():
        queries = [e for e in exprs if re.search(re.escape(metric) + r"\{", e)]
        assert queries, metric
        for expr in queries:
            assert re.match(pattern, expr), expr
