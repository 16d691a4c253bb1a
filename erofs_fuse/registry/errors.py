"""The registry client's one error tree: ``RegistryError`` and its cases.

``RegistryError`` is an ``OciError``, so a command that reports image errors reports these too;
``str()`` is one line naming the registry, the repository and what was asked for.
"""

from __future__ import annotations

from ..oci.layout import OciError


class RegistryError(OciError):
    """A registry could not give what was asked, or gave something refused."""


class NotFound(RegistryError):
    """404: no such repository, tag, manifest or blob."""


class AuthError(RegistryError):
    """401/403, a token server's refusal, or credentials that cannot be read or sent."""


class DigestMismatch(RegistryError):
    """Bytes that do not hash to the digest they were asked for, or are longer than its size."""


class IncompleteBody(RegistryError):
    """A reply that ended (or broke off) before all the bytes it announced."""


class Unreachable(RegistryError):
    """No answer after every try: connection errors, timeouts, 5xx or 429 replies."""


class BadResponse(RegistryError):
    """A reply that breaks the protocol: a wrong status or header, an oversized or
    malformed manifest, a range that is not the one asked for."""
