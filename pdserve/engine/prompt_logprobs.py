"""Logprobs of a prompt's own tokens (vLLM's `prompt_logprobs`, what `echo` + `logprobs` return):
each prompt position's hidden state scores the next prompt token. Computed for the positions a
step processes, the LM head run over a few hundred rows at a time (a long prompt's full logits
would not fit)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdserve.engine.outputs import TokenLogprobs
from pdserve.engine.request import Request, ScheduledRequest

ROWS_PER_CHUNK = 256


@dataclass
class PromptTargets:
    rows: list[int]  # rows of the step's hidden states
    targets: list[int]  # the prompt token each row predicts
    owners: list[tuple[Request, int]]  # (request, its number of rows), in row order


def prompt_targets(batch: list[ScheduledRequest]) -> PromptTargets | None:
    """The rows of this step whose next token is a prompt token still without its logprob."""
    rows, targets, owners = [], [], []
    offset = 0
    for item in batch:
        request = item.request
        start = request.num_computed_tokens
        if request.params.prompt_logprobs is not None:
            first = max(start, len(request.prompt_logprobs) - 1, 0)  # positions done before a preemption are kept
            last = min(start + item.num_tokens, request.num_prompt_tokens - 1)  # the last prompt position predicts output
            positions = range(first, last)
            rows += [offset + p - start for p in positions]
            targets += [request.prompt_token_ids[p + 1] for p in positions]
            if positions:
                owners.append((request, len(positions)))
        offset += item.num_tokens
    return PromptTargets(rows, targets, owners) if rows else None


def compute_prompt_logprobs(
    model: torch.nn.Module, hidden: torch.Tensor, prompt: PromptTargets
) -> dict[int, list[TokenLogprobs]]:
    """id(request) -> the logprobs of its prompt tokens this step predicted, in order."""
    device = hidden.device
    rows = torch.tensor(prompt.rows, device=device)
    targets = torch.tensor(prompt.targets, device=device)
    num_top = max(request.params.prompt_logprobs for request, _ in prompt.owners)
    chosen, ranks, top_values, top_ids = [], [], [], []
    for start in range(0, len(prompt.rows), ROWS_PER_CHUNK):
        logprobs = torch.log_softmax(model.compute_logits(hidden[rows[start : start + ROWS_PER_CHUNK]]), dim=-1)
        target = targets[start : start + ROWS_PER_CHUNK, None]
        value = logprobs.gather(1, target)
        chosen.append(value.squeeze(1))
        ranks.append((logprobs > value).sum(dim=-1) + 1)
        values, ids = logprobs.topk(num_top, dim=-1) if num_top else (logprobs[:, :0], target[:, :0])
        top_values.append(values)
        top_ids.append(ids)
    chosen_list, rank_list = torch.cat(chosen).tolist(), torch.cat(ranks).tolist()
    top_value_list, top_id_list = torch.cat(top_values).tolist(), torch.cat(top_ids).tolist()
    out: dict[int, list[TokenLogprobs]] = {}
    index = 0
    for request, count in prompt.owners:
        n = request.params.prompt_logprobs
        out[id(request)] = [
            TokenLogprobs(prompt.targets[i], chosen_list[i], rank_list[i], tuple(zip(top_id_list[i][:n], top_value_list[i][:n])))
            for i in range(index, index + count)
        ]
        index += count
    return out
