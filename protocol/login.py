"""Broker logins (docs/protocol.md, "Broker login"): a device's username and password.

- username: the device's Ed25519 public key, 64 lowercase hex characters;
- password: ``base64url(HMAC-SHA256(login_secret, "fogpay/1 broker login" || key)[:16])``
  without padding (22 characters). ``login_secret`` (32 random bytes) is kept by whoever
  issues the logins (the cloud; the sandbox's DIR); brokers keep only ``account_digest`` of
  each password, never the secret.
"""

import base64
import hashlib
import hmac
from typing import Final

LOGIN_CONTEXT: Final = b"fogpay/1 broker login"
LOGIN_SECRET_BYTES: Final = 32
PASSWORD_MAC_BYTES: Final = 16


def device_username(device: bytes) -> str:
    return device.hex()


def device_password(login_secret: bytes, device: bytes) -> str:
    if len(login_secret) < LOGIN_SECRET_BYTES:
        raise ValueError(f"a login secret has at least {LOGIN_SECRET_BYTES} bytes")
    mac = hmac.new(login_secret, LOGIN_CONTEXT + device, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:PASSWORD_MAC_BYTES]).rstrip(b"=").decode()


def account_digest(password: str) -> str:
    """How the embedded broker's accounts file keeps a password: SHA-256, hex (the passwords
    are 128-bit secrets, so a fast hash is enough)."""
    return hashlib.sha256(password.encode()).hexdigest()
