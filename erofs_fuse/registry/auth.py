"""Registry credentials and authentication challenges.

Sources: RFC 7235 §4.1 (``WWW-Authenticate``: challenges of a scheme and ``name=value``
parameters, values tokens or quoted strings), RFC 6750 §3 (the Bearer challenge), and
distribution's token spec (``docs/spec/auth/token.md``, v2.8.2): the client GETs
``<realm>?service=<service>&scope=<scope>`` (with Basic credentials when it has any, else
anonymously) and receives JSON with ``token`` (or ``access_token``) and ``expires_in`` (seconds,
60 when absent).

Credentials come from docker's client configuration: ``$DOCKER_CONFIG/config.json`` (default
``~/.docker/config.json``), its ``auths`` map from a registry (``host[:port]``, optionally as a
URL, Docker Hub as ``https://index.docker.io/v1/``) to ``auth`` (base64 of ``user:password``) or
``username`` and ``password``. Credential helpers (``credsStore``, ``credHelpers``) and
``identitytoken`` are not supported: such a registry is tried anonymously.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import AuthError, BadResponse
from .reference import DOCKER_HUB, is_loopback

__all__ = ["Challenge", "CredentialSource", "Credentials", "DockerConfig", "Token",
           "parse_challenges", "parse_token"]

MIN_EXPIRES = 60  # the token spec's default and floor for expires_in
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    def basic(self) -> str:
        """The ``Authorization`` header value for Basic authentication."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


CredentialSource = Callable[[str], "Credentials | None"]
"""Given a registry host as written in a reference, its credentials or None."""


_HUB_KEYS = ("index.docker.io", "docker.io", "registry-1.docker.io")


def _config_key(key: str) -> str:
    """An ``auths`` key as ``host[:port]``: without scheme and path, lowercased."""
    key = key.strip().lower()
    for scheme in ("https://", "http://"):
        key = key.removeprefix(scheme)
    return key.partition("/")[0]


@dataclass(frozen=True)
class DockerConfig:
    """Credentials from docker's ``config.json``: the file ``path``, or else
    ``$DOCKER_CONFIG/config.json``, or else ``~/.docker/config.json``, read at each call (a
    missing file means no credentials). Picklable, so worker processes can use it."""

    path: str | None = None

    def config_path(self) -> str:
        if self.path:
            return self.path
        directory = os.environ.get("DOCKER_CONFIG") or os.path.join(
            os.path.expanduser("~"), ".docker")
        return os.path.join(directory, "config.json")

    def __call__(self, host: str) -> Credentials | None:
        path = self.config_path()
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_CONFIG_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise AuthError(f"{path}: cannot read: {exc.strerror}") from None
        if len(data) > MAX_CONFIG_BYTES:
            raise AuthError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise AuthError(f"{path}: not valid JSON") from None
        auths = doc.get("auths") if isinstance(doc, dict) else None
        if not isinstance(auths, dict):
            return None
        wanted = _HUB_KEYS if host == DOCKER_HUB else (host.lower(),)
        entries = {_config_key(k): v for k, v in auths.items() if isinstance(k, str)}
        for key in wanted:
            if key in entries:
                return _entry_credentials(entries[key], f"{path}: auths[{key!r}]")
        return None


def _entry_credentials(entry: Any, where: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise AuthError(f"{where}: not an object")
    encoded = entry.get("auth")
    if isinstance(encoded, str) and encoded:
        try:
            user, sep, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise AuthError(f"{where}: auth is not base64 of user:password") from None
        if not sep or not user:
            raise AuthError(f"{where}: auth is not base64 of user:password")
        return Credentials(user, password)
    name, secret = entry.get("username"), entry.get("password")
    if isinstance(name, str) and name and isinstance(secret, str):
        return Credentials(name, secret)
    return None  # identitytoken alone, or an empty entry


# challenges -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Challenge:
    scheme: str  # lowercased: "bearer", "basic"
    params: dict[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")


_TOKEN_RE = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_PARTS = re.compile(rf"""\s*(?:
      (?P<param>{_TOKEN_RE})\s*=\s*(?:"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<value>{_TOKEN_RE}=*))
    | (?P<scheme>{_TOKEN_RE})
    | (?P<comma>,)
    )""", re.VERBOSE)
MAX_HEADER = 8192


def parse_challenges(header: str) -> list[Challenge]:
    """The challenges of a ``WWW-Authenticate`` value, in order; malformed text ends the parse
    (what was understood so far is kept)."""
    out: list[Challenge] = []
    pos, text = 0, header[:MAX_HEADER]
    while pos < len(text):
        m = _PARTS.match(text, pos)
        if not m or m.end() == pos:
            break
        pos = m.end()
        if m.group("scheme"):
            out.append(Challenge(m.group("scheme").lower(), {}))
        elif m.group("param") and out:
            quoted = m.group("quoted")
            value = (re.sub(r"\\(.)", r"\1", quoted) if quoted is not None
                     else str(m.group("value")))
            out[-1].params.setdefault(m.group("param").lower(), value)
    return out


# tokens -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Token:
    value: str = field(repr=False)
    expires_at: float  # time.monotonic() after which it is fetched again


def parse_token(data: bytes, now: float, where: str) -> Token:
    """A token server's JSON reply as a token expiring a little before it says."""
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise BadResponse(f"{where}: token reply is not JSON") from None
    if not isinstance(doc, dict):
        raise BadResponse(f"{where}: token reply is not a JSON object")
    value = doc.get("token") or doc.get("access_token")
    if not isinstance(value, str) or not value or len(value) > MAX_HEADER:
        raise BadResponse(f"{where}: token reply has no token")
    expires = doc.get("expires_in")
    seconds = expires if isinstance(expires, int) and not isinstance(expires, bool) else 0
    seconds = max(seconds, MIN_EXPIRES)
    return Token(value, now + seconds * 0.9)


def may_send_credentials(url_scheme: str, host: str) -> bool:
    """Credentials travel only over HTTPS, or to this machine."""
    return url_scheme == "https" or is_loopback(host)
