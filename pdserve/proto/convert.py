"""Conversions between the wire messages and the engine's plain types, used at the edges (the
servers and the gateway's gRPC client) so schedulers and the engine never see protobuf."""

from __future__ import annotations

import dataclasses
from typing import Any

from pdserve.engine.outputs import TokenLogprobs
from pdserve.engine.sampling_params import SamplingParams, StructuredOutput, Thinking
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.auth import STATUS_PROOF, prove
from pdserve.proto.cluster_secret import ClusterSecret
from pdserve.proto.failures import Failure, grpc_code


def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        min_tokens=params.min_tokens,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        cache_salt=params.cache_salt or "",
        priority=params.priority,
    )
    if params.seed is not None:
        msg.seed = params.seed
    if params.max_tokens is not None:
        msg.max_tokens = params.max_tokens
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    if params.prompt_logprobs is not None:
        msg.prompt_logprobs = params.prompt_logprobs
    if params.repetition_penalty != 1.0:
        msg.repetition_penalty = params.repetition_penalty
    msg.presence_penalty, msg.frequency_penalty = params.presence_penalty, params.frequency_penalty
    msg.logit_bias.update(dict(params.logit_bias))
    msg.bad_words.extend(pb.TokenSequence(token_ids=word) for word in params.bad_words_token_ids)
    msg.allowed_token_ids.extend(params.allowed_token_ids)
    if params.structured_output is not None:
        msg.structured_output.CopyFrom(structured_output_to_proto(params.structured_output))
    return msg


def structured_output_to_proto(spec: StructuredOutput) -> pb.StructuredOutput:
    msg = pb.StructuredOutput(kind=spec.kind, spec=spec.spec, disable_any_whitespace=spec.disable_any_whitespace)
    if spec.whitespace_pattern is not None:
        msg.whitespace_pattern = spec.whitespace_pattern
    if spec.thinking is not None:
        msg.thinking.CopyFrom(pb.Thinking(**dataclasses.asdict(spec.thinking)))
    return msg


def structured_output_from_proto(msg: pb.StructuredOutput) -> StructuredOutput:
    pattern = msg.whitespace_pattern if msg.HasField("whitespace_pattern") else None
    thinking = None
    if msg.HasField("thinking"):
        thinking = Thinking(msg.thinking.start_token_id, msg.thinking.end_token_id, msg.thinking.starts_thinking)
    return StructuredOutput(msg.kind, msg.spec, msg.disable_any_whitespace, pattern, thinking)


def params_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    """Raises InvalidRequestError for out-of-range fields (stop strings stay at the gateway)."""
    return SamplingParams(
        n=msg.n or 1,
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
        presence_penalty=msg.presence_penalty,
        frequency_penalty=msg.frequency_penalty,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        logit_bias=dict(msg.logit_bias),
        bad_words_token_ids=tuple(tuple(word.token_ids) for word in msg.bad_words),
        allowed_token_ids=tuple(msg.allowed_token_ids),
        prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        structured_output=structured_output_from_proto(msg.structured_output) if msg.HasField("structured_output") else None,
        cache_salt=msg.cache_salt or None,
        priority=msg.priority,
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


async def worker_status(
    worker: Any,
    role: str,
    model_name: str,
    request: pb.StatusRequest,
    context: Any,
    secret: ClusterSecret,
    **extra: Any,
) -> pb.WorkerStatus:
    """A worker's `GetStatus` answer, signing the caller's nonce (it is one of ours), or UNAVAILABLE
    once its engine loop or device has failed (the gateway's poll then marks it unhealthy and stops
    routing to it). `worker` has `worker_id`, `core`, `is_healthy`, `is_draining` and `status()`."""
    if not worker.is_healthy:
        await context.abort(grpc_code(Failure.UNAVAILABLE), "the engine loop or the device has failed")
    return pb.WorkerStatus(
        worker_id=worker.worker_id,
        proof=prove(secret, STATUS_PROOF, request.nonce, worker.worker_id),
        role=role,
        model=model_name,
        max_model_len=worker.core.max_model_len,
        max_logprobs=worker.core.max_logprobs,
        block_size=worker.core.config.block_size,
        is_draining=worker.is_draining,
        is_prefix_caching=worker.core.config.enable_prefix_caching,
        **worker.status(),
        **extra,
    )
