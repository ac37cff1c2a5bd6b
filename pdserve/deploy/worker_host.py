"""`WorkerHost`: one prefill or decode worker and its gRPC server, on a private asyncio loop thread
inside whatever process hosts it (a Ray actor in a cluster; the test process in tests). With a
Redis URL it also keeps the worker's registry record alive with signed heartbeats. `WorkerProcess`
is what a Ray actor runs: its workers, their load for the controller, and their drain."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import threading
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from pdserve.decode_worker.admission import DecodeLimits
from pdserve.engine.config import EngineConfig
from pdserve.engine.core import EngineCore
from pdserve.proto.cluster_secret import ClusterSecret
from pdserve.router.registry import DEFAULT_TTL_S, WorkerRecord, deregister, heartbeat, redacted_url

logger = logging.getLogger(__name__)
HEARTBEAT_INTERVAL_S = 1.0  # well inside the record's TTL; also how soon a restarted Redis knows the worker again
HEARTBEAT_RETRY_S = 0.25  # after a failed heartbeat (Redis restarting)


@dataclass(frozen=True)
class WorkerSpec:
    role: str  # "prefill" | "decode"
    engine: EngineConfig
    model_name: str
    host: str = "127.0.0.1"
    port: int = 0
    kv_transport: str = "auto"  # auto | cuda_ipc | nccl | grpc | local
    redis_url: str | None = None
    worker_id: str = ""
    cluster_secret: ClusterSecret | None = None  # signs and checks every gRPC call and registry record
    decode_limits: DecodeLimits = field(
        default_factory=DecodeLimits
    )  # what a decode worker lets in (leases, pending requests per caller)

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"role must be prefill or decode, got {self.role!r}")
        if self.cluster_secret is None:
            raise ValueError("a worker needs the cluster secret (WorkerSpec.cluster_secret)")
        if not self.worker_id:
            object.__setattr__(self, "worker_id", f"{self.role}-{uuid.uuid4().hex[:8]}")


# A thread waiting for the GIL gets it after at most this long (Python's default: 5 ms). The engine
# thread and the gRPC loop hand the GIL back and forth several times per request; at 5 ms a hop,
# that alone added ~20 ms to a hand-off's time to first token.
GIL_SWITCH_INTERVAL_S = 0.0005


class WorkerHost:
    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.record: WorkerRecord | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{spec.worker_id}-grpc", daemon=True)
        self._server: Any = None  # a grpc.aio.Server, once started
        self._worker: Any = None  # a PrefillWorker or a DecodeWorker, once started
        self._kv_servicer = None
        self._stop_heartbeat = threading.Event()

    def start(self) -> WorkerRecord:
        """Loads the model, starts the server and returns the worker's registry record."""
        engine = self.spec.engine
        if self.spec.role == "prefill":
            engine = replace(engine, enforce_eager=True)  # it never runs a decode step: no graphs to capture
        core = EngineCore.load(engine)
        self._thread.start()
        self.record = asyncio.run_coroutine_threadsafe(self._serve(core), self._loop).result()
        if self.spec.redis_url:
            threading.Thread(target=self._heartbeat_forever, name=f"{self.spec.worker_id}-heartbeat", daemon=True).start()
        logger.info("%s serving at %s", self.spec.worker_id, self.record.address)
        return self.record

    async def _serve(self, core: EngineCore) -> WorkerRecord:
        spec, host = self.spec, advertised_host(self.spec.host)
        if spec.role == "prefill":
            from pdserve.prefill_worker.server import start_server
            from pdserve.prefill_worker.worker import PrefillWorker

            self._worker = PrefillWorker(core, spec.worker_id, spec.kv_transport, host, secret=spec.cluster_secret)
            self._server, port = await start_server(self._worker, spec.model_name, spec.cluster_secret, spec.host, spec.port)
        else:
            from pdserve.decode_worker.server import start_server as start_decode_server
            from pdserve.decode_worker.worker import DecodeWorker

            self._worker = DecodeWorker(core, spec.worker_id, spec.decode_limits)
            self._server, port, self._kv_servicer = await start_decode_server(
                self._worker, spec.model_name, spec.cluster_secret, spec.host, spec.port, spec.kv_transport, advertise_host=host
            )
        return WorkerRecord(spec.worker_id, spec.role, f"{host}:{port}")

    def _heartbeat_forever(self) -> None:
        import redis

        client = redis.Redis.from_url(self.spec.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        is_up = True
        while True:
            try:
                heartbeat(client, self.record, self.spec.cluster_secret, DEFAULT_TTL_S)
                if not is_up:
                    logger.info("%s registered again at %s", self.spec.worker_id, redacted_url(self.spec.redis_url))
                is_up = True
            except Exception as exc:  # noqa: BLE001 - keep beating through Redis hiccups
                if is_up:
                    logger.warning("heartbeat to %s failed: %s", redacted_url(self.spec.redis_url), exc)
                is_up = False
            if self._stop_heartbeat.wait(HEARTBEAT_INTERVAL_S if is_up else HEARTBEAT_RETRY_S):
                break
        try:
            deregister(client, self.spec.worker_id)
        except Exception:  # noqa: BLE001 - the TTL removes the record anyway
            pass

    def drain(self) -> dict[str, object]:
        """Leave the pool: every gateway's next status poll sees the worker draining and routes it
        nothing new; its registry record goes. What it holds runs to completion. Returns what it
        held at that moment."""
        self._worker.is_draining = True
        self._stop_heartbeat.set()
        return self.load()

    def load(self) -> dict[str, object]:
        """The worker's status counts (`num_running`, `num_waiting`, `num_used_blocks`, ...)."""
        return {"worker_id": self.spec.worker_id, "is_draining": self._worker.is_draining, **self._worker.status()}

    def stop(self) -> None:
        if not self._thread.is_alive():  # never started, or stopped already
            return
        self._stop_heartbeat.set()
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(1.0), self._loop).result(timeout=10)
        if self._kv_servicer is not None:
            self._kv_servicer.close()  # also drops its in-process ("local") KV receiver
        if self._worker is not None:
            self._worker.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    @property
    def worker(self) -> object:
        """The PrefillWorker or DecodeWorker, once started."""
        return self._worker

    def ping(self) -> str:
        return self.spec.worker_id


class WorkerProcess:
    """What a Ray actor runs: one worker, or several sharing the process (the `local` KV transport).
    On a GPU node it first makes the actor's own GPU device 0 and the node's others visible after
    it, so that CUDA IPC can reach a peer on another GPU of the host."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        _own_gpu_first()
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.hosts = [WorkerHost(spec) for spec in specs]

    def start(self) -> list[WorkerRecord]:
        return [host.start() for host in self.hosts]

    def where(self) -> tuple[str, int]:
        """(Ray node id, pid) of this process."""
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()

    def load(self) -> list[dict[str, object]]:
        return [host.load() for host in self.hosts if host.worker is not None]

    def drain(self) -> list[dict[str, object]]:
        return [host.drain() for host in self.hosts if host.worker is not None]

    def stop(self) -> None:
        for host in self.hosts:
            host.stop()


def _own_gpu_first() -> None:
    """With Ray told not to set CUDA_VISIBLE_DEVICES (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES),
    list this actor's GPU first: it is cuda:0 to everything in this process, its peers follow."""
    if os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES") != "1":
        return
    import ray

    own = [str(i) for i in ray.get_gpu_ids()]
    if not own:
        return
    node_id = ray.get_runtime_context().get_node_id()
    num_gpus = next(int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["NodeID"] == node_id)
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    every = inherited.split(",") if inherited else [str(i) for i in range(num_gpus)]
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(own + [gpu for gpu in every if gpu not in own])


def advertised_host(bind_host: str) -> str:
    """The address peers should dial: the bind host, or this node's IP when bound to all."""
    if bind_host not in ("0.0.0.0", "::", ""):
        return bind_host
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"
