"""The controller's rules without Ray: a pool's bounds and which workers a scale-down takes, the
autoscaler's hysteresis, bounds and cool-down, the gateway's latency windows, and placement."""

from __future__ import annotations

import asyncio

import pytest

from pdserve.deploy.autoscaler import Autoscaler, PoolSignals
from pdserve.deploy.config import AutoscaleConfig, PoolConfig
from pdserve.deploy.latency_window import LatencyWindow
from pdserve.deploy.placement import actor_options, gpus_per_worker, local_node_resources, missing_pools
from pdserve.deploy.pool import Pool, PoolWorker, WorkerLoad, WorkerState
from pdserve.router.metrics import Metrics


def worker(pool: Pool, name: str, state: WorkerState, load: WorkerLoad | None = None) -> PoolWorker:
    w = PoolWorker(name, pool.role, actor=None, state=state, load=load)
    pool.add(w)
    return w


def test_a_pool_refuses_sizes_outside_its_bounds_and_never_rescales_a_shared_process() -> None:
    pool = Pool("decode", PoolConfig(min_replicas=1, max_replicas=3), replicas=1)
    assert pool.refusal(0) and "1 to 3" in pool.refusal(0)
    assert pool.refusal(4) and pool.refusal(3) is None
    fixed = Pool("decode", PoolConfig(), replicas=1, is_fixed=True)
    assert "local" in fixed.refusal(2)


def test_scale_down_takes_starting_workers_first_then_the_least_loaded() -> None:
    pool = Pool("decode", PoolConfig(max_replicas=8), replicas=4)
    busy = worker(pool, "busy", WorkerState.READY, WorkerLoad(num_running=5, num_used_blocks=40, num_total_blocks=100))
    idle = worker(pool, "idle", WorkerState.READY, WorkerLoad(num_running=1, num_used_blocks=8, num_total_blocks=100))
    starting = worker(pool, "starting", WorkerState.STARTING)
    worker(pool, "draining", WorkerState.DRAINING)  # already leaving: not counted
    assert pool.num_active == 3 and pool.shortfall() == 1
    pool.set_desired(1)
    assert pool.surplus() == [starting, idle]
    assert busy not in pool.surplus() and not pool.is_settled


def test_a_removed_worker_is_gone_with_its_reason_and_last_load() -> None:
    pool = Pool("prefill", PoolConfig(), replicas=1)
    w = worker(pool, "p", WorkerState.DRAINING, WorkerLoad(num_total_blocks=10))
    pool.remove(w, "drained")
    [gone] = pool.view()["gone"]
    assert gone["state"] == "gone" and gone["end_reason"] == "drained" and gone["load"]["num_used_blocks"] == 0
    assert pool.workers == {}


def test_failed_starts_back_off() -> None:
    pool = Pool("prefill", PoolConfig(), replicas=1)
    pool.started(is_ok=False)
    first = pool.next_start_at
    pool.started(is_ok=False)
    assert pool.next_start_at > first
    pool.started(is_ok=True)
    assert pool._num_start_failures == 0


def loads(*waiting: int, running: int = 0, used: int = 0) -> list[WorkerLoad]:
    return [WorkerLoad(num_running=running, num_waiting=w, num_used_blocks=used, num_total_blocks=100) for w in waiting]


def test_the_autoscaler_acts_only_on_a_sustained_signal_within_bounds_and_when_allowed() -> None:
    scaler = Autoscaler(
        AutoscaleConfig(enabled=True, sustain_ticks=2, prefill_queue_high=4, prefill_queue_low=0.5), max_num_seqs=8
    )
    queued = PoolSignals("prefill", loads(6))
    assert scaler.decide(queued, 1, (1, 3), can_change=True) is None  # one tick is not enough
    decision = scaler.decide(queued, 1, (1, 3), can_change=True)
    assert decision is not None and decision.direction == "up" and decision.replicas == 2 and "queued" in decision.reason
    assert scaler.decide(queued, 3, (1, 3), can_change=True) is None  # streak restarted after acting
    assert scaler.decide(queued, 3, (1, 3), can_change=True) is None  # at max
    assert scaler.decide(queued, 1, (1, 3), can_change=False) is None  # cooling down / not settled
    quiet = PoolSignals("prefill", loads(0, 0))
    scaler.decide(quiet, 2, (1, 3), can_change=True)
    down = scaler.decide(quiet, 2, (1, 3), can_change=True)
    assert down is not None and down.direction == "down" and down.replicas == 1
    assert scaler.num_decisions == {("prefill", "up"): 1, ("prefill", "down"): 1}


def test_the_gap_between_the_thresholds_holds_the_size() -> None:
    scaler = Autoscaler(
        AutoscaleConfig(enabled=True, sustain_ticks=1, prefill_queue_high=4, prefill_queue_low=0.5), max_num_seqs=8
    )
    # 2 queued over 2 workers: under "high", but 2 over one worker fewer is above "low": keep 2.
    assert scaler.pressure(PoolSignals("prefill", loads(1, 1))) == (None, "")
    assert scaler.pressure(PoolSignals("prefill", loads(1), ttft_s=3.0))[0] == "up"  # TTFT alone
    assert scaler.pressure(PoolSignals("prefill", loads(0, 0), ttft_s=1.0))[0] is None  # slow-ish TTFT: no shrink


def test_decode_pressure_reads_kv_usage_batch_and_itl() -> None:
    scaler = Autoscaler(AutoscaleConfig(enabled=True), max_num_seqs=10)
    assert scaler.pressure(PoolSignals("decode", loads(0, used=90)))[0] == "up"
    assert scaler.pressure(PoolSignals("decode", loads(0, running=10)))[0] == "up"
    assert scaler.pressure(PoolSignals("decode", loads(0, used=10), itl_s=0.5))[0] == "up"
    assert scaler.pressure(PoolSignals("decode", loads(0, 0, used=10, running=1)))[0] == "down"
    assert scaler.pressure(PoolSignals("decode", loads(0, 0, used=25, running=1)))[0] is None  # 50% on one worker: stay
    assert scaler.pressure(PoolSignals("decode", loads(0, used=1)))[0] is None  # one worker: nothing to remove


def test_autoscale_config_refuses_inverted_thresholds() -> None:
    with pytest.raises(ValueError, match="ttft"):
        AutoscaleConfig(ttft_low_s=3.0, ttft_high_s=2.0)


def test_the_latency_window_reads_only_what_was_observed_since_the_last_reading() -> None:
    metrics = Metrics("m")
    window = LatencyWindow(metrics.time_to_first_token)
    assert window.quantile(0.9) is None
    for _ in range(9):
        metrics.labels(metrics.time_to_first_token).observe(0.03)
    metrics.labels(metrics.time_to_first_token).observe(3.0)
    assert window.quantile(0.9) == 0.04  # 9 of 10 under the 0.04 s bound
    assert window.quantile(0.9) is None  # nothing new
    metrics.labels(metrics.time_to_first_token).observe(9999.0)  # past the last bound: read as it
    assert window.quantile(0.5) == 2560.0


def test_the_latency_window_interpolates_inside_the_bucket_like_histogram_quantile() -> None:
    metrics = Metrics("m")
    window = LatencyWindow(metrics.inter_token_latency)  # bounds ... 0.01 ... 0.1, 0.15, 0.2 ...
    for value in [0.12] * 5 + [0.17] * 5:
        metrics.labels(metrics.inter_token_latency).observe(value)
    assert window.quantile(0.9) == pytest.approx(0.19)  # rank 9: 4 of the 5 in (0.15, 0.2]
    for _ in range(10):
        metrics.labels(metrics.inter_token_latency).observe(0.004)
    assert window.quantile(0.5) == pytest.approx(0.005)  # the first bucket starts at 0, not at its bound


def test_an_itl_p90_under_the_high_threshold_does_not_grow_the_decode_pool() -> None:
    metrics = Metrics("m")
    window = LatencyWindow(metrics.inter_token_latency)
    for _ in range(100):
        metrics.labels(metrics.inter_token_latency).observe(0.155)  # every token 0.155 s apart
    itl = window.quantile(0.9)
    assert itl is not None and itl < 0.2  # not the 0.2 s bound of its bucket
    scaler = Autoscaler(AutoscaleConfig(itl_high_s=0.2), 256)
    assert scaler.pressure(PoolSignals("decode", [WorkerLoad(1, 0, 10, 100)], itl_s=itl))[0] is None


def test_workers_ask_for_their_pool_and_the_local_node_has_both() -> None:
    options = actor_options({"decode": 1}, {"num_gpus": 1, "accelerator_type:H200": 0.001}, gpu_share=0.5)
    assert options["resources"] == {"decode_pool": 1, "accelerator_type:H200": 0.001}
    assert options["num_gpus"] == 1 and options["num_cpus"] == 1
    assert options["runtime_env"]["env_vars"]["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"] == "1"
    assert "num_gpus" not in actor_options({"prefill": 1}, {}, gpu_share=0)
    assert missing_pools(local_node_resources()) == []
    assert missing_pools({"CPU": 8, "prefill_pool": 2}) == ["decode_pool"]
    assert gpus_per_worker(1, 2, "auto") == 0.5 and gpus_per_worker(8, 2, "auto") == 1 and gpus_per_worker(8, 2, "cpu") == 0


@pytest.mark.parametrize("prefill_gpus", [1, 0.25])
def test_a_worker_sizes_its_kv_cache_for_the_gpu_share_ray_gives_it(prefill_gpus: float) -> None:
    """A pool's `num_gpus` (1 in the example files) is what Ray gives each of its workers, so it is
    also the memory they size their KV cache in; a pool without it gets the even share of the GPUs."""
    from pdserve.deploy.cluster import Cluster
    from pdserve.deploy.config import ServeConfig
    from pdserve.deploy.controller import Controller
    from pdserve.engine.config import EngineConfig

    engine = EngineConfig(model="m", gpu_memory_utilization=0.9)
    config = ServeConfig(
        engine=engine,
        served_model_name="m",
        num_decode_workers=2,
        prefill_pool=PoolConfig(resources={"num_gpus": prefill_gpus, "num_cpus": 4}),
        decode_pool=PoolConfig(resources={"num_cpus": 4}),
    )
    controller_config = Cluster(config)._controller_config(num_cluster_gpus=2.0)  # 3 workers on 2 GPUs: 1/2 each
    controller = Controller(controller_config)
    given = {}
    for role in ("prefill", "decode"):
        num_gpus = actor_options({role: 1}, controller_config.pools[role].resources, controller_config.gpu_share)["num_gpus"]
        given[role] = num_gpus
        utilization = controller._spec(role).engine.gpu_memory_utilization
        assert utilization == pytest.approx(0.9 * min(1.0, num_gpus)), (role, num_gpus, utilization)
    assert given == {"prefill": prefill_gpus, "decode": 0.5}


@pytest.mark.parametrize("scaled_down", [True, False], ids=["scaled-down", "failed"])
def test_a_worker_killed_by_a_scale_down_while_starting_is_no_failed_start(
    monkeypatch: pytest.MonkeyPatch, scaled_down: bool
) -> None:
    """The controller kills a starting worker that a scale-down takes (it holds nothing); its start
    call then fails, as Ray's does for a killed actor. That is no failed start: the pool's next start
    is not backed off. A start that fails on its own still backs the pool's starts off."""
    from types import SimpleNamespace

    from pdserve.deploy import controller as controller_module
    from pdserve.deploy.config import AutoscaleConfig, DrainConfig

    async def scenario() -> Pool:
        started: asyncio.Future = asyncio.get_running_loop().create_future()
        monkeypatch.setattr(
            controller_module, "_kill", lambda actor: started.done() or started.set_exception(RuntimeError("actor died"))
        )
        config = SimpleNamespace(pools={role: PoolConfig() for role in ("prefill", "decode")}, replicas={"prefill": 1, "decode": 2},
                                 kv_transport="grpc", autoscale=AutoscaleConfig(), drain=DrainConfig())  # fmt: skip
        ctl = controller_module.Controller(config)
        pool = ctl.pools["decode"]
        w = PoolWorker("decode-1", "decode", actor=SimpleNamespace(start=SimpleNamespace(remote=lambda: started)))
        pool.add(w)
        bring_up = asyncio.ensure_future(ctl._bring_up(pool, [w]))
        await asyncio.sleep(0)
        if scaled_down:
            pool.set_desired(1)
            ctl._drain(w)
        else:
            started.set_exception(RuntimeError("no GPU left"))
        await asyncio.wait_for(bring_up, 5)
        assert w.state is WorkerState.GONE
        assert w.end_reason == ("stopped before it was ready" if scaled_down else "failed to start: no GPU left")
        return pool

    pool = asyncio.run(scenario())
    assert (pool.next_start_at == 0.0) == scaled_down
