"""API keys, as vLLM checks them: `Authorization: Bearer <key>` on `/v1/*`, `/tokenize` and
`/detokenize`, and on `/invocations`, which generates as they do (vLLM leaves it to SageMaker's
own authentication); on `/metrics` and `/health` with `protect_metrics`; 401 otherwise. A key's
identity (a hash, never the key) names its tenant, and seeds the prefix-cache salt of its
requests, so that cached prefixes, and `cached_tokens` in usage, are shared only within a tenant."""

from __future__ import annotations

import hashlib
import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from pdserve.proto.failures import Failure
from pdserve.router.errors import APIError

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize", "/invocations")
PROBE_PATHS = ("/metrics", "/health", "/ping")


def route_path(scope: Scope) -> str:
    """The path the app routes on: without the root path a proxy serves it under (`--root-path`:
    uvicorn puts it in front of every request's path, and routing takes it off again)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :]
    return path


def tenant_of(api_key: bytes) -> str:
    return hashlib.sha256(b"pdserve-api-key\0" + api_key).hexdigest()[:32]


def cache_salt_of(tenant: str | None, requested: str | None) -> str | None:
    """The salt a request's prefix-cache chain starts from: its tenant and its own `cache_salt`
    together (None: no key and no salt, the cache shared by every such request)."""
    if tenant is None and requested is None:
        return None
    return hashlib.sha256(f"{tenant or ''}\0{requested or ''}".encode()).hexdigest()


class APIKeyAuth:
    """ASGI middleware; the tenant of an accepted key goes into the request's state (`tenant`)."""

    def __init__(self, app: ASGIApp, api_keys: tuple[str, ...], protect_metrics: bool = False) -> None:
        self.app = app
        self._keys = [key.encode() for key in api_keys]
        self._protected = PROTECTED_PREFIXES + (PROBE_PATHS if protect_metrics else ())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or not route_path(scope).startswith(self._protected):
            await self.app(scope, receive, send)
            return
        key = self._bearer_key(scope)
        # every key is compared, in constant time, so the time taken tells nothing about them
        matches = [hmac.compare_digest(key, known) for known in self._keys]
        if not any(matches):
            response = APIError.of(
                Failure.UNAUTHORIZED, "Unauthorized: a valid API key is required (Authorization: Bearer <key>)"
            ).response()
            response.headers["www-authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["tenant"] = tenant_of(key)
        await self.app(scope, receive, send)

    @staticmethod
    def _bearer_key(scope: Scope) -> bytes:
        value = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, key = value.partition(b" ")
        return key.strip() if scheme.lower() == b"bearer" else b""
