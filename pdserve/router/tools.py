"""What a chat request's `tools` and `tool_choice` ask for, checked as vLLM checks them: the tools
the chat template renders, how the reply is read (`ToolMode`), and the JSON schema that forces a
named function's arguments or, for "required", an array of calls (vLLM's schemas)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pdserve.engine.sampling_params import StructuredOutput
from pdserve.router.errors import APIError
from pdserve.router.reasoning import PARSERS as REASONING_PARSERS

NAMED_CHOICE_USAGE = 'use {"type": "function", "function": {"name": "my_function"}}'


@dataclass(frozen=True)
class ToolOptions:
    """How replies are read: `--enable-auto-tool-choice --tool-call-parser NAME --reasoning-parser NAME`."""

    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None  # a name in `router.tool_parsers.PARSERS`
    reasoning_parser: str | None = None  # a name in `router.reasoning.PARSERS`

    def __post_init__(self) -> None:
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"--reasoning-parser must be one of {', '.join(REASONING_PARSERS)}, got {self.reasoning_parser}")


@dataclass(frozen=True)
class ToolMode:
    """How the reply is read: "none" (text), "auto" (the server's parser finds calls in it),
    "named" (the reply is `function`'s arguments) or "required" (a JSON array of calls)."""

    kind: str
    function: str | None = None


def tool_mode(
    tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None, options: ToolOptions
) -> ToolMode | None:
    """None when the request has no tools; raises APIError(400) as vLLM does."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"  # OpenAI's default
    if tools is None:
        if tool_choice != "none":
            raise APIError(400, "When using `tool_choice`, `tools` must be set.", "tool_choice")
        return None
    check_tools(tools)
    if tool_choice == "none" or (tool_choice == "required" and not tools):  # OpenAI: nothing to require
        return ToolMode("none")
    if tool_choice == "auto":
        if not options.enable_auto_tool_choice:
            raise APIError(
                400, '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set', "tool_choice"
            )
        return ToolMode("auto")
    if tool_choice == "required":
        return ToolMode("required")
    return ToolMode("named", _named_function(tool_choice, tools))


def check_tools(tools: list[dict[str, Any]]) -> None:
    for i, tool in enumerate(tools):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict):
            raise APIError(400, f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', "tools")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise APIError(400, f"tools[{i}].function.name must be a non-empty string", "tools")
        if not isinstance(function.get("parameters", {}), dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON schema object", "tools")


def _named_function(tool_choice: str | dict[str, Any], tools: list[dict[str, Any]]) -> str:
    if not isinstance(tool_choice, dict):
        raise APIError(
            400,
            f'Invalid value for `tool_choice`: {tool_choice!r}; only named tools, "none", "auto" or "required" are supported',
            "tool_choice",
        )
    function = tool_choice.get("function")
    if tool_choice.get("type", "function") != "function" or not isinstance(function, dict):
        raise APIError(400, f"Invalid `tool_choice`: {NAMED_CHOICE_USAGE}", "tool_choice")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise APIError(400, f"`tool_choice` needs function.name: {NAMED_CHOICE_USAGE}", "tool_choice")
    if name not in {tool["function"]["name"] for tool in tools}:
        raise APIError(
            400, f"The tool {name!r} specified in `tool_choice` does not match any of the specified `tools`", "tool_choice"
        )
    return name


def forced_call_schema(mode: ToolMode, tools: list[dict[str, Any]]) -> StructuredOutput | None:
    """The JSON schema a named or required tool choice constrains the reply to (as vLLM builds it)."""
    if mode.kind == "named":
        function = next(t["function"] for t in tools if t["function"]["name"] == mode.function)
        return StructuredOutput("json", json.dumps(_parameters(function), ensure_ascii=False))
    if mode.kind == "required":
        return StructuredOutput("json", json.dumps(_required_schema(tools), ensure_ascii=False))
    return None


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    """A function without parameters is called with `{}`."""
    return function.get("parameters") or {"type": "object", "properties": {}}


def _required_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """A non-empty array of {"name", "parameters"} objects (nothing else), one alternative per tool;
    the tools' `$defs` move to the top so their `$ref`s still resolve."""
    alternatives: list[dict[str, Any]] = []
    definitions: dict[str, Any] = {}
    for tool in tools:
        function = tool["function"]
        parameters = dict(_parameters(function))
        for name, schema in parameters.pop("$defs", {}).items():
            if definitions.get(name, schema) != schema:
                raise APIError(400, f"tools define $defs/{name} differently; rename one", "tools")
            definitions[name] = schema
        alternatives.append(
            {
                "properties": {"name": {"type": "string", "enum": [function["name"]]}, "parameters": parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,  # vLLM leaves this out: keys no parser reads, and a reply that may not end
            }
        )
    schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": alternatives}}
    if definitions:
        schema["$defs"] = definitions
    return schema
