"""HTTP to registries: schemes, retries, authentication, bounded bodies.

One ``Session`` holds an ``httpx.Client`` (a connection pool, HTTP/1.1) and, per registry host,
how it authenticates: the last Bearer challenge, tokens by scope (``repository:<name>:pull``;
push asks for ``pull,push`` and gets its own token) and whether it asked for Basic. It is
thread-safe: httpx's client may be shared by threads, and the auth state changes under a lock.
After a fork the child makes its own pool (sockets must not be shared between processes).

Retries (``RetryPolicy``): connection errors, timeouts, 5xx and 429 are retried with
exponential backoff (429 and 503 waiting for ``Retry-After`` up to a cap); a 401 gets one new
try after authenticating; every other 4xx is final. Redirects are followed (a few), and httpx
drops the ``Authorization`` header when one leaves the registry's origin.
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Union

import httpx

from .auth import (Challenge, CredentialSource, Credentials, Token, may_send_credentials,
                   parse_challenges, parse_token)
from .errors import AuthError, BadResponse, IncompleteBody, NotFound, RegistryError, Unreachable
from .reference import is_loopback

__all__ = ["Body", "RetryPolicy", "Session"]

CHUNK = 1 << 20
MAX_TOKEN_BYTES = 1 << 16
MAX_ERROR_BYTES = 1 << 14
MAX_REDIRECTS = 5

Body = Union[bytes, Callable[[], Iterator[bytes]]]
"""A request body: bytes, or a function that gives the bytes anew for each try."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to try. ``attempts`` counts the first try; the wait before try
    n+1 is ``backoff * 2**(n-1)`` (with up to 25% jitter) capped at ``max_backoff``, or a
    server's ``Retry-After`` capped at ``max_retry_after``. ``timeout`` bounds each connect and
    each read from the socket; ``deadline`` bounds a whole small reply (manifest, config,
    token, range)."""

    attempts: int = 4
    backoff: float = 0.2
    max_backoff: float = 5.0
    max_retry_after: float = 10.0
    timeout: float = 30.0
    deadline: float = 120.0

    def wait(self, tries: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        base = min(self.backoff * 2 ** (tries - 1), self.max_backoff)
        return float(base * (1 + random.random() / 4))


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()


@dataclass
class _HostAuth:
    lock: threading.Lock = field(default_factory=threading.Lock)
    bearer: Challenge | None = None
    basic: str | None = None  # the Authorization value, once the host asked for Basic
    tokens: dict[str, Token] = field(default_factory=dict)


class Session:
    """Requests to registries, authenticated and retried. ``plain_http``: None = HTTP for
    loopback hosts and HTTPS for the others; True = HTTP everywhere; False = HTTPS everywhere."""

    def __init__(self, *, plain_http: bool | None, credentials: CredentialSource | None,
                 retry: RetryPolicy) -> None:
        self.plain_http = plain_http
        self.credentials = credentials
        self.retry = retry
        self._lock = threading.Lock()
        self._hosts: dict[str, _HostAuth] = {}
        self._client: httpx.Client | None = None
        self._pid = 0

    # plumbing -------------------------------------------------------------------------------
    def scheme(self, host: str) -> str:
        plain = is_loopback(host) if self.plain_http is None else self.plain_http
        return "http" if plain else "https"

    def client(self) -> httpx.Client:
        with self._lock:
            if self._client is None or self._pid != os.getpid():
                # a forked child must not touch its parent's sockets: a new pool, the old one
                # left alone (closing it would shut the parent's connections down)
                self._client = httpx.Client(
                    timeout=httpx.Timeout(self.retry.timeout),
                    follow_redirects=True, max_redirects=MAX_REDIRECTS,
                    # blobs are hashed as sent: never let anything decode them
                    headers={"Accept-Encoding": "identity",
                             "User-Agent": "erofs-fuse-registry/0.1"})
                self._pid = os.getpid()
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                self._client.close()
            self._client = None

    def _host(self, host: str) -> _HostAuth:
        with self._lock:
            return self._hosts.setdefault(host, _HostAuth())

    def _credentials(self, host: str) -> Credentials | None:
        return self.credentials(host) if self.credentials is not None else None

    # requests -------------------------------------------------------------------------------
    def send(self, method: str, host: str, api_host: str, path: str, *, scope: str,
             headers: Mapping[str, str] | None = None, what: str, body: Body | None = None,
             attempts: int | None = None) -> httpx.Response:
        """The response to ``method`` on ``path`` of the registry ``host`` (its API at
        ``api_host``), its body not yet read (the caller closes it); any status that is not
        2xx raises. ``scope`` is the token scope the request needs. ``path`` may also be an
        absolute URL (an upload's ``Location``): the Authorization header goes only to the
        registry's own origin. ``body`` is bytes, or a function giving a new iterator of the
        bytes for each try; ``attempts`` (default the policy's) bounds the tries: an upload
        sends 1, since a body cut short may have left bytes in its session."""
        if path.startswith(("http://", "https://")):
            url = path
            own = httpx.URL(url).netloc.decode("ascii") == api_host
        else:
            url, own = f"{self.scheme(api_host)}://{api_host}{path}", True
        limit = attempts if attempts is not None else self.retry.attempts
        authenticated = False
        tries = 0
        while True:
            tries += 1
            request_headers = dict(headers or {})
            if own:
                request_headers.update(self._authorization(host, api_host, scope, what))
            content = body() if callable(body) else body
            response = self._try(method, url, request_headers, what, tries, content, limit)
            if response is None:
                continue
            status = response.status_code
            if status == 401 and not authenticated:
                challenge = response.headers.get("WWW-Authenticate", "")
                response.close()
                self._authenticate(host, api_host, scope, challenge, what)
                authenticated, tries = True, tries - 1  # the new try is not a retry
                continue
            if status == 429 or status >= 500:
                response.close()
                if tries >= limit:
                    raise Unreachable(f"{what}: {api_host} answered {status} "
                                      f"{response.reason_phrase} {tries} times")
                time.sleep(self.retry.wait(tries, _retry_after(response)))
                continue
            if status >= 300:
                raise self._status_error(response, what)
            return response

    def _try(self, method: str, url: str, headers: dict[str, str], what: str,
             tries: int, content: bytes | Iterator[bytes] | None = None,
             attempts: int | None = None) -> httpx.Response | None:
        """One request; None after a connection error that leaves tries to retry."""
        client = self.client()
        try:
            request = client.build_request(method, url, headers=headers, content=content)
            return client.send(request, stream=True)
        except httpx.TooManyRedirects:
            raise BadResponse(f"{what}: more than {MAX_REDIRECTS} redirects") from None
        except httpx.TransportError as exc:
            if _is_tls_failure(exc):  # a certificate or a plain-HTTP server: trying again
                raise Unreachable(f"{what}: {url}: TLS failed ({_describe(exc)}); a registry "
                                  "that speaks plain HTTP needs plain_http") from None
            if tries >= (attempts if attempts is not None else self.retry.attempts):
                raise Unreachable(f"{what}: {url}: {_describe(exc)} ({tries} tries)") from None
            time.sleep(self.retry.wait(tries, None))
            return None

    def _status_error(self, response: httpx.Response, what: str) -> RegistryError:
        status = response.status_code
        try:
            detail = _error_detail(read_limited(response, MAX_ERROR_BYTES, 5.0, what,
                                                truncate=True))
        except RegistryError:
            detail = ""
        finally:
            response.close()
        message = f"{what}: {status} {response.reason_phrase}{detail}"
        if status == 404:
            return NotFound(message)
        if status in (401, 403):
            return AuthError(message)
        return BadResponse(message)

    # authentication -------------------------------------------------------------------------
    def _authorization(self, host: str, api_host: str, scope: str,
                       what: str) -> dict[str, str]:
        """The Authorization header for a request, from what the registry asked before."""
        state = self._host(host)
        with state.lock:
            # a push's token (pull,push) serves its reads too: no second token for them
            for held in (scope, scope + ",push") if scope.endswith(":pull") else (scope,):
                token = state.tokens.get(held)
                if token is not None and token.expires_at > time.monotonic():
                    return {"Authorization": f"Bearer {token.value}"}
            bearer, basic = state.bearer, state.basic
        if bearer is not None:  # a new scope (or an expired token): ask before being told
            return {"Authorization": f"Bearer {self._fetch_token(host, bearer, scope, what)}"}
        return {"Authorization": basic} if basic else {}

    def _authenticate(self, host: str, api_host: str, scope: str, header: str,
                      what: str) -> None:
        """Act on a 401's challenge, so that the next try carries the right Authorization."""
        challenges = {c.scheme: c for c in reversed(parse_challenges(header))}
        state = self._host(host)
        if "bearer" in challenges and challenges["bearer"].realm:
            with state.lock:
                state.bearer, state.basic = challenges["bearer"], None
                state.tokens.pop(scope, None)
            return  # _authorization fetches the token
        if "basic" in challenges:
            creds = self._credentials(host)
            if creds is None:
                raise AuthError(f"{what}: {host} asks for a user name and password; add them "
                                "to the docker config (docker login, or auths in "
                                "~/.docker/config.json)")
            if not may_send_credentials(self.scheme(api_host), api_host):
                raise AuthError(f"{what}: {host} asks for a password over plain HTTP; "
                                "refused (only over HTTPS or to this machine)")
            with state.lock:
                if state.basic == creds.basic():  # these very credentials were refused
                    raise AuthError(f"{what}: {host} refused the password of "
                                    f"{creds.username!r} (401)")
                state.basic = creds.basic()
            return
        raise AuthError(f"{what}: {host} refused access (401) and offers no usable "
                        f"authentication ({header[:100]!r})")

    def _fetch_token(self, host: str, challenge: Challenge, scope: str, what: str) -> str:
        state = self._host(host)
        with state.lock:  # one fetch per host at a time; the others then find it cached
            token = state.tokens.get(scope)
            now = time.monotonic()
            if token is not None and token.expires_at > now:
                return token.value
            token = self._request_token(host, challenge, scope, what)
            state.tokens[scope] = token
            return token.value

    def _request_token(self, host: str, challenge: Challenge, scope: str,
                       what: str) -> Token:
        realm = httpx.URL(challenge.realm)
        if realm.scheme not in ("http", "https") or not realm.host:
            raise AuthError(f"{what}: {host}'s token realm {challenge.realm[:100]!r} is not "
                            "an http(s) URL")
        params: list[tuple[str, str | int | float | bool | None]] = []
        if "service" in challenge.params:
            params.append(("service", challenge.params["service"]))
        params.append(("scope", scope))
        headers = {}
        creds = self._credentials(host)
        if creds is not None:
            if not may_send_credentials(realm.scheme, realm.netloc.decode("ascii")):
                raise AuthError(f"{what}: {host}'s token realm {realm} is plain HTTP; "
                                "credentials are sent only over HTTPS or to this machine")
            headers["Authorization"] = creds.basic()
        where = f"{what}: token from {realm.host}"
        url = realm.copy_merge_params(params)
        tries = 0
        while True:
            tries += 1
            response = self._try("GET", str(url), headers, where, tries)
            if response is None:
                continue
            status = response.status_code
            if status == 429 or status >= 500:
                response.close()
                if tries >= self.retry.attempts:
                    raise Unreachable(f"{where}: answered {status} {tries} times")
                time.sleep(self.retry.wait(tries, _retry_after(response)))
                continue
            if status in (401, 403):
                response.close()
                who = f"the credentials of {creds.username!r}" if creds else "anonymous access"
                raise AuthError(f"{where}: refused {who} ({status})")
            if status != 200:
                raise self._status_error(response, where)
            try:
                data = read_limited(response, MAX_TOKEN_BYTES, self.retry.deadline, where)
            finally:
                response.close()
            return parse_token(data, time.monotonic(), where)


def read_limited(response: httpx.Response, limit: int, deadline: float, what: str, *,
                 truncate: bool = False) -> bytes:
    """A response's whole body, at most ``limit`` bytes (else BadResponse, or the first
    ``limit`` bytes when ``truncate``), read within ``deadline`` seconds."""
    length = response.headers.get("Content-Length")
    if not truncate and length is not None and length.isdigit() and int(length) > limit:
        raise BadResponse(f"{what}: {length} bytes, more than the {limit} accepted")
    # the chunks as they come off the socket, joined once: a lazy layer's read-all moves
    # hundreds of MB through here, and a growing bytearray re-chunked into CHUNK pieces
    # copied each byte four times
    parts: list[bytes] = []
    received = 0
    end = time.monotonic() + deadline
    for chunk in iter_body(response, what, None):
        parts.append(chunk)
        received += len(chunk)
        if received > limit:
            if truncate:
                return b"".join(parts)[:limit]
            raise BadResponse(f"{what}: more than the {limit} bytes accepted")
        if time.monotonic() > end:
            raise Unreachable(f"{what}: reply not complete after {deadline:.0f} s")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def iter_body(response: httpx.Response, what: str,
              chunk: int | None = CHUNK) -> Iterator[bytes]:
    """The raw body in chunks of ``chunk`` bytes (None: as they arrive); a connection that
    breaks off is an IncompleteBody."""
    try:
        yield from response.iter_raw(chunk)
    except httpx.TransportError as exc:
        raise IncompleteBody(f"{what}: reply broke off: {_describe(exc)}") from None


def _is_tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # httpx wraps httpcore's error, which wraps the ssl module's
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _describe(exc: httpx.TransportError) -> str:
    text = str(exc).splitlines()[0][:150] if str(exc) else ""
    return f"{type(exc).__name__}{': ' + text if text else ''}"


def _error_detail(body: bytes) -> str:
    """The first error of a distribution-spec error body (``{"errors": [{code, message}]}``)."""
    try:
        errors = json.loads(body).get("errors")
        first = errors[0]
        return f" ({first.get('code', '')}: {str(first.get('message', ''))[:200]})"
    except (ValueError, AttributeError, IndexError, TypeError, KeyError):
        return ""
