"""Access tokens: a token checked once is not checked again, but still expires and still has to be the same."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from backend.auth import tokens
from backend.auth.tokens import InvalidToken, TokenSigner
from backend.config import Settings


def _signer(ttl: int = 900, secret: str | None = None) -> TokenSigner:
    settings = Settings()
    return TokenSigner(
        dataclasses.replace(settings, access_token_ttl_seconds=ttl, secret_key=secret or settings.secret_key)
    )


def _issue(signer: TokenSigner) -> str:
    token, _ = signer.issue(
        subject=uuid.uuid4(),
        audience="tenant",
        tenant_id=uuid.uuid4(),
        session_id=uuid.uuid4(),
        permissions=frozenset({"customers:read"}),
    )
    return token


def test_a_verified_token_is_not_checked_again(monkeypatch):
    signer = _signer()
    token = _issue(signer)
    first = signer.verify(token)

    def no_second_check(_: str) -> None:
        raise AssertionError("checked again")

    monkeypatch.setattr(signer, "_verify", no_second_check)
    assert signer.verify(token) is first


def test_a_remembered_token_still_expires(monkeypatch):
    signer = _signer(ttl=60)
    token = _issue(signer)
    claims = signer.verify(token)
    monkeypatch.setattr(tokens.time, "time", lambda: float(claims.expires_at))
    with pytest.raises(InvalidToken):
        signer.verify(token)
    with pytest.raises(InvalidToken):  # and is not remembered as good afterwards either
        signer.verify(token)


def test_only_the_exact_token_is_remembered():
    signer = _signer()
    token = _issue(signer)
    signer.verify(token)
    header, payload, signature = token.split(".")
    tampered = ".".join([header, payload, ("A" if signature[0] != "A" else "B") + signature[1:]])
    with pytest.raises(InvalidToken):
        signer.verify(tampered)
    with pytest.raises(InvalidToken):
        _signer(secret="another-secret-another-secret-another").verify(token)  # another key checks, and refuses


def test_the_memory_is_bounded(monkeypatch):
    monkeypatch.setattr(tokens, "_VERIFIED_MAX", 3)
    signer = _signer()
    issued = [_issue(signer) for _ in range(5)]
    for token in issued:
        signer.verify(token)
    assert len(signer._verified) == 3 and issued[0] not in signer._verified
