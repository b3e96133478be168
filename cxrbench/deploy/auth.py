"""Who may use ``cxrbench serve``: bearer tokens compared in constant time, and no open service on a network.

Tokens come from ``--token-file PATH`` (one per line, so a new token can be added before the old one is
removed) or the environment variable ``CXRBENCH_TOKEN``. Only their SHA-256 digests are kept; a presented
token's digest is compared with every one of them by ``hmac.compare_digest``, with no early exit, so the time
taken says nothing about which token (or how much of one) matched, nor about their lengths. Every path but
``/health`` (the liveness probe) needs a token; tokens are never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path

from cxrbench.errors import CxrError

TOKEN_ENV = "CXRBENCH_TOKEN"
#: Shortest token accepted: 16 characters of a random token (``openssl rand -hex 32`` gives 64) resist guessing.
MIN_TOKEN_LENGTH = 16
#: Paths answered without a token: the liveness probe only (it says nothing but "ok").
PUBLIC_PATHS = frozenset({"/health"})


def load_tokens(token_file: str | Path | None, environ: Mapping[str, str] = os.environ) -> list[str]:
    """The accepted tokens, from ``token_file`` or ``$CXRBENCH_TOKEN`` (not both); none when neither is given."""
    from_env = environ.get(TOKEN_ENV)
    if token_file is not None and from_env:
        raise CxrError(f"tokens given twice: --token-file {token_file} and ${TOKEN_ENV}; keep one")
    if token_file is not None:
        try:
            text = Path(token_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise CxrError(f"{token_file}: cannot read the token file ({reason})") from None
        return _checked(text.splitlines(), str(token_file))
    if from_env:
        return _checked(from_env.splitlines(), f"${TOKEN_ENV}")
    return []


def _checked(lines: Iterable[str], where: str) -> list[str]:
    tokens = [line.strip() for line in lines if line.strip()]
    if not tokens:
        raise CxrError(f"{where}: no token in it (one token per line)")
    for number, token in enumerate(tokens, 1):
        # The token itself is never part of a message: only its position.
        if len(token) < MIN_TOKEN_LENGTH:
            raise CxrError(f"{where}: token {number} is shorter than {MIN_TOKEN_LENGTH} characters")
        if not token.isascii() or not token.isprintable() or " " in token:
            raise CxrError(f"{where}: token {number} has characters other than printable ASCII without spaces")
    return tokens


class Tokens:
    """The accepted tokens' digests; :meth:`accepts` checks a presented token against all of them."""

    def __init__(self, tokens: Iterable[str] = ()):
        self._digests = [_digest(t) for t in tokens]

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, presented: str) -> bool:
        digest = _digest(presented)
        matched = False
        for known in self._digests:  # every digest, always: no early exit
            matched |= hmac.compare_digest(digest, known)
        return matched


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is this machine's loopback (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_exposure(host: str, tokens: Tokens, insecure_no_auth: bool) -> None:
    """Refuse to serve other machines without a token, unless the operator says so in as many words."""
    if insecure_no_auth and len(tokens):
        raise CxrError("--insecure-no-auth and a token contradict each other: drop one")
    if not len(tokens) and not insecure_no_auth and not is_loopback(host):
        raise CxrError(
            f"--host {host} lets other machines in and no token is set: give --token-file PATH or ${TOKEN_ENV} "
            "(or --insecure-no-auth to serve anyone who can reach the port)"
        )


class BearerAuth:
    """ASGI middleware: a request without an accepted ``Authorization: Bearer`` token gets 401 JSON, and the
    application never sees it (nothing is read, decoded or scored)."""

    def __init__(self, app, tokens: Tokens):
        self.app, self.tokens = app, tokens

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not len(self.tokens) or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        problem = self._problem(dict(scope["headers"]).get(b"authorization"))
        if problem is None:
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        challenge = 'Bearer realm="cxrbench"' + (', error="invalid_token"' if problem[0] else "")
        response = JSONResponse({"error": problem[1]}, status_code=401, headers={"WWW-Authenticate": challenge})
        await response(scope, receive, send)

    def _problem(self, header: bytes | None) -> tuple[bool, str] | None:
        """None when the token is accepted; else (a token was presented, the message)."""
        scheme, _, presented = (header or b"").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return False, "missing bearer token: send the header 'Authorization: Bearer <token>'"
        if not self.tokens.accepts(presented.strip()):
            return True, "invalid token"
        return None
