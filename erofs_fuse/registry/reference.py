"""Image references: ``[host[:port]/]repository[:tag][@sha256:<hex>]``.

The grammar is distribution's ``reference`` package (docker's): the first path component is a
registry host when it holds a ``.`` or a ``:``, is ``localhost`` or a bracketed IPv6 address;
otherwise the host is ``docker.io`` and a one-component name gets ``library/`` in front. The
name and tag patterns are the OCI distribution spec's (v1.1, "Pulling manifests"). Only
``sha256`` digests are accepted, like everywhere else in erofs-fuse.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from .errors import RegistryError

__all__ = ["DOCKER_HUB", "Reference", "is_loopback", "is_repository_name"]

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"  # where docker.io's API answers
_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])"
                   r"(?::[0-9]{1,5})?")
MAX_NAME = 255  # distribution's limit on host + repository


@dataclass(frozen=True)
class Reference:
    """A parsed reference. ``host`` is as written (``docker.io`` for Docker Hub), ``tag`` is
    "latest" when neither a tag nor a digest was given; with a digest, the digest is what is
    fetched and the tag only names."""

    host: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str) -> Reference:
        if not text or len(text) > MAX_NAME + 200 or text != text.strip():
            raise RegistryError(f"image reference {text[:100]!r}: empty, too long or spaced")
        rest, _, digest = text.partition("@")
        if digest and not _DIGEST.fullmatch(digest):
            raise RegistryError(f"image reference {text!r}: digest {digest!r} is not "
                                "sha256:<64 lowercase hex>")
        tag: str | None = None
        slash, colon = rest.rfind("/"), rest.rfind(":")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1:]
            if not _TAG.fullmatch(tag):
                raise RegistryError(f"image reference {text!r}: tag {tag!r} is not valid")
        first, sep, remainder = rest.partition("/")
        if sep and ("." in first or ":" in first or first == "localhost" or
                    first.startswith("[")):
            if not _HOST.fullmatch(first):
                raise RegistryError(f"image reference {text!r}: host {first!r} is not valid")
            host, name = first, remainder
        else:
            host, name = DOCKER_HUB, rest
        if host.lower() in _HUB_ALIASES:
            host = DOCKER_HUB
            if "/" not in name:
                name = "library/" + name
        if not _NAME.fullmatch(name) or len(host) + 1 + len(name) > MAX_NAME:
            raise RegistryError(f"image reference {text!r}: repository {name!r} is not valid "
                                "(lowercase letters, digits and . _ - separators)")
        return cls(host, name, tag if tag or digest else "latest", digest or None)

    @property
    def api_host(self) -> str:
        """The ``host[:port]`` the distribution API is at."""
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    @property
    def reference(self) -> str:
        """What goes after ``/manifests/``: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def with_digest(self, digest: str) -> Reference:
        """The same name pinned to ``digest``."""
        return Reference(self.host, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = f"{self.host}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def is_repository_name(name: str) -> bool:
    """Whether ``name`` is a repository name (``team/app``), as the distribution spec
    spells them."""
    return bool(_NAME.fullmatch(name)) and len(name) <= MAX_NAME


def is_loopback(host: str) -> bool:
    """Whether ``host[:port]`` is this machine: ``localhost``, 127.0.0.0/8 or ::1."""
    name = host
    if name.startswith("["):
        name = name[1:name.find("]")] if "]" in name else name[1:]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
