"""The authenticated worker plane, attacked over real gRPC: real prefill and decode workers
(`WorkerHost`) refuse every call to each of their services (PrefillWorker, DecodeWorker,
KVTransfer) that is not signed with the cluster secret, and such a call changes nothing; a
prefill worker hands KV only to a decode worker that proves it holds the secret, and repeats
nothing an impostor said; oversized messages are refused before they are parsed."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from pdserve.deploy.worker_host import WorkerHost, WorkerSpec
from pdserve.engine import LLM
from pdserve.engine.config import ModelConfig
from pdserve.proto import auth
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.cluster_secret import ClusterSecret
from tests.servers import CLUSTER_SECRET
from tests.test_workers import (
    MAX_MODEL_LEN,
    RPC_TIMEOUT_S,
    Result,
    Worker,
    assert_rpc_error,
    engine_config,
    expected_tokens,
    generate_request,
    greedy,
    prefill_request,
    read_rest,
    reserve,
    signed_channel,
)

OTHER_SECRET = ClusterSecret("another-cluster-secret-" + "1" * 16)
SERVICES = {  # every method a worker serves, by service
    "PrefillWorker": ["Prefill", "Abort", "GetStatus"],
    "DecodeWorker": ["Generate", "Abort", "GetStatus"],
    "KVTransfer": ["Handshake", "Begin", "PushKV", "Receive", "Commit", "Abandon"],
}


def start(role: str, model: Path, secret: ClusterSecret = CLUSTER_SECRET, **overrides: object) -> Worker:
    host = WorkerHost(WorkerSpec(role, engine_config(model, **overrides), model_name="m", cluster_secret=secret))
    record = host.start()
    channel = signed_channel(record.address)
    stub = pb_grpc.PrefillWorkerStub(channel) if role == "prefill" else pb_grpc.DecodeWorkerStub(channel)
    return Worker(role, host, record.address, channel, stub)


@pytest.fixture(scope="module")
def pair(checkpoints: dict[str, Path]) -> Iterator[tuple[Worker, Worker]]:
    prefill, decode = start("prefill", checkpoints["llama"]), start("decode", checkpoints["llama"])
    try:
        yield prefill, decode
    finally:
        for worker in (prefill, decode):
            worker.channel.close()
            worker.host.stop()


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path]) -> LLM:
    return LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def prompt(reference: LLM) -> list[int]:
    return reference.get_tokenizer().encode("every call to a worker must carry the cluster's signature " * 3)[:40]


# ---- credentials that must not pass ------------------------------------------------------------


def credential(kind: str, method: str) -> list[tuple[str, str]]:
    """The metadata a call to `method` carries: a valid signature, or one of the ways it is not."""
    if kind == "none":
        return []
    if kind == "valid":
        return [(auth.METADATA_KEY, auth.sign_call(CLUSTER_SECRET, method, "test-gateway"))]
    if kind == "other-cluster":
        return [(auth.METADATA_KEY, auth.sign_call(OTHER_SECRET, method, "test-gateway"))]
    if kind == "expired":
        return [(auth.METADATA_KEY, auth.sign_call(CLUSTER_SECRET, method, "test-gateway", now=time.time() - 3600))]
    if kind == "replayed-from-another-method":
        other = (
            "/pdserve.DecodeWorker/GetStatus" if method != "/pdserve.DecodeWorker/GetStatus" else "/pdserve.DecodeWorker/Abort"
        )
        return [(auth.METADATA_KEY, auth.sign_call(CLUSTER_SECRET, other, "test-gateway"))]
    if kind == "caller-renamed":  # a valid signature whose caller name was changed in transit
        signed = auth.sign_call(CLUSTER_SECRET, method, "test-gateway")
        return [(auth.METADATA_KEY, signed.replace(":test-gateway:", ":admin:"))]
    assert kind == "garbage"
    return [(auth.METADATA_KEY, "Bearer " + CLUSTER_SECRET.value)]  # even the secret itself is no credential


BAD_CREDENTIALS = ["none", "other-cluster", "expired", "replayed-from-another-method", "caller-renamed", "garbage"]


def calls(
    prefill: Worker, decode: Worker, request: pb.GenerateRequest, reservation: pb.Reservation, kind: str, model: ModelConfig
) -> dict[str, Callable[[], object]]:
    """One call to every method of every service, each carrying a credential of `kind`, each
    aimed at the pending request so that, were it run, it would change something."""
    prefill_channel, decode_channel = grpc.insecure_channel(prefill.address), grpc.insecure_channel(decode.address)
    prefill_stub, decode_stub = pb_grpc.PrefillWorkerStub(prefill_channel), pb_grpc.DecodeWorkerStub(decode_channel)
    kv_stub = pb_grpc.KVTransferStub(decode_channel)
    transfer_id, sender = request.transfer_id, "attacker"
    chunk = pb.KVChunk(
        transfer_id=transfer_id,
        sender_id=sender,
        layer_start=0,
        layer_end=model.num_layers,
        block_start=0,
        block_end=1,
        data=bytes(model.kv_bytes_per_token * 4 * 16),
    )

    def md(service: str, method: str) -> list[tuple[str, str]]:
        return credential(kind, f"/pdserve.{service}/{method}")

    return {
        "PrefillWorker.Prefill": lambda: prefill_stub.Prefill(
            prefill_request(request, reservation), timeout=10, metadata=md("PrefillWorker", "Prefill")
        ),
        "PrefillWorker.Abort": lambda: prefill_stub.Abort(
            pb.AbortRequest(request_id=request.request_id), timeout=10, metadata=md("PrefillWorker", "Abort")
        ),
        "PrefillWorker.GetStatus": lambda: prefill_stub.GetStatus(
            pb.StatusRequest(), timeout=10, metadata=md("PrefillWorker", "GetStatus")
        ),
        "DecodeWorker.Generate": lambda: next(
            decode_stub.Generate(
                generate_request(list(request.prompt_token_ids), greedy(4), "intruder-request"),
                timeout=10,
                metadata=md("DecodeWorker", "Generate"),
            )
        ),
        "DecodeWorker.Abort": lambda: decode_stub.Abort(
            pb.AbortRequest(request_id=request.request_id), timeout=10, metadata=md("DecodeWorker", "Abort")
        ),
        "DecodeWorker.GetStatus": lambda: decode_stub.GetStatus(
            pb.StatusRequest(), timeout=10, metadata=md("DecodeWorker", "GetStatus")
        ),
        "KVTransfer.Handshake": lambda: kv_stub.Handshake(
            pb.HandshakeRequest(sender_id=sender, transports=["grpc"]), timeout=10, metadata=md("KVTransfer", "Handshake")
        ),
        "KVTransfer.Begin": lambda: kv_stub.Begin(
            pb.BeginRequest(transfer_id=transfer_id, sender_id=sender, num_blocks=len(reservation.block_ids)),
            timeout=10,
            metadata=md("KVTransfer", "Begin"),
        ),
        "KVTransfer.PushKV": lambda: kv_stub.PushKV(iter([chunk]), timeout=10, metadata=md("KVTransfer", "PushKV")),
        "KVTransfer.Receive": lambda: kv_stub.Receive(
            pb.ReceiveRequest(transfer_id=transfer_id, sender_id=sender, layer_bounds=[0, model.num_layers]),
            timeout=10,
            metadata=md("KVTransfer", "Receive"),
        ),
        "KVTransfer.Commit": lambda: kv_stub.Commit(
            pb.KVCommit(
                transfer_id=transfer_id, sender_id=sender, first_token_id=1, num_prompt_tokens=len(request.prompt_token_ids)
            ),
            timeout=10,
            metadata=md("KVTransfer", "Commit"),
        ),
        "KVTransfer.Abandon": lambda: kv_stub.Abandon(
            pb.AbandonRequest(transfer_id=transfer_id, sender_id=sender, reason="forged"),
            timeout=10,
            metadata=md("KVTransfer", "Abandon"),
        ),
    }


def observable(prefill: Worker, decode: Worker) -> tuple:
    """What a call could have changed on either worker, as their status says it."""
    p, d = prefill.status(), decode.status()
    return (
        p.num_running,
        p.num_waiting,
        p.num_used_blocks,
        p.kv_bytes_sent,
        d.num_running,
        d.num_waiting,
        d.num_used_blocks,
        d.kv_bytes_received,
    )


def test_every_method_of_every_service_is_covered(pair: tuple[Worker, Worker], checkpoints: dict[str, Path]) -> None:
    """The attack below reaches every method the proto defines, so a new method cannot slip by."""
    defined = {
        f"{service.name}.{method.name}" for service in pb.DESCRIPTOR.services_by_name.values() for method in service.methods
    }
    request = generate_request([1, 2, 3], greedy(1), "coverage")
    covered = calls(*pair, request, pb.Reservation(block_ids=[0]), "none", ModelConfig.from_pretrained(checkpoints["llama"]))
    assert set(covered) == defined == {f"{s}.{m}" for s, methods in SERVICES.items() for m in methods}


@pytest.mark.parametrize("kind", BAD_CREDENTIALS)
def test_calls_without_a_valid_signature_are_unauthenticated_and_change_nothing(
    pair: tuple[Worker, Worker], reference: LLM, prompt: list[int], checkpoints: dict[str, Path], kind: str
) -> None:
    prefill, decode = pair
    request = generate_request(prompt, greedy(6), f"pending-{kind}")
    stream, reservation = reserve(decode, request)  # a real request, waiting for its KV: the target
    before = observable(prefill, decode)

    for name, call in calls(
        prefill, decode, request, reservation, kind, ModelConfig.from_pretrained(checkpoints["llama"])
    ).items():
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, f"{name}: {caught.value.code()} {caught.value.details()}"

    assert observable(prefill, decode) == before
    # The pending request was not aborted, begun, written, committed or abandoned: it is served exactly.
    response = prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S)
    result = read_rest(stream, Result(reservation, response, [response.first_token_id]))
    assert result.token_ids == expected_tokens(reference, prompt, greedy(6))
    prefill.wait_idle()
    decode.wait_idle()


def test_the_same_calls_with_a_valid_signature_are_served(pair: tuple[Worker, Worker]) -> None:
    """The control for the test above: a plain channel plus a valid signature gets through."""
    prefill, decode = pair
    for worker, stub_cls, service in (
        (prefill, pb_grpc.PrefillWorkerStub, "PrefillWorker"),
        (decode, pb_grpc.DecodeWorkerStub, "DecodeWorker"),
    ):
        with grpc.insecure_channel(worker.address) as channel:
            status = stub_cls(channel).GetStatus(
                pb.StatusRequest(), timeout=10, metadata=credential("valid", f"/pdserve.{service}/GetStatus")
            )
        assert status.role == worker.name


def test_a_signature_is_checked_in_constant_time_against_the_right_method() -> None:
    method = "/pdserve.DecodeWorker/Generate"
    signed = auth.sign_call(CLUSTER_SECRET, method, "gw-1")
    assert auth.check_call(CLUSTER_SECRET, method, signed) is None
    assert "another method" in auth.check_call(CLUSTER_SECRET, "/pdserve.DecodeWorker/Abort", signed)
    assert "out of sync" in auth.check_call(CLUSTER_SECRET, method, signed, now=time.time() + 2 * auth.MAX_CLOCK_SKEW_S)
    assert "malformed" in auth.check_call(CLUSTER_SECRET, method, "v1:x:gw-1:00")
    assert CLUSTER_SECRET.value not in repr(CLUSTER_SECRET) and "hidden" in repr(CLUSTER_SECRET)


# ---- a prefill worker dials only a decode worker that proves the secret --------------------------


class _Impostor(pb_grpc.KVTransferServicer):
    """A KVTransfer service that does not hold the cluster secret; it records what reaches it."""

    def __init__(self, refuse_with: str | None) -> None:
        self.refuse_with = refuse_with
        self.calls: list[str] = []

    def Handshake(self, request: pb.HandshakeRequest, context: grpc.ServicerContext) -> pb.HandshakeResponse:  # noqa: N802
        self.calls.append("Handshake")
        if self.refuse_with is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, self.refuse_with)
        return pb.HandshakeResponse(receiver_id="decode-impostor", layout=request.layout, transport="grpc", proof="00" * 32)

    def Begin(self, request: pb.BeginRequest, context: grpc.ServicerContext) -> pb.BeginResponse:  # noqa: N802
        self.calls.append("Begin")
        return pb.BeginResponse(lease_remaining_s=60, block_ids=list(range(request.num_blocks)))

    def PushKV(self, request_iterator: Iterator[pb.KVChunk], context: grpc.ServicerContext) -> pb.KVAck:  # noqa: N802
        self.calls.append("PushKV")
        return pb.KVAck(bytes_received=sum(len(chunk.data) for chunk in request_iterator))

    def Commit(self, request: pb.KVCommit, context: grpc.ServicerContext) -> pb.KVAck:  # noqa: N802
        self.calls.append("Commit")
        return pb.KVAck()


@pytest.mark.parametrize("impostor", ["answers-with-a-bad-proof", "refuses-with-its-own-text", "another-cluster"])
def test_a_prefill_worker_hands_no_kv_to_a_decode_worker_that_cannot_prove_the_secret(
    pair: tuple[Worker, Worker], checkpoints: dict[str, Path], prompt: list[int], impostor: str
) -> None:
    prefill, _ = pair
    other = None
    if impostor == "another-cluster":  # a real decode worker of another cluster: it refuses our calls
        other = start("decode", checkpoints["llama"], secret=OTHER_SECRET)
        address, servicer, server = other.address, None, None
    else:
        servicer = _Impostor("PROBE-TEXT: nginx/1.25 at 10.0.0.7" if impostor == "refuses-with-its-own-text" else None)
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_KVTransferServicer_to_server(servicer, server)
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        server.start()
    sent_before = prefill.status().kv_bytes_sent
    target = pb.Reservation(block_ids=[0, 1, 2], kv_address=address, transports=["grpc"], worker_id="decode-impostor")
    try:
        error = assert_rpc_error(
            lambda: prefill.stub.Prefill(
                prefill_request(generate_request(prompt, greedy(4), uuid.uuid4().hex), target), timeout=RPC_TIMEOUT_S
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            f"decode worker at {address} did not prove it holds the cluster secret",
        )
    finally:
        if server is not None:
            server.stop(None)
        if other is not None:
            other.channel.close()
            other.host.stop()
    assert "PROBE-TEXT" not in error.details()  # what answered is not reported
    if servicer is not None:
        assert servicer.calls == ["Handshake"]  # no reservation taken, no KV pushed, no commit
    assert prefill.status().kv_bytes_sent == sent_before
    prefill.wait_idle()


# ---- message sizes -------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def padded(message: object, num_bytes: int) -> bytes:
    """`message` serialized plus an unknown field of `num_bytes`: parsed, it is `message` itself."""
    return message.SerializeToString() + _varint(99 << 3 | 2) + _varint(num_bytes) + bytes(num_bytes)


def test_an_oversized_message_is_refused_unparsed_and_changes_nothing(
    pair: tuple[Worker, Worker], reference: LLM, prompt: list[int], checkpoints: dict[str, Path]
) -> None:
    """A signed Abort of the pending request by its own caller would end it; padded to 1 MB it is
    over the control-message limit and refused before it is read. A prompt over the context's
    bound and a KV chunk over the layout's are refused alike."""
    prefill, decode = pair
    request = generate_request(prompt, greedy(5), "pending-while-flooded-with-bytes")
    stream, reservation = reserve(decode, request)
    before = observable(prefill, decode)
    raw_abort = decode.channel.unary_unary("/pdserve.DecodeWorker/Abort", response_deserializer=pb.AbortResponse.FromString)
    abort = pb.AbortRequest(request_id=request.request_id)
    assert len(padded(abort, 2**20)) > 2**20 and pb.AbortRequest.FromString(padded(abort, 2**20)).request_id == request.request_id
    assert_rpc_error(
        lambda: raw_abort(padded(abort, 2**20), timeout=10),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "over this method's 65536-byte limit",
    )
    huge_prompt = generate_request(prompt * 2000, greedy(5), "a-huge-prompt")  # ~200 KB: over the bound of a 128-token context
    assert_rpc_error(lambda: next(decode.stub.Generate(huge_prompt, timeout=10)), grpc.StatusCode.RESOURCE_EXHAUSTED, "limit")
    model = ModelConfig.from_pretrained(checkpoints["llama"])
    kv_stub = pb_grpc.KVTransferStub(signed_channel(decode.address, "prefill-0"))
    huge_chunk = pb.KVChunk(
        transfer_id=request.transfer_id, sender_id="p", layer_end=model.num_layers, block_end=1, data=bytes(8 * 2**20)
    )
    assert_rpc_error(lambda: kv_stub.PushKV(iter([huge_chunk]), timeout=10), grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert observable(prefill, decode) == before

    response = prefill.stub.Prefill(prefill_request(request, reservation), timeout=RPC_TIMEOUT_S)
    result = read_rest(stream, Result(reservation, response, [response.first_token_id]))
    assert result.token_ids == expected_tokens(reference, prompt, greedy(5))
    decode.wait_idle()
    prefill.wait_idle()
