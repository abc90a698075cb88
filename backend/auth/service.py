"""Sign-in, sessions, password reset, TOTP and API keys.

Each method runs its own transactions: a failed sign-in must be audited and
counted even though the request fails, and cache changes must follow commits.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import pyotp
import structlog
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from backend.auth import onetime
from backend.auth.authenticate import API_KEY_PREFIX, Authenticator
from backend.auth.credentials import RevokedCredentials, revoke_user_credentials
from backend.auth.crypto import SecretBox, digest, new_secret, same
from backend.auth.models import ApiKey, RefreshToken
from backend.auth.passwords import check_password_policy, hash_password, verify_password
from backend.auth.principal import Principal
from backend.auth.schemas import (
    ApiKeyCreate,
    ApiKeyCreated,
    ApiKeyOut,
    LoginRequest,
    MeOut,
    ProviderLoginRequest,
    TokenPair,
    TotpEnrolment,
)
from backend.auth.throttle import LoginThrottle
from backend.config import Settings
from backend.db.base import utcnow
from backend.db.engine import tenant_transaction
from backend.db.tenancy import set_tenant
from backend.lib.pagination import PageRequest, paginate
from backend.lib.problems import Conflict, Forbidden, InvalidInput, NotFound, Unauthenticated
from backend.lib.redis_keys import tenant_key
from backend.tenants import audit
from backend.tenants import service as tenants
from backend.tenants.mail import queue_mail
from backend.tenants.models import ProviderUser, User
from backend.tenants.permissions import PERMISSIONS

log = structlog.get_logger("auth")

TOTP_ISSUER = "Contact Center"
MFA_PENDING_PERMISSIONS = frozenset({"self"})
RESET_MAILS_PER_HOUR = 5


@dataclass(frozen=True, slots=True)
class SignedIn:
    """A successful sign-in: the tokens and who they belong to."""

    tokens: TokenPair
    tenant_id: uuid.UUID
    user_id: uuid.UUID


class AuthService:
    """Everything about proving who someone is and keeping that proof fresh."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        authenticator: Authenticator,
        throttle: LoginThrottle,
        settings: Settings,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.authenticator = authenticator
        self.throttle = throttle
        self.settings = settings
        self.box = SecretBox(settings.secret_key)

    # --- sign-in ------------------------------------------------------------------------------

    async def login(self, data: LoginRequest, address: str) -> SignedIn:
        """Password (and TOTP) sign-in to a workspace (ASVS 5.0 V6.3, V6.5)."""
        async with self.sessionmaker() as session, session.begin():
            tenant = await tenants.find_tenant_by_slug(session, data.workspace)
        tenant_id = tenant.id if tenant else None
        await self.throttle.check(tenant_id, data.email, address)
        failure: str | None = None
        signed_in: SignedIn | None = None
        async with self.sessionmaker() as session, session.begin():
            user = None
            if tenant is not None:
                await set_tenant(session, tenant.id)
                user = await tenants.find_user_by_email(session, data.email)
            password_ok = verify_password(user.password_hash if user else None, data.password)
            if tenant is None or user is None or not password_ok:
                failure = "bad_credentials"
            elif user.status != "active":
                failure = "inactive"
            elif user.totp_enabled:
                if data.totp_code is None:
                    # The password was right; the client must ask for the second factor.
                    raise Unauthenticated(
                        "Enter the code from your authenticator app",
                        kind="totp-required",
                        title="Second factor required",
                    )
                if not self._accept_totp(user, data.totp_code):
                    failure = "bad_totp"
            if failure is None and tenant is not None and user is not None:
                mfa_pending = tenant.require_mfa and not user.totp_enabled
                signed_in = await self._start_session(session, tenant.id, user.id, mfa_pending=mfa_pending)
                await audit.record(
                    session,
                    tenant_id=tenant.id,
                    actor_type="user",
                    actor_id=user.id,
                    action="auth.login",
                    target_type="user",
                    target_id=user.id,
                    after={"method": "password+totp" if user.totp_enabled else "password"},
                )
        if signed_in is not None:
            await self.throttle.succeeded(tenant_id, data.email)
            return signed_in
        await self.throttle.failed(tenant_id, data.email, address)
        if tenant is not None:
            async with tenant_transaction(self.sessionmaker, tenant.id) as session:
                await audit.record(
                    session,
                    tenant_id=tenant.id,
                    actor_type="anonymous",
                    actor_id=None,
                    action="auth.login_failed",
                    target_type="user",
                    target_id=data.email.strip().lower()[:80],
                    after={"reason": failure},
                )
        raise Unauthenticated("The workspace, e-mail, password or code is wrong", kind="invalid-credentials")

    def _accept_totp(self, user: User, code: str) -> bool:
        """A code of the current step or a neighbour (clock drift), never one at or before the last accepted step."""
        if not user.totp_secret:
            return False
        totp = pyotp.TOTP(self.box.open(user.totp_secret))
        current = int(time.time()) // totp.interval
        for step in (current, current - 1, current + 1):
            if (user.totp_last_step is None or step > user.totp_last_step) and same(totp.generate_otp(step), code):
                user.totp_last_step = step
                return True
        return False

    async def _start_session(
        self, session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID, *, mfa_pending: bool
    ) -> SignedIn:
        family = uuid.uuid4()
        now = utcnow()
        refresh_secret = new_secret()
        session.add(
            RefreshToken(
                tenant_id=tenant_id,
                family_id=family,
                user_id=user_id,
                token_hash=digest(refresh_secret),
                session_started_at=now,
                expires_at=now + timedelta(seconds=self.settings.session_idle_timeout_seconds),
            )
        )
        found = await tenants.user_permissions(session, user_id)
        assert found is not None
        permissions = MFA_PENDING_PERMISSIONS if mfa_pending else found[1]
        access, ttl = self.authenticator.signer.issue(
            subject=user_id,
            audience="tenant",
            tenant_id=tenant_id,
            session_id=family,
            permissions=permissions,
            mfa_pending=mfa_pending,
        )
        return SignedIn(
            TokenPair(access, "Bearer", ttl, f"{tenant_id.hex}.{refresh_secret}", mfa_enrolment_required=mfa_pending),
            tenant_id,
            user_id,
        )

    async def sign_in_user(self, tenant_id: uuid.UUID, user_id: uuid.UUID, method: str) -> SignedIn:
        """Start a session for a user whose identity was proven elsewhere (single sign-on)."""
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            tenant = await tenants.find_tenant(session, tenant_id)
            found = await tenants.user_permissions(session, user_id)
            if tenant is None or found is None or found[0].status != "active":
                raise Unauthenticated("This account cannot sign in")
            signed_in = await self._start_session(session, tenant_id, user_id, mfa_pending=False)
            await audit.record(
                session,
                tenant_id=tenant_id,
                actor_type="user",
                actor_id=user_id,
                action="auth.login",
                target_type="user",
                target_id=user_id,
                after={"method": method},
            )
        return signed_in

    async def refresh(self, refresh_token: str) -> TokenPair:
        """Rotate a refresh token; reusing a spent one ends the whole session (ASVS 5.0 V7.2, V9.x)."""
        try:
            tenant_id, secret = onetime.split_token(refresh_token, "refresh_token")
        except InvalidInput as exc:
            raise Unauthenticated("The refresh token is invalid") from exc
        reused: RefreshToken | None = None
        pair: TokenPair | None = None
        async with tenant_transaction(self.sessionmaker, tenant_id) as session:
            row = await session.scalar(
                select(RefreshToken).where(RefreshToken.token_hash == digest(secret)).with_for_update()
            )
            now = utcnow()
            if row is None:
                raise Unauthenticated("The refresh token is invalid")
            if row.used_at is not None or row.revoked_at is not None:
                reused = row
                await session.execute(
                    update(RefreshToken)
                    .where(RefreshToken.family_id == row.family_id, RefreshToken.revoked_at.is_(None))
                    .values(revoked_at=now)
                )
                if row.revoked_at is None or row.used_at is not None:
                    await audit.record(
                        session,
                        tenant_id=tenant_id,
                        actor_type="anonymous",
                        actor_id=None,
                        action="auth.refresh_reuse",
                        target_type="session",
                        target_id=row.family_id,
                        after={"user_id": str(row.user_id)},
                    )
            else:
                absolute_end = row.session_started_at + timedelta(
                    seconds=self.settings.session_absolute_timeout_seconds
                )
                if row.expires_at <= now or absolute_end <= now:
                    raise Unauthenticated("The session has expired; sign in again")
                found = await tenants.user_permissions(session, row.user_id)
                tenant = await tenants.find_tenant(session, tenant_id)
                if found is None or tenant is None or found[0].status != "active":
                    raise Unauthenticated("This account cannot sign in")
                user, permissions = found
                row.used_at = now
                new_secret_value = new_secret()
                session.add(
                    RefreshToken(
                        tenant_id=tenant_id,
                        family_id=row.family_id,
                        user_id=row.user_id,
                        token_hash=digest(new_secret_value),
                        session_started_at=row.session_started_at,
                        expires_at=min(
                            now + timedelta(seconds=self.settings.session_idle_timeout_seconds), absolute_end
                        ),
                    )
                )
                mfa_pending = tenant.require_mfa and not user.totp_enabled
                access, ttl = self.authenticator.signer.issue(
                    subject=row.user_id,
                    audience="tenant",
                    tenant_id=tenant_id,
                    session_id=row.family_id,
                    permissions=MFA_PENDING_PERMISSIONS if mfa_pending else permissions,
                    mfa_pending=mfa_pending,
                )
                pair = TokenPair(
                    access,
                    "Bearer",
                    ttl,
                    f"{tenant_id.hex}.{new_secret_value}",
                    mfa_enrolment_required=mfa_pending,
                )
        if reused is not None:
            await self.authenticator.revocations.end_session(tenant_id, reused.user_id, reused.family_id)
            log.warning("refresh_token_reuse", tenant_id=str(tenant_id), family=str(reused.family_id))
            raise Unauthenticated("The refresh token was already used; the session has been ended")
        assert pair is not None
        return pair

    async def logout(self, principal: Principal) -> None:
        """End the caller's session: its refresh tokens and its access tokens stop working now."""
        if principal.tenant_id is None or principal.user_id is None or principal.session_id is None:
            raise Forbidden("Only a signed-in session can log out; revoke API keys instead")
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            await session.execute(
                update(RefreshToken)
                .where(RefreshToken.family_id == principal.session_id, RefreshToken.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            await audit.record(
                session,
                tenant_id=principal.tenant_id,
                actor_type="user",
                actor_id=principal.user_id,
                action="auth.logout",
                target_type="session",
                target_id=principal.session_id,
            )
        await self.authenticator.revocations.end_session(principal.tenant_id, principal.user_id, principal.session_id)

    async def provider_login(self, data: ProviderLoginRequest, address: str) -> TokenPair:
        """Sign-in of a provider operator (no refresh token: short sessions for the most powerful accounts)."""
        await self.throttle.check(None, data.email, address)
        async with self.sessionmaker() as session, session.begin():
            operator = await session.scalar(select(ProviderUser).where(ProviderUser.email == data.email.strip()))
            ok = verify_password(operator.password_hash if operator else None, data.password)
        if operator is None or not ok or not operator.active:
            await self.throttle.failed(None, data.email, address)
            log.warning("provider_login_failed", email=data.email[:80])
            raise Unauthenticated("The e-mail or password is wrong", kind="invalid-credentials")
        await self.throttle.succeeded(None, data.email)
        access, ttl = self.authenticator.signer.issue(
            subject=operator.id,
            audience="provider",
            tenant_id=None,
            session_id=None,
            permissions=frozenset({"ops"}),
        )
        log.info("provider_login", provider_user_id=str(operator.id))
        return TokenPair(access, "Bearer", ttl)

    # --- who am I -----------------------------------------------------------------------------

    async def me(self, principal: Principal) -> MeOut:
        """The caller's own identity and rights."""
        assert principal.tenant_id is not None and principal.user_id is not None
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            found = await tenants.user_permissions(session, principal.user_id)
            user_out = await tenants.get_user(session, principal.user_id)
        if found is None:
            raise Unauthenticated("No such user")
        user, _ = found
        return MeOut(
            user_id=user.id,
            tenant_id=user.tenant_id,
            email=user.email,
            name=user.name,
            role=user_out.role,
            permissions=sorted(principal.permissions),
            tenant_status=principal.tenant_status or "active",
            totp_enabled=user.totp_enabled,
            mfa_pending=principal.mfa_pending,
        )

    # --- passwords ----------------------------------------------------------------------------

    async def request_password_reset(self, workspace: str, email: str) -> None:
        """E-mail a reset link if the account exists; the answer is the same either way (ASVS V6.4)."""
        async with self.sessionmaker() as session, session.begin():
            tenant = await tenants.find_tenant_by_slug(session, workspace)
            if tenant is None:
                return
            await set_tenant(session, tenant.id)
            user = await tenants.find_user_by_email(session, email)
            if user is None or user.status != "active":
                return
            limiter = tenant_key(tenant.id, "pwreset", str(user.id))
            count = await self.authenticator.redis.incr(limiter)
            if count == 1:
                await self.authenticator.redis.expire(limiter, 3600)
            if count > RESET_MAILS_PER_HOUR:
                log.warning("password_reset_throttled", tenant_id=str(tenant.id), user_id=str(user.id))
                return
            token = await onetime.issue(
                session,
                tenant_id=tenant.id,
                user_id=user.id,
                purpose="password_reset",
                ttl_seconds=self.settings.password_reset_ttl_seconds,
            )
            await queue_mail(
                session,
                tenant_id=tenant.id,
                to=user.email,
                kind="password_reset",
                subject="Reset your password",
                body=f"Choose a new password: {self.settings.public_base_url}/reset-password?token={token}",
            )
            await audit.record(
                session,
                tenant_id=tenant.id,
                actor_type="anonymous",
                actor_id=None,
                action="auth.password_reset_requested",
                target_type="user",
                target_id=user.id,
            )

    async def confirm_password_reset(self, token: str, password: str) -> None:
        """Set a new password from a reset link; every session and key of the user ends."""
        async with self.sessionmaker() as session, session.begin():
            tenant_id, user_id = await onetime.redeem(session, token, "password_reset")
            found = await tenants.user_permissions(session, user_id)
            assert found is not None
            user = found[0]
            check_password_policy(password, self.settings, context=(user.email.split("@")[0], user.name))
            revoked = await self._set_password(session, user, password)
            await audit.record(
                session,
                tenant_id=tenant_id,
                actor_type="user",
                actor_id=user_id,
                action="auth.password_reset",
                target_type="user",
                target_id=user_id,
            )
        await self.announce(revoked)

    async def change_password(self, principal: Principal, current: str, new: str) -> SignedIn:
        """Change one's own password; other sessions end, this one continues with new tokens."""
        assert principal.tenant_id is not None and principal.user_id is not None
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            found = await tenants.user_permissions(session, principal.user_id)
            assert found is not None
            user = found[0]
            if not verify_password(user.password_hash, current):
                raise InvalidInput.field("current_password", "is wrong")
            check_password_policy(new, self.settings, context=(user.email.split("@")[0], user.name))
            revoked = await self._set_password(session, user, new)
            await audit.record(
                session,
                tenant_id=principal.tenant_id,
                actor_type="user",
                actor_id=user.id,
                action="auth.password_change",
                target_type="user",
                target_id=user.id,
            )
        await self.announce(revoked)
        # A fresh session, issued after the revocation instant.
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            tenant = await tenants.find_tenant(session, principal.tenant_id)
            mfa_pending = bool(tenant and tenant.require_mfa and not user.totp_enabled)
            return await self._start_session(session, principal.tenant_id, principal.user_id, mfa_pending=mfa_pending)

    async def _set_password(self, session: AsyncSession, user: User, password: str) -> RevokedCredentials:
        user.password_hash = hash_password(password)
        user.password_changed_at = utcnow()
        user.tokens_revoked_at = utcnow()
        return await revoke_user_credentials(session, user.tenant_id, user.id)

    async def announce(self, revoked: RevokedCredentials | None) -> None:
        """After commit: drop caches and tell every process that the user's credentials were revoked."""
        if revoked is None:
            return
        for prefix in revoked.api_key_prefixes:
            await self.authenticator.forget_api_key(prefix)
        await self.authenticator.revocations.revoke_user(revoked.tenant_id, revoked.user_id)

    # --- TOTP ---------------------------------------------------------------------------------

    async def totp_enrol(self, principal: Principal) -> TotpEnrolment:
        """Start TOTP enrolment: a new secret, not yet trusted until confirmed with a code."""
        assert principal.tenant_id is not None and principal.user_id is not None
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            found = await tenants.user_permissions(session, principal.user_id)
            assert found is not None
            user = found[0]
            if user.totp_enabled:
                raise Conflict("A second factor is already enrolled; disable it first")
            secret = pyotp.random_base32()
            user.totp_secret = self.box.seal(secret)
            tenant = await tenants.find_tenant(session, principal.tenant_id)
            label = f"{tenant.slug if tenant else ''}:{user.email}"
        uri = pyotp.TOTP(secret).provisioning_uri(name=label, issuer_name=TOTP_ISSUER)
        return TotpEnrolment(secret=secret, otpauth_uri=uri)

    async def totp_confirm(self, principal: Principal, code: str) -> SignedIn:
        """Confirm enrolment with a first code; the session continues with full rights."""
        assert principal.tenant_id is not None and principal.user_id is not None
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            found = await tenants.user_permissions(session, principal.user_id)
            assert found is not None
            user = found[0]
            if user.totp_enabled:
                raise Conflict("A second factor is already enrolled")
            if user.totp_secret is None:
                raise Conflict("Start enrolment first")
            if not self._accept_totp(user, code):
                raise InvalidInput.field("code", "is wrong or expired")
            user.totp_enabled = True
            await audit.record(
                session,
                tenant_id=principal.tenant_id,
                actor_type="user",
                actor_id=user.id,
                action="auth.totp_enabled",
                target_type="user",
                target_id=user.id,
            )
            return await self._start_session(session, principal.tenant_id, user.id, mfa_pending=False)

    async def totp_disable(self, principal: Principal, password: str, code: str) -> None:
        """Remove the second factor (not allowed where the tenant makes it mandatory)."""
        assert principal.tenant_id is not None and principal.user_id is not None
        async with tenant_transaction(self.sessionmaker, principal.tenant_id) as session:
            tenant = await tenants.find_tenant(session, principal.tenant_id)
            found = await tenants.user_permissions(session, principal.user_id)
            assert found is not None and tenant is not None
            user = found[0]
            if tenant.require_mfa:
                raise Conflict("Your workspace requires a second factor")
            if not user.totp_enabled:
                raise Conflict("No second factor is enrolled")
            if not verify_password(user.password_hash, password):
                raise InvalidInput.field("password", "is wrong")
            if not self._accept_totp(user, code):
                raise InvalidInput.field("code", "is wrong or expired")
            user.totp_enabled = False
            user.totp_secret = None
            await audit.record(
                session,
                tenant_id=principal.tenant_id,
                actor_type="user",
                actor_id=user.id,
                action="auth.totp_disabled",
                target_type="user",
                target_id=user.id,
            )

    # --- API keys -----------------------------------------------------------------------------

    async def create_api_key(self, session: AsyncSession, principal: Principal, data: ApiKeyCreate) -> ApiKeyCreated:
        """A new key whose scopes are a subset of the creator's rights; shown once."""
        assert principal.tenant_id is not None and principal.user_id is not None
        if principal.kind != "user":
            raise Forbidden("API keys are created by people, not by other keys")
        scopes = sorted(set(data.scopes))
        unknown = [s for s in scopes if s not in PERMISSIONS]
        if unknown:
            raise InvalidInput(
                "Unknown scopes",
                errors=[{"field": "scopes", "message": f"unknown permission {s!r}"} for s in unknown],
            )
        if set(scopes) - principal.permissions:
            raise Forbidden("A key cannot have scopes its creator lacks")
        prefix = new_secret(9).replace("-", "x").replace("_", "y")[:12]
        secret = new_secret(32)
        key = ApiKey(
            tenant_id=principal.tenant_id,
            name=data.name.strip(),
            prefix=prefix,
            secret_hash=digest(secret),
            scopes=scopes,
            created_by=principal.user_id,
            expires_at=utcnow() + timedelta(days=data.expires_in_days) if data.expires_in_days else None,
        )
        session.add(key)
        await session.flush()
        await audit.record(
            session,
            tenant_id=principal.tenant_id,
            actor_type="user",
            actor_id=principal.user_id,
            action="api_key.create",
            target_type="api_key",
            target_id=key.id,
            after={"name": key.name, "prefix": prefix, "scopes": scopes},
        )
        return ApiKeyCreated(_api_key_out(key), f"{API_KEY_PREFIX}{prefix}_{secret}")

    async def list_api_keys(self, session: AsyncSession, page: PageRequest) -> tuple[list[ApiKeyOut], str | None]:
        """The tenant's keys (never their secrets)."""
        rows, cursor = await paginate(
            session,
            select(ApiKey),
            page,
            sortable={"created_at": ApiKey.created_at, "name": ApiKey.name},
            default_sort="-created_at",
            id_column=ApiKey.id,
        )
        return [_api_key_out(k) for k in rows], cursor

    async def revoke_api_key(self, session: AsyncSession, principal: Principal, key_id: uuid.UUID) -> str:
        """Revoke a key; returns its prefix so the cache can be cleared after commit."""
        assert principal.tenant_id is not None
        key = await session.scalar(select(ApiKey).where(ApiKey.id == key_id).with_for_update())
        if key is None:
            raise NotFound("No such API key")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
            await audit.record_by(
                session,
                principal,
                action="api_key.revoke",
                target_type="api_key",
                target_id=key.id,
                before={"name": key.name, "prefix": key.prefix},
            )
        return key.prefix


def _api_key_out(key: ApiKey) -> ApiKeyOut:
    return ApiKeyOut(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        scopes=list(key.scopes),
        created_by=key.created_by,
        created_at=key.created_at,
        last_used_at=key.last_used_at,
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
    )


__all__: Sequence[str] = ["AuthService", "SignedIn"]
