"""Ed25519 signatures of chain checkpoints (docs/audit.md, "Signed checkpoints").

A checkpoint signs, byte for byte::

    message = b"spendgate-audit-checkpoint-v1" || 0x00      30 bytes (domain separation)
           || partition as an unsigned 32-bit big-endian       4 bytes
           || seq as an unsigned 64-bit big-endian             8 bytes
           || link                                            32 bytes

with Ed25519 (RFC 8032, pure, no pre-hash), giving a 64-byte signature. The key id is the
first 16 hex digits of SHA-256 over the raw 32-byte public key, so anyone can recompute it
from the key. The private key comes from a secret, either as PEM (PKCS#8, ``-----BEGIN
PRIVATE KEY-----``) or as the standard base64 of the raw 32-byte Ed25519 seed. Pure: no I/O
besides what the caller passes in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from spendgate_auditor._chain import LINK_BYTES, PARTITION_MAX, SEQ_MAX

ALGORITHM = "ed25519"
CHECKPOINT_DOMAIN = b"spendgate-audit-checkpoint-v1\x00"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
KEY_ID_HEX_CHARS = 16


class SigningKeyError(ValueError):
    """The configured private key is not an Ed25519 key in a format we read."""


def checkpoint_message(partition: int, seq: int, link: bytes) -> bytes:
    """The bytes a checkpoint signature covers (see the module docstring)."""
    assert 0 <= partition <= PARTITION_MAX, partition
    assert 1 <= seq <= SEQ_MAX, seq
    assert len(link) == LINK_BYTES, len(link)
    return CHECKPOINT_DOMAIN + partition.to_bytes(4, "big") + seq.to_bytes(8, "big") + link


def key_id_of(public_key: bytes) -> str:
    """The key id of a raw 32-byte Ed25519 public key."""
    assert len(public_key) == PUBLIC_KEY_BYTES, len(public_key)
    return hashlib.sha256(public_key).hexdigest()[:KEY_ID_HEX_CHARS]


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_pem(public_key: bytes) -> str:
    key = Ed25519PublicKey.from_public_bytes(public_key)
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode("ascii")


def parse_public_key(text: str) -> bytes:
    """A raw 32-byte public key from PEM (SubjectPublicKeyInfo) or base64 of the raw key."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            loaded = serialization.load_pem_public_key(text.encode("ascii"))
        except ValueError as error:
            raise SigningKeyError(f"not a PEM public key: {error}") from None
        if not isinstance(loaded, Ed25519PublicKey):
            raise SigningKeyError("the PEM public key is not an Ed25519 key")
        return raw_public_key(loaded)
    raw = _base64(text)
    if len(raw) != PUBLIC_KEY_BYTES:
        raise SigningKeyError(f"a raw Ed25519 public key has 32 bytes, got {len(raw)}")
    return raw


def _base64(text: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise SigningKeyError("neither PEM nor standard base64") from None


@dataclass(frozen=True, slots=True)
class Signer:
    """The current private key. ``ephemeral``: generated in memory (no key configured)."""

    private_key: Ed25519PrivateKey
    public_key: bytes
    key_id: str
    ephemeral: bool = False

    @classmethod
    def of(cls, private_key: Ed25519PrivateKey, *, ephemeral: bool = False) -> Signer:
        public = raw_public_key(private_key.public_key())
        return cls(private_key, public, key_id_of(public), ephemeral)

    @classmethod
    def generate_ephemeral(cls) -> Signer:
        return cls.of(Ed25519PrivateKey.generate(), ephemeral=True)

    def sign(self, partition: int, seq: int, link: bytes) -> bytes:
        signature = self.private_key.sign(checkpoint_message(partition, seq, link))
        assert len(signature) == SIGNATURE_BYTES
        return signature


def load_private_key(secret: bytes) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (PKCS#8) or from base64 of the raw 32-byte seed.

    Raises :class:`SigningKeyError` (never echoing the secret) when it is neither.
    """
    text = secret.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            loaded = serialization.load_pem_private_key(text, password=None)
        except (ValueError, TypeError) as error:
            raise SigningKeyError(f"not an unencrypted PEM private key ({error})") from None
        if not isinstance(loaded, Ed25519PrivateKey):
            raise SigningKeyError("the PEM private key is not an Ed25519 key")
        return loaded
    raw = _base64(text.decode("ascii", errors="replace"))
    if len(raw) != PUBLIC_KEY_BYTES:
        raise SigningKeyError(f"a raw Ed25519 private key (seed) has 32 bytes, got {len(raw)}")
    return Ed25519PrivateKey.from_private_bytes(raw)


def new_private_key_pem() -> bytes:
    """A new Ed25519 private key as unencrypted PKCS#8 PEM (for ``spendgate up``)."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def verify_signature(
    public_key: Ed25519PublicKey, partition: int, seq: int, link: bytes, signature: bytes
) -> bool:
    """Whether ``signature`` is ``public_key``'s signature of the checkpoint (``False`` for
    values no checkpoint can have, such as a negative partition from an edited row)."""
    if len(signature) != SIGNATURE_BYTES or len(link) != LINK_BYTES:
        return False
    if not (0 <= partition <= PARTITION_MAX and 1 <= seq <= SEQ_MAX):
        return False
    try:
        public_key.verify(signature, checkpoint_message(partition, seq, link))
    except InvalidSignature:
        return False
    return True
