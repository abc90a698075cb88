"""JWT access tokens (joserfc, HS256). Short-lived; revocation is checked in Redis."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import OctKey

from backend.auth.crypto import derive_key
from backend.config import Settings
from backend.lib.bounded import BoundedDict

ISSUER = "contactcenter"
_ALGORITHMS = ["HS256"]
_VERIFIED_MAX = 10_000
"""Tokens whose signature this process checked already; enough for every session a process serves at once."""


@dataclass(frozen=True, slots=True)
class AccessClaims:
    """What an access token says about its bearer."""

    subject: uuid.UUID
    audience: str  # "tenant" or "provider"
    tenant_id: uuid.UUID | None
    session_id: uuid.UUID | None
    permissions: frozenset[str]
    issued_at_ms: int
    expires_at: int
    mfa_pending: bool


class InvalidToken(Exception):
    """The token is forged, expired, of the wrong kind or malformed."""


class TokenSigner:
    """Issues and verifies access tokens with a key derived from the application secret."""

    def __init__(self, settings: Settings) -> None:
        self._key = OctKey.import_key(derive_key(settings.secret_key, "contactcenter/access-token"))
        self._ttl = settings.access_token_ttl_seconds
        self._registry = jwt.JWTClaimsRegistry(
            iss={"essential": True, "value": ISSUER},
            exp={"essential": True},
            sub={"essential": True},
            aud={"essential": True},
        )
        # A token is the same bytes on every request of its session; what its signature proved does not change,
        # only whether it has expired. Checking the HMAC and the claims again cost a tenth of a cheap request.
        self._verified: BoundedDict[str, AccessClaims] = BoundedDict(_VERIFIED_MAX)

    @property
    def ttl(self) -> int:
        """Seconds an access token lives."""
        return self._ttl

    def issue(
        self,
        *,
        subject: uuid.UUID,
        audience: str,
        tenant_id: uuid.UUID | None,
        session_id: uuid.UUID | None,
        permissions: frozenset[str],
        mfa_pending: bool = False,
    ) -> tuple[str, int]:
        """A signed token and its lifetime in seconds."""
        now_ms = int(time.time() * 1000)
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": audience,
            "sub": str(subject),
            "iat": now_ms // 1000,
            "iat_ms": now_ms,
            "exp": now_ms // 1000 + self._ttl,
            "jti": uuid.uuid4().hex,
            "perms": sorted(permissions),
        }
        if tenant_id is not None:
            claims["tid"] = str(tenant_id)
        if session_id is not None:
            claims["sid"] = str(session_id)
        if mfa_pending:
            claims["mfa_pending"] = True
        return jwt.encode({"alg": "HS256", "typ": "JWT"}, claims, self._key, algorithms=_ALGORITHMS), self._ttl

    def verify(self, token: str) -> AccessClaims:
        """The claims of a valid token; `InvalidToken` for anything else (including `alg: none`)."""
        known = self._verified.get(token)
        if known is not None:
            if known.expires_at <= int(time.time()):  # joserfc's rule: expired at `exp`, without leeway
                del self._verified[token]
                raise InvalidToken("exp")
            return known
        claims = self._verify(token)
        return self._verified.keep(token, claims)

    def _verify(self, token: str) -> AccessClaims:
        try:
            decoded = jwt.decode(token, self._key, algorithms=_ALGORITHMS)
            self._registry.validate(decoded.claims)
            claims = decoded.claims
            return AccessClaims(
                subject=uuid.UUID(claims["sub"]),
                audience=str(claims["aud"]),
                tenant_id=uuid.UUID(claims["tid"]) if "tid" in claims else None,
                session_id=uuid.UUID(claims["sid"]) if "sid" in claims else None,
                permissions=frozenset(claims.get("perms", [])),
                issued_at_ms=int(claims.get("iat_ms", claims.get("iat", 0) * 1000)),
                expires_at=int(claims["exp"]),
                mfa_pending=bool(claims.get("mfa_pending", False)),
            )
        except (JoseError, ValueError, KeyError, TypeError) as exc:
            raise InvalidToken(str(exc) or type(exc).__name__) from exc
