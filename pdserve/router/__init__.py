"""The OpenAI-compatible HTTP gateway (`create_app` in `router/app.py`) over a `Backend` that
produces tokens: one colocated engine or disaggregated prefill/decode workers."""
