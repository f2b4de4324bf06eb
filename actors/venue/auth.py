"""Deribit-style API-key authentication for the venue simulator, both sides of it.

Server side, ``Authenticator`` holds the configured keys (``client_id -> client_secret``; the
client id is also the account name) and the tokens it issued:

* ``public/auth`` (``grant``) with ``grant_type`` ``client_credentials`` (id + secret),
  ``client_signature`` (id, ``timestamp`` ms, ``nonce``, optional ``data``, ``signature`` =
  hex HMAC-SHA256(secret, ``timestamp + "\\n" + nonce + "\\n" + data``)) or ``refresh_token``;
  the answer carries ``access_token``/``refresh_token``/``expires_in``/``scope``/``token_type``.
  A refresh token is single-use: refreshing issues a new pair and retires the old one.
* HTTP ``Authorization`` headers (``authorize_http``): ``Bearer <access_token>``,
  ``deri-hmac-sha256 id=..,ts=..,sig=..,nonce=..`` with ``sig`` = hex HMAC-SHA256(secret,
  ``ts + "\\n" + nonce + "\\n" + UPPER(method) + "\\n" + uri_with_query + "\\n" + body + "\\n"``),
  or ``Basic base64(client_id:client_secret)``.

A signature whose ``timestamp`` is more than ``max_clock_skew_s`` away from the server clock is
refused, and so is a signature already seen within that window (a replay). Failures are
``AuthFailure`` values with Deribit's code: 13004 ``invalid_credentials`` from ``public/auth``,
13009 ``unauthorized`` for private requests; ``reason`` says which check failed and is counted.

Client side, ``client_signature_params``, ``hmac_authorization`` and ``basic_authorization``
build what a client sends (used by the tests and by our own connector).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import math
import secrets
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from actors.venue.clock import Clock, to_ms

INVALID_CREDENTIALS = 13004
UNAUTHORIZED = 13009
INVALID_PARAMS = -32602
TOKEN_SCOPE = "connection mainaccount account:read_write trade:read_write wallet:read_write"


class AuthConfigError(ValueError):
    """An authentication setting is invalid; names the field and the value."""

    def __init__(self, field_name: str, value: object, why: str) -> None:
        self.field = field_name
        self.value = value
        shown = "<redacted>" if "secret" in field_name else repr(value)
        super().__init__(f"AuthConfig: invalid {field_name}={shown}: {why}")


@dataclass(frozen=True)
class AuthConfig:
    """API keys and token/signature policy. ``token_ttl_s``: lifetime of an access token;
    ``max_clock_skew_s``: largest ``|server_now - timestamp|`` a signature may have."""

    keys: Mapping[str, str]
    token_ttl_s: float = 3600.0
    max_clock_skew_s: float = 60.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", dict(self.keys))
        for client_id, secret in self.keys.items():
            if not isinstance(client_id, str) or not client_id or any(
                    c in client_id for c in ",= \n"):
                raise AuthConfigError("keys.client_id", client_id,
                                      "must be a non-empty string without ',', '=' or spaces")
            if not isinstance(secret, str) or len(secret) < 8:
                raise AuthConfigError(f"keys[{client_id}].secret", secret,
                                      "must be a string of at least 8 characters")
        for name in ("token_ttl_s", "max_clock_skew_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise AuthConfigError(name, value, "must be finite and > 0")

    def __repr__(self) -> str:  # never show secrets
        return (f"AuthConfig(keys={sorted(self.keys)}, token_ttl_s={self.token_ttl_s}, "
                f"max_clock_skew_s={self.max_clock_skew_s})")


@dataclass(frozen=True)
class AuthFailure:
    """A refused authentication: Deribit ``code``/``message`` and our ``reason``."""

    code: int
    message: str
    reason: str

    def to_error(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "data": {"reason": self.reason}}


def _invalid(reason: str) -> AuthFailure:
    return AuthFailure(INVALID_CREDENTIALS, "invalid_credentials", reason)


def _unauthorized(reason: str) -> AuthFailure:
    return AuthFailure(UNAUTHORIZED, "unauthorized", reason)


@dataclass(frozen=True)
class Session:
    """Who a valid token or signature belongs to."""

    account: str
    client_id: str
    expires_s: float | None = None


# --- signing (client and server use the same functions) ---------------------------------------
def _hmac_hex(secret: str, text: str) -> str:
    return hmac.new(secret.encode(), text.encode(), hashlib.sha256).hexdigest()


def sign_client_signature(secret: str, timestamp_ms: int, nonce: str, data: str = "") -> str:
    """Hex HMAC-SHA256 of ``timestamp\\nnonce\\ndata`` (``public/auth`` client_signature)."""
    return _hmac_hex(secret, f"{timestamp_ms}\n{nonce}\n{data}")


def sign_http(secret: str, timestamp_ms: int, nonce: str, method: str, uri: str,
              body: str = "") -> str:
    """Hex HMAC-SHA256 for the ``deri-hmac-sha256`` header; ``uri`` includes the query."""
    return sign_client_signature(secret, timestamp_ms, nonce,
                                 f"{method.upper()}\n{uri}\n{body}\n")


def new_nonce() -> str:
    return secrets.token_hex(8)


def client_signature_params(client_id: str, secret: str, timestamp_ms: int, *,
                            nonce: str | None = None, data: str = "") -> dict[str, object]:
    """``public/auth`` params for ``grant_type=client_signature``."""
    nonce = new_nonce() if nonce is None else nonce
    return {"grant_type": "client_signature", "client_id": client_id,
            "timestamp": timestamp_ms, "nonce": nonce, "data": data,
            "signature": sign_client_signature(secret, timestamp_ms, nonce, data)}


def hmac_authorization(client_id: str, secret: str, method: str, uri: str, body: str = "", *,
                       timestamp_ms: int, nonce: str | None = None) -> str:
    """The ``Authorization`` header value ``deri-hmac-sha256 id=..,ts=..,sig=..,nonce=..``."""
    nonce = new_nonce() if nonce is None else nonce
    sig = sign_http(secret, timestamp_ms, nonce, method, uri, body)
    return f"deri-hmac-sha256 id={client_id},ts={timestamp_ms},sig={sig},nonce={nonce}"


def basic_authorization(client_id: str, secret: str) -> str:
    """``Basic base64(client_id:client_secret)``."""
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


# --- server side ----------------------------------------------------------------------------
@dataclass
class _Token:
    session: Session
    expires_s: float


@dataclass
class AuthStats:
    grants: Counter[str] = field(default_factory=Counter)  # by grant_type
    failures: Counter[str] = field(default_factory=Counter)  # by AuthFailure.reason


class Authenticator:
    """Verifies keys, signatures and tokens against the injected clock (see module doc)."""

    def __init__(self, config: AuthConfig, clock: Clock) -> None:
        self._config = config
        self._clock = clock
        self._access: dict[str, _Token] = {}
        self._refresh: dict[str, Session] = {}
        self._seen_sigs: deque[tuple[float, str]] = deque()
        self._seen_set: set[str] = set()
        self.stats = AuthStats()

    @property
    def client_ids(self) -> list[str]:
        return sorted(self._config.keys)

    def refuse(self, reason: str) -> AuthFailure:
        """A counted 13009 for a private request that carried no credentials."""
        return self._fail(_unauthorized(reason))

    def _fail(self, failure: AuthFailure) -> AuthFailure:
        self.stats.failures[failure.reason] += 1
        return failure

    def _issue(self, session: Session, grant_type: str) -> dict[str, object]:
        now = self._clock.now_s()
        access, refresh = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        ttl = self._config.token_ttl_s
        self._access[access] = _Token(Session(session.account, session.client_id, now + ttl),
                                      now + ttl)
        self._refresh[refresh] = session
        self.stats.grants[grant_type] += 1
        self._prune(now)
        return {"access_token": access, "refresh_token": refresh, "expires_in": int(ttl),
                "scope": TOKEN_SCOPE, "token_type": "bearer"}

    def _prune(self, now: float) -> None:
        if len(self._access) > 10_000:
            self._access = {k: v for k, v in self._access.items() if v.expires_s > now}

    def _check_signature(self, client_id: str, timestamp_ms: object, nonce: object,
                         signature: object, text: str,
                         fail: Callable[[str], AuthFailure] = _invalid) -> Session | AuthFailure:
        secret = self._config.keys.get(client_id)
        if secret is None:
            return self._fail(fail("unknown_client_id"))
        if isinstance(timestamp_ms, bool) or not isinstance(timestamp_ms, int):
            return self._fail(fail("timestamp_invalid"))
        if not isinstance(nonce, str) or not isinstance(signature, str):
            return self._fail(fail("signature_invalid"))
        now = self._clock.now_s()
        if abs(now - timestamp_ms / 1000.0) > self._config.max_clock_skew_s:
            return self._fail(fail("stale_timestamp"))
        expected = _hmac_hex(secret, f"{timestamp_ms}\n{nonce}\n{text}")
        if not hmac.compare_digest(expected, signature.lower()):
            return self._fail(fail("bad_signature"))
        horizon = now - 2 * self._config.max_clock_skew_s
        while self._seen_sigs and self._seen_sigs[0][0] < horizon:
            self._seen_set.discard(self._seen_sigs.popleft()[1])
        if expected in self._seen_set:
            return self._fail(fail("replayed_signature"))
        self._seen_sigs.append((now, expected))
        self._seen_set.add(expected)
        return Session(client_id, client_id)

    def grant(self, params: Mapping[str, object]) -> dict[str, object] | AuthFailure:
        """``public/auth``: a token pair, or why not."""
        grant_type = params.get("grant_type")
        if grant_type == "client_credentials":
            client_id, secret = params.get("client_id"), params.get("client_secret")
            if not isinstance(client_id, str) or not isinstance(secret, str):
                return self._fail(AuthFailure(INVALID_PARAMS, "Invalid params",
                                              "client_credentials_missing"))
            known = self._config.keys.get(client_id)
            if known is None:
                return self._fail(_invalid("unknown_client_id"))
            if not hmac.compare_digest(known.encode(), secret.encode()):
                return self._fail(_invalid("wrong_secret"))
            return self._issue(Session(client_id, client_id), "client_credentials")
        if grant_type == "client_signature":
            client_id, data = params.get("client_id"), params.get("data", "")
            if not isinstance(client_id, str) or not isinstance(data, str):
                return self._fail(AuthFailure(INVALID_PARAMS, "Invalid params",
                                              "client_signature_missing"))
            checked = self._check_signature(client_id, params.get("timestamp"),
                                            params.get("nonce"), params.get("signature"), data)
            if isinstance(checked, AuthFailure):
                return checked
            return self._issue(checked, "client_signature")
        if grant_type == "refresh_token":
            token = params.get("refresh_token")
            session = self._refresh.pop(token, None) if isinstance(token, str) else None
            if session is None:
                return self._fail(_invalid("refresh_token_unknown"))
            return self._issue(session, "refresh_token")
        return self._fail(AuthFailure(INVALID_PARAMS, "Invalid params", "grant_type_invalid"))

    def check_token(self, token: object) -> Session | AuthFailure:
        """The session of a valid, unexpired access token (13009 otherwise)."""
        entry = self._access.get(token) if isinstance(token, str) else None
        if entry is None:
            return self._fail(_unauthorized("token_unknown"))
        if entry.expires_s <= self._clock.now_s():
            self._access.pop(token, None)  # type: ignore[arg-type]
            return self._fail(_unauthorized("token_expired"))
        return entry.session

    def authorize_http(self, header: str | None, method: str, uri: str, body: str
                       ) -> Session | AuthFailure:
        """Check an HTTP ``Authorization`` header (Bearer, deri-hmac-sha256 or Basic)."""
        if not header:
            return self._fail(_unauthorized("authorization_missing"))
        scheme, _, value = header.strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer":
            return self.check_token(value.strip())
        if scheme == "basic":
            try:
                client_id, sep, secret = base64.b64decode(value.strip(), validate=True
                                                          ).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return self._fail(_unauthorized("basic_malformed"))
            known = self._config.keys.get(client_id) if sep else None
            if known is None or not hmac.compare_digest(known.encode(), secret.encode()):
                return self._fail(_unauthorized("basic_wrong_credentials"))
            return Session(client_id, client_id)
        if scheme == "deri-hmac-sha256":
            fields: dict[str, str] = {}
            for part in value.split(","):
                key, sep, val = part.strip().partition("=")
                if sep:
                    fields[key] = val
            try:
                ts = int(fields.get("ts", ""))
            except ValueError:
                return self._fail(_unauthorized("timestamp_invalid"))
            if "id" not in fields or "sig" not in fields or "nonce" not in fields:
                return self._fail(_unauthorized("hmac_header_malformed"))
            return self._check_signature(fields["id"], ts, fields["nonce"], fields["sig"],
                                         f"{method.upper()}\n{uri}\n{body}\n",
                                         fail=_unauthorized)
        return self._fail(_unauthorized("authorization_scheme_unknown"))

    def now_ms(self) -> int:
        return to_ms(self._clock.now_s())
