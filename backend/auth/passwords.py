"""Password hashing (argon2id) and the password policy (ASVS 5.0 V6.2)."""

from __future__ import annotations

import gzip
import unicodedata
from functools import lru_cache
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from backend.config import Settings
from backend.lib.problems import InvalidInput

# OWASP's argon2id baseline: 19 MiB, 2 iterations, 1 lane.
_hasher = PasswordHasher(time_cost=2, memory_cost=19_456, parallelism=1)
_COMMON_PASSWORDS = Path(__file__).with_name("common_passwords.txt.gz")
_PADDING = "0123456789!@#$%^&*()_-+=.,?~ "
# Verified when the account does not exist, so that timing does not reveal which e-mails exist.
_DUMMY_HASH = _hasher.hash("not-a-real-password-just-for-timing")


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    """The shipped list of common and breached passwords (zxcvbn's 30,000, lower-cased)."""
    with gzip.open(_COMMON_PASSWORDS, "rt", encoding="utf-8") as handle:
        return frozenset(line.strip().lower() for line in handle if line.strip())


def normalise(password: str) -> str:
    """NFKC, so that the same password typed on two keyboards matches (ASVS V6.2.x)."""
    return unicodedata.normalize("NFKC", password)


def hash_password(password: str) -> str:
    """An argon2id hash of the password."""
    return _hasher.hash(normalise(password))


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether the password matches; spends the same time when there is no hash."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, normalise(password)) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def check_password_policy(password: str, settings: Settings, *, context: tuple[str, ...] = ()) -> None:
    """Refuse short, overlong, common or breached passwords and ones built from the account's own names."""
    password = normalise(password)
    if len(password) < settings.password_min_length:
        raise InvalidInput.field("password", f"must be at least {settings.password_min_length} characters")
    if len(password) > settings.password_max_length:
        raise InvalidInput.field("password", f"must be at most {settings.password_max_length} characters")
    lowered = password.lower()
    if lowered in common_passwords():
        raise InvalidInput.field("password", "is on the list of common or breached passwords")
    # "iloveyou1234", "dragon!!!!": a listed password padded with digits or symbols is no stronger.
    stem = lowered.rstrip(_PADDING)
    if stem != lowered and len(stem) >= 4 and stem in common_passwords():
        raise InvalidInput.field("password", "is a common password with characters added at the end")
    for raw_word in context:
        word = raw_word.lower().strip()
        if len(word) >= 4 and word in lowered and len(lowered) - len(word) < 6:
            raise InvalidInput.field("password", "is too close to your e-mail, name or workspace")
