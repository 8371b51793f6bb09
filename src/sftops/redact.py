"""Secrets stay out of everything sftops writes or prints (MLflow params and tags, run.json, manifests,
reports, error messages): passwords in URIs, signed-URL query values and token-shaped strings are masked.
Credentials themselves come from the environment, which is never logged."""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
_USERINFO = re.compile(r"(?<=://)([^/@:\s]+):([^/@\s]+)@")
_QUERY = re.compile(
    r"(?i)([?&](?:token|access_token|api_key|apikey|key|password|sig|signature|x-amz-signature|x-amz-credential)=)[^&#\s]+"
)
# Hugging Face, AWS access key ids, GitHub, OpenAI-style and Slack tokens.
_TOKENS = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|xox[abp]-[A-Za-z0-9-]{10,})\b"
)


def redact(text: str) -> str:
    """`text` with the password of user:password@host, secret query values and token-shaped strings masked."""
    text = _USERINFO.sub(rf"\1:{MASK}@", text)
    text = _QUERY.sub(rf"\1{MASK}", text)
    return _TOKENS.sub(MASK, text)


def tracking_credentials(uri: str) -> str:
    """An http(s) tracking URI without its user:password, which move to MLflow's own variables
    (MLFLOW_TRACKING_USERNAME/PASSWORD): MLflow prints and records the URI it is given, never those."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.password is None:
        return uri
    os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(parts.username or ""))
    os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(parts.password))
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))
