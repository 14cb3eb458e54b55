"""Credentials never leave the process environment: the one place that masks them and moves them out of URIs.

* :func:`mask` hides the password of every ``scheme://user:password@host`` in a text (``user:***@``), the value of
  secret-looking query parameters (``?token=***``) and the values of the secret environment variables
  (:data:`SECRET_ENV`) wherever they appear. Every message, log line, MLflow tag or param and file kdray writes
  that holds a URI (tracking, Ray address, storage) or an error text goes through it.
* :func:`credentials_to_env` moves ``user:password@`` out of an HTTP(S) tracking URI into
  ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (MLflow's basic auth reads them) and returns the
  clean URI, so no kdray object (options, trackers, the search state Ray Tune pickles) holds the password.
* :class:`MaskingFilter` masks every record a logging handler writes (the CLI installs it).

Named ``redact`` rather than ``secrets`` so that it never shadows the standard library's module.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Optional
from urllib.parse import quote, unquote, urlsplit, urlunsplit

SECRET_ENV = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AZURE_STORAGE_ACCESS_KEY", "AZURE_STORAGE_CONNECTION_STRING", "DATABRICKS_TOKEN", "RAY_AUTH_TOKEN",
              "HF_TOKEN", "MLFLOW_FLASK_SERVER_SECRET_KEY")
HIDDEN = "***"
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@?#]*):[^/\s@?#]*@")
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:[\w\-]*(?:password|passwd|pwd|secret|token|sig|signature|credential)"
                           r"|access_key|secret_key|key)=)[^&\s#'\"]+")


def _secret_values() -> set[str]:
    values = {os.environ.get(k, "") for k in SECRET_ENV}
    return {v for w in values if len(w) >= 4 for v in (w, quote(w, safe=""))}


def mask(text: Optional[str]) -> Optional[str]:
    """``text`` (a URI or any message) with every credential in it replaced by ``***``; None stays None."""
    if not text:
        return text
    text = _SECRET_QUERY.sub(r"\1" + HIDDEN, _USERINFO.sub(r"\1:" + HIDDEN + "@", str(text)))
    for value in sorted(_secret_values(), key=len, reverse=True):
        text = text.replace(value, HIDDEN)
    return text


def credentials_to_env(uri: str) -> str:
    """``uri`` without the ``user:password@`` of an HTTP(S) URI, which goes to ``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD`` in the process environment (MLflow's basic auth reads them there). Other URIs
    (a database URI needs its password in the URI itself) come back unchanged: print them through :func:`mask`."""
    parts = urlsplit(uri)
    if parts.scheme.lower() not in ("http", "https") or "@" not in parts.netloc:
        return uri
    if parts.username:
        os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


class MaskingFilter(logging.Filter):
    """A handler filter that masks the credentials in every record it lets through (message and traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask(message)
        if masked != message:
            record.msg, record.args = masked, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask(record.exc_text)
        return True


def mask_logging(logger: Optional[logging.Logger] = None) -> None:
    """Install :class:`MaskingFilter` on every handler of ``logger`` (default: the root logger)."""
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, MaskingFilter) for f in handler.filters):
            handler.addFilter(MaskingFilter())
