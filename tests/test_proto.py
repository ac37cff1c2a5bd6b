"""The wire contract: the generated modules match `pdserve.proto`, and `proto/convert.py` carries
sampling parameters and logprobs across the wire unchanged."""

from __future__ import annotations

import pytest

from pdserve.engine.outputs import TokenLogprobs
from pdserve.engine.sampling_params import InvalidRequestError, SamplingParams, StructuredOutput
from pdserve.proto import pdserve_pb2 as pb
from pdserve.proto.convert import logprobs_from_proto, logprobs_to_proto, params_from_proto, params_to_proto
from pdserve.proto.generate import stale_files


def test_generated_modules_are_not_stale() -> None:
    assert stale_files() == [], "regenerate them: python -m pdserve.proto.generate"


EVERY_FIELD = SamplingParams(
    temperature=0.75,
    top_p=0.5,
    top_k=40,
    min_p=0.125,
    seed=2**40 + 3,
    max_tokens=77,
    min_tokens=5,
    stop_token_ids=(2, 7, 11),
    ignore_eos=True,
    logprobs=4,
    cache_salt="tenant-7",
)


@pytest.mark.parametrize(
    "params",
    [
        EVERY_FIELD,
        SamplingParams(),  # defaults: no seed, no logprobs, max_tokens 16
        SamplingParams(max_tokens=None, seed=0, logprobs=0),  # unset max_tokens; seed and logprobs of zero are set
        SamplingParams(temperature=0.0, top_k=-1, min_p=0.0),  # greedy; zeros that proto3 does not send
        SamplingParams(structured_output=StructuredOutput("json", '{"type": "object"}', True, "[ ]?")),
        SamplingParams(structured_output=StructuredOutput("json_object")),  # empty spec, no whitespace pattern
    ],
    ids=["every-field", "defaults", "unset-max-tokens-zero-seed", "greedy-zeros", "json-schema", "json-object"],
)
def test_sampling_params_round_trip(params: SamplingParams) -> None:
    wire = pb.SamplingParams.FromString(params_to_proto(params).SerializeToString())  # through bytes
    back = params_from_proto(wire)
    assert back == params
    assert wire.HasField("seed") == (params.seed is not None)
    assert wire.HasField("max_tokens") == (params.max_tokens is not None)
    assert wire.HasField("logprobs") == (params.logprobs is not None)


def test_gateway_only_fields_stay_at_the_gateway() -> None:
    """Stop strings and detokenisation options are the gateway's: they never reach a worker."""
    params = SamplingParams(stop=("END",), skip_special_tokens=False, include_stop_str_in_output=True, max_tokens=3)
    back = params_from_proto(params_to_proto(params))
    assert back.stop == () and back.skip_special_tokens and not back.include_stop_str_in_output
    assert back.max_tokens == 3


def test_out_of_range_wire_params_are_refused_naming_the_field() -> None:
    with pytest.raises(InvalidRequestError, match="top_p") as caught:
        params_from_proto(pb.SamplingParams(temperature=1.0, top_p=0.0, top_k=-1))  # proto3 default top_p
    assert caught.value.param == "top_p"
    with pytest.raises(InvalidRequestError, match="logprobs must be >= 0, or -1"):
        params_from_proto(pb.SamplingParams(top_p=1.0, top_k=-1, logprobs=-2))
    assert params_from_proto(pb.SamplingParams(top_p=1.0, top_k=-1, logprobs=-1, prompt_logprobs=-1)).logprobs == -1


@pytest.mark.parametrize(
    "logprobs",
    [
        TokenLogprobs(token_id=42, logprob=-0.25, rank=1, top=((42, -0.25), (7, -1.5), (3, -2.0))),
        TokenLogprobs(token_id=9, logprob=-3.5, rank=4, top=((1, -0.5), (2, -1.0))),  # not among the top
        TokenLogprobs(token_id=0, logprob=0.0, rank=1, top=()),  # logprobs=0: no alternatives
    ],
    ids=["chosen-is-top", "chosen-outside-top", "no-top"],
)
def test_token_logprobs_round_trip(logprobs: TokenLogprobs) -> None:
    wire = pb.TokenLogprobs.FromString(logprobs_to_proto(logprobs).SerializeToString())
    assert logprobs_from_proto(wire) == logprobs  # values chosen exact in float32
