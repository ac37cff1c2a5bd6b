"""The Redis registry can be written by people who must not steer traffic: entries that are forged,
unsigned or malformed are ignored and logged while real workers (heartbeating signed records into
a real redis-server) keep serving exactly; a signed record whose address now answers for someone
else gets no traffic; Redis with a password, an ACL user or TLS works."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import redis

from pdserve.deploy.worker_host import WorkerHost, WorkerSpec
from pdserve.engine import LLM
from pdserve.engine.tokenizer import Tokenizer
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.cluster_secret import ClusterSecret
from pdserve.router.disaggregated import DisaggregatedBackend
from pdserve.router.registry import InvalidRecordError, RedisRegistry, WorkerRecord, redacted_url, redis_key
from pdserve.router.workers import WorkerPool
from tests.servers import CLUSTER_SECRET, redis_server
from tests.test_workers import MAX_MODEL_LEN, engine_config, greedy

OTHER_SECRET = ClusterSecret("another-cluster-secret-" + "1" * 16)


class _ImpostorDecode(pb_grpc.DecodeWorkerServicer):
    """A decode worker's look-alike: answers status like a healthy idle worker, wants the prompts."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []

    def GetStatus(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.WorkerStatus:  # noqa: N802
        return pb.WorkerStatus(
            worker_id="decode-impostor",
            role="decode",
            model="m",
            max_model_len=MAX_MODEL_LEN,
            num_total_blocks=10**6,
            block_size=16,
        )

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:  # noqa: N802
        self.prompts.append(list(request.prompt_token_ids))
        yield pb.GenerateResponse(reservation=pb.Reservation(block_ids=[0], kv_address="127.0.0.1:1", transports=["grpc"]))


@pytest.fixture()
def impostor() -> Iterator[tuple[str, _ImpostorDecode]]:
    servicer = _ImpostorDecode()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    pb_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
    address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    try:
        yield address, servicer
    finally:
        server.stop(None)


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path]) -> LLM:
    return LLM(model=str(checkpoints["llama"]), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)


def start_hosts(model: Path, redis_url: str) -> list[WorkerHost]:
    hosts = [
        WorkerHost(WorkerSpec(role, engine_config(model), model_name="m", redis_url=redis_url, cluster_secret=CLUSTER_SECRET))
        for role in ("prefill", "decode")
    ]
    for host in hosts:
        host.start()  # its first heartbeat follows at once, signed
    return hosts


def forged_entries(impostor_address: str) -> dict[str, bytes]:
    """key -> value of every kind of entry that must be ignored."""
    impostor = WorkerRecord("decode-impostor", "decode", impostor_address)
    plain = json.dumps({"worker_id": "decode-plain", "role": "decode", "address": impostor_address})
    signed_elsewhere = json.loads(impostor.signed_json(CLUSTER_SECRET))
    signed_elsewhere["record"]["worker_id"] = "decode-renamed"  # a real signature over a changed record
    return {
        redis_key("decode-impostor"): impostor.signed_json(OTHER_SECRET).encode(),  # forged: another secret
        redis_key("decode-plain"): plain.encode(),  # unsigned, the old format
        redis_key("decode-renamed"): json.dumps(signed_elsewhere).encode(),
        redis_key("decode-moved"): impostor.signed_json(CLUSTER_SECRET).encode(),  # a real record under another key
        redis_key("garbage"): b"\xff\xfe{not json",
        redis_key("nested"): json.dumps(
            {"record": {"worker_id": {"$gt": ""}, "role": "decode", "address": "x:1"}, "signature": "00"}
        ).encode(),
        redis_key("wrong-fields"): json.dumps(
            {"record": {"worker_id": "wrong-fields", "role": "decode"}, "signature": "00"}
        ).encode(),
        redis_key("huge"): b"{" + b" " * 100_000 + b"}",
        redis_key("list"): b"[1, 2, 3]",
    }


def test_forged_unsigned_and_malformed_entries_are_ignored_and_logged_while_real_workers_serve(
    checkpoints: dict[str, Path], reference: LLM, impostor: tuple[str, _ImpostorDecode], caplog: pytest.LogCaptureFixture
) -> None:
    impostor_address, impostor_servicer = impostor
    tokenizer = reference.get_tokenizer()
    prompts = [tokenizer.encode(f"request number {i} must reach a real decode worker, and no other")[:24] for i in range(4)]
    with redis_server() as url:
        client = redis.Redis.from_url(url)
        for key, value in forged_entries(impostor_address).items():
            client.set(key, value)
        hosts = start_hosts(checkpoints["llama"], url)
        real = {host.record.worker_id for host in hosts}

        async def discover() -> tuple[set[str], set[str]]:
            pool = WorkerPool(RedisRegistry(url, CLUSTER_SECRET), CLUSTER_SECRET)
            await pool.start()
            try:
                assert await pool.wait_ready(10)
                return set(pool.workers), {w.record.worker_id for w in pool.healthy("decode") + pool.healthy("prefill")}
            finally:
                await pool.close()

        with caplog.at_level(logging.WARNING, logger="pdserve.router.registry"):
            known, healthy = asyncio.run(discover())
        assert known == healthy == real
        logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "pdserve.router.registry")
        assert "ignored 9 registry entries that are not signed worker records" in logged, logged

        try:
            routable, results = asyncio.run(serve_in_one_loop(url, tokenizer, prompts))
        finally:
            for host in hosts:
                host.stop()
    assert routable == real
    assert results == [expected(reference, p) for p in prompts]
    assert impostor_servicer.prompts == []  # not one prompt went to the forged worker


async def serve_in_one_loop(url: str, tokenizer: Tokenizer, prompts: list[list[int]]) -> tuple[set[str], list[list[int]]]:
    """A gateway's pool over the registry: the workers it would route to, and `prompts` generated
    all at once (so that the least-loaded choice spreads them over every healthy worker)."""
    pool = WorkerPool(RedisRegistry(url, CLUSTER_SECRET), CLUSTER_SECRET)
    await pool.start()
    try:
        assert await pool.wait_ready(10)
        await asyncio.sleep(1.5)  # a few more polls: every record, and every answer, is in
        routable = {w.record.worker_id for w in pool.healthy("decode") + pool.healthy("prefill")}
        backend = DisaggregatedBackend(pool, tokenizer, "m", MAX_MODEL_LEN)

        async def one(prompt: list[int]) -> list[int]:
            tokens = []
            async for delta in backend.generate(uuid.uuid4().hex, prompt, greedy(6)):
                assert delta.finish_reason != "error", delta.error
                tokens += delta.token_ids
            return tokens

        return routable, list(await asyncio.gather(*(one(prompt) for prompt in prompts)))
    finally:
        await pool.close()


def expected(reference: LLM, prompt: list[int]) -> list[int]:
    [output] = reference.generate({"prompt_token_ids": prompt}, greedy(6))
    return output.outputs[0].token_ids


def test_a_signed_record_whose_address_answers_for_someone_else_gets_no_traffic(
    checkpoints: dict[str, Path], reference: LLM, impostor: tuple[str, _ImpostorDecode]
) -> None:
    """A worker died and another process took its port (or an old record was replayed): the
    record's signature is real, but what answers there cannot sign the gateway's nonce."""
    impostor_address, impostor_servicer = impostor
    tokenizer = reference.get_tokenizer()
    prompts = [tokenizer.encode("only workers that prove the secret get prompts")[:16]] * 3
    with redis_server() as url:
        redis.Redis.from_url(url).set(
            redis_key("decode-taken-over"),
            WorkerRecord("decode-taken-over", "decode", impostor_address).signed_json(CLUSTER_SECRET),
        )
        hosts = start_hosts(checkpoints["llama"], url)
        try:
            routable, results = asyncio.run(serve_in_one_loop(url, tokenizer, prompts))
        finally:
            for host in hosts:
                host.stop()
    assert routable == {host.record.worker_id for host in hosts}
    assert results == [expected(reference, p) for p in prompts]
    assert impostor_servicer.prompts == []


def test_a_record_must_be_signed_by_this_cluster_for_its_own_key() -> None:
    record = WorkerRecord("decode-1", "decode", "10.0.0.5:50051")
    value = record.signed_json(CLUSTER_SECRET)
    assert WorkerRecord.from_signed_json(redis_key("decode-1"), value, CLUSTER_SECRET) == record
    with pytest.raises(InvalidRecordError, match="bad signature"):
        WorkerRecord.from_signed_json(redis_key("decode-1"), value, OTHER_SECRET)
    with pytest.raises(InvalidRecordError, match="does not match its key"):
        WorkerRecord.from_signed_json(redis_key("decode-2"), value, CLUSTER_SECRET)
    bad_address = WorkerRecord("decode-1", "decode", "evil.example.com:80/x").signed_json(CLUSTER_SECRET)
    with pytest.raises(InvalidRecordError, match="not host:port"):
        WorkerRecord.from_signed_json(redis_key("decode-1"), bad_address, CLUSTER_SECRET)


# ---- Redis with a password, an ACL user, TLS ---------------------------------------------------------


def discovered(url: str, timeout_s: float = 5.0) -> set[str]:
    """The worker ids listed once the first heartbeat is in (or after `timeout_s`)."""

    async def main() -> set[str]:
        registry = RedisRegistry(url, CLUSTER_SECRET)
        try:
            deadline = time.monotonic() + timeout_s
            while not (found := {r.worker_id for r in await registry.list_workers()}) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            return found
        finally:
            await registry.close()

    return asyncio.run(main())


def test_redis_with_a_password_and_an_acl_user_works_and_refuses_without_them(checkpoints: dict[str, Path]) -> None:
    password = "registry-password-" + uuid.uuid4().hex
    with redis_server(password=password) as url:
        assert f":{password}@" in url
        admin = redis.Redis.from_url(url)
        admin.execute_command("ACL", "SETUSER", "pdserve", "on", ">acl-password", "~pdserve:*", "+@all")
        acl_url = url.replace(f":{password}@", "pdserve:acl-password@")
        for worker_url in (url, acl_url):
            host = WorkerHost(
                WorkerSpec(
                    "decode",
                    engine_config(checkpoints["llama"]),
                    model_name="m",
                    redis_url=worker_url,
                    cluster_secret=CLUSTER_SECRET,
                )
            )
            host.start()
            try:
                assert discovered(worker_url) == {host.record.worker_id}
            finally:
                host.stop()
        with pytest.raises(redis.exceptions.AuthenticationError):
            discovered(url.replace(f":{password}@", ""))
        with pytest.raises(redis.exceptions.AuthenticationError):
            discovered(url.replace(password, "wrong"))
    assert redacted_url(url) == url.replace(password, "***") and password not in redacted_url(url)
    assert redacted_url(acl_url) == acl_url.replace("acl-password", "***")


def test_redis_over_tls_works(checkpoints: dict[str, Path]) -> None:
    with redis_server(password="tls-registry-password", tls=True) as url:
        assert url.startswith("rediss://")
        host = WorkerHost(
            WorkerSpec(
                "prefill", engine_config(checkpoints["llama"]), model_name="m", redis_url=url, cluster_secret=CLUSTER_SECRET
            )
        )
        host.start()
        try:
            assert discovered(url) == {host.record.worker_id}
            with pytest.raises(redis.exceptions.ConnectionError):  # plain text to a TLS port
                discovered(url.replace("rediss://", "redis://").split("?")[0])
        finally:
            host.stop()
