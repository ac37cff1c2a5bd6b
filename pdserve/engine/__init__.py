"""Shared model execution for pdserve: config, model, loader, paged KV cache, scheduler, sampler,
tokenizer, and the offline `LLM` API. Exports are lazy so light users (the router) skip torch."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "pdserve.engine.llm",
    "SamplingParams": "pdserve.engine.sampling_params",
    "RequestOutput": "pdserve.engine.outputs",
    "CompletionOutput": "pdserve.engine.outputs",
    "EngineConfig": "pdserve.engine.config",
    "ModelConfig": "pdserve.engine.config",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
