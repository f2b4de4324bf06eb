"""CURVE key files for the mesh: generate, load, allow-list. Secret keys never leave this module
in a string: not in a repr, a log line or an exception message.

Files use ZeroMQ's certificate format (ZPL, as ``zmq.auth.create_certificates`` writes it), so
``zmq.auth.load_certificates`` and czmq tools read them too::

    keys/tokyo-1.key          public key only            mode 0644 (give it to peers)
    keys/tokyo-1.key_secret   public and secret key      mode 0600 (stays on the node)

A directory of ``*.key`` files is an allow-list: :func:`load_allow_list` gives their keys, which
the agent's ZAP handler admits (every other client fails the CURVE handshake).
"""

from __future__ import annotations

import datetime
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

__all__ = ["CurveIdentity", "KeyFileError", "check_public_key", "generate_keypair",
           "load_allow_list", "load_identity", "load_public_key", "load_public_keys"]

_Z85_KEY_CHARS = 40
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PUBLIC_MODE = 0o644
_SECRET_MODE = 0o600


class KeyFileError(ValueError):
    """Raised when a key file is missing, unreadable, malformed, or (a secret file) readable by
    group or others. The message names the file and the problem, never a key."""


@dataclass(frozen=True, slots=True)
class CurveIdentity:
    """A node's CURVE key pair, Z85-encoded (40 ASCII bytes each). ``repr`` shows the public key
    only; construction checks that the public key belongs to the secret one."""

    public: bytes
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "public", check_public_key(self.public, "public"))
        secret = self.secret.encode("ascii") if isinstance(self.secret, str) else self.secret
        if not isinstance(secret, bytes) or len(secret) != _Z85_KEY_CHARS:
            raise ValueError(f"CurveIdentity.secret: must be a {_Z85_KEY_CHARS}-character Z85 "
                             "key (value not shown)")
        try:
            derived = zmq.curve_public(secret)
        except (zmq.ZMQError, ValueError):
            raise ValueError("CurveIdentity.secret: not a valid Z85 key (value not shown)") \
                from None
        if derived != self.public:
            raise ValueError(f"CurveIdentity: public key {self.public.decode()} does not "
                             "belong to the secret key")
        object.__setattr__(self, "secret", secret)

    @classmethod
    def generate(cls) -> CurveIdentity:
        """A fresh key pair (``zmq.curve_keypair``), not written anywhere."""
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    def __repr__(self) -> str:
        return f"CurveIdentity(public={self.public.decode()!r}, secret=<redacted>)"

    __str__ = __repr__


def check_public_key(key: bytes | str, what: str = "public_key") -> bytes:
    """``key`` as Z85 bytes, checked to be a 40-character Z85 key.

    Raises:
        ValueError: not a 40-character Z85 key (the message names ``what``).
    """
    raw = key.encode("ascii", "replace") if isinstance(key, str) else key
    if not isinstance(raw, bytes) or len(raw) != _Z85_KEY_CHARS:
        raise ValueError(f"{what} = {key!r:.60}: must be a {_Z85_KEY_CHARS}-character Z85 "
                         "CURVE key")
    try:
        z85.decode(raw)
    except (ValueError, KeyError):
        raise ValueError(f"{what} = {key!r:.60}: not valid Z85") from None
    return raw


def generate_keypair(directory: str | os.PathLike[str], name: str, *,
                     overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``name.key`` (public, 0644) and ``name.key_secret`` (0600) into ``directory``
    (created 0700 if missing) and return their paths (public, secret). The secret file is
    created with mode 0600 from the start (never briefly readable by others).

    Raises:
        ValueError: ``name`` is not a plain file name (letters, digits, ``.``, ``_``, ``-``).
        FileExistsError: a file of that name exists and ``overwrite`` is False.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name = {name!r}: must be 1-128 of letters, digits, '.', '_', '-' "
                         "(starting with a letter or digit)")
    folder = Path(directory)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    public_path, secret_path = folder / f"{name}.key", folder / f"{name}.key_secret"
    if not overwrite:
        existing = [str(p) for p in (public_path, secret_path) if p.exists()]
        if existing:
            raise FileExistsError(f"{', '.join(existing)}: already exists (to replace the key "
                                  "pair on purpose: overwrite=True, bastion keys generate --force)")
    ident = CurveIdentity.generate()
    now = datetime.datetime.now().isoformat(timespec="seconds")
    _write(public_path, _PUBLIC_MODE, _zpl(now, "Public", ident.public, None))
    _write(secret_path, _SECRET_MODE, _zpl(now, "**Secret**", ident.public, ident.secret))
    return public_path, secret_path


def load_identity(path: str | os.PathLike[str]) -> CurveIdentity:
    """The key pair in the secret file ``path`` (``NAME.key_secret``).

    Raises:
        KeyFileError: missing or unreadable; not a regular file; readable or writable by group
            or others (mode must be 0600, or 0400); no secret key in it (a public ``.key`` file
            passed by mistake); keys malformed or not a pair.
    """
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise KeyFileError(f"{p}: cannot read secret key file: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{p}: not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise KeyFileError(f"{p}: secret key file has mode {mode:04o}, must be 0600 (readable "
                           f"by its owner only); fix it with: chmod 600 {p}")
    public, secret = _read_certificate(p)
    if secret is None:
        raise KeyFileError(f"{p}: no secret-key in it (is this a public .key file? pass "
                           "NAME.key_secret)")
    try:
        return CurveIdentity(public, secret)
    except ValueError as exc:
        raise KeyFileError(f"{p}: {exc}") from None


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The public key in a ``.key`` (or ``.key_secret``) file.

    Raises:
        KeyFileError: missing, unreadable or malformed.
    """
    p = Path(path)
    public, _secret = _read_certificate(p)
    return public


def load_public_keys(directory: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every ``*.key`` file in ``directory``: file stem -> public key, sorted by name.

    Raises:
        KeyFileError: the directory is missing, or one file is malformed (named).
    """
    folder = Path(directory)
    if not folder.is_dir():
        raise KeyFileError(f"{folder}: not a directory of public keys")
    return {p.stem: load_public_key(p) for p in sorted(folder.glob("*.key"))}


def load_allow_list(directory: str | os.PathLike[str]) -> frozenset[bytes]:
    """The public keys of every ``*.key`` file in ``directory`` (the clients to admit).

    Raises:
        KeyFileError: as :func:`load_public_keys`.
    """
    return frozenset(load_public_keys(directory).values())


# ---------------------------------------------------------------------------------------------

def _read_certificate(p: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(p)
    except OSError as exc:
        raise KeyFileError(f"{p}: cannot read key file: {exc.strerror or exc}") from None
    except ValueError:
        raise KeyFileError(f"{p}: no public-key in it (not a ZeroMQ certificate)") from None
    try:
        public = check_public_key(public, "public-key")
    except ValueError:
        raise KeyFileError(f"{p}: public-key is not a 40-character Z85 key") from None
    return public, secret


def _zpl(when: str, what: str, public: bytes, secret: bytes | None) -> bytes:
    lines = [f"#   ZeroMQ CURVE {what} Certificate, generated {when} by bastion keys",
             "#   " + ("DO NOT COPY THIS FILE OFF ITS NODE nor change its permissions."
                      if secret else "Give this file to peers: it goes in their allow-list."),
             "", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return ("\n".join(lines) + "\n").encode()


def _write(path: Path, mode: int, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file created with ``mode``, then rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have removed bits we want (0644)
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
