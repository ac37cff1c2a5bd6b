"""The Responses API's request (`ResponsesRequest`) and its meaning as a chat request: the
`instructions` and the conversation's items as chat messages, the flat function tools, `text.format`
as `response_format`; what pdserve cannot honour (background responses, stored prompts and
conversations) is refused with a 400 naming the field."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from pdserve.engine.sampling_params import ALL_LOGPROBS
from pdserve.router.errors import APIError
from pdserve.router.protocol import ChatCompletionRequest, SamplingFields

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
TEXT_PARTS = ("input_text", "output_text", "text")
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# OpenAI's `include` values: the others name output this server never makes (reasoning, images,
# built-in tools' results), so asking for them adds nothing, as on vLLM
INCLUDABLE = frozenset({
    LOGPROBS_INCLUDE, "reasoning.encrypted_content", "message.input_image.image_url", "file_search_call.results",
    "web_search_call.results", "web_search_call.action.sources", "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
})  # fmt: skip
# a chat field's name in this API, for the errors the chat path raises
PARAMS = {"messages": "input", "max_completion_tokens": "max_output_tokens", "max_tokens": "max_output_tokens",
          "response_format": "text.format", "logprobs": "include"}  # fmt: skip


class ResponsesRequest(SamplingFields):
    """OpenAI's fields, and the sampling fields chat takes (vLLM's extras too); what pdserve cannot honour is refused."""

    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    include: list[str] | None = None
    store: bool | None = None  # default true: kept in the response store (unless the server has none)
    previous_response_id: str | None = None  # a stored response this one continues
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    truncation: str | None = None
    max_tool_calls: int | None = Field(None, ge=1)
    metadata: dict[str, str] | None = None
    prompt: dict[str, Any] | None = None  # a stored prompt template: refused
    conversation: str | dict[str, Any] | None = None  # server-side state: refused

    def check_supported(self) -> None:
        for field, what in (("prompt", "stored prompt templates"), ("conversation", "stored conversations")):
            if getattr(self, field) is not None:
                raise APIError(
                    400, f"{field} is not supported: this server has no {what} (send the conversation in `input`)", field
                )
        if self.background:
            raise APIError(400, "background responses are not supported", "background")
        if self.truncation not in (None, "disabled"):
            raise APIError(400, f'truncation "{self.truncation}" is not supported (only "disabled")', "truncation")
        if self.reasoning is not None and any(v is not None for v in self.reasoning.values()):
            raise APIError(400, "reasoning options are not supported", "reasoning")
        unknown = [item for item in self.include or [] if item not in INCLUDABLE]
        if unknown:
            raise APIError(400, f'include: "{unknown[0]}" is not one of {", ".join(sorted(INCLUDABLE))}', "include")
        # -1 asks for the whole vocabulary; the limit: --max-logprobs (Serving.check_logprobs)
        if self.top_logprobs is not None and self.top_logprobs < ALL_LOGPROBS:
            message = f"top_logprobs must be >= 0, or -1 for the whole vocabulary; got {self.top_logprobs}"
            raise APIError(400, message, "top_logprobs")
        if self.max_output_tokens is not None and self.max_output_tokens < 1:
            raise APIError(400, f"max_output_tokens must be at least 1, got {self.max_output_tokens}", "max_output_tokens")

    @property
    def wants_logprobs(self) -> bool:
        return LOGPROBS_INCLUDE in (self.include or [])

    @property
    def max_calls(self) -> int | None:
        """The function calls a reply may make: one without parallel calls, at most max_tool_calls."""
        limits = [n for n in (1 if self.parallel_tool_calls is False else None, self.max_tool_calls) if n is not None]
        return min(limits, default=None)

    def chat_request(self, items: list[dict[str, Any]]) -> ChatCompletionRequest:
        """The same request as a chat completion over `items`, the whole conversation (`input`, after
        the previous response's, if any; pydantic's complaints as a 400 naming `input`)."""
        try:
            return ChatCompletionRequest(
                **self.sampling_fields(),
                messages=chat_messages(self.instructions, items),  # dicts: validated as ChatMessage here
                max_completion_tokens=self.max_output_tokens,
                logprobs=self.wants_logprobs,
                top_logprobs=(self.top_logprobs or 0) if self.wants_logprobs else None,
                tools=chat_tools(self.tools),
                tool_choice=chat_tool_choice(self.tool_choice),
                response_format=response_format(self.text),
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise APIError(400, f"{where}: {str(first['msg']).removeprefix('Value error, ')}", "input") from None


def chat_messages(instructions: str | None, items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as chat messages: `instructions` as the system turn, then the input items
    in order (a function call joins the assistant turn before it, if there is one)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not items:
        raise APIError(400, "input is empty", "input")
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if not isinstance(role, str) or role not in ROLES:
                raise APIError(400, f"input[{i}].role must be one of {', '.join(ROLES)}, got {role!r}", "input")
            content = _text(item.get("content"), f"input[{i}].content")
            if role == "assistant" and messages and messages[-1]["role"] == "assistant" and messages[-1]["content"] is None:
                messages[-1]["content"] = content  # the text of the turn whose function calls came first
            else:
                messages.append({"role": ROLES[role], "content": content})
        elif kind == "function_call":
            call = {
                "id": _field(item, "call_id", i),
                "type": "function",
                "function": {"name": _field(item, "name", i), "arguments": _field(item, "arguments", i)},
            }
            if not messages or messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": None})
            messages[-1].setdefault("tool_calls", []).append(call)
        elif kind == "reasoning":
            continue  # an earlier turn's thinking, sent back with its output: templates leave it out, so does this
        elif kind == "function_call_output":
            output = _text(item.get("output"), f"input[{i}].output")
            messages.append({"role": "tool", "content": output, "tool_call_id": _field(item, "call_id", i)})
        else:
            raise APIError(
                400,
                f"input[{i}]: items of type {kind!r} are not supported (message, function_call, function_call_output, reasoning)",
                "input",
            )
    return messages


def _field(item: dict[str, Any], name: str, i: int) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise APIError(400, f"input[{i}].{name} must be a string", "input")
    return value


def _text(content: object, where: str) -> str:
    """A message's text: a string, or its text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [_part_text(part) for part in content]
        if all(isinstance(text, str) for text in texts):
            return "\n".join(texts)  # type: ignore[arg-type]
    raise APIError(400, f"{where}: only text content is supported (a string, or input_text / output_text parts)", "input")


def _part_text(part: object) -> str | None:
    if not isinstance(part, dict):
        return None
    if part.get("type") == "refusal":  # an earlier assistant turn's, fed back
        return part.get("refusal")
    return part.get("text") if part.get("type") in TEXT_PARTS else None


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Function tools in the chat API's shape (the Responses API's are flat)."""
    if tools is None:
        return None
    converted = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise APIError(400, f"tools[{i}]: only function tools are supported, got type {tool.get('type')!r}", "tools")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise APIError(
                400, 'tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}', "tool_choice"
            )
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` as chat's `response_format`."""
    fmt = (text or {}).get("format")
    if fmt is not None and not isinstance(fmt, dict):
        raise APIError(400, 'text.format must be an object, e.g. {"type": "json_object"}', "text.format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema":
        schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}
    raise APIError(400, f"text.format type {fmt.get('type')!r} is not supported (text, json_object, json_schema)", "text.format")
