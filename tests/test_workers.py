"""Real prefill and decode workers (`deploy.worker_host.WorkerHost`, no Ray) on 127.0.0.1, driven
over gRPC with the generated stubs the way `router/disaggregated.py` drives them: Generate on the
decode worker (first message: the reservation), Prefill with that reservation as target, then the
rest of the Generate stream. Tokens are compared with the offline `engine.LLM`."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch

from pdserve.decode_worker.worker import DecodeWorker, Reserved
from pdserve.deploy.worker_host import WorkerHost, WorkerSpec
from pdserve.engine import LLM
from pdserve.engine.config import EngineConfig, ModelConfig
from pdserve.engine.core import EngineCore
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams
from pdserve.kvtransfer import Endpoint, KVSender, KVTransferError
from pdserve.kvtransfer.receiver import HOLD_GRACE_S
from pdserve.prefill_worker.worker import KVTarget, PrefillWorker
from pdserve.proto import auth
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.convert import params_to_proto
from pdserve.proto.failures import PARAM_METADATA_KEY
from tests.servers import CLUSTER_SECRET, free_port

MAX_MODEL_LEN = 128
LONG_MODEL_LEN = 512  # the fixtures' max_position_embeddings
BLOCK_SIZE = 16
NUM_KV_BLOCKS = 64
RPC_TIMEOUT_S = 60.0
TEXT = (
    "The key value cache of every request is stored in fixed size blocks, and the decode worker "
    "reserves blocks for a prompt before the prefill worker pushes its keys and values into them. "
    "Questions and answers: who wrote the letter, where did they go, and why is the sky blue? "
    "def add(a, b): return a + b; for i in range(10): print(i, add(i, 1)) and so on until the end."
)
# name -> (role, checkpoint family, --kv-transport, EngineConfig overrides)
SPECS: dict[str, tuple[str, str, str, dict]] = {
    "prefill": ("prefill", "llama", "auto", {}),  # auto on a CPU: grpc
    "prefill-local": ("prefill", "llama", "local", {}),
    "prefill-nccl": ("prefill", "llama", "nccl", {}),  # gloo on a CPU
    "decode": ("decode", "llama", "auto", {}),  # accepts every transport it can run
    "decode-grpc-only": ("decode", "llama", "grpc", {}),
    "prefill-bs8": ("prefill", "llama", "auto", {"block_size": 8}),
    "prefill-qwen2": ("prefill", "qwen2", "auto", {}),
    "prefill-slow": ("prefill", "llama", "auto", {"max_num_batched_tokens": 1, "max_model_len": LONG_MODEL_LEN}),
    "decode-long": ("decode", "llama", "auto", {"max_model_len": LONG_MODEL_LEN}),  # generations long enough to stop
    "decode-dup": ("decode", "llama", "auto", {}),  # for a test that breaks its worker
    "decode-tiny": ("decode", "llama", "auto", {"num_kv_blocks": 6, "max_model_len": 96}),
    # fp8 KV cache (--kv-cache-dtype fp8) on both ends
    "prefill-fp8": ("prefill", "llama", "auto", {"kv_cache_dtype": "fp8"}),
    "prefill-fp8-local": ("prefill", "llama", "local", {"kv_cache_dtype": "fp8"}),
    "prefill-fp8-nccl": ("prefill", "llama", "nccl", {"kv_cache_dtype": "fp8"}),
    "decode-fp8": ("decode", "llama", "auto", {"kv_cache_dtype": "fp8"}),
    "decode-fp8-tiny": ("decode", "llama", "auto", {"num_kv_blocks": 6, "max_model_len": 96, "kv_cache_dtype": "fp8"}),
    "prefill-fp8-scaled": ("prefill", "llama-kv-scaled", "auto", {"kv_cache_dtype": "fp8"}),
    "prefill-awq-fp8": ("prefill", "llama-awq", "auto", {"kv_cache_dtype": "fp8"}),
    "decode-awq-fp8": ("decode", "llama-awq", "auto", {"kv_cache_dtype": "fp8"}),
    "decode-fp8-scaled": ("decode", "llama-kv-scaled", "auto", {"kv_cache_dtype": "fp8"}),
}
# Per-layer fp8 KV scales that are not 1 (nor powers of two), as a calibrated checkpoint carries them
KV_SCALES = {
    "model.layers.0.self_attn.k_scale": 0.37,
    "model.layers.0.self_attn.v_scale": 0.061,
    "model.layers.1.self_attn.k_scale": 0.23,
    "model.layers.1.self_attn.v_scale": 0.045,
}
PREFILL_OF_TRANSPORT = {"grpc": "prefill", "local": "prefill-local", "nccl": "prefill-nccl"}
FP8_PREFILL_OF_TRANSPORT = {"grpc": "prefill-fp8", "local": "prefill-fp8-local", "nccl": "prefill-fp8-nccl"}


def signed_channel(address: str, caller: str = "test-gateway") -> grpc.Channel:
    """A channel whose calls are signed with the tests' cluster secret, as a gateway's are."""
    return auth.blocking_channel(address, CLUSTER_SECRET, caller)


def engine_config(model: Path, **overrides: object) -> EngineConfig:
    kwargs = dict(block_size=BLOCK_SIZE, max_model_len=MAX_MODEL_LEN, num_kv_blocks=NUM_KV_BLOCKS) | overrides
    return EngineConfig(model=str(model), device="cpu", dtype="float32", **kwargs)


@dataclass
class Worker:
    name: str
    host: WorkerHost
    address: str
    channel: grpc.Channel
    stub: pb_grpc.PrefillWorkerStub | pb_grpc.DecodeWorkerStub

    def status(self) -> pb.WorkerStatus:
        return self.stub.GetStatus(pb.StatusRequest(), timeout=5)

    def wait_idle(self, timeout_s: float = 15.0) -> pb.WorkerStatus:
        """Polls until no request holds a KV block here; fails naming what is still held."""
        deadline = time.monotonic() + timeout_s
        while True:
            status = self.status()
            if status.num_used_blocks == 0 and status.num_running == 0 and status.num_waiting == 0:
                return status
            assert time.monotonic() < deadline, (
                f"{self.name} still holds KV after {timeout_s} s: used_blocks={status.num_used_blocks} "
                f"running={status.num_running} waiting={status.num_waiting}"
            )
            time.sleep(0.05)


class Workers:
    """Starts the hosts of `SPECS` on first use; stops them all at the end of the module."""

    def __init__(self, checkpoints: dict[str, Path]) -> None:
        self.checkpoints = checkpoints
        self._workers: dict[str, Worker] = {}

    def __getitem__(self, name: str) -> Worker:
        if name not in self._workers:
            role, family, transport, overrides = SPECS[name]
            spec = WorkerSpec(
                role,
                engine_config(self.checkpoints[family], **overrides),
                model_name="m",
                kv_transport=transport,
                cluster_secret=CLUSTER_SECRET,
            )
            host = WorkerHost(spec)
            record = host.start()
            channel = signed_channel(record.address)
            stub_cls = pb_grpc.PrefillWorkerStub if role == "prefill" else pb_grpc.DecodeWorkerStub
            self._workers[name] = Worker(name, host, record.address, channel, stub_cls(channel))
        return self._workers[name]

    def stop(self) -> None:
        for worker in self._workers.values():
            worker.channel.close()
            worker.host.stop()
        self._workers.clear()


@pytest.fixture(scope="module")
def kv_scaled_checkpoint(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama checkpoint with KV_SCALES in a second safetensors file."""
    from tests.test_kv_fp8_accuracy import with_kv_scales

    scales = {name: torch.tensor(value) for name, value in KV_SCALES.items()}
    return with_kv_scales(checkpoints["llama"], tmp_path_factory.mktemp("kv-scaled") / "llama", scales)


@pytest.fixture(scope="module")
def awq_checkpoint(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The llama checkpoint quantized as AWQ (groups of 64: its layers are 64 and 128 wide)."""
    from tests.quant_checkpoints import write_quantized_checkpoint

    target = tmp_path_factory.mktemp("awq") / "llama"
    write_quantized_checkpoint(checkpoints["llama"], target, "awq-g64")
    return target


@pytest.fixture(scope="module")
def workers(checkpoints: dict[str, Path], kv_scaled_checkpoint: Path, awq_checkpoint: Path) -> Iterator[Workers]:
    pool = Workers(checkpoints | {"llama-kv-scaled": kv_scaled_checkpoint, "llama-awq": awq_checkpoint})
    try:
        yield pool
    finally:
        pool.stop()


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path]) -> LLM:
    return LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def reference_fp8(checkpoints: dict[str, Path]) -> LLM:
    """The colocated engine with the fp8 KV cache: what the disaggregated fp8 path must equal."""
    return LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_dtype="fp8")


@pytest.fixture(scope="module")
def text_ids(reference: LLM) -> list[int]:
    ids = reference.get_tokenizer().encode(" ".join([TEXT] * 8))
    assert len(ids) >= LONG_MODEL_LEN, "the text must give at least LONG_MODEL_LEN tokens"
    return ids


def greedy(max_tokens: int, **extra: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra)


def expected_tokens(reference: LLM, prompt: list[int], params: SamplingParams) -> list[int]:
    [output] = reference.generate({"prompt_token_ids": prompt}, params)
    return output.outputs[0].token_ids


def kv_bytes_of(num_prompt_tokens: int, checkpoint: Path, block_size: int = BLOCK_SIZE, element_size: int = 4) -> int:
    """Bytes of every block the prompt occupies: all layers, K and V, float32 (fp8: element_size 1)."""
    num_blocks = -(-num_prompt_tokens // block_size)
    return num_blocks * block_size * ModelConfig.from_pretrained(checkpoint).kv_bytes_per_token * element_size


@dataclass
class Result:
    reservation: pb.Reservation
    prefill: pb.PrefillResponse
    token_ids: list[int]
    logprobs: list[pb.TokenLogprobs] = field(default_factory=list)
    finished: pb.Finished | None = None


def generate_request(
    prompt: list[int],
    params: SamplingParams | pb.SamplingParams,
    request_id: str,
    transfer_id: str | None = None,
    lease_s: float = 30.0,
) -> pb.GenerateRequest:
    wire = params if isinstance(params, pb.SamplingParams) else params_to_proto(params)
    return pb.GenerateRequest(
        request_id=request_id,
        transfer_id=transfer_id or uuid.uuid4().hex,
        prompt_token_ids=prompt,
        params=wire,
        lease_seconds=lease_s,
    )


def prefill_request(generate: pb.GenerateRequest, target: pb.Reservation) -> pb.PrefillRequest:
    return pb.PrefillRequest(
        request_id=generate.request_id,
        transfer_id=generate.transfer_id,
        prompt_token_ids=generate.prompt_token_ids,
        params=generate.params,
        target=target,
    )


def as_caller(decode: Worker, caller: str) -> Worker:
    """`decode` as another caller (another gateway) sees it: its own signed channel."""
    channel = signed_channel(decode.address, caller)
    return Worker(f"{decode.name} as {caller}", decode.host, decode.address, channel, pb_grpc.DecodeWorkerStub(channel))


def reserve(decode: Worker, request: pb.GenerateRequest) -> tuple[grpc.Call, pb.Reservation]:
    stream = decode.stub.Generate(request, timeout=RPC_TIMEOUT_S)
    first = next(stream)
    assert first.HasField("reservation"), f"first Generate message is not a reservation: {first}"
    return stream, first.reservation


def read_rest(stream: Iterator[pb.GenerateResponse], result: Result) -> Result:
    for message in stream:
        assert result.finished is None, f"message after Finished: {message}"
        if message.HasField("tokens"):
            result.token_ids += message.tokens.token_ids
            result.logprobs += message.tokens.logprobs
        else:
            assert message.HasField("finished"), f"unexpected message {message}"
            result.finished = message.finished
    return result


def run(prefill: Worker, decode: Worker, prompt: list[int], params: SamplingParams, request_id: str | None = None) -> Result:
    """One request through both workers, as the gateway does it."""
    request = generate_request(prompt, params, request_id or uuid.uuid4().hex)
    stream, reservation = reserve(decode, request)
    response = prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S)
    first = [response.first_logprobs] if response.HasField("first_logprobs") else []
    return read_rest(stream, Result(reservation, response, [response.first_token_id], first))


def assert_rpc_error(call: object, code: grpc.StatusCode, *fragments: str) -> grpc.RpcError:
    """Calls `call()` and checks it fails with `code` and a message containing every fragment."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == code, f"{error.code()}: {error.details()}"
    for fragment in fragments:
        assert fragment in error.details(), f"{fragment!r} not in {error.details()!r}"
    return error


# ---- a. the happy path -------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["grpc", "local", "nccl"])
@pytest.mark.parametrize("num_prompt_tokens, max_tokens", [(5, 12), (32, 20), (45, 30), (MAX_MODEL_LEN - 2, 30)])
def test_greedy_tokens_equal_the_offline_engine_and_kv_bytes_add_up(
    workers: Workers,
    reference: LLM,
    text_ids: list[int],
    checkpoints: dict[str, Path],
    transport: str,
    num_prompt_tokens: int,
    max_tokens: int,
) -> None:
    """Then the same prompt again, from the same prefill worker: the decode worker keeps the full
    blocks it holds of all but the prompt's last token, and is sent only the rest."""
    prefill, decode = workers[PREFILL_OF_TRANSPORT[transport]], workers["decode"]
    prompt = text_ids[:num_prompt_tokens]
    params = greedy(max_tokens, cache_salt=uuid.uuid4().hex)  # a chain of its own: other tests' prompts share nothing with it
    expected = expected_tokens(reference, prompt, params)
    assert len(expected) == min(max_tokens, MAX_MODEL_LEN - num_prompt_tokens)  # the longest prompt: cut by the context
    num_present = (num_prompt_tokens - 1) // BLOCK_SIZE  # on the repeat
    for attempt, present in enumerate([0, num_present]):
        sent_before, received_before = prefill.status().kv_bytes_sent, decode.status().kv_bytes_received

        result = run(prefill, decode, prompt, params)

        assert result.token_ids == expected, attempt
        assert result.finished is not None and result.finished.finish_reason == "length"
        assert result.prefill.kv_transport == transport  # what the handshake agreed on
        assert result.reservation.kv_address == decode.address
        assert len(result.reservation.block_ids) == -(-num_prompt_tokens // BLOCK_SIZE)
        assert result.prefill.kv_present_blocks == present, attempt
        num_bytes = kv_bytes_of(num_prompt_tokens, checkpoints["llama"]) - kv_bytes_of(present * BLOCK_SIZE, checkpoints["llama"])
        assert result.prefill.kv_bytes == num_bytes
        assert prefill.status().kv_bytes_sent - sent_before == num_bytes
        assert decode.status().kv_bytes_received - received_before == num_bytes
    prefill.wait_idle()
    decode.wait_idle()


def test_logprobs_cross_both_workers(workers: Workers, reference: LLM, text_ids: list[int]) -> None:
    prompt, params = text_ids[:20], greedy(8, logprobs=3)
    [want] = reference.generate({"prompt_token_ids": prompt}, params)
    result = run(workers["prefill"], workers["decode"], prompt, params)
    assert result.token_ids == want.outputs[0].token_ids
    assert [lp.token_id for lp in result.logprobs] == result.token_ids  # the first from the prefill worker
    for got, expected in zip(result.logprobs, want.outputs[0].logprobs):
        assert len(got.top_token_ids) == len(got.top_logprobs) == 3
        assert got.logprob == pytest.approx(expected[got.token_id].logprob, abs=1e-4)
        assert got.rank == 1  # greedy: the chosen token is the most likely


def test_one_token_requests_finish_at_admission(workers: Workers, reference: LLM, text_ids: list[int]) -> None:
    prompt, params = text_ids[:17], greedy(1)
    result = run(workers["prefill"], workers["decode"], prompt, params)
    assert result.token_ids == expected_tokens(reference, prompt, params)
    assert result.finished is not None and result.finished.finish_reason == "length"
    workers["decode"].wait_idle()


def test_finished_counts_the_output_tokens(workers: Workers, text_ids: list[int]) -> None:
    result = run(workers["prefill"], workers["decode"], text_ids[:10], greedy(6))
    assert len(result.token_ids) == 6
    assert result.finished.num_output_tokens == 6


# ---- b. a push for an unknown transfer ---------------------------------------------------------


def test_push_for_an_unknown_transfer_is_not_found_and_a_pending_reservation_is_untouched(
    workers: Workers, reference: LLM, text_ids: list[int], checkpoints: dict[str, Path]
) -> None:
    prefill, decode = workers["prefill"], workers["decode"]
    prompt, params = text_ids[:40], greedy(10)
    request = generate_request(prompt, params, "pending-while-pushed-at")
    stream, reservation = reserve(decode, request)
    before = decode.status()
    assert before.num_used_blocks == len(reservation.block_ids) == 3

    model = ModelConfig.from_pretrained(checkpoints["llama"])
    intruder_cache = torch.ones(model.num_layers, 2, 4, BLOCK_SIZE, model.num_kv_heads, model.head_dim)
    layout = decode.host.worker.receiver.layout  # same model: the handshake passes

    async def begin_unknown() -> KVTransferError:
        sender = KVSender(
            intruder_cache, layout, "intruder", Endpoint.here(torch.device("cpu"), "127.0.0.1"), ["grpc"], secret=CLUSTER_SECRET
        )
        try:
            peer = await sender.connect(decode.address, 10)
            with pytest.raises(KVTransferError) as caught:
                await sender.begin(peer, "no-such-transfer", 1, 10)
        finally:
            await sender.close()
        return caught.value

    error = asyncio.run(begin_unknown())
    assert error.code == "NOT_FOUND"
    assert "'no-such-transfer' is not pending: never expected" in str(error)
    # raw data and commit messages for it: the same refusal, nothing lands
    kv_stub = pb_grpc.KVTransferStub(signed_channel(decode.address, "intruder"))
    data = intruder_cache[:, :, :1].contiguous().view(torch.uint8).numpy().tobytes()
    chunk = pb.KVChunk(
        transfer_id="no-such-transfer",
        sender_id="intruder",
        layer_start=0,
        layer_end=model.num_layers,
        block_start=0,
        block_end=1,
        data=data,
    )
    assert_rpc_error(lambda: kv_stub.PushKV(iter([chunk]), timeout=10), grpc.StatusCode.NOT_FOUND, "never expected")
    commit = pb.KVCommit(transfer_id="no-such-transfer", sender_id="intruder", first_token_id=1, num_prompt_tokens=16)
    assert_rpc_error(lambda: kv_stub.Commit(commit, timeout=10), grpc.StatusCode.NOT_FOUND, "never expected")

    after = decode.status()
    assert after.kv_bytes_received == before.kv_bytes_received
    assert after.num_used_blocks == before.num_used_blocks and after.num_waiting == before.num_waiting

    response = prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S)
    result = read_rest(stream, Result(reservation, response, [response.first_token_id]))
    assert result.token_ids == expected_tokens(reference, prompt, params)
    assert result.finished.finish_reason == "length"
    decode.wait_idle()
    prefill.wait_idle()


# ---- c. layouts that do not match --------------------------------------------------------------


@pytest.mark.parametrize(
    "prefill_name, decode_name, num_prompt_tokens, field",
    [
        ("prefill-bs8", "decode", 7, "block_size"),  # one block on either side
        ("prefill-qwen2", "decode", 30, "model_id"),  # same shapes, another checkpoint
    ],
)
def test_layout_mismatch_is_failed_precondition_naming_the_field_and_lands_no_kv(
    workers: Workers,
    reference: LLM,
    text_ids: list[int],
    prefill_name: str,
    decode_name: str,
    num_prompt_tokens: int,
    field: str,
) -> None:
    bad_prefill, decode = workers[prefill_name], workers[decode_name]
    prompt = text_ids[:num_prompt_tokens]
    request = generate_request(prompt, greedy(5), uuid.uuid4().hex)
    received_before, sent_before = decode.status().kv_bytes_received, bad_prefill.status().kv_bytes_sent
    stream, reservation = reserve(decode, request)

    error = assert_rpc_error(
        lambda: bad_prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.FAILED_PRECONDITION,
        "KV layout mismatch",
        f"{field}: ours",
    )
    other_fields = {"block_size", "model_id", "dtype", "num_layers", "num_kv_heads", "head_dim"} - {field}
    assert not any(f"{name}: ours" in error.details() for name in other_fields), error.details()
    assert decode.status().kv_bytes_received == received_before
    assert bad_prefill.status().kv_bytes_sent == sent_before

    stream.cancel()  # as the gateway does when the prefill fails
    bad_prefill.wait_idle()
    decode.wait_idle()
    result = run(workers["prefill"], decode, prompt, greedy(5))
    assert result.token_ids == expected_tokens(reference, prompt, greedy(5))


def test_block_size_mismatch_with_a_multi_block_prompt_is_failed_precondition(workers: Workers, text_ids: list[int]) -> None:
    bad_prefill, decode = workers["prefill-bs8"], workers["decode"]
    request = generate_request(text_ids[:20], greedy(5), uuid.uuid4().hex)
    stream, reservation = reserve(decode, request)
    try:
        assert_rpc_error(
            lambda: bad_prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S),
            grpc.StatusCode.FAILED_PRECONDITION,
            "block_size: ours 8 != theirs 16",
        )
    finally:
        stream.cancel()
        bad_prefill.wait_idle()
        decode.wait_idle()


def test_block_size_mismatch_with_a_multi_block_prompt_lands_no_kv_and_frees_both_workers(
    workers: Workers, reference: LLM, text_ids: list[int]
) -> None:
    """A block-size mismatch on a prompt of several blocks: refused, nothing leaks, the decode worker goes on."""
    bad_prefill, decode = workers["prefill-bs8"], workers["decode"]
    prompt = text_ids[:20]
    request = generate_request(prompt, greedy(5), uuid.uuid4().hex)
    received_before = decode.status().kv_bytes_received
    stream, reservation = reserve(decode, request)
    with pytest.raises(grpc.RpcError):
        bad_prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S)
    assert decode.status().kv_bytes_received == received_before
    stream.cancel()
    bad_prefill.wait_idle()
    decode.wait_idle()
    assert run(workers["prefill"], decode, prompt, greedy(5)).token_ids == expected_tokens(reference, prompt, greedy(5))


# ---- d. the lease ------------------------------------------------------------------------------


def test_kv_that_never_arrives_ends_the_stream_at_the_lease_and_frees_blocks(workers: Workers, text_ids: list[int]) -> None:
    prefill, decode = workers["prefill"], workers["decode"]
    request = generate_request(text_ids[:40], greedy(5), uuid.uuid4().hex, lease_s=0.5)
    start = time.monotonic()
    stream, reservation = reserve(decode, request)
    assert decode.status().num_used_blocks == len(reservation.block_ids)

    assert_rpc_error(lambda: next(stream), grpc.StatusCode.ABORTED, "0.5 s lease", request.transfer_id)
    assert time.monotonic() - start >= 0.5
    decode.wait_idle(timeout_s=5)

    # a prefill that comes too late lands nothing and keeps no blocks on the prefill worker either
    received_before = decode.status().kv_bytes_received
    assert_rpc_error(
        lambda: prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.ABORTED,
        "NOT_FOUND",
        "is not pending: expired",
    )
    assert decode.status().kv_bytes_received == received_before
    prefill.wait_idle()


# ---- e. aborting and cancelling a generation ----------------------------------------------------

LONG_PROMPT_LEN = 10
LONG_MAX_TOKENS = LONG_MODEL_LEN - LONG_PROMPT_LEN - 1  # a few hundred ms of decoding: time to stop it


def start_long_generation(workers: Workers, text_ids: list[int], request_id: str) -> tuple[Iterator, Result]:
    """A request well into its decode: the first TokenDelta has been read."""
    prefill, decode = workers["prefill"], workers["decode-long"]
    request = generate_request(text_ids[:LONG_PROMPT_LEN], greedy(LONG_MAX_TOKENS), request_id)
    stream, reservation = reserve(decode, request)
    response = prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S)
    message = next(stream)
    assert message.HasField("tokens")
    return stream, Result(reservation, response, [response.first_token_id, *message.tokens.token_ids])


def test_abort_rpc_mid_generation_finishes_the_stream_with_abort_and_frees_blocks(
    workers: Workers, reference: LLM, text_ids: list[int]
) -> None:
    decode = workers["decode-long"]
    stream, result = start_long_generation(workers, text_ids, "to-abort")
    assert decode.stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=5).found
    read_rest(stream, result)
    assert result.finished is not None and result.finished.finish_reason == "abort"
    assert 2 <= len(result.token_ids) < LONG_MAX_TOKENS
    num_checked = min(len(result.token_ids), MAX_MODEL_LEN - LONG_PROMPT_LEN - 1)  # the reference's context
    assert result.token_ids[:num_checked] == expected_tokens(reference, text_ids[:LONG_PROMPT_LEN], greedy(num_checked))
    decode.wait_idle()
    assert not decode.stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=5).found


@contextlib.contextmanager
def slowed_steps(worker: Worker, seconds: float) -> Iterator[None]:
    """Every engine step of `worker` takes at least `seconds`: a generation of N more tokens cannot
    end by itself in less than N * seconds."""
    runner = worker.host.worker.core.runner
    execute, launch = runner.execute, runner.launch

    def slow_execute(*args: object, **kwargs: object) -> object:
        time.sleep(seconds)
        return execute(*args, **kwargs)

    def slow_launch(*args: object, **kwargs: object) -> object:  # a step launched ahead
        time.sleep(seconds)
        return launch(*args, **kwargs)

    runner.execute, runner.launch = slow_execute, slow_launch
    try:
        yield
    finally:
        del runner.execute, runner.launch  # the class's methods again


def test_cancelling_generate_mid_stream_frees_blocks(workers: Workers, text_ids: list[int]) -> None:
    decode = workers["decode-long"]
    stream, result = start_long_generation(workers, text_ids, "to-cancel")
    with slowed_steps(decode, 0.02):
        assert decode.status().num_running == 1
        num_left = LONG_MAX_TOKENS - len(result.token_ids)  # >= 9 s of steps if nothing stopped them
        assert num_left * 0.02 > 5
        stream.cancel()
        decode.wait_idle(timeout_s=2)  # the abort freed the blocks: the generation did not run on
    assert not decode.stub.Abort(pb.AbortRequest(request_id="to-cancel"), timeout=5).found


# ---- f. cancelling a prefill while it computes --------------------------------------------------


def test_cancelling_prefill_while_the_prompt_is_computed_frees_its_blocks(workers: Workers, text_ids: list[int]) -> None:
    prefill, decode = workers["prefill-slow"], workers["decode-long"]
    request = generate_request(text_ids[: LONG_MODEL_LEN - 8], greedy(4), uuid.uuid4().hex)  # ~500 steps
    stream, reservation = reserve(decode, request)
    sent_before, received_before = prefill.status().kv_bytes_sent, decode.status().kv_bytes_received

    call = prefill.stub.Prefill.future(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S)
    deadline = time.monotonic() + 10
    while prefill.status().num_used_blocks == 0:  # admitted: computing one token per step
        assert time.monotonic() < deadline and not call.done(), "the prefill never started computing"
        time.sleep(0.005)
    assert call.cancel()
    with pytest.raises(grpc.FutureCancelledError):
        call.result()

    prefill.wait_idle()
    assert prefill.status().kv_bytes_sent == sent_before  # cancelled before its KV went anywhere
    assert decode.status().kv_bytes_received == received_before
    stream.cancel()
    decode.wait_idle()


def test_prefill_cancelled_right_after_admission_still_frees_its_blocks(
    workers: Workers, checkpoints: dict[str, Path], text_ids: list[int]
) -> None:
    decode = workers["decode"]
    worker = PrefillWorker(EngineCore.load(engine_config(checkpoints["llama"])), "prefill-direct", secret=CLUSTER_SECRET)
    request = generate_request(text_ids[:20], greedy(4), "cancelled-at-admission")
    stream, reservation = reserve(decode, request)
    target = KVTarget(reservation.kv_address, reservation.worker_id)

    async def main() -> None:
        await worker.sender.connect(target.address, 10)  # handshaken already: the next await is the admission
        task = asyncio.create_task(worker.prefill("r", request.transfer_id, text_ids[:20], greedy(4), target))
        while "r" not in worker._requests:  # begin, then the task hands `_add` to the engine loop
            await asyncio.sleep(0)
        time.sleep(0.3)  # noqa: ASYNC251 - on purpose: block this event loop: the loop thread adds (and computes) the request meanwhile
        task.cancel()  # as a gRPC client's cancel would, before the event loop saw `_add` finish
        with pytest.raises(asyncio.CancelledError):
            await task
        await worker.sender.close()

    try:
        asyncio.run(main())
        deadline = time.monotonic() + 2
        while (
            used := worker.loop.call(lambda: worker.core.block_manager.num_used_blocks).result(5)
        ) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert used == 0, f"{used} blocks still held by a request nobody waits for"
    finally:
        worker.shutdown()
        stream.cancel()
    decode.wait_idle()


# ---- g. bad input --------------------------------------------------------------------------------

BAD_INPUTS = [  # (case, prompt, params, words in the message, the field the status names)
    ("empty prompt", lambda ids: [], greedy(4), "the prompt is empty", "prompt"),
    ("out-of-vocabulary token", lambda ids: ids[:5] + [10**6], greedy(4), "prompt token ids must be in [0,", "prompt"),
    ("negative token", lambda ids: [-1] + ids[:5], greedy(4), "prompt token ids must be in [0,", "prompt"),
    ("prompt too long", lambda ids: ids[:MAX_MODEL_LEN], greedy(4), "maximum context length is 128", "prompt"),
    ("top_p 0", lambda ids: ids[:5], pb.SamplingParams(temperature=0.0, top_p=0.0, top_k=-1, max_tokens=4), "top_p", "top_p"),
    ("top_k 0", lambda ids: ids[:5], pb.SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=4), "top_k", "top_k"),
    ("priority under fcfs", lambda ids: ids[:5], greedy(4, priority=2), "--scheduling-policy priority", "priority"),
]


@pytest.mark.parametrize("case, make_prompt, params, fragment, param", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_invalid_argument_on_both_workers(
    workers: Workers, text_ids: list[int], case: str, make_prompt: object, params: object, fragment: str, param: str
) -> None:
    """The status names the offending field in its trailing metadata (the gateway's error `param`)."""
    prefill, decode = workers["prefill"], workers["decode"]
    request = generate_request(make_prompt(text_ids), params, f"bad-{case}")
    error = assert_rpc_error(lambda: next(decode.stub.Generate(request, timeout=10)), grpc.StatusCode.INVALID_ARGUMENT, fragment)
    assert (PARAM_METADATA_KEY, param) in error.trailing_metadata()
    target = pb.Reservation(block_ids=[0], kv_address=decode.address, transports=["grpc"])
    error = assert_rpc_error(
        lambda: prefill.stub.Prefill(prefill_request(request, target), timeout=10), grpc.StatusCode.INVALID_ARGUMENT, fragment
    )
    assert (PARAM_METADATA_KEY, param) in error.trailing_metadata()
    prefill.wait_idle(timeout_s=2)
    decode.wait_idle(timeout_s=2)


def test_workers_keep_serving_after_bad_input(workers: Workers, reference: LLM, text_ids: list[int]) -> None:
    decode = workers["decode"]
    assert_rpc_error(
        lambda: next(decode.stub.Generate(generate_request([], greedy(4), "bad-again"), timeout=10)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    prompt = text_ids[:12]
    assert run(workers["prefill"], decode, prompt, greedy(6)).token_ids == expected_tokens(reference, prompt, greedy(6))


def test_duplicate_request_id_on_the_decode_worker_is_invalid_argument(workers: Workers, text_ids: list[int]) -> None:
    decode = workers["decode"]
    request = generate_request(text_ids[:10], greedy(4), "twice")
    stream, _ = reserve(decode, request)
    again = generate_request(text_ids[:10], greedy(4), "twice")
    assert_rpc_error(lambda: next(decode.stub.Generate(again, timeout=10)), grpc.StatusCode.INVALID_ARGUMENT, "already running")
    stream.cancel()
    decode.wait_idle()


def test_duplicate_transfer_id_is_refused_without_harming_the_other_request(
    workers: Workers, reference: LLM, text_ids: list[int]
) -> None:
    prefill, decode = workers["prefill"], workers["decode-dup"]  # its own worker: today this breaks it
    prompt = text_ids[:20]
    first = generate_request(prompt, greedy(4), "first", transfer_id="shared-transfer")
    stream, reservation = reserve(decode, first)
    second = decode.stub.Generate(generate_request(prompt, greedy(4), "second", transfer_id="shared-transfer"), timeout=10)
    try:
        with pytest.raises(grpc.RpcError) as caught:
            next(second)
        assert caught.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.ALREADY_EXISTS)
        response = prefill.stub.Prefill(prefill_request(first, reservation), timeout=RPC_TIMEOUT_S)
        result = read_rest(stream, Result(reservation, response, [response.first_token_id]))
        assert result.token_ids == expected_tokens(reference, prompt, greedy(4))
        decode.wait_idle(timeout_s=2)
    finally:
        stream.cancel()
        second.cancel()


def test_a_transfer_id_held_for_an_aborted_device_writer_is_refused_until_its_blocks_come_back(
    checkpoints: dict[str, Path], text_ids: list[int]
) -> None:
    """A CUDA IPC sender writes the decode worker's blocks itself, so when its request is aborted the
    blocks stay held for it until its lease (and a grace) ends. A new request naming that transfer id
    meanwhile is refused: taking it lost the held blocks for good (the worker never came back idle)."""
    worker = DecodeWorker(EngineCore.load(engine_config(checkpoints["llama"])), "decode-direct")
    prompt, lease_s = text_ids[:20], 1.0

    async def reserved(request_id: str) -> tuple[AsyncGenerator, Reserved]:
        stream = worker.generate(request_id, "held-transfer", prompt, greedy(4), lease_s, "gateway")
        first = await anext(stream)
        assert isinstance(first, Reserved)
        return stream, first

    def num_used_blocks() -> int:
        return worker.loop.call(lambda: worker.core.block_manager.num_used_blocks).result(5)

    async def main() -> None:
        stream, reservation = await reserved("a")
        worker.receiver.begin("held-transfer", "prefill-0", len(reservation.block_ids), is_device_writer=True)
        await worker.on_begin("held-transfer", "prefill-0")
        worker.receiver.to_write("held-transfer", "prefill-0")  # the writer was told its blocks
        await stream.aclose()  # the client left: aborted; its blocks are held for the writer
        assert num_used_blocks() > 0
        with pytest.raises(InvalidRequestError, match="already pending"):
            await reserved("b")
        deadline = time.monotonic() + lease_s + HOLD_GRACE_S + 10
        while num_used_blocks() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert num_used_blocks() == 0
        stream, _ = await reserved("c")  # free again: the id may be used
        await stream.aclose()
        assert num_used_blocks() == 0

    try:
        asyncio.run(main())
    finally:
        worker.shutdown()


# ---- h. a decode worker short of KV blocks --------------------------------------------------------


def test_tiny_decode_pool_makes_reservations_wait_and_preempts_yet_every_request_is_exact(
    workers: Workers, reference: LLM, text_ids: list[int]
) -> None:
    """6 blocks of 16 tokens; 5 requests of 2-block prompts growing to 5 blocks each: only 3
    reservations fit at first, and the running requests must preempt each other to grow. Each
    request comes from a gateway of its own: one caller's reservations may hold half the blocks."""
    prefill, decode = workers["prefill"], workers["decode-tiny"]
    assert decode.status().num_total_blocks == 6
    prompts = [text_ids[i * 7 : i * 7 + 20 + i] for i in range(5)]
    params = [greedy(45 + i) for i in range(5)]
    expected = [expected_tokens(reference, p, sp) for p, sp in zip(prompts, params)]
    preemptions_before = decode.status().num_preemptions
    reserved: list[int] = []
    lock, go = threading.Lock(), threading.Event()

    def one(i: int) -> list[int]:
        request = generate_request(prompts[i], params[i], f"tiny-{i}")
        stream, reservation = reserve(as_caller(decode, f"gateway-{i}"), request)
        with lock:
            reserved.append(i)
        assert go.wait(30)
        response = prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S)
        result = read_rest(stream, Result(reservation, response, [response.first_token_id]))
        assert result.finished.finish_reason == "length"
        return result.token_ids

    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(one, i) for i in range(5)]
        deadline = time.monotonic() + 10
        while len(reserved) < 3:
            assert time.monotonic() < deadline, f"only {len(reserved)} reservations arrived"
            time.sleep(0.01)
        time.sleep(0.3)  # the other two must still be waiting for blocks
        status = decode.status()
        with lock:
            assert len(reserved) == 3, f"reservations {reserved} do not fit in 6 blocks"
        assert status.num_used_blocks == 6 and status.num_waiting == 5
        go.set()
        results = [future.result(timeout=120) for future in futures]

    assert results == expected
    assert decode.status().num_preemptions > preemptions_before
    decode.wait_idle()
    prefill.wait_idle()


# ---- fp8 KV cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["grpc", "local", "nccl"])
def test_fp8_kv_greedy_tokens_equal_the_colocated_fp8_engine_and_move_a_quarter_of_fp32s_bytes(
    workers: Workers,
    reference_fp8: LLM,
    text_ids: list[int],
    checkpoints: dict[str, Path],
    transport: str,
) -> None:
    prefill, decode = workers[FP8_PREFILL_OF_TRANSPORT[transport]], workers["decode-fp8"]
    for num_prompt_tokens, max_tokens in [(5, 12), (45, 30)]:
        prompt, params = text_ids[:num_prompt_tokens], greedy(max_tokens, cache_salt=uuid.uuid4().hex)  # a chain of its own
        num_cached = []
        # The second time the prompt's full blocks are prefix-cache hits on the prefill worker, and
        # the decode worker keeps those of its first tokens (each prefill worker's own: none the first time).
        for present in (0, (num_prompt_tokens - 1) // BLOCK_SIZE):
            result = run(prefill, decode, prompt, params)
            assert result.token_ids == expected_tokens(reference_fp8, prompt, params)
            assert result.prefill.kv_transport == transport
            assert result.prefill.kv_present_blocks == present
            # one byte per element: half of bf16's, a quarter of these float32 workers'
            num_sent = num_prompt_tokens - present * BLOCK_SIZE
            assert result.prefill.kv_bytes == kv_bytes_of(num_sent, checkpoints["llama"], element_size=1)
            num_cached.append(result.prefill.num_cached_tokens)
        assert num_cached[1] == num_prompt_tokens // BLOCK_SIZE * BLOCK_SIZE - (num_prompt_tokens % BLOCK_SIZE == 0) * BLOCK_SIZE
    prefill.wait_idle()
    decode.wait_idle()


@pytest.mark.parametrize(
    "prefill_name, decode_name, ours, theirs",
    [
        ("prefill", "decode-fp8", "float32", "float8_e4m3fn"),
        ("prefill-fp8", "decode", "float8_e4m3fn", "float32"),
    ],
)
def test_a_decode_worker_of_the_other_kv_cache_dtype_is_refused_naming_both(
    workers: Workers,
    text_ids: list[int],
    prefill_name: str,
    decode_name: str,
    ours: str,
    theirs: str,
) -> None:
    prefill, decode = workers[prefill_name], workers[decode_name]
    request = generate_request(text_ids[:20], greedy(5), uuid.uuid4().hex)
    stream, reservation = reserve(decode, request)
    received_before = decode.status().kv_bytes_received
    assert_rpc_error(
        lambda: prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.FAILED_PRECONDITION,
        f"dtype: ours '{ours}' != theirs '{theirs}'",
    )
    assert decode.status().kv_bytes_received == received_before
    stream.cancel()
    prefill.wait_idle()
    decode.wait_idle()


def test_the_checkpoints_fp8_kv_scales_cross_the_hand_off(
    workers: Workers, reference_fp8: LLM, kv_scaled_checkpoint: Path, text_ids: list[int]
) -> None:
    """Both workers load per-layer K and V scales that are not 1 from the checkpoint: the decode
    worker reads the shipped blocks with them, so its greedy tokens equal the colocated fp8 engine
    of that checkpoint; and the scales matter (unit scales decode other tokens), so a worker that
    ignored or misread them would fail."""
    prefill, decode = workers["prefill-fp8-scaled"], workers["decode-fp8-scaled"]
    scaled = LLM(
        model=str(kv_scaled_checkpoint), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_dtype="fp8"
    )
    k_scales, v_scales = scaled.engine.core.runner.kv_scales
    assert k_scales == pytest.approx((0.37, 0.23)) and v_scales == pytest.approx((0.061, 0.045))
    differs_from_unit_scales = []
    for num_prompt_tokens, max_tokens in [(5, 12), (45, 30)]:
        prompt, params = text_ids[:num_prompt_tokens], greedy(max_tokens)
        expected = expected_tokens(scaled, prompt, params)
        assert run(prefill, decode, prompt, params).token_ids == expected
        differs_from_unit_scales.append(expected != expected_tokens(reference_fp8, prompt, params))
    assert any(differs_from_unit_scales)
    prefill.wait_idle()
    decode.wait_idle()


def test_an_awq_model_with_an_fp8_kv_cache_serves_disaggregated_as_colocated(
    workers: Workers, awq_checkpoint: Path, text_ids: list[int]
) -> None:
    """Both savings at once, across the hand-off: 4-bit weights on both workers and fp8 KV blocks
    on the wire; greedy tokens equal the colocated engine with the same settings."""
    prefill, decode = workers["prefill-awq-fp8"], workers["decode-awq-fp8"]
    colocated = LLM(model=str(awq_checkpoint), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN, kv_cache_dtype="fp8")
    assert type(colocated.engine.core.runner.model.model.layers[0].mlp.down_proj).__name__ == "W4Linear"
    for num_prompt_tokens, max_tokens in [(5, 12), (45, 30)]:
        prompt, params = text_ids[:num_prompt_tokens], greedy(max_tokens)
        result = run(prefill, decode, prompt, params)
        assert result.token_ids == expected_tokens(colocated, prompt, params)
        assert result.prefill.kv_bytes == kv_bytes_of(num_prompt_tokens, awq_checkpoint, element_size=1)
    prefill.wait_idle()
    decode.wait_idle()


def test_fp8_kv_survives_preemption_on_a_tiny_decode_pool(workers: Workers, reference_fp8: LLM, text_ids: list[int]) -> None:
    """3 requests growing to 5 blocks each in 6 fp8 blocks: they preempt each other (and are
    recomputed into fp8 blocks on the decode worker), yet each equals the colocated fp8 engine."""
    prefill, decode = workers["prefill-fp8"], workers["decode-fp8-tiny"]
    prompts = [text_ids[i * 7 : i * 7 + 20 + i] for i in range(3)]
    params = [greedy(50 + i) for i in range(3)]
    preemptions_before = decode.status().num_preemptions
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda i: run(prefill, decode, prompts[i], params[i]).token_ids, range(3)))
    assert results == [expected_tokens(reference_fp8, p, sp) for p, sp in zip(prompts, params)]
    assert decode.status().num_preemptions > preemptions_before
    decode.wait_idle()
    prefill.wait_idle()


# ---- stopping a worker ---------------------------------------------------------------------------


def test_a_stopped_local_decode_worker_takes_no_kv_and_its_address_can_be_reused(
    workers: Workers, reference: LLM, text_ids: list[int], checkpoints: dict[str, Path]
) -> None:
    prefill, port = workers["prefill-local"], free_port()
    spec = WorkerSpec(
        "decode",
        engine_config(checkpoints["llama"]),
        model_name="m",
        port=port,
        kv_transport="local",
        cluster_secret=CLUSTER_SECRET,
    )
    host = WorkerHost(spec)
    record = host.start()
    channel = signed_channel(record.address)
    request = generate_request(text_ids[:20], greedy(4), "to-a-stopped-worker")
    stream, reservation = reserve(
        Worker("decode-stopped", host, record.address, channel, pb_grpc.DecodeWorkerStub(channel)), request
    )
    host.stop()
    channel.close()
    # the prefill worker in this process must not hand KV to a worker that is gone
    assert_rpc_error(
        lambda: prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S),
        grpc.StatusCode.UNAVAILABLE,
        "KV transfer to",
    )
    prefill.wait_idle()

    again = WorkerHost(spec)  # same address, same process
    record = again.start()
    channel = signed_channel(record.address)
    try:
        worker = Worker("decode-again", again, record.address, channel, pb_grpc.DecodeWorkerStub(channel))
        prompt = text_ids[:20]
        result = run(prefill, worker, prompt, greedy(4))
        assert result.token_ids == expected_tokens(reference, prompt, greedy(4)) and result.prefill.kv_transport == "local"
        worker.wait_idle()
    finally:
        channel.close()
        again.stop()


def test_a_prefill_worker_with_no_transport_in_common_is_refused_by_name(workers: Workers, text_ids: list[int]) -> None:
    prefill, decode = workers["prefill-nccl"], workers["decode-grpc-only"]
    request = generate_request(text_ids[:20], greedy(4), "no-common-transport")
    stream, reservation = reserve(decode, request)
    try:
        assert_rpc_error(
            lambda: prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S),
            grpc.StatusCode.FAILED_PRECONDITION,
            "no common KV transport",
            "['nccl']",
            "['grpc']",
        )
    finally:
        stream.cancel()
    prefill.wait_idle()
    decode.wait_idle()
