"""KV hand-off bandwidth of each transport through pdserve's own sender and receiver (control over
gRPC, data over the transport), prefill cache in this process, decode cache in another, next to
the device-to-device copy bandwidth measured in the same run. Llama-3-8B's KV layout, bf16.

    python -m pdserve.bench.kv_transfer [--transports cuda_ipc,grpc] [--blocks 64,256,1024] [--peer-device cuda:0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import torch

from pdserve.bench.ceilings import copy_bandwidth_gbs, describe_gpu
from pdserve.proto.cluster_secret import ClusterSecret

NUM_LAYERS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 32, 16, 8, 128  # Llama-3-8B: 2 MiB of KV per block
CACHE_BLOCKS = 2304  # 4.5 GiB of KV a side
MODEL_ID = "bench-kv"
REPEATS = 5
SECRET = ClusterSecret("bench-kv-transfer-" + "0" * 32)  # both processes of the bench; calls are signed as in a cluster


def kv_cache(device: str) -> torch.Tensor:
    shape = (NUM_LAYERS, 2, CACHE_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    return torch.randn(shape, dtype=torch.bfloat16, device=device)


def host_copy_gbs(num_bytes: int = 1 << 28) -> float:
    """The CPU's copy bandwidth (read+write), for a run without a GPU."""
    src, dst = torch.ones(num_bytes, dtype=torch.uint8), torch.empty(num_bytes, dtype=torch.uint8)
    dst.copy_(src)
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    return 2 * num_bytes * 5 / (time.perf_counter() - start) / 1e9


def plan(transports: list[str], block_counts: list[int]) -> list[tuple[str, str, int]]:
    """(transfer_id, transport, number of blocks) of every hand-off, warm-up first."""
    return [
        (f"{name}-{num_blocks}-{rep}", name, num_blocks)
        for name in transports
        for num_blocks in block_counts
        for rep in range(REPEATS + 1)
    ]


def serve_receiver(device: str, transports: list[str], block_counts: list[int]) -> None:
    """The decode side, in its own process: a cache, a receiver with every planned reservation,
    its KVTransfer service. Prints its address, then serves until killed."""
    import grpc

    from pdserve.kvtransfer import Endpoint, KVReceiver
    from pdserve.kvtransfer.control import KVTransferServicer, add_kv_transfer_service
    from pdserve.proto import GRPC_OPTIONS
    from pdserve.proto.auth import ServerAuth

    async def main() -> None:
        receiver = KVReceiver(kv_cache(device), MODEL_ID, "bench-decode")
        generator = torch.Generator().manual_seed(1)
        for transfer_id, _, num_blocks in plan(transports, block_counts):
            blocks = torch.randperm(CACHE_BLOCKS, generator=generator)[:num_blocks].tolist()
            receiver.expect(transfer_id, blocks, time.monotonic() + 3600, lambda info, ready: None)
        server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=[ServerAuth(SECRET)])
        endpoint = Endpoint.here(torch.device(device), "127.0.0.1")
        add_kv_transfer_service(server, KVTransferServicer(receiver, endpoint, transports, SECRET))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(f"ADDRESS 127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())


async def measure(address: str, device: str, transports: list[str], block_counts: list[int]) -> list[dict]:
    from pdserve.kvtransfer import Endpoint, KVLayout, KVSender, LayerProgress, OutgoingTransfer
    from pdserve.kvtransfer.receiver import KVCommitInfo

    cache = kv_cache("cuda" if device.startswith("cuda") else "cpu")
    generator = torch.Generator().manual_seed(2)
    rows = []
    for name in transports:
        sender = KVSender(
            cache, KVLayout.of(cache, MODEL_ID), f"bench-{name}", Endpoint.here(cache.device, "127.0.0.1"), [name], secret=SECRET
        )
        peer = await sender.connect(address, 30)
        for num_blocks in block_counts:
            seconds = []
            for rep in range(REPEATS + 1):
                transfer_id = f"{name}-{num_blocks}-{rep}"
                reservation = await sender.begin(peer, transfer_id, num_blocks, 30)
                progress = LayerProgress(sender.bounds)
                progress.mark_all()
                src = torch.randperm(CACHE_BLOCKS, generator=generator)[:num_blocks].tolist()
                if cache.is_cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
                num_bytes = await sender.push(
                    peer, OutgoingTransfer(transfer_id, src, reservation.block_ids, progress, reservation.deadline)
                )
                seconds.append(time.perf_counter() - start)
                await sender.commit(peer, transfer_id, KVCommitInfo(0, None, num_blocks * BLOCK_SIZE), 30)
            median = sorted(seconds[1:])[len(seconds[1:]) // 2]  # the first is a warm-up
            row = {
                "transport": name,
                "blocks": num_blocks,
                "bytes": num_bytes,
                "seconds": median,
                "gbs": num_bytes / median / 1e9,
            }
            if (
                name == "cuda_ipc" and peer.half.peer_cache.device == cache.device
            ):  # the data plane alone: the copy kernel into the other process's cache
                row["device_seconds"] = device_copy_seconds(cache, peer.half.peer_cache, num_blocks, generator)
            rows.append(row)
        await sender.close()
    return rows


def device_copy_seconds(cache: torch.Tensor, peer_cache: torch.Tensor, num_blocks: int, generator: torch.Generator) -> float:
    """Median time of the block-copy kernel alone (CUDA events) writing `num_blocks` scattered blocks
    into the peer's cache through CUDA IPC, fresh block ids each time."""
    from pdserve import kernels

    times = []
    for _ in range(REPEATS + 1):
        src = torch.randperm(CACHE_BLOCKS, generator=generator)[:num_blocks].cuda()
        dst = torch.randperm(CACHE_BLOCKS, generator=generator)[:num_blocks].cuda()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        kernels.copy_kv_blocks(cache, src, peer_cache, dst)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times[1:])[len(times[1:]) // 2]


def peer_copy_gbs(peer_device: str, num_bytes: int = 1 << 30) -> float:
    """GPU 0 -> the peer GPU, one large copy (bytes moved once): the link's ceiling."""
    from pdserve.bench.ceilings import median_ms

    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda:0").random_()
    dst = torch.empty(num_bytes, dtype=torch.uint8, device=peer_device)
    return num_bytes / (median_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9


def nccl_send_gbs(num_bytes: int = 512 << 20) -> float:
    """Raw NCCL send/recv of one contiguous buffer between two processes, GPU 0 -> GPU 1."""
    code = (
        "import datetime,sys,time,torch,torch.distributed as d\n"
        "rank,port=int(sys.argv[1]),int(sys.argv[2]);torch.cuda.set_device(rank)\n"
        "s=d.TCPStore('127.0.0.1',port,2,rank==0,datetime.timedelta(seconds=60))\n"
        "g=d.ProcessGroupNCCL(s,rank,2,d.ProcessGroupNCCL.Options())\n"
        f"t=torch.ones({num_bytes},dtype=torch.uint8,device='cuda')\n"
        "op=(lambda:g.send([t],1,0).wait()) if rank==0 else (lambda:g.recv([t],0,0).wait())\n"
        "[op() for _ in range(3)];torch.cuda.synchronize();t0=time.perf_counter()\n"
        "[op() for _ in range(10)];torch.cuda.synchronize();dt=(time.perf_counter()-t0)/10\n"
        f"print({num_bytes}/dt/1e9) if rank==1 else None\n"
    )
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = [subprocess.Popen([sys.executable, "-c", code, str(r), str(port)], stdout=subprocess.PIPE, text=True) for r in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in ranks]
    return float(outputs[1].strip())


def print_across(rows: list[dict], ceilings: dict[str, float]) -> None:
    print(
        f"ceilings (bytes moved once): GPU0->GPU1 copy {ceilings['cuda_ipc']:.0f} GB/s, NCCL send/recv {ceilings['nccl']:.0f} GB/s"
    )
    print("| transport | blocks | KV MiB | hand-off ms (push, wall) | KV GB/s | vs its ceiling |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        ceiling = ceilings.get(row["transport"])
        ratio = f"{row['gbs'] / ceiling:.1%}" if ceiling else "-"
        print(
            f"| {row['transport']} | {row['blocks']} | {row['bytes'] / 2**20:.0f} | {row['seconds'] * 1e3:.3f} | {row['gbs']:.1f} | {ratio} |"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transports", default="cuda_ipc,grpc")
    parser.add_argument("--blocks", default="32,128,512,1024", help="blocks per hand-off (2 MiB of KV each)")
    parser.add_argument("--peer-device", default="cuda:0", help="the decode side's GPU (cuda:1 for two GPUs)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--serve-receiver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    transports, block_counts = args.transports.split(","), [int(b) for b in args.blocks.split(",")]
    if args.serve_receiver:
        serve_receiver(args.peer_device, transports, block_counts)
        return 0
    env = dict(os.environ)
    peer_device = args.peer_device
    if peer_device.startswith("cuda:") and peer_device != "cuda:0":  # its GPU first there, ours after it
        env["CUDA_VISIBLE_DEVICES"] = f"{peer_device.split(':')[1]},0"
        peer_device = "cuda:0"
    receiver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pdserve.bench.kv_transfer",
            "--serve-receiver",
            "--transports",
            args.transports,
            "--blocks",
            args.blocks,
            "--peer-device",
            peer_device,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        address = receiver.stdout.readline().split()[1]
        threading.Thread(target=receiver.stdout.read, daemon=True).start()
        on_gpu = args.peer_device.startswith("cuda")
        copy_gbs = copy_bandwidth_gbs() if on_gpu else host_copy_gbs()
        across = on_gpu and args.peer_device != "cuda:0"
        if across:  # two GPUs: the ceilings are the link's, bytes moved once
            ceilings = {"cuda_ipc": peer_copy_gbs(args.peer_device), "nccl": nccl_send_gbs()}
        rows = asyncio.run(measure(address, args.peer_device, transports, block_counts))
        copy_after = copy_bandwidth_gbs() if on_gpu else host_copy_gbs()
    finally:
        receiver.kill()
    where = describe_gpu() if on_gpu else "CPU"
    print(f"{where}; device-to-device copy {copy_gbs:.0f} / {copy_after:.0f} GB/s (read+write, before/after)")
    if across:
        print_across(rows, ceilings)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": where, "ceilings_gbs": ceilings, "rows": rows}, f, indent=2)
        return 0
    # A copy reads each byte once and writes it once: read+write bytes, as the ceiling counts them.
    print(
        "| transport | blocks | KV MiB | hand-off ms (push, wall) | KV GB/s | read+write vs copy | data plane ms (device) | read+write vs copy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        device = row.get("device_seconds")
        device_cells = f"{device * 1e3:.3f} | {2 * row['bytes'] / device / 1e9 / copy_gbs:.1%}" if device else "- | -"
        print(
            f"| {row['transport']} | {row['blocks']} | {row['bytes'] / 2**20:.0f} | {row['seconds'] * 1e3:.3f} | "
            f"{row['gbs']:.1f} | {2 * row['gbs'] / copy_gbs:.1%} | {device_cells} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": where, "copy_gbs": copy_gbs, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
