"""The decode worker's gRPC edge: the DecodeWorker service and the KV hand-off's KVTransfer service
on one server; protobuf is converted to plain calls on `DecodeWorker` here."""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from decode_worker.worker import DecodeWorker, Reserved
from engine.outputs import RequestDelta
from engine.sampling_params import InvalidRequestError
from kvtransfer import AUTO, Endpoint, accepts
from kvtransfer.control import KVTransferServicer, add_kv_transfer_service
from proto import GRPC_OPTIONS
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc
from proto.convert import logprobs_to_proto, params_from_proto, worker_status
from proto.failures import Failure, grpc_code

DEFAULT_LEASE_S = 30.0


class DecodeServicer(pb_grpc.DecodeWorkerServicer):
    def __init__(self, worker: DecodeWorker, model_name: str, kv_address: str, transports: list[str]) -> None:
        self.worker = worker
        self.model_name = model_name
        self.kv_address = kv_address
        self.transports = transports

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            params = params_from_proto(request.params)
            lease_s = request.lease_seconds if request.lease_seconds > 0 else DEFAULT_LEASE_S
            events = self.worker.generate(
                request.request_id, request.transfer_id, list(request.prompt_token_ids), params, lease_s
            )
            async for event in events:
                if isinstance(event, RequestDelta) and event.finish_reason == "error":
                    # the KV never arrived (lease over, sender gone) or a step failed: the request is lost
                    await context.abort(grpc_code(Failure.KV_LOST), event.error or "decode failed")
                for message in self._to_proto(event):
                    yield message
        except InvalidRequestError as exc:
            await context.abort(grpc_code(Failure.INVALID_REQUEST), str(exc))

    def _to_proto(self, event: Reserved | RequestDelta) -> list[pb.GenerateResponse]:
        if isinstance(event, Reserved):
            reservation = pb.Reservation(
                block_ids=event.block_ids, kv_address=self.kv_address, transports=self.transports,
                worker_id=self.worker.worker_id,
            )
            return [pb.GenerateResponse(reservation=reservation)]
        messages = []
        if event.token_ids:
            logprobs = [logprobs_to_proto(lp) for lp in event.logprobs]
            messages.append(pb.GenerateResponse(tokens=pb.TokenDelta(token_ids=event.token_ids, logprobs=logprobs)))
        if event.finish_reason is not None:
            finished = pb.Finished(finish_reason=event.finish_reason, num_output_tokens=event.num_output_tokens)
            if isinstance(event.stop_reason, int):
                finished.stop_token_id = event.stop_reason
            messages.append(pb.GenerateResponse(finished=finished))
        return messages

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        return pb.AbortResponse(found=await self.worker.abort(request.request_id))

    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.WorkerStatus:
        return await worker_status(self.worker, "decode", self.model_name, context, kv_transports=",".join(self.transports))


async def start_server(
    worker: DecodeWorker, model_name: str, host: str = "127.0.0.1", port: int = 0, kv_transport: str = AUTO,
    advertise_host: str | None = None,
) -> tuple[grpc.aio.Server, int, KVTransferServicer]:
    """Starts the gRPC server (decode + KV transfer); returns it, its bound port and the KV servicer
    (close it after the server stops)."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    bound = server.add_insecure_port(f"{host}:{port}")
    address = advertise_host or host
    transports = accepts(kv_transport, worker.core.runner.device)
    pb_grpc.add_DecodeWorkerServicer_to_server(DecodeServicer(worker, model_name, f"{address}:{bound}", transports), server)
    kv_servicer = KVTransferServicer(worker.receiver, Endpoint.here(worker.core.runner.device, address), transports)
    add_kv_transfer_service(server, kv_servicer)
    await server.start()
    return server, bound, kv_servicer
