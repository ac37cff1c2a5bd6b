"""`Controller`: the Ray actor (named `pdserve-controller`) that owns pool membership: it starts
worker actors on their pool's nodes, watches them (`starting -> ready -> draining -> gone`), replaces
those that die, drains surplus workers before stopping them, and applies the autoscaler's and the
operator's desired sizes. It is owned by the `pdserve serve` process: when that process ends, for
whatever reason, Ray ends the controller and, with it, every worker."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

from pdserve.deploy.autoscaler import Autoscaler, PoolSignals
from pdserve.deploy.config import ROLES, AutoscaleConfig, DrainConfig, PoolConfig
from pdserve.deploy.placement import actor_options
from pdserve.deploy.pool import Pool, PoolWorker, WorkerLoad, WorkerState
from pdserve.deploy.worker_host import WorkerProcess, WorkerSpec
from pdserve.engine.config import EngineConfig
from pdserve.proto.cluster_secret import ClusterSecret
from pdserve.router.registry import WorkerRecord

logger = logging.getLogger(__name__)
CONTROLLER_NAME = "pdserve-controller"
NAMESPACE = "pdserve"
POLL_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 15.0
SHUTDOWN_POLL_S = 0.1  # how often shutdown's drain asks the workers whether they still hold requests
SHUTDOWN_QUIET_S = 0.75  # past a gateway's status poll (every 0.5 s): by then none still picks a draining worker
WORKER_THREADS = 4  # a worker actor answers load() and drain() while start() loads the model


@dataclass(frozen=True)
class ControllerConfig:
    engines: dict[str, EngineConfig]  # per role, as its workers run it (GPU memory already scaled to their share)
    model_name: str
    worker_host: str
    kv_transport: str
    redis_url: str | None
    replicas: dict[str, int]
    pools: dict[str, PoolConfig]
    gpu_share: float
    autoscale: AutoscaleConfig
    drain: DrainConfig
    cluster_secret: ClusterSecret  # travels to every worker through Ray, never through Redis
    tick_s: float = 0.5
    unresponsive_s: float = 30.0  # a worker whose process answers nothing this long is replaced


class Controller:
    def __init__(self, config: ControllerConfig) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = config
        is_fixed = config.kv_transport == "local"
        self.pools = {role: Pool(role, config.pools[role], config.replicas[role], is_fixed) for role in ROLES}
        self.autoscaler = (
            Autoscaler(config.autoscale, config.engines["decode"].max_num_seqs) if config.autoscale.enabled else None
        )
        self._latencies: dict[str, tuple[float, float | None, float | None]] = {}  # gateway -> (at, ttft, itl)
        self._next_autoscale = 0.0
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.Task | None = None

    # -- called by the gateway -------------------------------------------------------------------
    async def start(self, timeout_s: float) -> str | None:
        """Starts the initial workers and waits until they are all ready: None, or why not."""
        if self.pools["prefill"].is_fixed:
            self._launch_group()
        self._loop = asyncio.create_task(self._run())
        deadline = time.monotonic() + timeout_s
        while not all(pool.is_settled for pool in self.pools.values()):
            failed = [w for pool in self.pools.values() for w in pool.gone]
            if failed:
                return f"{failed[0].worker_id} {failed[0].end_reason}"
            if time.monotonic() > deadline:
                return f"the workers were not ready within {timeout_s:g} s: {self._view()['pools']}"
            await asyncio.sleep(0.1)
        return None

    async def ready_records(self) -> list[WorkerRecord]:
        """The workers gateways may route to."""
        return [
            WorkerRecord(w.worker_id, w.role, w.address) for pool in self.pools.values() for w in pool.members(WorkerState.READY)
        ]

    async def pools_view(self) -> dict:
        return self._view()

    async def scale(self, role: str, replicas: int) -> dict:
        """The operator's desired size: {"error": why} or the pools' view."""
        pool = self.pools[role]
        refusal = pool.refusal(replicas)
        if refusal is not None:
            return {"error": refusal}
        if replicas != pool.desired:
            logger.info("operator: %s pool %d -> %d replicas", role, pool.desired, replicas)
            pool.set_desired(replicas)
            self._reconcile(pool)
        return self._view()

    async def report(self, gateway_id: str, ttft_s: float | None, itl_s: float | None) -> dict:
        """A gateway's latencies over its last interval (p90s); answers the pools' view."""
        self._latencies[gateway_id] = (time.monotonic(), ttft_s, itl_s)
        return self._view()

    async def shutdown(self, drain_timeout_s: float = 0.0) -> None:
        """Stops every worker; first, for up to `drain_timeout_s`, lets them finish what they hold."""
        if self._loop is not None:
            self._loop.cancel()
        workers = [w for pool in self.pools.values() for w in pool.workers.values()]
        if drain_timeout_s > 0:
            try:
                await asyncio.wait_for(self._drain_all(workers), drain_timeout_s)
            except TimeoutError:
                busy = [w.worker_id for w in workers if _holds_requests(w)]
                logger.warning("shutdown: %s still hold requests after %g s; stopping them", busy, drain_timeout_s)
        actors = list({id(w.actor): w.actor for w in workers}.values())
        await asyncio.gather(*(asyncio.wait_for(_ref(a.stop.remote()), STOP_TIMEOUT_S) for a in actors), return_exceptions=True)
        for actor in actors:
            _kill(actor)

    async def _drain_all(self, workers: list[PoolWorker]) -> None:
        """Shutdown's drain, as a scale-down's but of every worker at once: none takes new requests
        (gateways see it at their next status poll); returns once none holds a request or a block."""
        serving = [w for w in workers if w.state in (WorkerState.READY, WorkerState.DRAINING)]
        for worker in serving:
            if worker.state is WorkerState.READY:
                self._enter_draining(worker)
        logger.info("shutdown: draining %d workers", len(serving))
        await asyncio.gather(*(self._mark_draining(w) for w in serving), return_exceptions=True)
        # With Redis, other gateways may have picked a worker just before their poll saw it draining.
        quiet_until = time.monotonic() + (SHUTDOWN_QUIET_S if self.config.redis_url else 0.0)
        while True:
            await asyncio.gather(*(self._poll(w) for w in serving))
            if not any(map(_holds_requests, serving)) and time.monotonic() >= quiet_until:
                return
            await asyncio.sleep(SHUTDOWN_POLL_S)

    # -- the reconcile loop ----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                await self._tick()
            except Exception:  # noqa: BLE001 - one bad tick must not stop the next
                logger.exception("controller tick failed")
            await asyncio.sleep(self.config.tick_s)

    async def _tick(self) -> None:
        watched = [w for pool in self.pools.values() for w in pool.members(WorkerState.READY, WorkerState.DRAINING)]
        await asyncio.gather(*(self._poll(w) for w in watched))
        for worker in watched:
            reason = self._leave_reason(worker)
            if reason is not None:
                self._spawn(self._stop(worker, reason))
        if self.autoscaler is not None and time.monotonic() >= self._next_autoscale:
            self._next_autoscale = time.monotonic() + self.config.autoscale.interval_s
            self._autoscale()
        for pool in self.pools.values():
            self._reconcile(pool)

    async def _poll(self, worker: PoolWorker) -> None:
        import ray

        try:
            loads = await asyncio.wait_for(_ref(worker.actor.load.remote()), POLL_TIMEOUT_S)
        except ray.exceptions.ActorDiedError as exc:
            if worker.worker_id in self.pools[worker.role].workers:
                logger.warning("%s died: %s", worker.worker_id, type(exc).__name__)
                self._remove(worker, "died", kill=False)
            return
        except (TimeoutError, ray.exceptions.RayError) as exc:
            if time.monotonic() - worker.last_answer > self.config.unresponsive_s:
                logger.warning(
                    "%s has not answered for %g s (%s): replacing it", worker.worker_id, self.config.unresponsive_s, exc
                )
                self._remove(worker, "unresponsive", kill=True)
            return
        worker.last_answer = time.monotonic()
        worker.load = next((WorkerLoad.of(s) for s in loads if s["worker_id"] == worker.worker_id), worker.load)

    def _reconcile(self, pool: Pool) -> None:
        if pool.is_fixed:
            return
        for worker in pool.surplus():
            self._drain(worker)
        if pool.shortfall() and time.monotonic() >= pool.next_start_at:
            for _ in range(pool.shortfall()):
                self._launch(pool)

    # -- a worker's life -------------------------------------------------------------------------
    def _spec(self, role: str) -> WorkerSpec:
        c = self.config
        return WorkerSpec(
            role,
            c.engines[role],
            c.model_name,
            c.worker_host,
            kv_transport=c.kv_transport,
            redis_url=c.redis_url,
            cluster_secret=c.cluster_secret,
        )

    def _launch(self, pool: Pool) -> None:
        import ray

        spec = self._spec(pool.role)
        options = actor_options({pool.role: 1}, pool.config.resources, self.config.gpu_share)
        actor = ray.remote(WorkerProcess).options(name=spec.worker_id, max_concurrency=WORKER_THREADS, **options).remote([spec])
        worker = PoolWorker(spec.worker_id, pool.role, actor)
        pool.add(worker)
        logger.info("starting %s (%s pool: %d active, %d desired)", spec.worker_id, pool.role, pool.num_active, pool.desired)
        self._spawn(self._bring_up(pool, [worker]))

    def _launch_group(self) -> None:
        """`--kv-transport local`: every worker in one process (the transport needs it), started once."""
        import ray

        specs = [self._spec(role) for role in ROLES for _ in range(self.pools[role].desired)]
        units = {role: self.pools[role].desired for role in ROLES}
        resources = {**self.config.pools["prefill"].resources, **self.config.pools["decode"].resources}
        options = actor_options(units, resources, self.config.gpu_share)
        actor = (
            ray.remote(WorkerProcess).options(name=specs[0].worker_id, max_concurrency=WORKER_THREADS, **options).remote(specs)
        )
        workers = [PoolWorker(spec.worker_id, spec.role, actor) for spec in specs]
        for worker in workers:
            self.pools[worker.role].add(worker)
        self._spawn(self._bring_up(self.pools["prefill"], workers))

    async def _bring_up(self, pool: Pool, workers: list[PoolWorker]) -> None:
        actor = workers[0].actor
        try:
            records = {r.worker_id: r for r in await _ref(actor.start.remote())}
            node_id, pid = await _ref(actor.where.remote())
        except Exception as exc:  # noqa: BLE001 - a worker that cannot start is gone; another one is tried
            failed = [worker for worker in workers if worker.state is WorkerState.STARTING]
            for worker in failed:
                logger.error("%s failed to start: %s", worker.worker_id, exc)
                self._remove(worker, f"failed to start: {exc}", kill=True)
            if failed:  # else all were taken out while starting (killed by a scale-down): no failed start
                pool.started(is_ok=False)
            return
        pool.started(is_ok=True)
        for worker in workers:
            if worker.state is WorkerState.STARTING:  # else taken out while it was starting
                worker.address, worker.node_id, worker.pid = records[worker.worker_id].address, node_id, pid
                worker.last_answer = time.monotonic()
                worker.enter(WorkerState.READY)
                logger.info("%s ready at %s (node %s, pid %d)", worker.worker_id, worker.address, node_id[:12], pid)

    def _drain(self, worker: PoolWorker) -> None:
        if worker.state is WorkerState.STARTING:  # it holds nothing and gets no traffic yet
            self._remove(worker, "stopped before it was ready", kill=True)
            return
        self._enter_draining(worker)
        logger.info("draining %s (%s)", worker.worker_id, worker.load)
        self._spawn(self._mark_draining(worker))

    @staticmethod
    def _enter_draining(worker: PoolWorker) -> None:
        worker.load_at_drain = worker.load  # the last poll's, until the worker answers with its own
        worker.enter(WorkerState.DRAINING)

    async def _mark_draining(self, worker: PoolWorker) -> None:
        loads = await asyncio.wait_for(_ref(worker.actor.drain.remote()), POLL_TIMEOUT_S)
        worker.load_at_drain = next((WorkerLoad.of(s) for s in loads if s["worker_id"] == worker.worker_id), worker.load_at_drain)

    def _leave_reason(self, worker: PoolWorker) -> str | None:
        """Why a draining worker may exit now: it holds nothing once no gateway can still pick it."""
        if worker.state is not WorkerState.DRAINING or worker.is_leaving:
            return None
        elapsed = time.monotonic() - worker.since
        if elapsed >= self.config.drain.quiet_s and worker.load is not None and worker.load.is_idle:
            return "drained"
        if elapsed >= self.config.drain.timeout_s:
            return f"drain timed out after {elapsed:.0f} s"
        return None

    async def _stop(self, worker: PoolWorker, reason: str) -> None:
        worker.is_leaving = True
        try:
            loads = await asyncio.wait_for(_ref(worker.actor.load.remote()), POLL_TIMEOUT_S)
            worker.load = next((WorkerLoad.of(s) for s in loads if s["worker_id"] == worker.worker_id), worker.load)
            if reason == "drained" and not worker.load.is_idle:  # a request arrived since the last poll
                worker.is_leaving = False
                return
            await asyncio.wait_for(_ref(worker.actor.stop.remote()), STOP_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - it is killed regardless
            logger.warning("%s did not stop cleanly: %s", worker.worker_id, exc)
        logger.info("%s gone (%s); its last load: %s", worker.worker_id, reason, worker.load)
        self._remove(worker, reason, kill=True)

    def _remove(self, worker: PoolWorker, reason: str, kill: bool) -> None:
        if kill:
            _kill(worker.actor)
        self.pools[worker.role].remove(worker, reason)

    # -- autoscaling -----------------------------------------------------------------------------
    def _autoscale(self) -> None:
        ttft, itl = self._recent_latencies()
        for pool in self.pools.values():
            if pool.is_fixed:
                continue
            loads = [w.load for w in pool.members(WorkerState.READY) if w.load is not None]
            signals = PoolSignals(pool.role, loads, ttft_s=ttft, itl_s=itl)
            is_cool = time.monotonic() - pool.last_change >= self.config.autoscale.cooldown_s
            bounds = (max(1, pool.config.min_replicas), pool.config.max_replicas)
            decision = self.autoscaler.decide(signals, pool.desired, bounds, pool.is_settled and is_cool)
            if decision is not None:
                logger.info(
                    "autoscaler: %s pool %d -> %d replicas (%s)", pool.role, pool.desired, decision.replicas, decision.reason
                )
                pool.set_desired(decision.replicas)

    def _recent_latencies(self) -> tuple[float | None, float | None]:
        """The worst p90s the gateways reported over the last two intervals."""
        fresh = [(t, i) for at, t, i in self._latencies.values() if time.monotonic() - at <= 2 * self.config.autoscale.interval_s]
        ttfts, itls = [t for t, _ in fresh if t is not None], [i for _, i in fresh if i is not None]
        return (max(ttfts) if ttfts else None), (max(itls) if itls else None)

    def _view(self) -> dict:
        autoscaler = self.autoscaler.view() if self.autoscaler is not None else {"enabled": False}
        return {"pools": {role: pool.view() for role, pool in self.pools.items()}, "autoscaler": autoscaler}

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(_log_failure)
        task.add_done_callback(self._tasks.discard)


async def _ref(ref: Any) -> Any:
    """A Ray ObjectRef as a coroutine (for asyncio.wait_for and gather)."""
    return await ref


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("controller task failed: %s", task.exception())


def _holds_requests(worker: PoolWorker) -> bool:
    """A draining worker that may still hold requests or KV blocks (or has not said yet)."""
    return worker.state is WorkerState.DRAINING and (worker.load is None or not worker.load.is_idle)


def _kill(actor: Any) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass
