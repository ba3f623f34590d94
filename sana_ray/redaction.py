"""What counts as a secret, and how it is masked: the one place that decides.

Secrets never belong in a manifest (MLflow reads ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` /
``_TOKEN`` and Hugging Face ``HF_TOKEN`` from the environment), but a value a user wrote may
still carry one: a URI with user-info, a signed URL. Everything sana-ray writes that holds
manifest values (MLflow params and tags, the run's ``manifest.yaml``, ``run.json``, console
lines, error messages) goes through :func:`redact_text` / :func:`redact_data`, and the manifest
fields that are URIs refuse credentials outright (:func:`uri_credentials`).

What is masked:

* the user-info of a URI of any scheme, in any case (``postgresql+psycopg2://user:pw@host``,
  ``MYSQL2://u:p@h``, ``https://token@host``) -> ``scheme://***@host``;
* the value of a query parameter whose name looks like a credential (``?token=``,
  ``&access_token=``, ``sig=``, ``api_key=``, ``X-Amz-Signature=``, ``password=`` ...) -> ``***``;
* ``Bearer <token>`` (an Authorization header pasted into a message);
* the literal value of any environment variable whose name says it is a secret
  (``*TOKEN*``, ``*SECRET*``, ``*PASSWORD*``, ``*_KEY``, ...), wherever it appears.

Only the standard library: the CLI's fast path (``validate``) imports this module.
"""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"

# RFC 3986 scheme, then everything up to the LAST '@' before a blank or a quote: a password
# holding '@' or '/' (common, and invalid unencoded) is still masked whole. An '@' in a path or
# query (rare in what sana-ray prints) over-masks the host; that is the safe side.
# (``scheme:///path``, an empty authority as in sqlite:////abs/path, has no user-info to mask.)
# Lengths are bounded so that a long string without a match costs linear time, not quadratic.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]{0,31}://)(?P<userinfo>[^\s'\"<>@/][^\s'\"<>]{0,255}@)")

# Query (or matrix) parameters whose name contains one of these words.
_SECRET_WORDS = (
    "token", "secret", "passw", "pwd", "sig", "signature", "key", "credential", "auth", "session",
)
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;][A-Za-z0-9_.\-]{0,40}?(?:" + "|".join(_SECRET_WORDS) + r")[A-Za-z0-9_.\-]{0,40}=)(?P<value>[^&#;\s'\"<>]+)",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(?P<name>\bbearer\s+)(?P<value>[A-Za-z0-9._~+/=\-]{8,})", re.IGNORECASE)

# Environment variables whose values are secrets (names as MLflow, Hugging Face, AWS, Ray use them).
# (Not PWD: that one is the working directory.)
_SECRET_ENV_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|(API|ACCESS|PRIVATE|AUTH)_?KEY", re.IGNORECASE)
_MIN_ENV_SECRET = 8  # shorter values ("true", "1") would mask ordinary words


def _env_secrets() -> list[str]:
    values = {v for k, v in os.environ.items() if _SECRET_ENV_NAME.search(k) and len(v) >= _MIN_ENV_SECRET}
    return sorted(values, key=len, reverse=True)  # longest first: a secret containing another is masked whole


def redact_text(text: str) -> str:
    """``text`` with every secret (see the module docstring) replaced by ``***``."""
    if not isinstance(text, str) or not text:
        return text
    for secret in _env_secrets():
        if secret in text:
            text = text.replace(secret, MASK)
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m['name']}{MASK}", text)
    return _BEARER.sub(lambda m: f"{m['name']}{MASK}", text)


def redact_uri(uri: str) -> str:
    """A URI as it may be printed or stored: user-info and credential-like query values masked."""
    return redact_text(uri)


def redact_data(value: Any) -> Any:
    """``value`` (plain data: dicts, lists, strings, numbers) with every string redacted; a copy."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {key: redact_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_data(item) for item in value)
    return value


def uri_credentials(uri: str) -> str | None:
    """What secret a URI carries, in words ("a password", "a token in its query (?token=)"), or None.

    For the manifest fields that are URIs: those refuse credentials instead of masking them.
    """
    match = _USERINFO.search(uri)
    if match and ":" in match["userinfo"]:
        return "a password (user:password@)"
    query = _QUERY_SECRET.search(uri)
    if query:
        return f"a credential in its query ({query['name'][1:]})"
    return None
