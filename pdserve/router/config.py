"""`GatewayConfig`: what the HTTP gateway is told at start (`pdserve serve` flags): API keys,
input limits, admission bounds, drain time, the requests' deadlines, the tool-call parser, the
Responses API's store, and how it listens (CORS, TLS, a proxy's root path).
Built once, never mutated."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from pdserve.proto.deadlines import Deadlines
from pdserve.router.tools import ToolOptions

DEFAULT_MAX_REQUEST_BODY_BYTES = 8 * 2**20  # a full 128K-token prompt as text or as token ids fits many times
DEFAULT_RESPONSES_STORE_MAX_BYTES = 256 * 2**20


@dataclass(frozen=True)
class CorsOptions:
    """Cross-origin requests from browsers (vLLM's --allowed-origins, --allowed-methods,
    --allowed-headers, --allow-credentials): the CORS headers sent, preflights answered."""

    allowed_origins: tuple[str, ...]  # "*": any
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False


@dataclass(frozen=True)
class TLSOptions:
    """HTTPS (vLLM's --ssl-keyfile, --ssl-certfile, --ssl-ca-certs, --ssl-cert-reqs), as uvicorn takes it."""

    keyfile: str
    certfile: str
    ca_certs: str | None = None  # client certificates are checked against these (with cert_reqs > 0)
    cert_reqs: int = 0  # ssl.CERT_NONE (0), CERT_OPTIONAL (1) or CERT_REQUIRED (2)

    def __post_init__(self) -> None:
        if self.cert_reqs not in (0, 1, 2):
            raise ValueError(f"ssl_cert_reqs must be 0, 1 or 2 (none, optional, required), got {self.cert_reqs}")
        if self.cert_reqs and not self.ca_certs:
            raise ValueError("ssl_cert_reqs > 0 checks client certificates: it needs ssl_ca_certs")


@dataclass(frozen=True)
class GatewayConfig:
    deadlines: Deadlines = field(default_factory=Deadlines)
    api_keys: tuple[str, ...] = ()  # empty: /v1 is open
    protect_metrics: bool = False  # /metrics and /health need a key too
    max_num_queued_reqs: int = 256  # admitted requests without a first token yet, per gateway
    max_num_queued_tokens: int = 262144  # and their prompt tokens
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    request_read_timeout_s: float = 30.0  # a client's request headers, and then its body, must arrive within this
    shutdown_timeout_s: float = 30.0  # SIGTERM: in-flight requests may finish within this, then are ended
    tool_options: ToolOptions = field(default_factory=ToolOptions)  # parsing tool calls out of replies
    responses_store_max_entries: int = 10_000  # stored /v1/responses in memory; 0: none stored
    responses_store_max_bytes: int = DEFAULT_RESPONSES_STORE_MAX_BYTES  # their JSON in memory; in Redis, one's at most
    responses_store_ttl_s: float = 3600.0  # a stored response is forgotten this long after it was written
    responses_store_redis_url: str | None = None  # the store in this Redis, shared by the gateways; None: in memory
    model_aliases: tuple[str, ...] = ()  # other names requests may give the served model (--served-model-name's)
    model_root: str | None = None  # --model as given (a path or Hub id): /v1/models' `root`, as vLLM's; None: the name
    # requests' defaults for the sampling fields they leave out (temperature, top_p, top_k, min_p,
    # repetition_penalty, max_tokens): the checkpoint's generation_config.json, as vLLM applies it
    sampling_defaults: Mapping[str, float] = field(default_factory=dict)
    # logprobs name tokens "token_id:N" unless a request says otherwise (vLLM's --return-tokens-as-token-ids)
    return_tokens_as_token_ids: bool = False
    chat_template: str | None = None  # --chat-template: rendered instead of the checkpoint's
    cors: CorsOptions | None = None  # None: no CORS headers (a browser page of another origin cannot read replies)
    tls: TLSOptions | None = None  # None: plain HTTP
    root_path: str = ""  # the path prefix a proxy serves the gateway under (ASGI root_path; vLLM's --root-path)

    def __post_init__(self) -> None:
        if any(not key for key in self.api_keys):
            raise ValueError("an API key must not be empty")
        for name in ("max_num_queued_reqs", "max_num_queued_tokens", "max_request_body_bytes", "responses_store_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.request_read_timeout_s > 0:
            raise ValueError(f"request_read_timeout_s must be positive, got {self.request_read_timeout_s}")
        if self.responses_store_max_entries < 0:
            raise ValueError(f"responses_store_max_entries must be >= 0, got {self.responses_store_max_entries}")
        if self.responses_store_redis_url is not None:
            from pdserve.router.registry import check_redis_url

            check_redis_url(self.responses_store_redis_url, "--responses-store-redis-url")
        if not 0 < self.responses_store_ttl_s < math.inf:
            raise ValueError(f"responses_store_ttl_s must be positive and finite, got {self.responses_store_ttl_s}")
        if not self.shutdown_timeout_s >= 0:
            raise ValueError(f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
