"""What a worker receives is checked, so a bad message fails only itself: real workers over real
gRPC, with authenticated callers that misbehave (a forged commit, a lease out of bounds, a flood of
reservations whose KV never comes, an abort of someone else's request, garbage KV that must not
reach another request through the decode worker's cache)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch

from pdserve.decode_worker.admission import DecodeLimits, DecodeQueueFullError
from pdserve.deploy.worker_host import WorkerHost, WorkerSpec
from pdserve.engine import LLM
from pdserve.engine.outputs import TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kvtransfer import Endpoint, KVCommitInfo, KVLayout, KVSender, KVTransferError, LayerProgress, OutgoingTransfer
from pdserve.proto import GRPC_OPTIONS, auth
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import params_to_proto
from tests.servers import CLUSTER_SECRET
from tests.test_workers import (
    BLOCK_SIZE,
    MAX_MODEL_LEN,
    RPC_TIMEOUT_S,
    Result,
    Worker,
    as_caller,
    assert_rpc_error,
    engine_config,
    expected_tokens,
    generate_request,
    greedy,
    kv_bytes_of,
    prefill_request,
    read_rest,
    reserve,
    run,
    signed_channel,
    slowed_steps,
)

FLOOD_LIMITS = DecodeLimits(max_num_pending=64, max_num_pending_per_caller=24)


def start(role: str, model: Path, limits: DecodeLimits | None = None, **overrides: object) -> Worker:
    spec = WorkerSpec(
        role,
        engine_config(model, **overrides),
        model_name="m",
        cluster_secret=CLUSTER_SECRET,
        decode_limits=limits or DecodeLimits(),
    )
    host = WorkerHost(spec)
    record = host.start()
    channel = signed_channel(record.address)
    stub = pb_grpc.PrefillWorkerStub(channel) if role == "prefill" else pb_grpc.DecodeWorkerStub(channel)
    return Worker(role, host, record.address, channel, stub)


@pytest.fixture(scope="module")
def workers(checkpoints: dict[str, Path]) -> Iterator[dict[str, Worker]]:
    model = checkpoints["llama"]
    pool = {
        "prefill": start("prefill", model),
        "prefill-slow": start("prefill", model, max_num_batched_tokens=1),
        "decode": start("decode", model),
        "decode-flood": start("decode", model, FLOOD_LIMITS, max_num_seqs=16),
        "decode-tiny": start("decode", model, num_kv_blocks=6, max_model_len=96),
    }
    try:
        yield pool
    finally:
        for worker in pool.values():
            worker.channel.close()
            worker.host.stop()


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path]) -> LLM:
    return LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def text_ids(reference: LLM) -> list[int]:
    return reference.get_tokenizer().encode("a bad message must fail only itself, never its neighbours; " * 8)


def forge(
    decode: Worker, transfer_id: str, num_prompt_tokens: int, commit: KVCommitInfo, kv: str = "random"
) -> KVTransferError | None:
    """An authenticated sender that is not a real prefill worker: it takes the reservation, writes
    KV of its own (`random`, or `zeros`) into it and commits `commit`; the commit's error, if any."""
    layout: KVLayout = decode.host.worker.receiver.layout
    num_blocks = -(-num_prompt_tokens // layout.block_size)
    shape = layout.chunk_shape(layout.num_layers, num_blocks + 1)
    cache = torch.randn(shape) * 4 if kv == "random" else torch.zeros(shape)

    async def main() -> KVTransferError | None:
        sender = KVSender(
            cache, layout, "forger", Endpoint.here(torch.device("cpu"), "127.0.0.1"), ["grpc"], secret=CLUSTER_SECRET
        )
        try:
            peer = await sender.connect(decode.address, 10)
            reservation = await sender.begin(peer, transfer_id, num_blocks, 10)
            progress = LayerProgress(sender.bounds)
            progress.mark_all()
            await sender.push(
                peer,
                OutgoingTransfer(
                    transfer_id,
                    list(range(1, num_blocks + 1))[reservation.num_present_blocks :],  # it may hold what it sent before
                    reservation.block_ids,
                    progress,
                    reservation.deadline,
                ),
            )
            await sender.commit(peer, transfer_id, commit, 10)
        except KVTransferError as error:
            return error
        finally:
            await sender.close()
        return None

    return asyncio.run(main())


# ---- a forged commit fails only itself --------------------------------------------------------

FORGED_COMMITS = {
    "token id past the vocabulary": (
        lambda n, t: KVCommitInfo(10**6, None, n),
        "first_token_id 1000000 is outside the vocabulary",
    ),
    "negative token id": (lambda n, t: KVCommitInfo(-5, None, n), "first_token_id -5 is outside the vocabulary"),
    "logprobs naming a token past the vocabulary": (
        lambda n, t: KVCommitInfo(t, TokenLogprobs(t, -0.5, 1, ((t, -0.5), (10**6, -1.0))), n),
        "outside the vocabulary",
    ),
    "NaN logprob": (lambda n, t: KVCommitInfo(t, TokenLogprobs(t, math.nan, 1, ()), n), "not <= 0"),
    "another prompt length": (lambda n, t: KVCommitInfo(t, None, n + 1), "prompt tokens, the reservation for"),
    "logprobs the request did not ask for": (
        lambda n, t: KVCommitInfo(t, TokenLogprobs(t, -0.5, 1, ((t, -0.5),)), n),
        "first_logprobs has more than 0 entries",
    ),
}


@pytest.mark.parametrize("case", list(FORGED_COMMITS))
def test_a_forged_commit_fails_only_itself_while_a_real_request_on_the_worker_finishes_exactly(
    workers: dict[str, Worker], reference: LLM, text_ids: list[int], case: str
) -> None:
    prefill, decode = workers["prefill"], workers["decode"]
    make_commit, fragment = FORGED_COMMITS[case]
    real_prompt, forged_prompt = text_ids[:20], text_ids[20:50]
    real = generate_request(real_prompt, greedy(40), f"real-{uuid.uuid4().hex[:6]}")
    real_stream, real_reservation = reserve(decode, real)
    victim = generate_request(forged_prompt, greedy(10), f"forged-{uuid.uuid4().hex[:6]}")
    victim_stream, _ = reserve(as_caller(decode, "gateway-2"), victim)
    with slowed_steps(decode, 0.03):  # the real request is still decoding when the forged commit lands
        response = prefill.stub.Prefill(prefill_request(real, real_reservation), timeout=RPC_TIMEOUT_S)
        result = Result(real_reservation, response, [response.first_token_id])
        message = next(real_stream)  # the real request is decoding in the batch now
        result.token_ids += message.tokens.token_ids
        error = forge(decode, victim.transfer_id, len(forged_prompt), make_commit(len(forged_prompt), 7))
        assert error is not None and error.code == "INVALID_ARGUMENT" and fragment in str(error), error
        assert decode.status().num_running == 1
        read_rest(real_stream, result)
    assert result.finished.finish_reason == "length"
    assert result.token_ids == expected_tokens(reference, real_prompt, greedy(40))
    # Nothing else changed: the forged transfer is still waiting (its lease, or its caller, ends it).
    assert decode.host.worker.receiver.is_pending(victim.transfer_id)
    assert forge(decode, victim.transfer_id, len(forged_prompt), KVCommitInfo(7, None, len(forged_prompt))) is None
    assert next(victim_stream).HasField("tokens")  # a valid commit of the same transfer is admitted
    victim_stream.cancel()
    decode.wait_idle()
    prefill.wait_idle()


def test_more_logprobs_than_the_workers_max_logprobs_is_invalid_argument_and_reserves_nothing(
    workers: dict[str, Worker], text_ids: list[int]
) -> None:
    decode = workers["decode"]
    for params, field in ((greedy(4, logprobs=21), "sample"), (greedy(4, prompt_logprobs=25), "prompt")):
        request = generate_request(text_ids[:20], params, uuid.uuid4().hex)
        assert_rpc_error(
            lambda request=request: next(decode.stub.Generate(request, timeout=10)),
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Requested {field} logprobs of",
            "greater than max allowed: 20 (--max-logprobs)",
        )
    assert decode.wait_idle(timeout_s=2).max_logprobs == 20  # what gateways read to refuse it first


# ---- leases --------------------------------------------------------------------------------------


@pytest.mark.parametrize("lease_s", [math.nan, math.inf, -1.0, 601.0, 1e9])
def test_a_lease_out_of_bounds_is_invalid_argument_and_reserves_nothing(
    workers: dict[str, Worker], text_ids: list[int], lease_s: float
) -> None:
    decode = workers["decode"]
    request = generate_request(text_ids[:20], greedy(4), uuid.uuid4().hex, lease_s=lease_s)
    assert_rpc_error(
        lambda: next(decode.stub.Generate(request, timeout=10)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "lease_seconds must be in (0, 600]",
    )
    decode.wait_idle(timeout_s=2)


def test_the_longest_lease_is_accepted(workers: dict[str, Worker], text_ids: list[int]) -> None:
    decode = workers["decode"]
    stream, reservation = reserve(decode, generate_request(text_ids[:20], greedy(4), uuid.uuid4().hex, lease_s=600.0))
    assert len(reservation.block_ids) == 2
    stream.cancel()
    decode.wait_idle()


# ---- a flood of reservations ---------------------------------------------------------------------


async def _flood(address: str, caller: str, prompt: list[int], count: int) -> tuple[list, list[str], list, grpc.aio.Channel]:
    """`count` Generate calls of `caller`, never prefilled, with the longest lease: the calls that
    got a reservation, the refusals' messages, and the calls still queued after 3 s."""
    channel = auth.channel(address, CLUSTER_SECRET, caller, GRPC_OPTIONS)
    stub = pb_grpc.DecodeWorkerStub(channel)
    wire = params_to_proto(greedy(4))
    calls = [
        stub.Generate(
            pb.GenerateRequest(
                request_id=f"{caller}-{i}", transfer_id=uuid.uuid4().hex, prompt_token_ids=prompt, params=wire, lease_seconds=600
            ),
            timeout=120,
        )
        for i in range(count)
    ]
    reads = [asyncio.ensure_future(call.read()) for call in calls]
    await asyncio.wait(reads, timeout=3)
    reserved, refused, queued = [], [], []
    for call, read in zip(calls, reads):
        if not read.done():
            queued.append((call, read))
        elif read.exception() is not None:
            assert read.exception().code() == grpc.StatusCode.RESOURCE_EXHAUSTED, read.exception()
            refused.append(read.exception().details())
        else:
            assert read.result().HasField("reservation")
            reserved.append(call)
    return reserved, refused, queued, channel


def test_a_flood_of_tiny_reservations_is_bounded_and_other_callers_are_served_exactly(
    workers: dict[str, Worker], reference: LLM, text_ids: list[int]
) -> None:
    """256 one-token reservations from one caller, each with a 600 s lease and never a prefill:
    that caller holds at most its share (half the batch slots and blocks) and queues at most its
    24; the rest are refused at once (503 at the gateway), and another caller is served exactly."""
    prefill, decode = workers["prefill"], workers["decode-flood"]
    total = decode.status().num_total_blocks

    async def main() -> None:
        reserved, refused, queued, channel = await _flood(decode.address, "flooder", text_ids[:1], 256)
        assert len(reserved) == 8  # max_num_seqs 16: half of the batch
        assert len(reserved) + len(queued) == FLOOD_LIMITS.max_num_pending_per_caller
        assert len(refused) == 256 - 24 and "caller flooder has 24 requests waiting" in refused[0]
        status = decode.status()
        assert status.num_used_blocks == 8 and status.num_waiting == 24 and total == 64

        started = time.monotonic()
        prompt = text_ids[5:40]
        result = await asyncio.to_thread(run_as, prefill, as_caller(decode, "gateway-real"), prompt, greedy(12))
        assert result == expected_tokens(reference, prompt, greedy(12))
        assert time.monotonic() - started < 30  # served now, not when the flood's leases end

        for call, _read in queued:
            call.cancel()
        for call in reserved:
            call.cancel()
        await asyncio.gather(*(read for _, read in queued), return_exceptions=True)
        await channel.close()

    asyncio.run(main())
    decode.wait_idle()
    prefill.wait_idle()


def run_as(prefill: Worker, decode: Worker, prompt: list[int], params: object) -> list[int]:
    request = generate_request(prompt, params, uuid.uuid4().hex)
    stream, reservation = reserve(decode, request)
    response = prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S)
    return read_rest(stream, Result(reservation, response, [response.first_token_id])).token_ids


def test_the_worker_wide_bound_refuses_every_caller_once_reached() -> None:
    limits = DecodeLimits(max_num_pending=4, max_num_pending_per_caller=3)
    limits.check_pending(["a", "a", "b"], "b")  # 3 waiting: one more fits
    with pytest.raises(DecodeQueueFullError, match="4 requests waiting"):
        limits.check_pending(["a", "a", "b", "c"], "d")
    with pytest.raises(DecodeQueueFullError, match="caller a has 3"):
        limits.check_pending(["a", "a", "a"], "a")


# ---- aborts --------------------------------------------------------------------------------------


def test_a_caller_cannot_abort_another_callers_generation(
    workers: dict[str, Worker], reference: LLM, text_ids: list[int]
) -> None:
    prefill, decode = workers["prefill"], workers["decode"]
    prompt = text_ids[3:25]
    request = generate_request(prompt, greedy(8), "someone-elses")
    stream, reservation = reserve(decode, request)
    assert not as_caller(decode, "gateway-other").stub.Abort(pb.AbortRequest(request_id="someone-elses"), timeout=5).found
    response = prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S)
    result = read_rest(stream, Result(reservation, response, [response.first_token_id]))
    assert result.finished.finish_reason == "length" and result.token_ids == expected_tokens(reference, prompt, greedy(8))
    decode.wait_idle()


def test_a_caller_cannot_abort_another_callers_prefill(workers: dict[str, Worker], text_ids: list[int]) -> None:
    prefill, decode = workers["prefill-slow"], workers["decode"]
    request = generate_request(text_ids[:100], greedy(2), "slow-prefill")
    stream, reservation = reserve(decode, request)
    with slowed_steps(prefill, 0.02):  # one token a step: 2 s of computing at least
        call = prefill.stub.Prefill.future(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S)
        deadline = time.monotonic() + 10
        while prefill.status().num_used_blocks == 0:
            assert time.monotonic() < deadline and not call.done(), "the prefill never started computing"
            time.sleep(0.01)
        other = pb_grpc.PrefillWorkerStub(signed_channel(prefill.address, "gateway-other"))
        assert not other.Abort(pb.AbortRequest(request_id="slow-prefill"), timeout=5).found
        assert not call.done()
        assert prefill.stub.Abort(pb.AbortRequest(request_id="slow-prefill"), timeout=5).found  # its own caller may
        with pytest.raises(grpc.RpcError) as caught:
            call.result(timeout=30)
        assert caught.value.code() == grpc.StatusCode.CANCELLED and "was aborted" in caught.value.details()
    stream.cancel()
    prefill.wait_idle()
    decode.wait_idle()


# ---- received KV stays with its request ------------------------------------------------------------


def test_garbage_kv_received_for_one_request_never_reaches_another_after_a_preemption(
    workers: dict[str, Worker], reference: LLM, text_ids: list[int]
) -> None:
    """A sender writes garbage KV for prompt P (request A); request B has the same prompt P and its
    real KV. The pool (6 blocks) cannot hold both as they grow: B, the later one, is preempted and
    recomputed on the decode worker. Had A's received blocks been cached under P's hash, B's
    recompute would reuse them and continue from garbage; B must equal the offline engine."""
    prefill, decode = workers["prefill"], workers["decode-tiny"]
    prompt = text_ids[:32]  # two full blocks
    preemptions_before = decode.status().num_preemptions
    a = generate_request(prompt, greedy(63), "garbage-a")
    b = generate_request(prompt, greedy(60), "honest-b")
    a_stream, _ = reserve(as_caller(decode, "gateway-a"), a)
    b_stream, b_reservation = reserve(as_caller(decode, "gateway-b"), b)
    with slowed_steps(decode, 0.01):  # A cannot finish before B joins it
        first = expected_tokens(reference, prompt, greedy(1))[0]
        assert forge(decode, a.transfer_id, len(prompt), KVCommitInfo(first, None, len(prompt))) is None
        response = prefill.stub.Prefill(prefill_request(b, b_reservation), timeout=RPC_TIMEOUT_S)
        b_result = read_rest(b_stream, Result(b_reservation, response, [response.first_token_id]))
        read_rest(a_stream, Result(None, None, []))
    assert decode.status().num_preemptions > preemptions_before  # the scenario happened
    assert b_result.token_ids == expected_tokens(reference, prompt, greedy(60))
    decode.wait_idle()
    prefill.wait_idle()


# ---- the decode worker's prefix cache: what a sender sent serves that sender's prompts only -------


def test_a_prefix_a_sender_sent_is_kept_for_its_next_prompt_and_never_for_another_senders(
    workers: dict[str, Worker], reference: LLM, text_ids: list[int], checkpoints: dict[str, Path]
) -> None:
    """A forger (authenticated, no prefill worker) hands off garbage KV for prompt P; then the
    prefill worker hands off P twice. Its first hand-off keeps nothing (the forger's blocks are
    the forger's) and is sent whole; its second keeps the full blocks of P's first tokens from its
    first, and is sent the rest. Both equal the offline engine."""
    prefill, decode = workers["prefill"], workers["decode"]
    prompt = text_ids[:45]  # 3 blocks; its first 44 tokens fill 2
    params = greedy(8, cache_salt=uuid.uuid4().hex)  # no other test's prompt shares its chain
    forged = generate_request(prompt, params, "forged-prefix")
    stream, _ = reserve(decode, forged)
    first = expected_tokens(reference, prompt, greedy(1))[0]
    assert forge(decode, forged.transfer_id, len(prompt), KVCommitInfo(first, None, len(prompt))) is None
    read_rest(stream, Result(None, None, []))  # decoded from garbage: its own business
    expected = expected_tokens(reference, prompt, params)
    one_block = kv_bytes_of(BLOCK_SIZE, checkpoints["llama"])
    for present in (0, 2):
        result = run(prefill, decode, prompt, params)
        assert result.prefill.kv_present_blocks == present
        assert result.prefill.kv_bytes == (3 - present) * one_block
        assert result.token_ids == expected, present
    decode.wait_idle()
    prefill.wait_idle()


def begin_as_keeper(decode: Worker, prompt: list[int], params: SamplingParams, end: str) -> int:
    """A sender named "keeper" (no prefill worker: random KV) takes a new reservation of `prompt`
    and ends it by `end`: "commit" (the rest of the KV, a valid first token; the request then
    decodes to its end), "abandon", or "leave" (its caller cancels the Generate call). How many
    of the prompt's blocks the decode worker kept at its Begin."""
    request = generate_request(prompt, params, uuid.uuid4().hex)
    stream, _ = reserve(decode, request)
    layout: KVLayout = decode.host.worker.receiver.layout
    num_blocks = -(-len(prompt) // layout.block_size)
    cache = torch.randn(layout.chunk_shape(layout.num_layers, num_blocks + 1))

    async def main() -> int:
        sender = KVSender(
            cache, layout, "keeper", Endpoint.here(torch.device("cpu"), "127.0.0.1"), ["grpc"], secret=CLUSTER_SECRET
        )
        try:
            peer = await sender.connect(decode.address, 10)
            reservation = await sender.begin(peer, request.transfer_id, num_blocks, 10)
            if end == "abandon":
                await sender.abandon(peer, request.transfer_id, "the test gives it up")
            elif end == "leave":
                stream.cancel()
            else:
                progress = LayerProgress(sender.bounds)
                progress.mark_all()
                src = list(range(1, num_blocks + 1))[reservation.num_present_blocks :]
                await sender.push(
                    peer, OutgoingTransfer(request.transfer_id, src, reservation.block_ids, progress, reservation.deadline)
                )
                await sender.commit(peer, request.transfer_id, KVCommitInfo(7, None, len(prompt)), 10)
            return reservation.num_present_blocks
        finally:
            await sender.close()

    kept = asyncio.run(main())
    with contextlib.suppress(grpc.RpcError):  # "leave": cancelled
        messages = list(stream)
        assert messages[-1].finished.finish_reason == ("length" if end == "commit" else "error"), messages[-1]
    return kept


def test_a_reservation_that_kept_cached_blocks_frees_every_block_however_it_ends(
    workers: dict[str, Worker], text_ids: list[int]
) -> None:
    """Kept blocks are shared with the cache: whether the hand-off commits, is abandoned by its
    sender or left by its caller, the decode worker ends with no block in use."""
    decode = workers["decode"]
    prompt, params = text_ids[:45], greedy(3, cache_salt=uuid.uuid4().hex)  # 3 blocks; 2 full in its first 44 tokens
    kept = []
    for end in ("commit", "abandon", "leave", "commit"):
        kept.append(begin_as_keeper(decode, prompt, params, end))
        decode.wait_idle()
    assert kept == [0, 2, 2, 2]
