"""Conversions between the wire messages and the engine's plain types, used at the edges (the
servers and the gateway's gRPC client) so schedulers and the engine never see protobuf."""
from __future__ import annotations

import grpc

from engine.outputs import TokenLogprobs
from engine.sampling_params import SamplingParams
from proto import pdserve_pb2 as pb


def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        min_tokens=params.min_tokens,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.max_tokens is not None:
        msg.max_tokens = params.max_tokens
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Raises InvalidRequestError for out-of-range fields (stop strings stay at the gateway)."""
    return SamplingParams(
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k,
        min_p=msg.min_p,
        seed=msg.seed if msg.HasField("seed") else None,
        max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
        min_tokens=msg.min_tokens,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs if msg.HasField("logprobs") else None,
    )


def logprobs_to_proto(lp: TokenLogprobs) -> pb.TokenLogprobs:
    return pb.TokenLogprobs(
        token_id=lp.token_id,
        logprob=lp.logprob,
        rank=lp.rank,
        top_token_ids=[t for t, _ in lp.top],
        top_logprobs=[v for _, v in lp.top],
    )


def logprobs_from_proto(msg: pb.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(msg.token_id, msg.logprob, msg.rank, tuple(zip(msg.top_token_ids, msg.top_logprobs)))


async def worker_status(worker: object, role: str, model_name: str, context: object, **extra: object) -> pb.WorkerStatus:
    """A worker's `GetStatus` answer, or UNAVAILABLE once its engine loop or device has failed (the
    gateway's poll then marks it unhealthy and stops routing to it). `worker` has `worker_id`,
    `core`, `is_healthy`, `is_draining` and `status()`."""
    if not worker.is_healthy:
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine loop or the device has failed")
    return pb.WorkerStatus(
        worker_id=worker.worker_id,
        role=role,
        model=model_name,
        max_model_len=worker.core.max_model_len,
        block_size=worker.core.config.block_size,
        is_draining=worker.is_draining,
        **worker.status(),
        **extra,
    )
