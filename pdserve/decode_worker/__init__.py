"""The decode worker: reserves KV blocks for prompts, receives their KV from prefill workers and
generates the rest of each response with continuous batching over its paged KV cache."""
