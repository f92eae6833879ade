"""Authentication of what travels through the broker: each message is sealed with the
group's key, and a node reads only messages that carry a valid seal.

A broker is often shared (other applications, other teams), and its pub/sub channels and
streams take messages from any client that may publish: without a seal, anyone who can
publish could patch rows into every node's trees, or claim a capture node's term. The seal
is an HMAC-SHA256 of the group's stream name and the message, keyed with ``fanout_key``:
only a holder of the key can make one, and a message sealed for one group (one database and
channel) is not valid in another that happens to share the key and the broker.

A message is the 32-byte tag followed by the codec's bytes. The seal authenticates; it does
not hide: what travels is readable by whoever may read the stream (broker ACLs, see
docs/security.md, "The fan-out broker", decide that).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from rowsync.errors import ConfigurationError

OVERHEAD = hashlib.sha256().digest_size
"""Bytes the seal adds to a message."""

MIN_KEY = 16
"""The shortest key accepted, in bytes."""

_IN_PROCESS = secrets.token_bytes(32)
"""The key of ``memory://`` groups given none: only this process can publish to them."""


def group_key(url: str, key: str | bytes | None) -> bytes:
    """The key that seals the messages of the group at ``url``; ConfigurationError when a
    broker other processes can reach is given no key, or one too short to resist guessing."""
    if key is None:
        if urlsplit(url).scheme == "memory":
            return _IN_PROCESS
        raise ConfigurationError(
            f"fanout={url!r} needs fanout_key=: a secret shared by every node of the group, "
            "that authenticates what they publish (without it, anyone who can publish to the "
            "broker could patch rows into the trees). Make one with "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    secret = key.encode() if isinstance(key, str) else bytes(key)
    if len(secret) < MIN_KEY:
        raise ConfigurationError(f"fanout_key must be at least {MIN_KEY} bytes long")
    return secret


class Seal:
    """Seals and opens the messages of one group's stream (``context``: its name)."""

    def __init__(self, key: bytes, context: str) -> None:
        self._key = key
        self._context = b"rowsync fan-out\0" + context.encode() + b"\0"

    def __repr__(self) -> str:
        return "<Seal>"  # never the key

    def seal(self, body: bytes) -> bytes:
        return self._tag(body) + body

    def open(self, message: bytes) -> bytes | None:
        """The message's body, or None when its seal is not valid (forged, altered, or sealed
        with another key)."""
        tag, body = message[:OVERHEAD], message[OVERHEAD:]
        return body if hmac.compare_digest(tag, self._tag(body)) else None

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._key, self._context + body, hashlib.sha256).digest()
