"""`ClusterSecret`: the one secret a pdserve cluster shares (made at `pdserve serve`, or taken from
PDSERVE_CLUSTER_SECRET), and the HMAC-SHA256 signatures derived from it, one key per purpose, so
that a signature made for one purpose (a registry entry) is worthless for another (a gRPC call)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

MIN_SECRET_CHARS = 32
ENV_VAR = "PDSERVE_CLUSTER_SECRET"


@dataclass(frozen=True, repr=False)
class ClusterSecret:
    """Travels to the workers inside their WorkerSpec (Ray pickles it); never logged: `repr` hides it."""

    value: str

    def __post_init__(self) -> None:
        if len(self.value) < MIN_SECRET_CHARS:
            raise ValueError(
                f"{ENV_VAR} must be at least {MIN_SECRET_CHARS} characters "
                "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )

    @classmethod
    def generate(cls) -> ClusterSecret:
        return cls(secrets.token_urlsafe(32))  # 256 random bits

    def __repr__(self) -> str:
        return "ClusterSecret(<hidden>)"

    def sign(self, purpose: str, message: bytes) -> str:
        """Hex HMAC-SHA256 of `message` under the key for `purpose`."""
        return hmac.new(self._key(purpose), message, hashlib.sha256).hexdigest()

    def verify(self, purpose: str, message: bytes, signature: str | bytes) -> bool:
        """Constant-time comparison; any malformed signature is simply wrong."""
        if isinstance(signature, bytes):
            signature = signature.decode("ascii", errors="replace")
        if not signature.isascii():  # compare_digest takes ASCII strings only
            return False
        return hmac.compare_digest(self.sign(purpose, message), signature)

    def key(self, purpose: str) -> bytes:
        """The 32-byte key derived for `purpose` (for a keyed hash; `sign` uses the same)."""
        return self._key(purpose)

    def _key(self, purpose: str) -> bytes:
        return hmac.new(self.value.encode(), b"pdserve/" + purpose.encode(), hashlib.sha256).digest()
