"""Per-tenant OpenID Connect single sign-on: the IdP adapter (Authlib + joserfc) and the sign-in logic.

Only this module talks to identity providers. The flow is the authorization
code flow with PKCE (S256), state and nonce; the ID token is verified against
the IdP's JWKS (issuer, audience, expiry, nonce, verified e-mail) before the
user is looked up in the tenant and signed in with our own tokens.
"""

from __future__ import annotations

import json
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import authlib.deprecate  # noqa: F401 - installs Authlib's own warning filter before ours below
import httpx
import msgspec
import structlog
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth.crypto import SecretBox, new_secret
from backend.auth.models import SsoConfig
from backend.auth.principal import Principal
from backend.auth.schemas import SsoConfigIn, SsoConfigOut, SsoStatus
from backend.auth.service import AuthService, SignedIn
from backend.config import Settings
from backend.db.engine import tenant_transaction
from backend.lib.problems import Forbidden, InvalidInput, NotFound, Problem, Unauthenticated
from backend.lib.redis_keys import global_key
from backend.tenants import audit
from backend.tenants import service as tenants

with warnings.catch_warnings():
    # Authlib prefers the `httpx2` fork and warns when it falls back to httpx, which is our HTTP client.
    warnings.simplefilter("ignore", DeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client

log = structlog.get_logger("auth.sso")

CALLBACK_PATH = "/api/v1/auth/sso/callback"
ID_TOKEN_ALGORITHMS = ["RS256", "ES256", "PS256", "EdDSA"]


class IdentityProviderError(Problem):
    """The identity provider failed or answered something we cannot trust."""

    status = 502
    kind = "idp-error"
    title = "Identity provider error"


@dataclass(frozen=True, slots=True)
class Discovery:
    """The parts of an IdP's discovery document the flow uses."""

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str


class OidcClient:
    """Talks to identity providers: discovery, JWKS, the code exchange. Caches what it may."""

    def __init__(self, settings: Settings) -> None:
        self._timeout = settings.sso_http_timeout_seconds
        self._cache_seconds = settings.sso_metadata_cache_seconds
        self._discoveries: dict[str, tuple[float, Discovery]] = {}
        self._keys: dict[str, tuple[float, KeySet]] = {}

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            async with httpx.AsyncClient(timeout=self._timeout, follow_redirects=False) as http:
                response = await http.get(url)
            response.raise_for_status()
            data = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise IdentityProviderError(f"Could not read {url}: {type(exc).__name__}") from exc
        if not isinstance(data, dict):
            raise IdentityProviderError(f"{url} did not answer a JSON object")
        return data

    async def discover(self, issuer: str) -> Discovery:
        """The issuer's discovery document (cached)."""
        cached = self._discoveries.get(issuer)
        if cached and cached[0] > time.monotonic():
            return cached[1]
        data = await self._get_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
        try:
            discovery = Discovery(
                issuer=str(data["issuer"]),
                authorization_endpoint=str(data["authorization_endpoint"]),
                token_endpoint=str(data["token_endpoint"]),
                jwks_uri=str(data["jwks_uri"]),
            )
        except KeyError as exc:
            raise IdentityProviderError(f"The discovery document lacks {exc}") from exc
        if discovery.issuer.rstrip("/") != issuer.rstrip("/"):
            raise IdentityProviderError("The discovery document names another issuer")
        self._discoveries[issuer] = (time.monotonic() + self._cache_seconds, discovery)
        return discovery

    async def key_set(self, jwks_uri: str, *, refresh: bool = False) -> KeySet:
        """The IdP's signing keys (cached; refreshed once when a token names an unknown key)."""
        cached = self._keys.get(jwks_uri)
        if cached and cached[0] > time.monotonic() and not refresh:
            return cached[1]
        try:
            keys = KeySet.import_key_set(await self._get_json(jwks_uri))  # type: ignore[arg-type]
        except (JoseError, ValueError, TypeError) as exc:
            raise IdentityProviderError("The IdP's JWKS is not usable") from exc
        self._keys[jwks_uri] = (time.monotonic() + self._cache_seconds, keys)
        return keys

    def authorization_url(
        self, discovery: Discovery, client_id: str, redirect_uri: str, state: str, nonce: str, code_verifier: str
    ) -> str:
        """Where to send the browser to sign in."""
        client = AsyncOAuth2Client(
            client_id=client_id, scope="openid email profile", redirect_uri=redirect_uri, code_challenge_method="S256"
        )
        url, _ = client.create_authorization_url(
            discovery.authorization_endpoint, state=state, code_verifier=code_verifier, nonce=nonce
        )
        return str(url)

    async def exchange(
        self, discovery: Discovery, client_id: str, client_secret: str, redirect_uri: str, code: str, code_verifier: str
    ) -> dict[str, Any]:
        """Trade the authorization code for tokens."""
        client = AsyncOAuth2Client(
            client_id=client_id,
            client_secret=client_secret,
            redirect_uri=redirect_uri,
            token_endpoint_auth_method="client_secret_post",
            timeout=self._timeout,
        )
        try:
            async with client:
                token = await client.fetch_token(discovery.token_endpoint, code=code, code_verifier=code_verifier)
        except Exception as exc:  # Authlib raises several unrelated types for IdP failures
            raise IdentityProviderError(f"The code exchange failed: {type(exc).__name__}") from exc
        return dict(token)

    async def verify_id_token(self, discovery: Discovery, id_token: str, client_id: str, nonce: str) -> dict[str, Any]:
        """The ID token's claims once its signature, issuer, audience, expiry and nonce hold."""
        keys = await self.key_set(discovery.jwks_uri)
        try:
            decoded = jwt.decode(id_token, keys, algorithms=ID_TOKEN_ALGORITHMS)
        except (JoseError, ValueError):
            keys = await self.key_set(discovery.jwks_uri, refresh=True)
            try:
                decoded = jwt.decode(id_token, keys, algorithms=ID_TOKEN_ALGORITHMS)
            except (JoseError, ValueError) as exc:
                raise Unauthenticated("The identity provider's token is not validly signed") from exc
        registry = jwt.JWTClaimsRegistry(
            iss={"essential": True, "value": discovery.issuer},
            aud={"essential": True, "value": client_id},
            exp={"essential": True},
            sub={"essential": True},
            nonce={"essential": True, "value": nonce},
        )
        try:
            registry.validate(decoded.claims)
        except JoseError as exc:
            raise Unauthenticated(f"The identity provider's token was refused: {exc.error}") from exc
        return dict(decoded.claims)


class SsoService:
    """Configuration of a tenant's IdP and the sign-in through it."""

    def __init__(
        self,
        settings: Settings,
        redis: Redis,
        sessionmaker: async_sessionmaker[AsyncSession],
        auth: AuthService,
        client: OidcClient | None = None,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.sessionmaker = sessionmaker
        self.auth = auth
        self.client = client or OidcClient(settings)
        self.box = SecretBox(settings.secret_key)

    @property
    def redirect_uri(self) -> str:
        """Our callback, as registered with every IdP."""
        return self.settings.public_base_url.rstrip("/") + CALLBACK_PATH

    # --- configuration ------------------------------------------------------------------------

    @staticmethod
    def _out(config: SsoConfig) -> SsoConfigOut:
        return SsoConfigOut(
            issuer=config.issuer,
            client_id=config.client_id,
            enabled=config.enabled,
            auto_provision=config.auto_provision,
            updated_at=config.created_at,
        )

    def _check_issuer(self, issuer: str) -> str:
        parts = urlsplit(issuer)
        local = parts.hostname in {"127.0.0.1", "localhost", "::1"}
        if parts.scheme != "https" and not (
            parts.scheme == "http" and local and self.settings.environment != "production"
        ):
            raise InvalidInput.field("issuer", "must be an https URL")
        if not parts.netloc or parts.query or parts.fragment:
            raise InvalidInput.field("issuer", "must be the issuer URL, without query or fragment")
        return issuer.rstrip("/")

    async def status(self, session: AsyncSession) -> SsoStatus:
        """The tenant's SSO configuration (never its secret)."""
        config = await session.scalar(select(SsoConfig))
        return SsoStatus(configured=config is not None, config=self._out(config) if config else None)

    async def configure(self, session: AsyncSession, principal: Principal, data: SsoConfigIn) -> SsoStatus:
        """Create or replace the tenant's IdP settings."""
        assert principal.tenant_id is not None
        issuer = self._check_issuer(data.issuer)
        config = await session.scalar(select(SsoConfig).with_for_update())
        before = msgspec.to_builtins(self._out(config)) if config else None
        if config is None:
            config = SsoConfig(tenant_id=principal.tenant_id, issuer=issuer, client_id=data.client_id, client_secret="")
            session.add(config)
        config.issuer = issuer
        config.client_id = data.client_id
        config.client_secret = self.box.seal(data.client_secret)
        config.enabled = data.enabled
        config.auto_provision = data.auto_provision
        await session.flush()
        after = msgspec.to_builtins(self._out(config))
        await audit.record_by(
            session,
            principal,
            action="sso.configure",
            target_type="sso",
            target_id=config.id,
            before=before,
            after=after,
        )
        return await self.status(session)

    async def remove(self, session: AsyncSession, principal: Principal) -> None:
        """Remove the tenant's IdP settings (idempotent)."""
        assert principal.tenant_id is not None
        config = await session.scalar(select(SsoConfig).with_for_update())
        if config is None:
            return
        await session.delete(config)
        await audit.record_by(
            session,
            principal,
            action="sso.delete",
            target_type="sso",
            target_id=config.id,
            before=msgspec.to_builtins(self._out(config)),
        )

    # --- sign-in ------------------------------------------------------------------------------

    async def begin(self, workspace: str) -> str:
        """The IdP URL to send the browser to; the state, nonce and PKCE verifier wait in Redis."""
        async with self.sessionmaker() as session, session.begin():
            tenant = await tenants.find_tenant_by_slug(session, workspace)
        if tenant is None:
            raise NotFound("No single sign-on for this workspace")
        async with tenant_transaction(self.sessionmaker, tenant.id) as session:
            config = await session.scalar(select(SsoConfig).where(SsoConfig.enabled.is_(True)))
        if config is None:
            raise NotFound("No single sign-on for this workspace")
        discovery = await self.client.discover(config.issuer)
        state, nonce, verifier = new_secret(24), new_secret(24), new_secret(48)
        await self.redis.set(
            global_key("sso", "state", state),
            json.dumps({"tenant_id": str(tenant.id), "nonce": nonce, "verifier": verifier}),
            ex=self.settings.sso_state_ttl_seconds,
        )
        return self.client.authorization_url(discovery, config.client_id, self.redirect_uri, state, nonce, verifier)

    async def complete(self, code: str, state: str) -> SignedIn:
        """Finish the sign-in: exchange the code, verify the ID token, find (or create) the user."""
        pending = await self.redis.getdel(global_key("sso", "state", state))
        if pending is None:
            raise InvalidInput.field("state", "is unknown, used or expired: start the sign-in again")
        facts = json.loads(pending)
        tenant_id = uuid.UUID(facts["tenant_id"])
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            config = await session.scalar(select(SsoConfig).where(SsoConfig.enabled.is_(True)))
        if config is None:
            raise Forbidden("Single sign-on is no longer enabled for this workspace")
        discovery = await self.client.discover(config.issuer)
        tokens = await self.client.exchange(
            discovery, config.client_id, self.box.open(config.client_secret), self.redirect_uri, code, facts["verifier"]
        )
        if "id_token" not in tokens:
            raise IdentityProviderError("The identity provider returned no ID token")
        claims = await self.client.verify_id_token(discovery, str(tokens["id_token"]), config.client_id, facts["nonce"])
        email = claims.get("email")
        if not isinstance(email, str) or claims.get("email_verified") is not True:
            raise Forbidden("The identity provider did not vouch for a verified e-mail address")
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            user = await tenants.find_user_by_email(session, email)
            if user is None:
                if not config.auto_provision:
                    raise Forbidden("No account with this e-mail in the workspace; ask an administrator to invite you")
                name = str(claims.get("name") or email.split("@")[0])[:200]
                user = await tenants.create_user(
                    session,
                    tenant_id=tenant_id,
                    email=email,
                    name=name,
                    role_name="agent",
                    password=None,
                    verified=True,
                )
                await audit.record(
                    session,
                    tenant_id=tenant_id,
                    actor_type="system",
                    actor_id=None,
                    action="user.sso_provision",
                    target_type="user",
                    target_id=user.id,
                    after={"email": user.email, "role": "agent", "issuer": config.issuer},
                )
            if user.status != "active":
                raise Forbidden("This account is not active")
            user_id = user.id
        log.info("sso_login", tenant_id=str(tenant_id), user_id=str(user_id))
        return await self.auth.sign_in_user(tenant_id, user_id, "sso")
