"""KV hand-off end to end on the CPU: a prefill-side cache handed into a decode-side reservation
through the real control service (gRPC on 127.0.0.1) over each CPU transport (`grpc`, `nccl` as
gloo, `local`); the transport choice; errors with the right status; the receiver's bookkeeping."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from pdserve.engine.outputs import TokenLogprobs
from pdserve.kvtransfer import (
    AUTO,
    Endpoint,
    KVCommitInfo,
    KVLayout,
    KVLayoutMismatchError,
    KVPeer,
    KVReceiver,
    KVSender,
    KVTransferError,
    LayerProgress,
    NoCommonTransportError,
    OutgoingTransfer,
    UnknownTransferError,
    accepts,
    choose,
    offers,
)
from pdserve.kvtransfer.control import KVTransferServicer, OnBegin, add_kv_transfer_service
from pdserve.kvtransfer.grpc_transport import decode_chunk
from pdserve.proto import GRPC_OPTIONS, auth, pdserve_pb2_grpc
from pdserve.proto import pdserve_pb2 as pb
from tests.servers import CLUSTER_SECRET

MODEL_ID = "tiny-model@abc123"
NUM_LAYERS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 4, 4, 2, 8
COMMIT = KVCommitInfo(
    first_token_id=42,
    first_logprobs=TokenLogprobs(42, -0.25, 1, ((42, -0.25), (7, -1.5))),  # exact in float32
    num_prompt_tokens=14,
)
CPU_TRANSPORTS = ["grpc", "nccl", "local"]
CPU = torch.device("cpu")
FP8_SCALES = ((1.0, 0.5, 2.0, 1.0), (1.0, 1.0, 0.25, 1.0))  # per layer, K then V


def make_cache(num_blocks: int, dtype: torch.dtype = torch.float32, is_random: bool = True, **shape: int) -> torch.Tensor:
    dims = dict(num_layers=NUM_LAYERS, block_size=BLOCK_SIZE, num_kv_heads=NUM_KV_HEADS, head_dim=HEAD_DIM) | shape
    size = (dims["num_layers"], 2, num_blocks, dims["block_size"], dims["num_kv_heads"], dims["head_dim"])
    return torch.randn(size).to(dtype) if is_random else torch.zeros(size, dtype=dtype)


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def later(seconds: float = 60.0) -> float:
    return time.monotonic() + seconds


class Commits(list):
    """An on_commit callback that records what it was given."""

    def __call__(self, info: KVCommitInfo, ready: object) -> None:
        assert ready is None  # on the CPU every write is done when it returns
        self.append(info)


@contextlib.asynccontextmanager
async def serving(
    receiver: KVReceiver, accepted: list[str], on_begin: OnBegin | None = None, servicers: list | None = None
) -> AsyncIterator[str]:
    """`receiver`'s KVTransfer service on a real gRPC server (signed calls only, as on a worker); yields its address.
    The servicer is appended to `servicers`, when given."""
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=[auth.ServerAuth(CLUSTER_SECRET)])
    servicer = KVTransferServicer(receiver, Endpoint.here(CPU, "127.0.0.1"), accepted, CLUSTER_SECRET, on_begin)
    if servicers is not None:
        servicers.append(servicer)
    add_kv_transfer_service(server, servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)
        servicer.close()


async def until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout_s} s"
        await asyncio.sleep(0.02)


def make_sender(
    cache: torch.Tensor,
    offered: list[str],
    layers_per_group: int = 2,
    model_id: str = MODEL_ID,
    kv_scales: tuple = ((), ()),
) -> KVSender:
    layout = KVLayout.of(cache, model_id, kv_scales)
    return KVSender(cache, layout, "prefill-0", Endpoint.here(CPU, "127.0.0.1"), offered, layers_per_group, secret=CLUSTER_SECRET)


async def hand_off(
    sender: KVSender, address: str, transfer_id: str, src_blocks: list[int], progress: LayerProgress | None = None
) -> int:
    """What a prefill worker does for one prompt: connect, begin, push, commit."""
    peer = await sender.connect(address, 10)
    reservation = await sender.begin(peer, transfer_id, len(src_blocks), 10)
    if progress is None:
        progress = LayerProgress(sender.bounds)
        progress.mark_all()
    src_to_send = src_blocks[reservation.num_present_blocks :]  # the receiver holds the first ones
    transfer = OutgoingTransfer(transfer_id, src_to_send, reservation.block_ids, progress, reservation.deadline)
    num_bytes = await sender.push(peer, transfer)
    assert await sender.commit(peer, transfer_id, COMMIT, 10) == num_bytes
    return num_bytes


# ---- data arrives bit for bit ---------------------------------------------------------------------


@pytest.mark.parametrize("transport_name", CPU_TRANSPORTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("layers_per_group", [1, 3, 4])
def test_hand_off_copies_blocks_bit_for_bit(transport_name: str, dtype: torch.dtype, layers_per_group: int) -> None:
    generator = torch.Generator().manual_seed(0)
    src_cache, dst_cache = make_cache(16, dtype), make_cache(12, dtype, is_random=False)
    src_blocks = torch.randperm(16, generator=generator)[:5].tolist()
    dst_blocks = torch.randperm(12, generator=generator)[:5].tolist()
    kv_scales = FP8_SCALES if dtype == torch.float8_e4m3fn else ((), ())
    receiver = KVReceiver(dst_cache, MODEL_ID, "decode-0", kv_scales)
    sender = make_sender(src_cache, [transport_name], layers_per_group, kv_scales=kv_scales)
    commits = Commits()
    receiver.expect("t1", dst_blocks, later(), commits)

    async def main() -> int:
        async with serving(receiver, [transport_name]) as address:
            num_bytes = await hand_off(sender, address, "t1", src_blocks)
            await sender.close()
        return num_bytes

    num_bytes = asyncio.run(main())
    assert (
        num_bytes
        == receiver.bytes_received
        == sender.bytes_sent
        == src_cache[:, :, src_blocks].numel() * src_cache.element_size()
    )
    assert torch.equal(bits(dst_cache[:, :, dst_blocks]), bits(src_cache[:, :, src_blocks]))
    assert not bits(dst_cache[:, :, [b for b in range(12) if b not in dst_blocks]]).any()
    assert commits == [COMMIT] and not receiver.is_pending("t1")


@pytest.mark.parametrize("transport_name", CPU_TRANSPORTS)
def test_a_receiver_that_holds_the_prompts_first_blocks_is_sent_only_the_rest(transport_name: str) -> None:
    """At Begin the receiver's owner keeps two blocks it already holds (from this sender, earlier):
    the sender learns the other blocks and that two come before them; it sends those only, into
    the blocks after the kept ones; the replaced blocks and the kept ones are not written."""
    src_cache, dst_cache = make_cache(16), make_cache(12, is_random=False)
    dst_cache[:, :, [7, 8]] = src_cache[:, :, [4, 9]]  # what an earlier transfer left there
    held = dst_cache[:, :, [7, 8]].clone()
    receiver = KVReceiver(dst_cache, MODEL_ID, "decode-0")
    sender = make_sender(src_cache, [transport_name])
    commits = Commits()
    receiver.expect("t1", [1, 2, 3, 5], later(), commits)
    begun = []

    async def on_begin(transfer_id: str, sender_id: str, may_keep: bool) -> None:
        begun.append((transfer_id, sender_id, may_keep))
        receiver.keep_present(transfer_id, sender_id, [7, 8])

    async def main() -> int:
        async with serving(receiver, [transport_name], on_begin) as address:
            num_bytes = await hand_off(sender, address, "t1", [4, 9, 0, 11])
            await sender.close()
        return num_bytes

    num_bytes = asyncio.run(main())
    assert begun == [("t1", "prefill-0", True)] and commits == [COMMIT]
    assert num_bytes == receiver.bytes_received == src_cache[:, :, [0, 11]].numel() * src_cache.element_size()
    assert torch.equal(dst_cache[:, :, [3, 5]], src_cache[:, :, [0, 11]])
    assert torch.equal(dst_cache[:, :, [7, 8]], held) and not dst_cache[:, :, [1, 2]].any()


def test_present_blocks_are_kept_only_before_anything_is_written_and_held_with_the_rest() -> None:
    receiver = KVReceiver(make_cache(12, is_random=False), MODEL_ID)
    receiver.expect("t1", [0, 1, 2], later(), Commits())
    with pytest.raises(UnknownTransferError):
        receiver.keep_present("t2", "p", [9])
    receiver.begin("t1", "p", 3, is_device_writer=False)
    with pytest.raises(ValueError, match="was not begun by"):
        receiver.keep_present("t1", "someone-else", [9])
    with pytest.raises(ValueError, match="cannot keep 3 present blocks"):
        receiver.keep_present("t1", "p", [9, 10, 11])  # one block at least is sent
    receiver.write("t1", "p", 0, NUM_LAYERS, 0, 1, make_cache(1))
    with pytest.raises(ValueError, match="written already"):
        receiver.keep_present("t1", "p", [9])
    assert receiver.to_write("t1", "p")[1:] == ([0, 1, 2], 0) and receiver.cancel("t1")
    receiver.expect("t2", [3, 4, 5], later(), Commits())
    receiver.begin("t2", "p", 3, is_device_writer=True)
    receiver.keep_present("t2", "p", [9, 10])
    assert receiver.to_write("t2", "p")[1:] == ([5], 2)
    receiver.begin("t2", "p", 3, is_device_writer=True)  # the prompt's count, as before
    with pytest.raises(ValueError, match="cannot keep"):
        receiver.keep_present("t2", "p", [9])  # once
    assert not receiver.cancel("t2")  # a device writer may still write its block: held with the kept ones
    assert receiver.poll(time.monotonic() + 120.0) == ([], [[9, 10, 5]])  # past its lease and grace
    receiver.expect("t3", [6, 7, 8], later(), Commits())
    receiver.begin("t3", "p", 3, is_device_writer=True)
    assert receiver.to_write("t3", "p")[1:] == ([6, 7, 8], 0)  # a second Begin of its sender was answered...
    with pytest.raises(ValueError, match="knows its blocks already"):
        receiver.keep_present("t3", "p", [9])  # ...so the first one's keep comes too late
    assert receiver.cancel("t3") is False and receiver.poll(time.monotonic() + 120.0)[1] == [[6, 7, 8]]


@pytest.mark.parametrize("transport_name", CPU_TRANSPORTS)
def test_a_layer_group_is_read_only_once_it_is_computed(transport_name: str) -> None:
    """The push starts before the prompt's forward pass ends: each group's KV is taken only once
    the pass marks it done, so later layers computed meanwhile arrive as computed."""
    src_cache, dst_cache = make_cache(8), make_cache(8, is_random=False)
    receiver = KVReceiver(dst_cache, MODEL_ID, "decode-0")
    sender = make_sender(src_cache, [transport_name], layers_per_group=2)
    receiver.expect("t1", [6, 1], later(), Commits())

    async def main() -> None:
        async with serving(receiver, [transport_name]) as address:
            progress = LayerProgress(sender.bounds)
            handing_off = asyncio.create_task(hand_off(sender, address, "t1", [3, 5], progress))
            src_cache[:2, :, [3, 5]] = 1.0  # "layers 0-1 computed"
            progress.on_layer(1, None)
            await asyncio.sleep(0.2)
            assert not handing_off.done()  # waits for the second group
            src_cache[2:, :, [3, 5]] = 2.0  # "layers 2-3 computed"
            progress.on_layer(3, None)
            await handing_off
            await sender.close()

    asyncio.run(main())
    assert (dst_cache[:2, :, [6, 1]] == 1.0).all() and (dst_cache[2:, :, [6, 1]] == 2.0).all()


@pytest.mark.parametrize("transport_name", CPU_TRANSPORTS)
def test_a_failed_forward_pass_fails_the_push_and_commits_nothing(transport_name: str) -> None:
    receiver = KVReceiver(make_cache(8, is_random=False), MODEL_ID, "decode-0")
    sender = make_sender(make_cache(8), [transport_name])
    commits = Commits()
    receiver.expect("t1", [0, 1], later(), commits)

    async def main() -> None:
        async with serving(receiver, [transport_name]) as address:
            progress = LayerProgress(sender.bounds)
            progress.on_layer(1, None)
            progress.fail(RuntimeError("out of memory in layer 2"))
            with pytest.raises(RuntimeError, match="out of memory in layer 2"):
                await hand_off(sender, address, "t1", [2, 3], progress)
            await sender.close()

    asyncio.run(main())
    assert commits == [] and receiver.is_pending("t1")


# ---- handshake: layout and transport --------------------------------------------------------------


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
def test_handshake_mismatch_names_the_field_and_moves_no_bytes(field: str, dst_kwargs: dict, expected: str) -> None:
    dst_kwargs = dict(dst_kwargs)
    model_id, dtype = dst_kwargs.pop("model_id", MODEL_ID), dst_kwargs.pop("dtype", torch.float32)
    dst_cache = make_cache(6, dtype, is_random=False, **dst_kwargs)
    receiver = KVReceiver(dst_cache, model_id)
    receiver.expect("t1", [1, 2], later(), Commits())
    sender = make_sender(make_cache(6), ["grpc"])

    async def main() -> None:
        async with serving(receiver, ["grpc"]) as address:
            for _ in range(2):  # a failed handshake is not cached: the second try fails the same way
                with pytest.raises(KVLayoutMismatchError, match=expected) as caught:
                    await hand_off(sender, address, "t1", [0, 4])
                assert [m.split(":")[0] for m in caught.value.mismatches] == [field]
            await sender.close()

    asyncio.run(main())
    assert receiver.bytes_received == 0 and not dst_cache.any() and receiver.is_pending("t1")


def test_layout_mismatch_names_every_field() -> None:
    ours = KVLayout.of(make_cache(2), MODEL_ID)
    theirs = KVLayout.of(make_cache(2, torch.float16, block_size=16), MODEL_ID)
    error = KVLayoutMismatchError(ours.mismatches(theirs))
    assert str(error) == "KV layout mismatch: dtype: ours 'float32' != theirs 'float16'; block_size: ours 4 != theirs 16"
    assert ours.mismatches(ours) == []
    with pytest.raises(ValueError, match="num_layers, 2, num_blocks"):
        KVLayout.of(torch.zeros(4, 3, 2, 4, 2, 8), MODEL_ID)
    with pytest.raises(ValueError, match="dtype"):
        KVLayout.of(torch.zeros(4, 2, 2, 4, 2, 8, dtype=torch.int8), MODEL_ID)


@pytest.mark.parametrize(
    "sender_dtype, receiver_dtype", [(torch.bfloat16, torch.float8_e4m3fn), (torch.float8_e4m3fn, torch.bfloat16)]
)
def test_a_worker_refuses_kv_of_the_other_kv_cache_dtype_by_name(sender_dtype: torch.dtype, receiver_dtype: torch.dtype) -> None:
    """A bf16 decode worker refuses an fp8 prefill worker's KV at the handshake, and vice versa."""

    def scales(dtype: torch.dtype) -> tuple:
        return FP8_SCALES if dtype == torch.float8_e4m3fn else ((), ())

    dst_cache = make_cache(6, receiver_dtype, is_random=False)
    receiver = KVReceiver(dst_cache, MODEL_ID, "decode-0", scales(receiver_dtype))
    receiver.expect("t1", [1, 2], later(), Commits())
    sender = make_sender(make_cache(6, sender_dtype), ["grpc"], kv_scales=scales(sender_dtype))
    names = {torch.bfloat16: "bfloat16", torch.float8_e4m3fn: "float8_e4m3fn"}
    expected = f"dtype: ours '{names[sender_dtype]}' != theirs '{names[receiver_dtype]}'"

    async def main() -> None:
        async with serving(receiver, ["grpc"]) as address:
            with pytest.raises(KVLayoutMismatchError) as caught:
                await hand_off(sender, address, "t1", [0, 4])
            await sender.close()
        assert caught.value.mismatches == [expected]  # the scales follow from the dtype: not named

    asyncio.run(main())
    assert receiver.bytes_received == 0 and not bits(dst_cache).any()


def test_fp8_workers_with_other_kv_scales_are_refused_naming_the_scales() -> None:
    dst_cache = make_cache(6, torch.float8_e4m3fn, is_random=False)
    receiver = KVReceiver(dst_cache, MODEL_ID, "decode-0", ((1.0,) * 4, (1.0,) * 4))
    receiver.expect("t1", [1, 2], later(), Commits())
    sender = make_sender(make_cache(6, torch.float8_e4m3fn), ["grpc"], kv_scales=FP8_SCALES)

    async def main() -> None:
        async with serving(receiver, ["grpc"]) as address:
            with pytest.raises(
                KVLayoutMismatchError, match=r"k_scales: ours \(1.0, 0.5, 2.0, 1.0\) != theirs \(1.0, 1.0, 1.0, 1.0\)"
            ):
                await hand_off(sender, address, "t1", [0, 4])
            await sender.close()

    asyncio.run(main())
    assert receiver.bytes_received == 0


def test_an_fp8_layout_carries_one_scale_per_layer_and_moves_half_the_bytes() -> None:
    bf16 = KVLayout.of(make_cache(2, torch.bfloat16), MODEL_ID)
    fp8 = KVLayout.of(make_cache(2, torch.float8_e4m3fn), MODEL_ID, FP8_SCALES)
    assert fp8.dtype == "float8_e4m3fn" and fp8.k_scales == FP8_SCALES[0] and fp8.v_scales == FP8_SCALES[1]
    assert fp8.chunk_num_bytes(4, 3) * 2 == bf16.chunk_num_bytes(4, 3)
    with pytest.raises(ValueError, match="carries 4 K and V scales, got 0 and 0"):
        KVLayout.of(make_cache(2, torch.float8_e4m3fn), MODEL_ID)
    with pytest.raises(ValueError, match="carries 0 K and V scales, got 4 and 4"):
        KVLayout.of(make_cache(2, torch.bfloat16), MODEL_ID, FP8_SCALES)


def test_a_sender_with_no_transport_in_common_is_refused_by_name() -> None:
    receiver = KVReceiver(make_cache(6, is_random=False), MODEL_ID)
    receiver.expect("t1", [1, 2], later(), Commits())
    sender = make_sender(make_cache(6), ["nccl"])

    async def main() -> None:
        async with serving(receiver, ["grpc"]) as address:
            with pytest.raises(
                NoCommonTransportError,
                match=r"no common KV transport: the sender offers \['nccl'\], the receiver accepts \['grpc'\]",
            ):
                await hand_off(sender, address, "t1", [0, 4])
            await sender.close()

    asyncio.run(main())
    assert receiver.is_pending("t1") and receiver.bytes_received == 0


def _endpoint(host: str, device: str, uuid: str = "", pid: int = 1) -> Endpoint:
    return Endpoint(host, pid, device, uuid)


@pytest.mark.parametrize(
    "sender, receiver, offered, expected",
    [
        (_endpoint("a", "cuda", "gpu0"), _endpoint("a", "cuda", "gpu0", 2), offers(AUTO, torch.device("cuda")), "cuda_ipc"),
        (_endpoint("a", "cuda", "gpu0"), _endpoint("a", "cuda", "gpu1", 2), offers(AUTO, torch.device("cuda")), "cuda_ipc"),
        (_endpoint("a", "cuda", "gpu0"), _endpoint("b", "cuda", "gpu1"), offers(AUTO, torch.device("cuda")), "nccl"),
        (_endpoint("a", "cpu"), _endpoint("b", "cpu"), offers(AUTO, CPU), "grpc"),
        (_endpoint("a", "cpu"), _endpoint("a", "cpu", pid=2), offers(AUTO, CPU), "grpc"),
        (_endpoint("a", "cpu"), _endpoint("a", "cpu", pid=2), ["nccl"], "nccl"),  # gloo between CPU workers
        (_endpoint("a", "cpu"), _endpoint("a", "cpu"), ["local", "grpc"], "local"),  # one process
        (_endpoint("a", "cpu"), _endpoint("a", "cpu", pid=2), ["local", "grpc"], "grpc"),
        (_endpoint("a", "cuda", "gpu0"), _endpoint("a", "cpu"), offers(AUTO, torch.device("cuda")), "grpc"),
    ],
    ids=[
        "same-gpu",
        "two-gpus-one-host",
        "two-hosts",
        "cpu-hosts",
        "cpu-one-host",
        "cpu-gloo",
        "one-process",
        "local-across-processes",
        "gpu-to-cpu",
    ],
)
def test_auto_picks_the_fastest_transport_both_ends_can_use(
    sender: Endpoint, receiver: Endpoint, offered: list[str], expected: str
) -> None:
    assert choose(offered, accepts(AUTO, torch.device(receiver.device)), sender, receiver) == expected


def test_transport_settings_offer_and_accept_what_the_device_allows() -> None:
    assert offers(AUTO, torch.device("cuda")) == ["cuda_ipc", "nccl", "grpc"]
    assert offers(AUTO, CPU) == ["grpc"]
    assert offers("nccl", CPU) == ["nccl"]
    assert accepts(AUTO, CPU) == ["grpc", "local", "nccl"]
    assert "cuda_ipc" in accepts(AUTO, torch.device("cuda"))
    with pytest.raises(ValueError, match="the cuda_ipc KV transport needs a GPU"):
        offers("cuda_ipc", CPU)
    with pytest.raises(ValueError, match="unknown KV transport 'rdma'"):
        accepts("rdma", CPU)
    with pytest.raises(NoCommonTransportError, match="no common KV transport"):  # NCCL refuses two ranks on one GPU
        choose(["nccl"], ["nccl"], _endpoint("a", "cuda", "gpu0"), _endpoint("a", "cuda", "gpu0", 2))


# ---- unknown, expired, cancelled transfers --------------------------------------------------------


@pytest.mark.parametrize("transport_name", CPU_TRANSPORTS)
def test_unknown_expired_and_cancelled_transfers_are_refused_others_unaffected(transport_name: str) -> None:
    src_cache, dst_cache = make_cache(8), make_cache(8, is_random=False)
    receiver = KVReceiver(dst_cache, MODEL_ID, "decode-0")
    kept, old, cancelled = Commits(), Commits(), Commits()
    receiver.expect("kept", [0, 1], later(), kept)
    receiver.expect("old", [2, 3], time.monotonic() - 1.0, old)
    receiver.expect("cancelled", [4, 5], later(), cancelled)
    ended, released = receiver.poll()
    assert [(e.transfer_id, e.reason, e.is_free) for e in ended] == [("old", "expired", True)] and released == []
    assert receiver.cancel("cancelled") is True
    sender = make_sender(src_cache, [transport_name])

    async def main() -> None:
        async with serving(receiver, [transport_name]) as address:
            for transfer_id, reason in [("nope", "never expected"), ("old", "expired"), ("cancelled", "cancelled")]:
                with pytest.raises(KVTransferError, match=f"'{transfer_id}' is not pending: {reason}") as caught:
                    await hand_off(sender, address, transfer_id, [6, 7])
                assert caught.value.code == "NOT_FOUND"
            assert receiver.bytes_received == 0
            await hand_off(sender, address, "kept", [6, 7])
            await sender.close()

    asyncio.run(main())
    assert kept == [COMMIT] and old == [] and cancelled == []
    assert torch.equal(dst_cache[:, :, [0, 1]], src_cache[:, :, [6, 7]])
    assert not dst_cache[:, :, 2:].any()
    assert receiver.poll(time.monotonic() + 3600) == ([], [])  # "kept" was committed, nothing left


def test_a_reservation_of_another_size_is_refused_before_any_kv_moves() -> None:
    receiver = KVReceiver(make_cache(8, is_random=False), MODEL_ID)
    receiver.expect("t1", [0, 1, 2], later(), Commits())
    sender = make_sender(make_cache(8), ["grpc"])

    async def main() -> None:
        async with serving(receiver, ["grpc"]) as address:
            with pytest.raises(KVTransferError, match="the sender has 2 blocks, the reservation 3") as caught:
                await hand_off(sender, address, "t1", [4, 5])
            await sender.close()
        assert caught.value.code == "INVALID_ARGUMENT"

    asyncio.run(main())
    assert receiver.bytes_received == 0 and receiver.is_pending("t1")


def test_only_the_sender_that_began_a_transfer_may_write_or_commit_it() -> None:
    receiver = KVReceiver(make_cache(4, is_random=False), MODEL_ID)
    receiver.expect("t1", [0, 1], later(), Commits())
    receiver.begin("t1", "prefill-a", 2, is_device_writer=False)
    with pytest.raises(ValueError, match="already begun by prefill-a"):
        receiver.begin("t1", "prefill-b", 2, is_device_writer=False)
    with pytest.raises(ValueError, match="not begun by 'prefill-b'"):
        receiver.write("t1", "prefill-b", 0, NUM_LAYERS, 0, 2, make_cache(2))
    with pytest.raises(ValueError, match="not begun by 'prefill-b'"):
        receiver.commit("t1", "prefill-b", COMMIT)
    assert receiver.bytes_received == 0 and receiver.is_pending("t1")


def test_receiver_commits_exactly_once_only_after_every_layer_and_block() -> None:
    cache = make_cache(6, is_random=False)
    receiver = KVReceiver(cache, MODEL_ID)
    commits = Commits()
    receiver.expect("t1", [5, 0, 3], later(), commits)
    receiver.begin("t1", "p", 3, is_device_writer=False)
    part = make_cache(3, num_layers=2)
    assert receiver.write("t1", "p", 0, 2, 0, 3, part) == part.numel() * 4
    receiver.write("t1", "p", 2, 4, 0, 2, make_cache(2, num_layers=2))
    with pytest.raises(ValueError, match=r"missing layer 2 blocks \[2, 3\); layer 3 blocks \[2, 3\)"):
        receiver.commit("t1", "p", COMMIT)
    assert receiver.is_pending("t1") and commits == []
    receiver.write("t1", "p", 2, 4, 2, 3, make_cache(1, num_layers=2))
    receiver.commit("t1", "p", COMMIT)
    assert commits == [COMMIT] and not receiver.is_pending("t1")
    with pytest.raises(UnknownTransferError, match="already committed"):
        receiver.commit("t1", "p", COMMIT)
    assert torch.equal(cache[0:2, :, [5, 0, 3]], part) and commits == [COMMIT]


def test_the_receiver_remembers_only_the_latest_ended_transfers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Committed and cancelled ids alike: its memory stays bounded however many requests it serves."""
    monkeypatch.setattr("pdserve.kvtransfer.receiver._MAX_CLOSED_IDS", 3)
    receiver = KVReceiver(make_cache(2, is_random=False), MODEL_ID)
    for i in range(6):
        receiver.expect(f"t{i}", [0], later(), Commits())
        receiver.begin(f"t{i}", "p", 1, is_device_writer=False)
        receiver.write(f"t{i}", "p", 0, NUM_LAYERS, 0, 1, make_cache(1))
        receiver.commit(f"t{i}", "p", COMMIT)
    assert list(receiver._closed) == ["t3", "t4", "t5"]
    with pytest.raises(UnknownTransferError, match="already committed"):
        receiver.commit("t5", "p", COMMIT)
    with pytest.raises(UnknownTransferError, match="never expected"):
        receiver.commit("t0", "p", COMMIT)  # forgotten
    receiver.expect("t6", [1], later(), Commits())
    receiver.cancel("t6")
    assert list(receiver._closed) == ["t4", "t5", "t6"]


def test_receiver_takes_writes_from_many_threads_while_the_owner_polls() -> None:
    src = make_cache(16, num_layers=8)
    cache = make_cache(16, is_random=False, num_layers=8)
    receiver = KVReceiver(cache, MODEL_ID)
    commits = Commits()
    receiver.expect("t1", list(range(16)), later(), commits)
    receiver.begin("t1", "p", 16, is_device_writer=False)

    def write_layer(layer: int) -> int:
        receiver.poll()  # the owner's sweep every step, racing with the writes
        return receiver.write("t1", "p", layer, layer + 1, 0, 16, src[layer : layer + 1])

    with ThreadPoolExecutor(max_workers=8) as pool:
        num_bytes = sum(pool.map(write_layer, range(8)))
    receiver.commit("t1", "p", COMMIT)
    assert num_bytes == receiver.bytes_received == src.numel() * 4
    assert torch.equal(cache, src) and commits == [COMMIT]


def test_chunks_outside_the_reservation_or_of_the_wrong_shape_are_refused_and_nothing_written() -> None:
    cache = make_cache(6, is_random=False)
    receiver = KVReceiver(cache, MODEL_ID)
    receiver.expect("t1", [3, 4, 5], later(), Commits())
    receiver.begin("t1", "p", 3, is_device_writer=False)
    with pytest.raises(ValueError, match=r"blocks \[1, 4\) outside the reservation's \[0, 3\)"):
        receiver.write("t1", "p", 0, NUM_LAYERS, 1, 4, make_cache(3))
    with pytest.raises(ValueError, match=r"layers \[2, 6\) outside \[0, 4\)"):
        receiver.write("t1", "p", 2, 6, 0, 1, make_cache(1, num_layers=4))
    with pytest.raises(ValueError, match="chunk shape"):
        receiver.write("t1", "p", 0, NUM_LAYERS, 0, 2, make_cache(1))
    with pytest.raises(ValueError, match="dtype"):
        receiver.write("t1", "p", 0, NUM_LAYERS, 0, 2, make_cache(2, torch.bfloat16))
    with pytest.raises(ValueError, match="must be distinct"):
        receiver.expect("t2", [1, 1], later(), Commits())
    with pytest.raises(ValueError, match="already pending"):
        receiver.expect("t1", [1], later(), Commits())
    assert receiver.bytes_received == 0 and not cache.any() and receiver.is_pending("t1")


def test_blocks_a_device_writer_may_still_write_are_held_until_it_is_done() -> None:
    """With CUDA IPC the sender writes into our blocks itself: a reservation cancelled (or expired)
    after it began keeps its blocks out of reuse until the sender says it is done, or a grace
    period past its lease."""
    receiver = KVReceiver(make_cache(8, is_random=False), MODEL_ID)
    for transfer_id, blocks in [("abandoned", [0, 1]), ("late-commit", [2, 3]), ("silent", [4, 5]), ("plain", [6, 7])]:
        receiver.expect(transfer_id, blocks, later(1.0), Commits())
        receiver.begin(transfer_id, "p", 2, is_device_writer=transfer_id != "plain")
    assert [receiver.cancel(t) for t in ("abandoned", "late-commit", "silent", "plain")] == [False, False, False, True]
    assert receiver.num_held_blocks == 6 and receiver.poll() == ([], [])
    receiver.abandon("abandoned", "q", "not its writer")  # another sender's word frees nothing
    with pytest.raises(UnknownTransferError):
        receiver.commit("late-commit", "q", COMMIT)
    assert receiver.num_held_blocks == 6 and receiver.poll() == ([], [])
    receiver.abandon("abandoned", "p", "cancelled by the client")
    with pytest.raises(UnknownTransferError, match="cancelled"):
        receiver.commit("late-commit", "p", COMMIT)  # a commit says it is done too
    assert receiver.poll() == ([], [[0, 1], [2, 3]])
    assert receiver.poll(time.monotonic() + 5.0) == ([], [])  # "silent": held past its lease
    assert receiver.poll(time.monotonic() + 60.0) == ([], [[4, 5]])
    assert receiver.num_held_blocks == 0


def test_an_abandoned_reservation_ends_and_its_blocks_are_free() -> None:
    receiver = KVReceiver(make_cache(4, is_random=False), MODEL_ID)
    receiver.expect("t1", [0, 1], later(), Commits())
    receiver.begin("t1", "p", 2, is_device_writer=True)
    receiver.abandon("t1", "someone-else", "not theirs")  # ignored
    assert receiver.is_pending("t1")
    receiver.abandon("t1", "p", "prefill failed")
    ended, released = receiver.poll()
    assert [(e.transfer_id, e.is_free) for e in ended] == [("t1", True)] and "prefill failed" in ended[0].reason
    assert released == [] and receiver.num_held_blocks == 0


# ---- the gRPC edge ---------------------------------------------------------------------------------


def test_grpc_chunk_with_a_bad_byte_count_is_invalid_argument() -> None:
    receiver = KVReceiver(make_cache(4, is_random=False), MODEL_ID)
    receiver.expect("t1", [0, 1], later(), Commits())
    receiver.begin("t1", "prefill-0", 2, is_device_writer=False)
    data = make_cache(2).contiguous().view(torch.uint8).numpy().tobytes()
    truncated = pb.KVChunk(
        transfer_id="t1", sender_id="prefill-0", layer_start=0, layer_end=NUM_LAYERS, block_start=0, block_end=2, data=data[:-4]
    )

    async def main() -> None:
        async with serving(receiver, ["grpc"]) as address:
            async with auth.channel(address, CLUSTER_SECRET, "prefill-0", GRPC_OPTIONS) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await pdserve_pb2_grpc.KVTransferStub(channel).PushKV(iter([truncated]), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "expected" in caught.value.details()

    asyncio.run(main())
    assert receiver.is_pending("t1") and receiver.bytes_received == 0
    assert decode_chunk(
        pb.KVChunk(layer_start=0, layer_end=NUM_LAYERS, block_start=0, block_end=2, data=data), receiver.layout
    ).shape == (4, 2, 2, 4, 2, 8)


@pytest.mark.parametrize(
    "caller, sender_id, code, fragment",
    [
        ("prefill-0", "stranger", grpc.StatusCode.FAILED_PRECONDITION, "has not handshaken"),  # calls before a handshake
        # the sender id is what a decode worker caches received KV under: it must be the signer's
        ("someone-else", "prefill-0", grpc.StatusCode.INVALID_ARGUMENT, "is not the caller that signed"),
    ],
    ids=["before-a-handshake", "signed-by-another-caller"],
)
def test_a_begin_is_refused_before_a_handshake_or_when_another_caller_signs_it(
    caller: str, sender_id: str, code: grpc.StatusCode, fragment: str
) -> None:
    receiver = KVReceiver(make_cache(4, is_random=False), MODEL_ID)
    receiver.expect("t1", [0, 1], later(), Commits())
    sender = make_sender(make_cache(4), ["grpc"])

    async def main() -> None:
        async with serving(receiver, ["grpc"]) as address:
            await sender.connect(address, 10)  # "prefill-0" handshook
            async with auth.channel(address, CLUSTER_SECRET, caller, GRPC_OPTIONS) as channel:
                stub = pdserve_pb2_grpc.KVTransferStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Begin(pb.BeginRequest(transfer_id="t1", sender_id=sender_id, num_blocks=2), timeout=10)
                assert caught.value.code() == code
                assert fragment in caught.value.details()
            await sender.close()

    asyncio.run(main())
    assert receiver.is_pending("t1")
    receiver.begin("t1", "prefill-0", 2, is_device_writer=False)  # not taken by the refused call


@pytest.mark.parametrize("method", ["Commit", "Abandon", "PushKV", "Receive"])
def test_a_call_naming_another_sender_than_its_signer_is_refused_and_changes_nothing(method: str) -> None:
    src_cache, dst_cache = make_cache(4), make_cache(4, is_random=False)
    receiver = KVReceiver(dst_cache, MODEL_ID, "decode-0")
    commits = Commits()
    receiver.expect("t1", [0, 1], later(), commits)
    sender = make_sender(src_cache, ["nccl"])
    chunk = pb.KVChunk(
        transfer_id="t1",
        sender_id="prefill-0",
        layer_start=0,
        layer_end=NUM_LAYERS,
        block_start=0,
        block_end=2,
        data=bits(make_cache(2)).numpy().tobytes(),
    )

    async def main() -> None:
        async with serving(receiver, ["grpc", "nccl"]) as address:
            peer = await sender.connect(address, 10)
            await sender.begin(peer, "t1", 2, 10)  # "prefill-0" took the reservation
            async with auth.channel(address, CLUSTER_SECRET, "prefill-1", GRPC_OPTIONS) as channel:
                stub = pdserve_pb2_grpc.KVTransferStub(channel)
                calls = {
                    "Commit": lambda: stub.Commit(pb.KVCommit(transfer_id="t1", sender_id="prefill-0"), timeout=5),
                    "Abandon": lambda: stub.Abandon(pb.AbandonRequest(transfer_id="t1", sender_id="prefill-0"), timeout=5),
                    "PushKV": lambda: stub.PushKV(iter([chunk]), timeout=5),
                    "Receive": lambda: stub.Receive(
                        pb.ReceiveRequest(transfer_id="t1", sender_id="prefill-0", layer_bounds=sender.bounds), timeout=5
                    ),
                }
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await calls[method]()
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert caught.value.details() == "sender_id 'prefill-0' is not the caller that signed the call"
            assert receiver.is_pending("t1") and receiver.bytes_received == 0 and not peer.half.is_broken
            await hand_off(sender, address, "t1", [2, 3])  # the real sender's transfer goes on
            await sender.close()

    asyncio.run(main())
    assert commits == [COMMIT] and torch.equal(dst_cache[:, :, [0, 1]], src_cache[:, :, [2, 3]])


@pytest.mark.parametrize("transport_name", CPU_TRANSPORTS)
def test_a_push_past_its_deadline_fails_with_deadline_exceeded(transport_name: str) -> None:
    receiver = KVReceiver(make_cache(4, is_random=False), MODEL_ID, "decode-0")
    commits = Commits()
    receiver.expect("t1", [0, 1], later(), commits)
    sender = make_sender(make_cache(4), [transport_name])

    async def main() -> None:
        async with serving(receiver, [transport_name]) as address:
            peer = await sender.connect(address, 10)
            reservation = await sender.begin(peer, "t1", 2, 10)
            progress = LayerProgress(sender.bounds)  # the forward pass never ends
            transfer = OutgoingTransfer("t1", [2, 3], reservation.block_ids, progress, time.monotonic() + 0.3)
            started = time.monotonic()
            with pytest.raises(KVTransferError) as caught:
                await sender.push(peer, transfer)
            assert caught.value.code == "DEADLINE_EXCEEDED" and time.monotonic() - started < 5.0
            await sender.close()

    asyncio.run(main())
    assert commits == [] and receiver.is_pending("t1")  # the owner's poll frees it when its lease ends


async def send_again_on_a_fresh_group(sender: KVSender, address: str, failed: KVPeer, transfer: OutgoingTransfer) -> None:
    """What the prefill worker's retry does after an UNAVAILABLE push: handshake anew (the failed
    peer is forgotten), push, commit; then close the sender."""
    retried = await sender.connect(address, 10)
    assert retried is not failed
    await sender.push(retried, transfer)
    await sender.commit(retried, transfer.transfer_id, COMMIT, 10)
    await sender.close()


def test_a_push_queued_behind_one_cancelled_on_a_nccl_pair_fails_unavailable_and_a_retry_succeeds() -> None:
    """Prompt "a"'s push is cancelled (its client left) while "b"'s waits for the pair: the cancel
    closes the pair, so "b" fails with UNAVAILABLE (the sender forgets the peer), and "b" sent again
    after a fresh handshake arrives whole."""
    src_cache, dst_cache = make_cache(16), make_cache(12, is_random=False)
    receiver = KVReceiver(dst_cache, MODEL_ID, "decode-0")
    commits = Commits()
    receiver.expect("a", [0, 1], later(), Commits())
    receiver.expect("b", [2, 3], later(), commits)
    sender = make_sender(src_cache, ["nccl"], layers_per_group=2)

    async def main() -> None:
        async with serving(receiver, ["nccl"]) as address:
            peer = await sender.connect(address, 10)
            reserved_a, reserved_b = await sender.begin(peer, "a", 2, 10), await sender.begin(peer, "b", 2, 10)
            computing = LayerProgress(sender.bounds)  # "a"'s layers are still being computed
            push_a = asyncio.create_task(
                sender.push(peer, OutgoingTransfer("a", [4, 5], reserved_a.block_ids, computing, reserved_a.deadline))
            )
            computed = LayerProgress(sender.bounds)
            computed.mark_all()
            transfer_b = OutgoingTransfer("b", [6, 7], reserved_b.block_ids, computed, reserved_b.deadline)
            push_b = asyncio.create_task(sender.push(peer, transfer_b))
            await asyncio.sleep(0.2)
            assert not push_b.done()  # waits for "a"
            push_a.cancel()
            receiver.cancel("a")
            await asyncio.gather(push_a, return_exceptions=True)
            with pytest.raises(KVTransferError) as caught:
                await push_b
            assert caught.value.code == "UNAVAILABLE"
            await send_again_on_a_fresh_group(sender, address, peer, transfer_b)

    asyncio.run(main())
    assert commits == [COMMIT] and torch.equal(dst_cache[:, :, [2, 3]], src_cache[:, :, [6, 7]])


def test_a_sender_that_leaves_mid_transfer_gets_its_nccl_group_aborted_on_the_receiver() -> None:
    """The prompt's client leaves after the first layer group went over: the receiver aborts its end
    of the group at once. On NCCL its receive of the group that never comes would otherwise hold the
    KV stream, and every decode step fenced behind it, until the group's 60 s timeout. The sender's
    next hand-off, on a fresh group, arrives whole."""
    src_cache, dst_cache = make_cache(8), make_cache(4, is_random=False)
    receiver = KVReceiver(dst_cache, MODEL_ID, "decode-0")
    commits = Commits()
    receiver.expect("a", [0, 1], later(), Commits())
    receiver.expect("b", [2, 3], later(), commits)
    sender = make_sender(src_cache, ["nccl"], layers_per_group=2)
    servicers: list = []

    async def main() -> None:
        async with serving(receiver, ["nccl"], servicers=servicers) as address:
            peer = await sender.connect(address, 10)
            reserved = await sender.begin(peer, "a", 2, 10)
            computing = LayerProgress(sender.bounds)
            computing.on_layer(1, None)  # the first group of layers only
            push = asyncio.create_task(
                sender.push(peer, OutgoingTransfer("a", [4, 5], reserved.block_ids, computing, reserved.deadline))
            )
            await until(lambda: receiver.bytes_received > 0)  # the first group arrived; the second never will
            receive_pair = servicers[0].halves["nccl"]._pairs["prefill-0"]
            push.cancel()
            await asyncio.gather(push, return_exceptions=True)
            await until(lambda: receive_pair.is_broken, timeout_s=5)
            await hand_off(sender, address, "b", [6, 7])
            await sender.close()

    asyncio.run(main())
    assert commits == [COMMIT] and torch.equal(dst_cache[:, :, [2, 3]], src_cache[:, :, [6, 7]])


def test_a_failed_send_on_a_nccl_pair_fails_unavailable_and_a_retry_succeeds(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process group's send fails (as gloo's does when the peer resets the connection): the
    push fails UNAVAILABLE, which the prefill worker answers as retryable, not UNKNOWN; the sender
    forgets the peer, and the transfer sent again after a fresh handshake arrives whole."""
    src_cache, dst_cache = make_cache(8), make_cache(4, is_random=False)
    receiver = KVReceiver(dst_cache, MODEL_ID, "decode-0")
    commits = Commits()
    receiver.expect("t1", [0, 1], later(), commits)
    sender = make_sender(src_cache, ["nccl"])

    async def main() -> None:
        async with serving(receiver, ["nccl"]) as address:
            peer = await sender.connect(address, 10)
            reservation = await sender.begin(peer, "t1", 2, 10)
            computed = LayerProgress(sender.bounds)
            computed.mark_all()
            transfer = OutgoingTransfer("t1", [4, 5], reservation.block_ids, computed, reservation.deadline)

            def reset_by_peer(*args: object) -> None:
                raise RuntimeError("[gloo] Connection closed by peer")

            with monkeypatch.context() as patched:
                patched.setattr(peer.half, "_send", reset_by_peer)
                with pytest.raises(KVTransferError) as caught:
                    await sender.push(peer, transfer)
            assert caught.value.code == "UNAVAILABLE" and peer.half.is_broken
            await send_again_on_a_fresh_group(sender, address, peer, transfer)

    asyncio.run(main())
    assert commits == [COMMIT] and torch.equal(dst_cache[:, :, [0, 1]], src_cache[:, :, [4, 5]])


def test_an_unreachable_peer_is_unavailable() -> None:
    sender = make_sender(make_cache(1), ["grpc"])

    async def main() -> None:
        with pytest.raises(KVTransferError) as caught:
            await sender.connect("127.0.0.1:1", 5)
        assert caught.value.code == "UNAVAILABLE"
        await sender.close()

    asyncio.run(main())


def test_a_sender_refuses_a_layout_that_is_not_its_cache() -> None:
    cache = make_cache(4)
    with pytest.raises(ValueError, match="does not describe kv_cache"):
        KVSender(
            cache,
            KVLayout.of(make_cache(4, block_size=8), MODEL_ID),
            "p",
            Endpoint.here(CPU, "127.0.0.1"),
            ["grpc"],
            secret=CLUSTER_SECRET,
        )
