"""The structured-output fields of a request, as vLLM's OpenAI server takes them, turned into one
`StructuredOutput`: OpenAI's `response_format` (json_object, json_schema), vLLM's `guided_json`,
`guided_regex`, `guided_choice`, `guided_grammar` and its newer `structured_outputs` object. More
than one, an unknown form, or a spec that does not compile is a 400 naming the field."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from pdserve.engine.sampling_params import StructuredOutput
from pdserve.engine.structured_output import check
from pdserve.router.errors import APIError

if TYPE_CHECKING:
    from pdserve.router.protocol import GenerationRequest

# vLLM's name for llguidance is "guidance"; asking for another backend is refused, as vLLM does.
BACKENDS = (None, "auto", "guidance", "llguidance")


class StructuredOutputsParams(BaseModel):
    """vLLM's `structured_outputs` request field."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: str | dict[str, Any] | None = Field(None, alias="json")  # `json` would shadow BaseModel.json
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | None = None
    disable_fallback: bool = False  # nothing to fall back to: one backend
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None


def structured_output_of(request: GenerationRequest, forced: StructuredOutput | None = None) -> StructuredOutput | None:
    """The request's one constraint (None: unconstrained); raises APIError(400). `forced`: the
    grammar of a forced tool call (chat), which excludes the other forms."""
    found = [(param, spec) for param, spec in _candidates(request) if spec is not None]
    if forced is not None:
        if found:
            raise APIError(
                400,
                "a named or required tool_choice cannot be combined with response_format, guided_* or structured_outputs",
                "tool_choice",
            )
        found = [("tools", forced)]
    if len(found) > 1:
        names = ", ".join(param for param, _ in found)
        raise APIError(400, f"only one kind of structured output per request is supported, got {names}", found[1][0])
    if request.guided_decoding_backend not in BACKENDS:
        raise APIError(
            400,
            f"structured output backend {request.guided_decoding_backend!r} is not available: this "
            'server uses llguidance ("guidance"); leave guided_decoding_backend out',
            "guided_decoding_backend",
        )
    if not found:
        return None
    param, spec = found[0]
    options = request.structured_outputs or StructuredOutputsParams()
    pattern = options.whitespace_pattern or request.guided_whitespace_pattern
    spec = StructuredOutput(spec.kind, spec.spec, options.disable_any_whitespace, pattern)
    check(spec, param)  # InvalidRequestError: a 400 naming the field
    return spec


def _candidates(request: GenerationRequest) -> list[tuple[str, StructuredOutput | None]]:
    choice = request.guided_choice
    return [
        ("response_format", _response_format(request.response_format)),
        ("guided_json", None if request.guided_json is None else json_schema(request.guided_json, "guided_json")),
        ("guided_regex", None if request.guided_regex is None else StructuredOutput("regex", request.guided_regex)),
        ("guided_choice", None if choice is None else StructuredOutput("choice", _choices(choice, "guided_choice"))),
        ("guided_grammar", None if request.guided_grammar is None else StructuredOutput("grammar", request.guided_grammar)),
        ("structured_outputs", None if request.structured_outputs is None else _structured_outputs(request.structured_outputs)),
    ]


def json_schema(schema: object, param: str) -> StructuredOutput:
    """A JSON schema given as an object or as JSON text."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as error:
            raise APIError(400, f"{param} is not valid JSON: {error}", param) from None
    if not isinstance(schema, dict):
        raise APIError(400, f"{param} must be a JSON schema (an object)", param)
    return StructuredOutput("json", json.dumps(schema, ensure_ascii=False))


def _choices(choices: list[str], param: str) -> str:
    if not choices:
        raise APIError(400, f"{param} must list at least one string", param)
    return json.dumps(choices, ensure_ascii=False)


def _response_format(response_format: dict[str, Any] | None) -> StructuredOutput | None:
    """OpenAI's `response_format`: text (no constraint), json_object or json_schema."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind == "json_schema":
        body = response_format.get("json_schema")
        if not isinstance(body, dict) or not isinstance(body.get("schema"), dict):
            raise APIError(400, "response_format json_schema needs json_schema.schema, a JSON schema object", "response_format")
        return json_schema(body["schema"], "response_format")
    if kind == "structural_tag":
        raise APIError(400, "response_format type structural_tag is not supported", "response_format")
    raise APIError(400, f"unknown response_format type {kind!r}: use text, json_object or json_schema", "response_format")


def _structured_outputs(params: StructuredOutputsParams) -> StructuredOutput | None:
    if params.structural_tag is not None:
        raise APIError(400, "structured_outputs.structural_tag is not supported", "structured_outputs")
    if params.disable_additional_properties:
        raise APIError(
            400,
            'structured_outputs.disable_additional_properties is not supported: set "additionalProperties": false in the schema',
            "structured_outputs",
        )
    specs = [
        None if params.json_ is None else json_schema(params.json_, "structured_outputs"),
        None if params.regex is None else StructuredOutput("regex", params.regex),
        None if params.choice is None else StructuredOutput("choice", _choices(params.choice, "structured_outputs")),
        None if params.grammar is None else StructuredOutput("grammar", params.grammar),
        StructuredOutput("json_object") if params.json_object else None,
    ]
    specs = [s for s in specs if s is not None]
    if len(specs) > 1:
        raise APIError(400, "structured_outputs takes one of json, regex, choice, grammar, json_object", "structured_outputs")
    return specs[0] if specs else None
