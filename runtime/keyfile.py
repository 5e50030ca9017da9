"""Private key files: the 32-byte Ed25519 seed as 64 hex characters and a newline, mode 0600.

Written atomically (temp file, fsync, rename) and never overwritten; loading refuses a file
that others can read, because a leaked device or fog key spends someone's money.
"""

import os
import stat
from pathlib import Path

import nacl.signing

from protocol import limits

KEY_FILE_MODE = 0o600


class KeyFileError(Exception):
    pass


def new_key_file(path: str | Path) -> nacl.signing.SigningKey:
    """Generate a key and write it to ``path`` (which must not exist)."""
    key = nacl.signing.SigningKey.generate()
    write_key_file(path, key)
    return key


def write_key_file(path: str | Path, key: nacl.signing.SigningKey) -> None:
    path = Path(path)
    if path.exists():
        raise KeyFileError(f"{path}: exists; refusing to overwrite a key")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
    try:
        os.write(fd, bytes(key).hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def load_key_file(path: str | Path) -> nacl.signing.SigningKey:
    path = Path(path)
    try:
        st = path.stat()
        text = path.read_text().strip()
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{path}: mode {stat.S_IMODE(st.st_mode):o}; must be 0600")
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        raise KeyFileError(f"{path}: not hex") from None
    if len(seed) != limits.SEED_BYTES:
        raise KeyFileError(f"{path}: seed must be {limits.SEED_BYTES} bytes")
    return nacl.signing.SigningKey(seed)
