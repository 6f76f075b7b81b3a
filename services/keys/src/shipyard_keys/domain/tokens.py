"""API token and client key secrets: how they are made, hashed and recognised.

A token is ``sy_`` + 32 random bytes (URL-safe base64), shown once to whoever created it;
a deployment's client key is the same with ``sk_``. Only their SHA-256 is stored. A slow
password KDF (bcrypt, scrypt, argon2) would add nothing: those protect *low-entropy*
secrets against guessing, and 256 bits from the OS CSPRNG cannot be guessed however fast
the hash is. A fast, unsalted hash also lets the server find a token by its hash with one
index lookup, which a salted KDF would not.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

TOKEN_PREFIX = "sy_"  # noqa: S105 - a prefix, not a secret
"""Every API token starts with this, so scanners (and people) recognise leaked ones."""

TOKEN_ID_PREFIX = "tok_"  # noqa: S105 - a prefix, not a secret
"""Every token id starts with this; ids are public (listed, logged, in Principals)."""

MAX_TOKEN_LENGTH = 256
"""Longer strings are refused before hashing; real tokens are 46 characters."""

CLIENT_KEY_PREFIX = "sk_"
"""Every client key secret starts with this: distinct from ``sy_`` so that the gateway (and
people) tell a deployment's client key from a person's API token at a glance."""

CLIENT_KEY_ID_PREFIX = "ck_"
"""Every client key id starts with this; ids are public (listed, logged, in events)."""

_TOKEN_ID = re.compile(r"^tok_[0-9a-f]{8}$")


def new_token() -> str:
    """A fresh API token secret (``sy_`` + 43 URL-safe characters, 256 bits)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def new_token_id() -> str:
    """A fresh public token id (``tok_`` + 8 hex digits); unique per user (the User
    aggregate draws again on a clash), not a secret."""
    return TOKEN_ID_PREFIX + secrets.token_hex(4)


def hash_token(token: str) -> str:
    """The stored form of a token: its SHA-256, hex encoded (see the module docstring for
    why no slow KDF)."""
    return hashlib.sha256(token.encode()).hexdigest()


def looks_like_token(token: str) -> bool:
    """Whether ``token`` has a Shipyard token's shape (prefix, bounded length); cheap
    checks done before any lookup."""
    return token.startswith(TOKEN_PREFIX) and len(token) <= MAX_TOKEN_LENGTH


def hashes_match(stored_hash: str, token: str) -> bool:
    """Whether ``token`` hashes to ``stored_hash``, compared in constant time."""
    return hmac.compare_digest(stored_hash.encode(), hash_token(token).encode())


def is_token_id(value: str) -> bool:
    """Whether ``value`` has the shape of a token id (``tok_`` + 8 lowercase hex digits)."""
    return bool(_TOKEN_ID.match(value))


def new_client_key() -> str:
    """A fresh client key secret (``sk_`` + 43 URL-safe characters, 256 bits)."""
    return CLIENT_KEY_PREFIX + secrets.token_urlsafe(32)


def new_client_key_id() -> str:
    """A fresh public client key id (``ck_`` + 8 hex digits); unique per deployment (the
    ClientKeys aggregate draws again on a clash), not a secret."""
    return CLIENT_KEY_ID_PREFIX + secrets.token_hex(4)


def looks_like_client_key(secret: str) -> bool:
    """Whether ``secret`` has a client key's shape (prefix, bounded length); cheap checks
    done before any lookup."""
    return secret.startswith(CLIENT_KEY_PREFIX) and len(secret) <= MAX_TOKEN_LENGTH
