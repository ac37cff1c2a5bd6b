"""KV transfer end to end: a prefill-side cache pushed into a decode-side reservation over real
gRPC servers on 127.0.0.1 and over the in-process transport; errors with the right status."""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from engine.outputs import TokenLogprobs
from kvtransfer import (
    KVChunkData, KVCommitInfo, KVLayout, KVLayoutMismatchError, KVReceiver, KVSender, KVTransferError,
    UnknownTransferError, make_transport,
)
from kvtransfer.grpc_transport import add_kv_transfer_service, encode_chunk
from proto import GRPC_OPTIONS
from kvtransfer.local_transport import register_receiver, unregister_receiver
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc

MODEL_ID = "tiny-model@abc123"
NUM_LAYERS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 4, 4, 2, 8
COMMIT = KVCommitInfo(
    first_token_id=42,
    first_logprobs=TokenLogprobs(42, -0.25, 1, ((42, -0.25), (7, -1.5))),  # exact in float32
    num_prompt_tokens=18,
)
TRANSPORT_NAMES = ["grpc", "local"]
_local_addresses = itertools.count()


def make_cache(
    num_blocks: int, dtype: torch.dtype = torch.float32, is_random: bool = True, **shape: int
) -> torch.Tensor:
    dims = dict(num_layers=NUM_LAYERS, block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM) | shape
    size = (dims["num_layers"], 2, num_blocks, dims["block_size"], dims["num_kv_heads"], dims["head_dim"])
    return torch.randn(size).to(dtype) if is_random else torch.zeros(size, dtype=dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def random_blocks(num_blocks: int, num_chosen: int, generator: torch.Generator) -> list[int]:
    return torch.randperm(num_blocks, generator=generator)[:num_chosen].tolist()


@contextlib.asynccontextmanager
async def serving(transport_name: str, receiver: KVReceiver) -> AsyncIterator[str]:
    """`receiver` reachable through `transport_name`; yields its address."""
    if transport_name == "local":
        address = f"local-{next(_local_addresses)}"
        register_receiver(address, receiver)
        try:
            yield address
        finally:
            unregister_receiver(address)
        return
    server = grpc.aio.server(options=GRPC_OPTIONS)
    add_kv_transfer_service(server, receiver)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


class Commits(list):
    """An on_commit callback that records what it was given."""

    def __call__(self, info: KVCommitInfo) -> None:
        self.append(info)


def later(seconds: float = 60.0) -> float:
    return time.monotonic() + seconds


# ---- data arrives bit for bit ---------------------------------------------------------------------

@pytest.mark.parametrize("transport_name", TRANSPORT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "max_chunk_bytes, layers_per_chunk",
    [(4 * 2**20, None), (1, None), (3 * 2 * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 4, 1), (4 * 2**20, 3)],
    ids=["one-chunk", "block-per-chunk", "layer-groups-of-1-split", "layer-groups-of-3"],
)
def test_send_copies_blocks_bit_for_bit(
    transport_name: str, dtype: torch.dtype, max_chunk_bytes: int, layers_per_chunk: int | None
) -> None:
    generator = torch.Generator().manual_seed(0)
    src_cache, dst_cache = make_cache(16, dtype), make_cache(12, dtype, is_random=False)
    src_blocks, dst_blocks = random_blocks(16, 5, generator), random_blocks(12, 5, generator)
    receiver = KVReceiver(dst_cache, MODEL_ID, "decode-0")
    sender = KVSender(src_cache, KVLayout.of(src_cache, MODEL_ID), "prefill-0", max_chunk_bytes, layers_per_chunk)
    commits = Commits()
    receiver.expect("t1", dst_blocks, later(), commits)

    async def main() -> None:
        async with serving(transport_name, receiver) as address:
            result = await sender.send(transport_name, address, "t1", src_blocks, len(dst_blocks), COMMIT, timeout=10)
            await sender.close()
        num_bytes = src_cache[:, :, src_blocks].numel() * src_cache.element_size()
        assert result.num_bytes == receiver.bytes_received == sender.bytes_sent == num_bytes
        assert result.seconds > 0

    asyncio.run(main())
    assert torch.equal(bits(dst_cache[:, :, dst_blocks]), bits(src_cache[:, :, src_blocks]))
    others = [block for block in range(12) if block not in dst_blocks]
    assert not dst_cache[:, :, others].any()
    assert commits == [COMMIT]
    assert not receiver.is_pending("t1")


@pytest.mark.parametrize(
    "max_chunk_bytes, layers_per_chunk, expected_ranges",
    [
        (1, None, [((0, 4), (b, b + 1)) for b in range(5)]),  # at least one block per chunk
        (2 * 2 * 2 * BLOCK_SIZE * NUM_KV_HEADS * HEAD_DIM * 4, 2,  # two blocks of two layers
         [((0, 2), (0, 2)), ((0, 2), (2, 4)), ((0, 2), (4, 5)), ((2, 4), (0, 2)), ((2, 4), (2, 4)), ((2, 4), (4, 5))]),
        (4 * 2**20, 3, [((0, 3), (0, 5)), ((3, 4), (0, 5))]),
    ],
)
def test_chunks_follow_layer_groups_and_byte_limit(
    max_chunk_bytes: int, layers_per_chunk: int | None, expected_ranges: list
) -> None:
    cache = make_cache(8)
    sender = KVSender(cache, KVLayout.of(cache, MODEL_ID), "prefill-0", max_chunk_bytes, layers_per_chunk)
    chunks = list(sender.chunks([7, 1, 3, 0, 5]))
    assert [((c.layer_start, c.layer_end), (c.block_start, c.block_end)) for c in chunks] == expected_ranges
    for chunk in chunks:
        one_block = sender.layout.chunk_num_bytes(chunk.layer_end - chunk.layer_start, 1)
        assert chunk.num_bytes <= max(max_chunk_bytes, one_block)


def test_chunks_of_a_layer_group_are_read_only_when_reached() -> None:
    cache = make_cache(8)
    before = cache.clone()
    sender = KVSender(cache, KVLayout.of(cache, MODEL_ID), "prefill-0", layers_per_chunk=2)
    chunks = sender.chunks([3, 5])
    first = next(chunks)
    cache[2:] = 7.0  # "prefill" finishes layers 2-3 only after group 0 was handed out
    second = next(chunks)
    assert (first.layer_start, first.layer_end, second.layer_start, second.layer_end) == (0, 2, 2, 4)
    assert torch.equal(first.data, before[0:2, :, [3, 5]])
    assert torch.equal(second.data, torch.full_like(second.data, 7.0))


# ---- layout handshake ------------------------------------------------------------------------------

@pytest.mark.parametrize("transport_name", TRANSPORT_NAMES)
@pytest.mark.parametrize(
    "field, dst_kwargs, expected",
    [
        ("block_size", dict(block_size=8), "block_size: ours 4 != theirs 8"),
        ("dtype", dict(dtype=torch.bfloat16), "dtype: ours 'float32' != theirs 'bfloat16'"),
        ("num_kv_heads", dict(num_kv_heads=4), "num_kv_heads: ours 2 != theirs 4"),
        ("num_layers", dict(num_layers=6), "num_layers: ours 4 != theirs 6"),
        ("model_id", dict(model_id="other-model"), "model_id: ours 'tiny-model@abc123' != theirs 'other-model'"),
    ],
)
def test_handshake_mismatch_names_the_field_and_moves_no_bytes(
    transport_name: str, field: str, dst_kwargs: dict, expected: str
) -> None:
    dst_kwargs = dict(dst_kwargs)
    model_id, dtype = dst_kwargs.pop("model_id", MODEL_ID), dst_kwargs.pop("dtype", torch.float32)
    dst_cache = make_cache(6, dtype, is_random=False, **dst_kwargs)
    receiver = KVReceiver(dst_cache, model_id)
    receiver.expect("t1", [1, 2], later(), Commits())
    src_cache = make_cache(6)
    sender = KVSender(src_cache, KVLayout.of(src_cache, MODEL_ID), "prefill-0")

    async def main() -> None:
        async with serving(transport_name, receiver) as address:
            for _ in range(2):  # a failed handshake is not cached: the second send fails the same way
                with pytest.raises(KVLayoutMismatchError, match=expected) as caught:
                    await sender.send(transport_name, address, "t1", [0, 4], 2, COMMIT, timeout=10)
                assert [m.split(":")[0] for m in caught.value.mismatches] == [field]
            await sender.close()

    asyncio.run(main())
    assert receiver.bytes_received == 0 and not dst_cache.any()
    assert receiver.is_pending("t1")


def test_layout_mismatch_names_every_field() -> None:
    ours = KVLayout.of(make_cache(2), MODEL_ID)
    theirs = KVLayout.of(make_cache(2, torch.float16, block_size=16), MODEL_ID)
    error = KVLayoutMismatchError(ours.mismatches(theirs))
    assert str(error) == (
        "KV layout mismatch: dtype: ours 'float32' != theirs 'float16'; block_size: ours 4 != theirs 16"
    )
    assert ours.mismatches(ours) == []
    with pytest.raises(ValueError, match="num_layers, 2, num_blocks"):
        KVLayout.of(torch.zeros(4, 3, 2, 4, 2, 8), MODEL_ID)
    with pytest.raises(ValueError, match="dtype"):
        KVLayout.of(torch.zeros(4, 2, 2, 4, 2, 8, dtype=torch.int8), MODEL_ID)


# ---- unknown, expired, cancelled transfers --------------------------------------------------------

@pytest.mark.parametrize("transport_name", TRANSPORT_NAMES)
def test_unknown_expired_and_cancelled_transfers_are_refused_others_unaffected(transport_name: str) -> None:
    src_cache, dst_cache = make_cache(8), make_cache(8, is_random=False)
    receiver = KVReceiver(dst_cache, MODEL_ID)
    kept, old, cancelled = Commits(), Commits(), Commits()
    receiver.expect("kept", [0, 1], later(), kept)
    receiver.expect("old", [2, 3], time.monotonic() - 1.0, old)
    receiver.expect("cancelled", [4, 5], later(), cancelled)
    assert receiver.expire(time.monotonic()) == ["old"]
    assert receiver.cancel("cancelled") and not receiver.cancel("cancelled")
    sender = KVSender(src_cache, KVLayout.of(src_cache, MODEL_ID), "prefill-0", max_chunk_bytes=1)

    async def main() -> None:
        async with serving(transport_name, receiver) as address:
            for transfer_id, reason in [("nope", "never expected"), ("old", "expired"), ("cancelled", "cancelled")]:
                with pytest.raises(KVTransferError, match=f"'{transfer_id}' is not pending: {reason}") as caught:
                    await sender.send(transport_name, address, transfer_id, [6, 7], 2, COMMIT, timeout=10)
                assert caught.value.code == "NOT_FOUND"
            assert receiver.bytes_received == 0
            await sender.send(transport_name, address, "kept", [6, 7], 2, COMMIT, timeout=10)
            await sender.close()

    asyncio.run(main())
    assert kept == [COMMIT] and old == [] and cancelled == []
    assert torch.equal(dst_cache[:, :, [0, 1]], src_cache[:, :, [6, 7]])
    assert not dst_cache[:, :, 2:].any()
    assert receiver.expire(time.monotonic() + 3600) == []  # "kept" was committed, nothing left


def test_receiver_commits_exactly_once_only_after_every_layer_and_block() -> None:
    cache = make_cache(6, is_random=False)
    receiver = KVReceiver(cache, MODEL_ID)
    commits = Commits()
    receiver.expect("t1", [5, 0, 3], later(), commits)
    part = make_cache(3, num_layers=2)
    assert receiver.write("t1", 0, 2, 0, 3, part) == part.numel() * 4
    receiver.write("t1", 2, 4, 0, 2, make_cache(2, num_layers=2))
    with pytest.raises(ValueError, match=r"missing layer 2 blocks \[2, 3\); layer 3 blocks \[2, 3\)"):
        receiver.commit("t1", COMMIT)
    assert receiver.is_pending("t1") and commits == []
    receiver.write("t1", 2, 4, 2, 3, make_cache(1, num_layers=2))
    receiver.commit("t1", COMMIT)
    assert commits == [COMMIT] and not receiver.is_pending("t1")
    with pytest.raises(UnknownTransferError, match="already committed"):
        receiver.commit("t1", COMMIT)
    assert torch.equal(cache[0:2, :, [5, 0, 3]], part)
    assert commits == [COMMIT]


def test_receiver_takes_writes_from_many_threads_while_the_owner_expires() -> None:
    src = make_cache(16, num_layers=8)
    cache = make_cache(16, is_random=False, num_layers=8)
    receiver = KVReceiver(cache, MODEL_ID)
    commits = Commits()
    receiver.expect("t1", list(range(16)), later(), commits)

    def write_layer(layer: int) -> int:
        receiver.expire(time.monotonic())  # the owner's periodic sweep, racing with the writes
        return receiver.write("t1", layer, layer + 1, 0, 16, src[layer:layer + 1])

    with ThreadPoolExecutor(max_workers=8) as pool:
        num_bytes = sum(pool.map(write_layer, range(8)))
    receiver.commit("t1", COMMIT)
    assert num_bytes == receiver.bytes_received == src.numel() * 4
    assert torch.equal(cache, src) and commits == [COMMIT]


@pytest.mark.parametrize("transport_name", TRANSPORT_NAMES)
def test_push_without_every_block_fails_and_leaves_the_reservation_pending(transport_name: str) -> None:
    receiver = KVReceiver(make_cache(6, is_random=False), MODEL_ID)
    commits = Commits()
    receiver.expect("t1", [1, 2, 3], later(), commits)
    partial = [KVChunkData(0, NUM_LAYERS, 0, 2, make_cache(2))]  # block position 2 never sent

    async def main() -> None:
        transport = make_transport(transport_name)
        async with serving(transport_name, receiver) as address:
            with pytest.raises(KVTransferError, match=r"commit before all KV arrived.*blocks \[2, 3\)") as caught:
                await transport.push(address, "t1", partial, COMMIT, timeout=10)
        await transport.close()
        assert caught.value.code == "INVALID_ARGUMENT"

    asyncio.run(main())
    assert receiver.is_pending("t1") and commits == []


# ---- chunks outside the reservation ---------------------------------------------------------------

@pytest.mark.parametrize("transport_name", TRANSPORT_NAMES)
@pytest.mark.parametrize(
    "chunk, expected",
    [
        (KVChunkData(0, NUM_LAYERS, 1, 4, make_cache(3)), r"blocks \[1, 4\) outside the reservation's \[0, 3\)"),
        (KVChunkData(2, 6, 0, 1, make_cache(1)), r"layers \[2, 6\) outside \[0, 4\)"),
    ],
    ids=["blocks", "layers"],
)
def test_chunk_outside_the_reservation_is_refused_and_nothing_written(
    transport_name: str, chunk: KVChunkData, expected: str
) -> None:
    cache = make_cache(6, is_random=False)
    receiver = KVReceiver(cache, MODEL_ID)
    receiver.expect("t1", [3, 4, 5], later(), Commits())

    async def main() -> None:
        transport = make_transport(transport_name)
        async with serving(transport_name, receiver) as address:
            with pytest.raises(KVTransferError, match=expected) as caught:
                await transport.push(address, "t1", [chunk], COMMIT, timeout=10)
        await transport.close()
        assert caught.value.code == "INVALID_ARGUMENT"

    asyncio.run(main())
    assert receiver.bytes_received == 0 and not cache.any() and receiver.is_pending("t1")


def test_receiver_refuses_wrong_shape_or_dtype_and_writes_nothing() -> None:
    cache = make_cache(4, is_random=False)
    receiver = KVReceiver(cache, MODEL_ID)
    receiver.expect("t1", [0, 2], later(), Commits())
    with pytest.raises(ValueError, match="chunk shape"):
        receiver.write("t1", 0, NUM_LAYERS, 0, 2, make_cache(1))
    with pytest.raises(ValueError, match="dtype"):
        receiver.write("t1", 0, NUM_LAYERS, 0, 2, make_cache(2, torch.bfloat16))
    with pytest.raises(ValueError, match="repeated block ids"):
        receiver.expect("t2", [1, 1], later(), Commits())
    with pytest.raises(ValueError, match="already pending"):
        receiver.expect("t1", [1], later(), Commits())
    assert receiver.bytes_received == 0 and not cache.any()


# ---- the gRPC edge ---------------------------------------------------------------------------------

def test_grpc_stream_without_commit_and_bad_byte_count_are_invalid_argument() -> None:
    receiver = KVReceiver(make_cache(4, is_random=False), MODEL_ID)
    receiver.expect("t1", [0, 1], later(), Commits())
    good = encode_chunk("t1", KVChunkData(0, NUM_LAYERS, 0, 2, make_cache(2)))
    truncated = pb.KVChunk()
    truncated.CopyFrom(good)
    truncated.data = good.data[:-4]

    async def push(messages: list[pb.KVChunk], address: str) -> grpc.aio.AioRpcError:
        async with grpc.aio.insecure_channel(address, options=GRPC_OPTIONS) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pdserve_pb2_grpc.KVTransferStub(channel).PushKV(iter(messages), timeout=10)
        return caught.value

    async def main() -> None:
        async with serving("grpc", receiver) as address:
            error = await push([good], address)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "ended before the commit" in error.details()
            error = await push([truncated], address)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "expected" in error.details()

    asyncio.run(main())
    assert receiver.is_pending("t1")


def test_grpc_refusal_mid_stream_reaches_the_client_with_its_status() -> None:
    """The server refuses the first of many large chunks while the client is still writing; the
    client must see NOT_FOUND, not grpc.aio's INTERNAL from a failed write (grpc/grpc#36066)."""
    receiver = KVReceiver(make_cache(64, is_random=False, head_dim=256), MODEL_ID)
    chunks = [KVChunkData(0, NUM_LAYERS, b, b + 1, make_cache(1, head_dim=256)) for b in range(64)]  # 64 KiB each

    async def main() -> None:
        transport = make_transport("grpc")
        async with serving("grpc", receiver) as address:
            for _ in range(5):
                with pytest.raises(KVTransferError, match="never expected") as caught:
                    await transport.push(address, "nope", chunks, COMMIT, timeout=10)
                assert caught.value.code == "NOT_FOUND"
        await transport.close()

    asyncio.run(main())
    assert receiver.bytes_received == 0


@pytest.mark.parametrize("transport_name", TRANSPORT_NAMES)
def test_push_past_its_deadline_fails_with_deadline_exceeded(transport_name: str) -> None:
    receiver = KVReceiver(make_cache(4, is_random=False), MODEL_ID)
    receiver.expect("t1", [0, 1], later(), Commits())

    def slow_chunks() -> Iterator[KVChunkData]:
        yield KVChunkData(0, NUM_LAYERS, 0, 1, make_cache(1))
        time.sleep(0.3)
        yield KVChunkData(0, NUM_LAYERS, 1, 2, make_cache(1))

    async def main() -> None:
        transport = make_transport(transport_name)
        async with serving(transport_name, receiver) as address:
            with pytest.raises(KVTransferError) as caught:
                await transport.push(address, "t1", slow_chunks(), COMMIT, timeout=0.2)
        await transport.close()
        assert caught.value.code == "DEADLINE_EXCEEDED"

    asyncio.run(main())
    assert receiver.is_pending("t1")  # the owner's expire() frees it


def test_sender_refuses_bad_requests_before_any_kv_moves() -> None:
    cache = make_cache(4)
    sender = KVSender(cache, KVLayout.of(cache, MODEL_ID), "prefill-0")
    receiver = KVReceiver(make_cache(4), MODEL_ID)
    register_receiver("local:count-check", receiver)
    try:  # the layouts agree (handshake passes), the reservation is the wrong size: nothing lands
        with pytest.raises(ValueError, match="2 source blocks but the peer reserved 3"):
            asyncio.run(sender.send("local", "local:count-check", "t1", [0, 1], 3, COMMIT, timeout=1))
        assert receiver.bytes_received == 0
    finally:
        unregister_receiver("local:count-check")
    with pytest.raises(ValueError, match="source blocks"):
        asyncio.run(sender.send("grpc", "127.0.0.1:1", "t1", [0, 9], 2, COMMIT, timeout=1))
    with pytest.raises(ValueError, match="unknown KV transport 'nccl'"):
        asyncio.run(sender.send("nccl", "127.0.0.1:1", "t1", [0, 1], 2, COMMIT, timeout=1))
    with pytest.raises(ValueError, match="does not describe kv_cache"):
        KVSender(cache, KVLayout.of(make_cache(4, block_size=8), MODEL_ID), "prefill-0")


def test_grpc_unreachable_peer_is_unavailable() -> None:
    async def main() -> None:
        transport = make_transport("grpc")
        with pytest.raises(KVTransferError) as caught:
            await transport.handshake("127.0.0.1:1", KVLayout.of(make_cache(1), MODEL_ID), timeout=5)
        await transport.close()
        assert caught.value.code == "UNAVAILABLE"

    asyncio.run(main())
