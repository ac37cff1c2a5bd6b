"""The prefill worker's gRPC edge: protobuf in, plain Python calls on `PrefillWorker`, protobuf or
a gRPC status out."""
from __future__ import annotations

import asyncio

import grpc

from engine.sampling_params import InvalidRequestError
from kvtransfer import KVLayoutMismatchError, KVTransferError, NoCommonTransportError
from prefill_worker.worker import KVTarget, PrefillWorker
from proto import GRPC_OPTIONS
from proto import pdserve_pb2 as pb
from proto import pdserve_pb2_grpc as pb_grpc
from proto.convert import logprobs_to_proto, params_from_proto, worker_status
from proto.failures import Failure, grpc_code


class PrefillServicer(pb_grpc.PrefillWorkerServicer):
    def __init__(self, worker: PrefillWorker, model_name: str) -> None:
        self.worker = worker
        self.model_name = model_name
        self._tasks: dict[str, asyncio.Task] = {}

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext) -> pb.PrefillResponse:
        target = KVTarget(request.target.kv_address, request.target.worker_id)
        self._tasks[request.request_id] = asyncio.current_task()
        try:
            params = params_from_proto(request.params)
            result = await self.worker.prefill(
                request.request_id, request.transfer_id, list(request.prompt_token_ids), params, target
            )
        except InvalidRequestError as exc:
            await context.abort(grpc_code(Failure.INVALID_REQUEST), str(exc))
        except (KVLayoutMismatchError, NoCommonTransportError) as exc:
            await context.abort(grpc_code(Failure.INCOMPATIBLE), f"decode worker at {target.address}: {exc}")
        except KVTransferError as exc:
            # The peer refused the push (e.g. NOT_FOUND: its reservation expired) or could not be reached.
            failure = Failure.KV_LOST if exc.code in ("NOT_FOUND", "INVALID_ARGUMENT") else Failure.UNAVAILABLE
            await context.abort(grpc_code(failure), f"KV transfer to {target.address} failed: {exc}")
        finally:
            self._tasks.pop(request.request_id, None)
        response = pb.PrefillResponse(
            first_token_id=result.first_token_id,
            num_cached_tokens=result.num_cached_tokens,
            kv_bytes=result.kv_bytes,
            kv_seconds=result.kv_seconds,
            kv_transport=result.kv_transport,
        )
        if result.first_logprobs is not None:
            response.first_logprobs.CopyFrom(logprobs_to_proto(result.first_logprobs))
        return response

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        task = self._tasks.get(request.request_id)
        if task is not None:
            task.cancel()
        return pb.AbortResponse(found=task is not None)

    async def GetStatus(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.WorkerStatus:
        return await worker_status(self.worker, "prefill", self.model_name, context)


async def start_server(worker: PrefillWorker, model_name: str, host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Starts the gRPC server; returns it and the port it is bound to."""
    server = grpc.aio.server(options=GRPC_OPTIONS)
    pb_grpc.add_PrefillWorkerServicer_to_server(PrefillServicer(worker, model_name), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound
