"""The prefill worker's gRPC edge: protobuf in, plain Python calls on `PrefillWorker`, protobuf or
a gRPC status out. Every call is authenticated and size-limited before it gets here."""

from __future__ import annotations

import asyncio
import re

import grpc

from pdserve.engine.sampling_params import InvalidRequestError
from pdserve.kvtransfer import KVLayoutMismatchError, KVTransferError, NoCommonTransportError, UnprovenPeerError
from pdserve.prefill_worker.worker import KVTarget, PrefillWorker
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto import pdserve_pb2_grpc as pb_grpc
from pdserve.proto.auth import ServerAuth, caller_of
from pdserve.proto.cluster_secret import ClusterSecret
from pdserve.proto.convert import logprobs_to_proto, params_from_proto, worker_status
from pdserve.proto.failures import Failure, grpc_code, param_metadata
from pdserve.proto.limits import MessageLimitInterceptor, MessageLimits, prompt_message_bytes

ABORTED = "aborted by an Abort call"
_ADDRESS = re.compile(r"[A-Za-z0-9.\-]{1,253}:\d{1,5}|\[[0-9A-Fa-f:.]{2,45}\]:\d{1,5}")  # host:port, [v6]:port


class PrefillServicer(pb_grpc.PrefillWorkerServicer):
    def __init__(self, worker: PrefillWorker, model_name: str, secret: ClusterSecret) -> None:
        self.worker = worker
        self.model_name = model_name
        self.secret = secret
        self._tasks: dict[str, tuple[str, asyncio.Task]] = {}  # request_id -> (its caller, its task)

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        target = KVTarget(request.target.kv_address, request.target.worker_id)
        if not _ADDRESS.fullmatch(target.address):
            await context.abort(
                grpc_code(Failure.INVALID_REQUEST), f"target.kv_address {target.address[:300]!r} is not host:port"
            )
        if request.request_id in self._tasks:
            await context.abort(grpc_code(Failure.INVALID_REQUEST), f"request {request.request_id} is already being prefilled")
        self._tasks[request.request_id] = (caller_of(context), asyncio.current_task())
        try:
            params = params_from_proto(request.params)
            result = await self.worker.prefill(
                request.request_id, request.transfer_id, list(request.prompt_token_ids), params, target
            )
        except InvalidRequestError as exc:
            await context.abort(grpc_code(Failure.INVALID_REQUEST), str(exc), param_metadata(exc.param))
        except (KVLayoutMismatchError, NoCommonTransportError, UnprovenPeerError) as exc:
            await context.abort(grpc_code(Failure.INCOMPATIBLE), f"decode worker at {target.address}: {exc}")
        except KVTransferError as exc:
            # The peer refused the push (e.g. NOT_FOUND: its reservation expired) or could not be reached.
            failure = Failure.KV_LOST if exc.code in ("NOT_FOUND", "INVALID_ARGUMENT") else Failure.UNAVAILABLE
            await context.abort(grpc_code(failure), f"KV transfer to {target.address} failed: {exc}")
        except asyncio.CancelledError as exc:
            if exc.args != (ABORTED,):
                raise  # the caller left: there is no one to answer
            await context.abort(grpc.StatusCode.CANCELLED, f"request {request.request_id} was aborted")
        finally:
            self._tasks.pop(request.request_id, None)
        response = pb.PrefillResponse(
            first_token_id=result.first_token_id,
            num_cached_tokens=result.num_cached_tokens,
            kv_bytes=result.kv_bytes,
            kv_present_blocks=result.kv_present_blocks,
            kv_seconds=result.kv_seconds,
            kv_transport=result.kv_transport,
            prompt_logprobs=[logprobs_to_proto(lp) for lp in result.prompt_logprobs],
            sibling_token_ids=result.sibling_token_ids,
            sibling_logprobs=[logprobs_to_proto(lp) for lp in result.sibling_logprobs],
            queue_seconds=result.queue_seconds,
            prefill_seconds=result.prefill_seconds,
        )
        if result.first_logprobs is not None:
            response.first_logprobs.CopyFrom(logprobs_to_proto(result.first_logprobs))
        return response

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        """Only the caller that started a prefill may abort it; to others it is not found."""
        caller, task = self._tasks.get(request.request_id, ("", None))
        is_found = task is not None and caller == caller_of(context)
        if is_found:
            task.cancel(ABORTED)  # its Prefill call then ends with CANCELLED, not at its deadline
        return pb.AbortResponse(found=is_found)

    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.WorkerStatus:
        return await worker_status(self.worker, "prefill", self.model_name, request, context, self.secret)


async def start_server(
    worker: PrefillWorker, model_name: str, secret: ClusterSecret, host: str = "127.0.0.1", port: int = 0
) -> tuple[grpc.aio.Server, int]:
    """Starts the gRPC server (calls signed with `secret` only); returns it and the port it is bound to."""
    limits = MessageLimits({"/pdserve.PrefillWorker/Prefill": prompt_message_bytes(worker.core.max_model_len)})
    server = grpc.aio.server(options=limits.server_options(), interceptors=[ServerAuth(secret), MessageLimitInterceptor(limits)])
    pb_grpc.add_PrefillWorkerServicer_to_server(PrefillServicer(worker, model_name, secret), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound
