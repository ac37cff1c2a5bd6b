"""The prefill worker: batches prompts under a token budget (chunked prefill, prefix cache),
samples their first token and ships their KV to a decode worker."""
