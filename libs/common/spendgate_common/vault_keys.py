"""Vault keys: ``sgk_<tenant>_<key id>_<secret>``.

The tenant routes the key to its partition, the key id names it in the ledger, and the
secret (160 random bits, base32) is shown once at issue; the ledger stores only its
SHA-256 and compares in constant time. A high-entropy random secret needs no slow hash.
Tenants are ``[a-z0-9-]`` so that ``_`` separates the parts without ambiguity.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

import msgspec

from spendgate_common.limits import TENANT_CHARS_MAX

KEY_PREFIX = "sgk"
KEY_ID_CHARS = 16
SECRET_CHARS = 32

TENANT_PATTERN = re.compile(rf"[a-z0-9][a-z0-9-]{{0,{TENANT_CHARS_MAX - 1}}}")
KEY_ID_PATTERN = re.compile(rf"[a-z2-7]{{{KEY_ID_CHARS}}}")
SECRET_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
_KEY_PATTERN = re.compile(
    rf"{KEY_PREFIX}_({TENANT_PATTERN.pattern})_({KEY_ID_PATTERN.pattern})"
    rf"_([a-z2-7]{{{SECRET_CHARS}}})"
)


class VaultKey(msgspec.Struct, frozen=True):
    tenant: str
    key_id: str
    secret: str

    def __str__(self) -> str:
        return f"{KEY_PREFIX}_{self.tenant}_{self.key_id}_{self.secret}"

    @property
    def secret_sha256(self) -> str:
        return hash_secret(self.secret)


def _random_base32(chars: int) -> str:
    raw = secrets.token_bytes((chars * 5 + 7) // 8)
    return base64.b32encode(raw).decode("ascii").lower().rstrip("=")[:chars]


def new_vault_key(tenant: str) -> VaultKey:
    """A fresh key for ``tenant`` (which must match :data:`TENANT_PATTERN`)."""
    assert is_valid_tenant(tenant), tenant
    return VaultKey(tenant, _random_base32(KEY_ID_CHARS), _random_base32(SECRET_CHARS))


def is_valid_tenant(tenant: str) -> bool:
    """``[a-z0-9][a-z0-9-]*``, at most TENANT_CHARS_MAX characters (whole string)."""
    return TENANT_PATTERN.fullmatch(tenant) is not None


def parse_vault_key(text: str) -> VaultKey | None:
    """Parse a presented key; ``None`` when it does not have a vault key's shape."""
    match = _KEY_PATTERN.fullmatch(text)
    if match is None:
        return None
    return VaultKey(match.group(1), match.group(2), match.group(3))


def hash_secret(secret: str) -> str:
    """Hex SHA-256 of a key's secret part: what the ledger stores and compares."""
    return hashlib.sha256(secret.encode("ascii")).hexdigest()
