"""Secrets: random tokens, their digests, and encryption of stored secrets (TOTP seeds, SSO client secrets)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def new_secret(nbytes: int = 32) -> str:
    """A URL-safe random secret with `nbytes` of entropy."""
    return secrets.token_urlsafe(nbytes)


def digest(secret: str) -> str:
    """SHA-256 of a high-entropy secret: enough for tokens and keys (passwords use argon2)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def same(a: str, b: str) -> bool:
    """Constant-time comparison."""
    return hmac.compare_digest(a.encode(), b.encode())


def derive_key(secret_key: str, purpose: str, length: int = 32) -> bytes:
    """A key for one purpose, derived from the application secret (HKDF-SHA256)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=purpose.encode()).derive(secret_key.encode())


class SecretBox:
    """AES-256-GCM encryption of small secrets stored in the database."""

    def __init__(self, secret_key: str) -> None:
        self._aead = AESGCM(derive_key(secret_key, "contactcenter/stored-secrets"))

    def seal(self, plaintext: str) -> str:
        """Encrypt; the result is ASCII and carries its nonce."""
        nonce = os.urandom(12)
        return base64.urlsafe_b64encode(nonce + self._aead.encrypt(nonce, plaintext.encode(), None)).decode()

    def open(self, sealed: str) -> str:
        """Decrypt what `seal` produced."""
        raw = base64.urlsafe_b64decode(sealed.encode())
        return self._aead.decrypt(raw[:12], raw[12:], None).decode()
