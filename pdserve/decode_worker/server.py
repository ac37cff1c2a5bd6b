"""The decode worker's gRPC edge: the DecodeWorker service and the KV hand-off's KVTransfer service
on one server; protobuf is converted to plain calls on `DecodeWorker` here. Every call is
authenticated and size-limited before it gets here."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from pdserve.decode_worker.admission import DecodeQueueFullError
from pdserve.decode_worker.worker import DecodeWorker, Reserved
from pdserve.engine.outputs import RequestDelta
from pdserve.engine.sampling_params import MAX_N, InvalidRequestError
from pdserve.kvtransfer import AUTO, Endpoint, accepts
from pdserve.kvtransfer.control import KVTransferServicer, add_kv_transfer_service
from pdserve.kvtransfer.grpc_transport import max_chunk_message_bytes
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.auth import ServerAuth, caller_of
from pdserve.proto.cluster_secret import ClusterSecret
from pdserve.proto.convert import logprobs_to_proto, params_from_proto, worker_status
from pdserve.proto.failures import Failure, grpc_code, param_metadata
from pdserve.proto.limits import MessageLimitInterceptor, MessageLimits, commit_message_bytes, prompt_message_bytes

DEFAULT_LEASE_S = 30.0


class DecodeServicer(pb_grpc.DecodeWorkerServicer):
    def __init__(
        self, worker: DecodeWorker, model_name: str, kv_address: str, transports: list[str], secret: ClusterSecret
    ) -> None:
        self.worker = worker
        self.model_name = model_name
        self.kv_address = kv_address
        self.transports = transports
        self.secret = secret
        self._callers: dict[str, str] = {}  # request_id -> the caller whose Generate call it is

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        if request.request_id in self._callers:
            await context.abort(grpc_code(Failure.INVALID_REQUEST), f"request {request.request_id} is already running here")
        caller = self._callers[request.request_id] = caller_of(context)
        try:
            params = params_from_proto(request.params)
            lease_s = request.lease_seconds if request.lease_seconds != 0 else DEFAULT_LEASE_S  # 0: unset
            events = self.worker.generate(
                request.request_id, request.transfer_id, list(request.prompt_token_ids), params, lease_s, caller
            )
            async for event in events:
                if isinstance(event, RequestDelta) and event.finish_reason == "error":
                    # the KV never arrived (lease over, sender gone) or a step failed: the request is lost
                    await context.abort(grpc_code(Failure.KV_LOST), event.error or "decode failed")
                for message in self._to_proto(event):
                    yield message
        except InvalidRequestError as exc:
            await context.abort(grpc_code(Failure.INVALID_REQUEST), str(exc), param_metadata(exc.param))
        except DecodeQueueFullError as exc:
            await context.abort(grpc_code(Failure.OVERLOADED), str(exc))
        finally:
            del self._callers[request.request_id]

    def _to_proto(self, event: Reserved | RequestDelta) -> list[pb.GenerateResponse]:
        if isinstance(event, Reserved):
            reservation = pb.Reservation(
                block_ids=event.block_ids,
                kv_address=self.kv_address,
                transports=self.transports,
                worker_id=self.worker.worker_id,
            )
            return [pb.GenerateResponse(reservation=reservation)]
        messages = []
        if event.token_ids:
            logprobs = [logprobs_to_proto(lp) for lp in event.logprobs]
            messages.append(
                pb.GenerateResponse(tokens=pb.TokenDelta(token_ids=event.token_ids, logprobs=logprobs, index=event.index))
            )
        if event.finish_reason is not None:
            finished = pb.Finished(
                finish_reason=event.finish_reason, num_output_tokens=event.num_output_tokens, index=event.index
            )
            if isinstance(event.stop_reason, int):
                finished.stop_token_id = event.stop_reason
            messages.append(pb.GenerateResponse(finished=finished))
        return messages

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        """Only the caller whose Generate call it is may abort a request; to others it is not found."""
        if self._callers.get(request.request_id) != caller_of(context):
            return pb.AbortResponse(found=False)
        return pb.AbortResponse(found=await self.worker.abort(request.request_id))

    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.WorkerStatus:
        return await worker_status(
            self.worker, "decode", self.model_name, request, context, self.secret, kv_transports=",".join(self.transports)
        )


async def start_server(
    worker: DecodeWorker,
    model_name: str,
    secret: ClusterSecret,
    host: str = "127.0.0.1",
    port: int = 0,
    kv_transport: str = AUTO,
    advertise_host: str | None = None,
) -> tuple[grpc.aio.Server, int, KVTransferServicer]:
    """Starts the gRPC server (decode + KV transfer; calls signed with `secret` only); returns it,
    its bound port and the KV servicer (close it after the server stops)."""
    limits = MessageLimits(
        {
            "/pdserve.DecodeWorker/Generate": prompt_message_bytes(worker.core.max_model_len),
            "/pdserve.KVTransfer/PushKV": max_chunk_message_bytes(worker.receiver.layout),
            "/pdserve.KVTransfer/Commit": commit_message_bytes(MAX_N, worker.core.max_logprobs),
        }
    )
    server = grpc.aio.server(options=limits.server_options(), interceptors=[ServerAuth(secret), MessageLimitInterceptor(limits)])
    bound = server.add_insecure_port(f"{host}:{port}")
    address = advertise_host or host
    transports = accepts(kv_transport, worker.core.runner.device)
    decode_servicer = DecodeServicer(worker, model_name, f"{address}:{bound}", transports, secret)
    pb_grpc.add_DecodeWorkerServicer_to_server(decode_servicer, server)
    endpoint = Endpoint.here(worker.core.runner.device, address)
    kv_servicer = KVTransferServicer(worker.receiver, endpoint, transports, secret, on_begin=worker.on_begin)
    add_kv_transfer_service(server, kv_servicer)
    await server.start()
    return server, bound, kv_servicer
