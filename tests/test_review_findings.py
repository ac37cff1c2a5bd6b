"""Regression tests for defects a code review found (each failed before its fix): usage's cached
tokens, out-of-range wire values, out-of-vocab stop tokens, NaN temperature, GPU shares, seeded
sampling across workers, leases shorter than a prefill, decode batch limits, broken devices."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pdserve.deploy.worker_host import WorkerHost, WorkerSpec
from pdserve.engine import LLM
from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.deadlines import Deadlines
from pdserve.proto.failures import TABLE
from pdserve.router.admission import Admission
from pdserve.router.backend import BackendFailure
from pdserve.router.disaggregated import DisaggregatedBackend
from pdserve.router.drain import Drain
from pdserve.router.metrics import Metrics
from pdserve.router.registry import InMemoryRegistry, WorkerRecord
from pdserve.router.serving import Serving, collect
from pdserve.router.workers import WorkerHandle, WorkerPool
from tests.servers import CLUSTER_SECRET

MAX_MODEL_LEN = 256
TEXT = (
    "The key value cache of every request is stored in fixed size blocks, and the decode worker "
    "reserves blocks for a prompt before the prefill worker pushes its keys and values into them. "
)


def greedy(max_tokens: int, **extra: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra)


# ---- scripted workers: the gateway's DisaggregatedBackend without any model --------------------


class _ScriptedStream:
    """A `DecodeWorker.Generate` call that plays back fixed messages."""

    def __init__(self, messages: list[pb.GenerateResponse]) -> None:
        self._messages = list(messages)

    async def read(self) -> pb.GenerateResponse:
        return self._messages.pop(0) if self._messages else grpc.aio.EOF

    def cancel(self) -> bool:
        return True


class _ScriptedDecodeStub:
    def __init__(self, messages: list[pb.GenerateResponse]) -> None:
        self.messages = messages
        self.num_calls = 0

    def Generate(self, request: pb.GenerateRequest, timeout: float | None = None) -> _ScriptedStream:  # noqa: N802
        self.num_calls += 1
        return _ScriptedStream(self.messages)


class _ScriptedCall:
    """A unary gRPC call: awaitable, cancellable."""

    def __init__(self, response: pb.PrefillResponse) -> None:
        self.response = response

    def __await__(self):  # noqa: ANN204
        async def response() -> pb.PrefillResponse:
            return self.response

        return response().__await__()

    def cancel(self) -> bool:
        return False


class _ScriptedPrefillStub:
    def __init__(self, response: pb.PrefillResponse) -> None:
        self.response = response

    def Prefill(self, request: pb.PrefillRequest, timeout: float | None = None) -> _ScriptedCall:  # noqa: N802
        return _ScriptedCall(self.response)


def _scripted_backend(
    tokenizer: Tokenizer, decode_messages: list[pb.GenerateResponse], prefill_response: pb.PrefillResponse
) -> DisaggregatedBackend:
    pool = WorkerPool(InMemoryRegistry(), CLUSTER_SECRET)
    for role, stub in (("decode", _ScriptedDecodeStub(decode_messages)), ("prefill", _ScriptedPrefillStub(prefill_response))):
        record = WorkerRecord(f"{role}-0", role, "127.0.0.1:1")
        pool.workers[record.worker_id] = WorkerHandle(record, channel=None, stub=stub, is_healthy=True)
    return DisaggregatedBackend(pool, tokenizer, "m", MAX_MODEL_LEN)


def _reservation() -> pb.GenerateResponse:
    return pb.GenerateResponse(reservation=pb.Reservation(block_ids=[0, 1], kv_address="127.0.0.1:1", transports=["grpc"]))


@pytest.fixture(scope="module")
def demo_tokenizer(demo_model_dir: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(demo_model_dir)


def test_disaggregated_usage_reports_the_prefill_workers_cached_tokens(demo_tokenizer: Tokenizer) -> None:
    decode_messages = [
        _reservation(),
        pb.GenerateResponse(tokens=pb.TokenDelta(token_ids=[11, 12])),
        pb.GenerateResponse(finished=pb.Finished(finish_reason="length", num_output_tokens=3)),
    ]
    backend = _scripted_backend(demo_tokenizer, decode_messages, pb.PrefillResponse(first_token_id=10, num_cached_tokens=16))

    async def main() -> dict:
        serving = Serving(backend, Metrics("m"), Deadlines(first_token_s=30, request_s=30), Admission(8, 4096), Drain())
        generation = serving.generation("r", list(range(1, 40)), greedy(3))
        whole = await collect(generation.deltas())
        assert whole.token_ids == [10, 11, 12] and whole.finish_reason == "length"
        return generation.usage

    usage = asyncio.run(main())
    assert usage.get("prompt_tokens_details") == {"cached_tokens": 16}


def test_out_of_int32_token_id_is_a_400_and_leaves_worker_load_unchanged(demo_tokenizer: Tokenizer) -> None:
    backend = _scripted_backend(demo_tokenizer, [], pb.PrefillResponse())

    async def main() -> None:
        stream = backend.generate("r", [1, 2, 2**31], greedy(4))
        try:
            with pytest.raises(InvalidRequestError):
                await anext(stream)
        finally:
            assert [h.num_in_flight for h in backend.pool.workers.values()] == [0, 0]

    asyncio.run(main())


# ---- the engine's sampler --------------------------------------------------------------------


def test_a_stop_token_id_outside_the_vocab_does_not_take_down_other_requests(demo_model_dir: Path) -> None:
    engine = LLMEngine.from_config(EngineConfig(model=str(demo_model_dir), device="cpu", max_model_len=128, num_kv_blocks=32))
    vocab = engine.core.model_config.vocab_size
    good = engine.add_request("good", [1, 2, 3, 4], greedy(4))
    try:
        engine.add_request("bad", [5, 6, 7, 8], greedy(4, min_tokens=2, stop_token_ids=[vocab + 7]))
    except InvalidRequestError:
        pass  # rejecting it up front is a fine fix too
    for _ in range(20):
        if not engine.has_unfinished_requests():
            break
        engine.step()
    assert good.finish_reason == "length" and len(good.output_token_ids) == 4


def test_nan_temperature_is_rejected() -> None:
    with pytest.raises(InvalidRequestError):
        SamplingParams(temperature=float("nan"))


# ---- deploy ----------------------------------------------------------------------------------


def test_fractional_gpu_shares_let_every_worker_be_placed() -> None:
    from pdserve.deploy.placement import gpus_per_worker

    share = gpus_per_worker(num_cluster_gpus=2.0, num_workers=3, device="auto")
    workers_per_gpu = int(1 / share + 1e-9) if share < 1 else 1  # Ray packs fractional shares summing to <= 1
    assert workers_per_gpu * 2 >= 3, f"a share of {share:.3f} GPU fits {workers_per_gpu} worker(s) per GPU"


# ---- real prefill and decode workers behind the gateway's backend ------------------------------

HOSTS: dict[str, WorkerHost] = {}


@pytest.fixture(scope="module")
def cluster(checkpoints: dict[str, Path]) -> Iterator[dict[str, WorkerRecord]]:
    def config(**overrides: object) -> EngineConfig:
        base = dict(
            model=str(checkpoints["llama"]),
            device="cpu",
            dtype="float32",
            block_size=16,
            max_model_len=MAX_MODEL_LEN,
            num_kv_blocks=64,
        )
        return EngineConfig(**(base | overrides))

    hosts = {
        "prefill": WorkerHost(WorkerSpec("prefill", config(), "m", cluster_secret=CLUSTER_SECRET)),
        "prefill-slow": WorkerHost(WorkerSpec("prefill", config(max_num_batched_tokens=1), "m", cluster_secret=CLUSTER_SECRET)),
        "decode": WorkerHost(WorkerSpec("decode", config(), "m", cluster_secret=CLUSTER_SECRET)),
        "decode-narrow": WorkerHost(WorkerSpec("decode", config(max_num_seqs=2), "m", cluster_secret=CLUSTER_SECRET)),
        "decode-doomed": WorkerHost(WorkerSpec("decode", config(), "m", cluster_secret=CLUSTER_SECRET)),
    }
    HOSTS.update(hosts)
    try:
        yield {name: host.start() for name, host in hosts.items()}
    finally:
        for host in hosts.values():
            if host.record is not None:
                host.stop()


@pytest.fixture(scope="module")
def llama_tokenizer(checkpoints: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_pretrained(checkpoints["llama"])


def _generate(
    records: list[WorkerRecord],
    tokenizer: Tokenizer,
    prompt: list[int],
    params: SamplingParams,
    deadlines: Deadlines = Deadlines(),
) -> list[int]:
    async def main() -> list[int]:
        pool = WorkerPool(InMemoryRegistry(records), CLUSTER_SECRET)
        await pool.start()
        try:
            assert await pool.wait_ready(10)
            backend = DisaggregatedBackend(pool, tokenizer, "m", MAX_MODEL_LEN, deadlines=deadlines)
            tokens = []
            async for delta in backend.generate(uuid.uuid4().hex, prompt, params):
                assert delta.finish_reason != "error", delta.error
                tokens += delta.token_ids
            return tokens
        finally:
            await pool.close()

    return asyncio.run(main())


def test_seeded_sampling_matches_the_offline_engine(
    cluster: dict[str, WorkerRecord], llama_tokenizer: Tokenizer, checkpoints: dict[str, Path]
) -> None:
    prompt = llama_tokenizer.encode(TEXT)[:20]
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    reference = LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)
    [want] = reference.generate({"prompt_token_ids": prompt}, params)
    got = _generate([cluster["prefill"], cluster["decode"]], llama_tokenizer, prompt, params)
    assert got == want.outputs[0].token_ids


def test_a_prefill_slower_than_the_lease_is_served_or_refused_as_unavailable(
    cluster: dict[str, WorkerRecord], llama_tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    prompt = llama_tokenizer.encode(TEXT * 4)[7:247]  # ~240 one-token steps on the slow prefill worker
    records = [cluster["prefill-slow"], cluster["decode"]]
    # The prefill worker gives the hand-off up once the lease has run out (or the reservation is gone).
    # The gateway then tries once more with a fresh reservation; the prompt's KV is in the prefill
    # worker's prefix cache by then, so that attempt may fit the lease: served, or a 503, never a 500.
    try:
        tokens = _generate(records, llama_tokenizer, prompt, greedy(2), Deadlines(kv_lease_s=0.05))
    except BackendFailure as failure:
        assert TABLE[failure.failure].http_status == 503, failure
    else:
        assert len(tokens) == 2
    assert "not pending: expired" in caplog.text or "not computed in time" in caplog.text  # the first attempt
    assert len(_generate(records, llama_tokenizer, prompt, greedy(2))) == 2  # the default lease covers it


def test_the_decode_batch_never_exceeds_max_num_seqs(
    cluster: dict[str, WorkerRecord], llama_tokenizer: Tokenizer, checkpoints: dict[str, Path]
) -> None:
    import threading

    worker = HOSTS["decode-narrow"]._worker
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.wait(0.0005):  # sample often, yet leave the GIL to the workers
            peak[0] = max(peak[0], len(worker.scheduler.running))

    prompts = [llama_tokenizer.encode(TEXT)[i : i + 12] for i in range(5)]

    async def main() -> list[list[int]]:
        pool = WorkerPool(InMemoryRegistry([cluster["prefill"], cluster["decode-narrow"]]), CLUSTER_SECRET)
        await pool.start()
        try:
            assert await pool.wait_ready(10)
            backend = DisaggregatedBackend(pool, llama_tokenizer, "m", MAX_MODEL_LEN)

            async def one(prompt: list[int]) -> list[int]:
                return [t for d in [d async for d in backend.generate(uuid.uuid4().hex, prompt, greedy(20))] for t in d.token_ids]

            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await pool.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = asyncio.run(main())
    finally:
        stop.set()
        watcher.join()
    reference = LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)
    expected = reference.generate([{"prompt_token_ids": p} for p in prompts], greedy(20))
    assert results == [e.outputs[0].token_ids for e in expected]
    assert peak[0] == 2  # full, never over


def test_a_worker_whose_device_failed_reports_unavailable_and_leaves_the_pool(
    cluster: dict[str, WorkerRecord], llama_tokenizer: Tokenizer
) -> None:
    worker = HOSTS["decode-doomed"]._worker

    def broken_step(*args: object) -> None:
        raise RuntimeError("CUDA error: device-side assert triggered")

    worker.core.runner.execute = broken_step
    worker.core.runner.launch = broken_step  # a decode step launched ahead
    worker.core.is_device_healthy = lambda: False
    prompt = llama_tokenizer.encode(TEXT)[:10]

    async def main() -> tuple[str | None, bool]:
        pool = WorkerPool(InMemoryRegistry([cluster["prefill"], cluster["decode-doomed"]]), CLUSTER_SECRET)
        await pool.start()
        try:
            assert await pool.wait_ready(10)
            backend = DisaggregatedBackend(pool, llama_tokenizer, "m", MAX_MODEL_LEN)
            with pytest.raises(BackendFailure) as caught:  # the request is lost: an error event for its client
                async for _ in backend.generate(uuid.uuid4().hex, prompt, greedy(5)):
                    pass
            for _ in range(50):  # the worker marks itself broken right after failing its requests
                await pool.refresh()
                if not await backend.is_healthy():
                    break
                await asyncio.sleep(0.1)
            return str(caught.value), await backend.is_healthy()
        finally:
            await pool.close()

    error, is_healthy = asyncio.run(main())
    assert "device-side assert" in error
    assert not is_healthy  # the pool stopped routing to it; /health turns 503
