"""The data plane's shape: a transport is two halves of one idea, the prefill side's `KVSendHalf`
and the decode side's `KVReceiveHalf`, registered together in `TRANSPORTS`. Which one two
workers use is agreed in their handshake (`choose`) from where each runs (`Endpoint`)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pdserve.kvtransfer.layout import KVLayout, KVLayoutMismatchError
from pdserve.kvtransfer.receiver import UnknownTransferError

if TYPE_CHECKING:
    from pdserve.kvtransfer.layer_progress import LayerProgress
    from pdserve.kvtransfer.receiver import KVReceiver

HANDSHAKE_TIMEOUT_S = 10.0
AUTO = "auto"
# What `auto` offers, fastest first: CUDA IPC within a host, NCCL between hosts, gRPC anywhere.
AUTO_PREFERENCE = ("cuda_ipc", "nccl", "grpc")


class KVTransferError(RuntimeError):
    """The peer refused or failed a transfer; `code` is the gRPC status code name when there is one."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.code = code


class UnprovenPeerError(KVTransferError):
    """The peer at an address did not prove, in the KV handshake, that it holds the cluster secret:
    nothing more is sent there, and nothing it said is repeated."""

    def __init__(self, address: str, detail: str) -> None:
        super().__init__(
            f"the decode worker at {address} did not prove it holds the cluster secret ({detail})", "FAILED_PRECONDITION"
        )


class NoCommonTransportError(ValueError):
    """The two ends of a hand-off have no KV transport that both accept and can use."""

    PREFIX = "no common KV transport: "

    def __init__(self, detail: str) -> None:
        super().__init__(self.PREFIX + detail)


@dataclass(frozen=True)
class Endpoint:
    """Where a worker runs: what decides which transports two workers can use."""

    host_id: str  # equal on one machine
    pid: int
    device: str  # "cpu" | "cuda"
    device_uuid: str = ""
    address: str = "127.0.0.1"  # the host its data plane binds

    @classmethod
    def here(cls, device: torch.device, address: str) -> Endpoint:
        uuid = ""
        if device.type == "cuda":
            uuid = str(torch.cuda.get_device_properties(device).uuid)
        return cls(_host_id(), os.getpid(), device.type, uuid, address)


@dataclass
class OutgoingTransfer:
    """One prompt's KV on its way: our blocks into the peer's, layer group by layer group."""

    transfer_id: str
    src_block_ids: list[int]
    dst_block_ids: list[int]
    progress: LayerProgress  # when each layer group is computed
    deadline: float  # time.monotonic(): nothing is written after it


class KVSendHalf(Protocol):
    """The prefill side of one transport, connected to one peer."""

    is_broken: bool  # it failed in a way that needs a new handshake

    async def push(self, transfer: OutgoingTransfer) -> int:
        """Every layer group of `transfer`, each as soon as it is computed, into the peer's blocks;
        returns once all of it is in place (for a device writer: complete on the device). The
        bytes moved."""
        ...

    async def close(self) -> None: ...


class KVReceiveHalf(Protocol):
    """The decode side of one transport, one per worker."""

    def accept(self, sender_id: str, sender: Endpoint) -> dict[str, bytes]:
        """What `sender` needs to connect (an IPC handle, a rendezvous address)."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class PeerInfo:
    """A handshaken decode worker, as a send half needs it."""

    address: str  # its KVTransfer service
    receiver_id: str
    layout: KVLayout
    params: dict[str, bytes]
    control: Any  # kvtransfer.control.KVControlClient (grpc data and nccl use its stub)


@dataclass(frozen=True)
class Transport:
    name: str
    can_connect: Callable[[Endpoint, Endpoint], bool]  # (sender, receiver)
    connect: Callable[[torch.Tensor, str, Endpoint, PeerInfo], KVSendHalf]  # (kv_cache, sender_id, ours, peer)
    receiver: Callable[[KVReceiver, Endpoint], KVReceiveHalf]
    devices: tuple[str, ...] = ("cpu", "cuda")  # where its halves can run
    is_device_writer: bool = False  # the sender writes into the receiver's blocks itself


TRANSPORTS: dict[str, Transport] = {}  # filled by the transport modules (kvtransfer/__init__.py)


def offers(setting: str, device: torch.device) -> list[str]:
    """What a sender configured with `--kv-transport setting` offers, in its order of preference
    (`auto` on a CPU: gRPC; NCCL's CPU form, gloo, only when asked for)."""
    if setting != AUTO:
        return [_usable(setting, device)]
    return [name for name in AUTO_PREFERENCE if device.type == "cuda" or name == "grpc"]


def accepts(setting: str, device: torch.device) -> list[str]:
    """What a receiver configured with `--kv-transport setting` accepts: `auto`, all it can run."""
    if setting != AUTO:
        return [_usable(setting, device)]
    return sorted(name for name, transport in TRANSPORTS.items() if device.type in transport.devices)


def choose(offered: list[str], accepted: list[str], sender: Endpoint, receiver: Endpoint) -> str:
    """The first transport the sender offers that the receiver accepts and both ends can use."""
    for name in offered:
        if name in accepted and name in TRANSPORTS and TRANSPORTS[name].can_connect(sender, receiver):
            return name
    raise NoCommonTransportError(
        f"the sender offers {offered}, the receiver accepts {accepted}; sender on {sender.device} "
        f"(host {sender.host_id}), receiver on {receiver.device} (host {receiver.host_id})"
    )


def check_name(name: str) -> None:
    if name != AUTO and name not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {name!r}; known: {AUTO}, {', '.join(sorted(TRANSPORTS))}")


def _usable(name: str, device: torch.device) -> str:
    check_name(name)
    if device.type not in TRANSPORTS[name].devices:
        raise ValueError(f"the {name} KV transport needs a GPU; this worker runs on the {device.type}")
    return name


def status_code_name(error: Exception) -> str | None:
    """The gRPC status code a receiver-side error maps to."""
    if isinstance(error, (KVLayoutMismatchError, NoCommonTransportError)):  # before ValueError: they are ones
        return "FAILED_PRECONDITION"
    if isinstance(error, UnknownTransferError):
        return "NOT_FOUND"
    if isinstance(error, ValueError):
        return "INVALID_ARGUMENT"
    return None


async def wait_for_event(event: torch.cuda.Event, deadline: float, what: str) -> None:
    """Waits for device work without blocking the event loop: a worker thread blocks on the event
    (a poll from the loop would add up to a timer tick of latency to every hand-off)."""
    if event.query():
        return
    try:
        await asyncio.wait_for(asyncio.to_thread(event.synchronize), max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise KVTransferError(f"{what}: the device work did not finish in time", "DEADLINE_EXCEEDED") from None


def _host_id() -> str:
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    suffix = boot_id.read_text().strip() if boot_id.is_file() else ""
    return f"{socket.gethostname()}/{suffix}"
