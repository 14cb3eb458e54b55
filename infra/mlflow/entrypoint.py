#!/usr/bin/env python3
"""Start ``mlflow server --app-name basic-auth`` with every secret taken from the environment.

* The tracking store URI (``MLFLOW_BACKEND_STORE_URI``) and the basic-auth user store URI are built
  from ``POSTGRES_*`` (password percent-encoded) unless given whole; the tracking URI reaches MLflow
  through the environment, so no password is on a command line (``ps``) or in a file of the image.
* The basic-auth settings are the template ``basic_auth.ini`` (no secrets) with ``database_uri``
  filled in, written to a 0600 file in a private folder; ``MLFLOW_AUTH_CONFIG_PATH`` points at it.
* The admin password is only ever read by MLflow from ``MLFLOW_AUTH_ADMIN_PASSWORD`` at the first
  start (an empty user store); it is never written to a file.

Environment:
  required   MLFLOW_FLASK_SERVER_SECRET_KEY, MLFLOW_ALLOWED_HOSTS, MLFLOW_ARTIFACTS_DESTINATION,
             POSTGRES_PASSWORD (unless both store URIs below are given)
  optional   POSTGRES_USER (mlflow), POSTGRES_HOST (postgres), POSTGRES_PORT (5432),
             POSTGRES_DB (mlflow), MLFLOW_AUTH_DB (mlflow_auth),
             MLFLOW_BACKEND_STORE_URI, MLFLOW_AUTH_DATABASE_URI (whole URIs instead),
             MLFLOW_HOST (0.0.0.0), MLFLOW_PORT (5000), MLFLOW_WORKERS (2),
             MLFLOW_AUTH_TEMPLATE (/etc/mlflow/basic_auth.ini), MLFLOW_AUTH_RUNTIME_DIR (/tmp/mlflow-auth),
             MLFLOW_AUTH_ADMIN_PASSWORD (first start only)
Extra command-line arguments are passed on to ``mlflow server``.
"""
from __future__ import annotations

import configparser
import os
import sys
from urllib.parse import quote


def fail(message: str) -> None:
    sys.exit(f"mlflow entrypoint: {message}")


def required(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        fail(f"{name} must be set (see infra/mlflow/.env.example)")
    return value


def postgres_uri(database: str) -> str:
    user = os.environ.get("POSTGRES_USER", "mlflow")
    password = required("POSTGRES_PASSWORD")
    host = os.environ.get("POSTGRES_HOST", "postgres")
    port = os.environ.get("POSTGRES_PORT", "5432")
    return f"postgresql+psycopg2://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{database}"


def write_auth_config(database_uri: str) -> str:
    template = os.environ.get("MLFLOW_AUTH_TEMPLATE", "/etc/mlflow/basic_auth.ini")
    config = configparser.ConfigParser(interpolation=None)
    with open(template, encoding="utf-8") as f:
        config.read_file(f)
    if "mlflow" not in config:
        fail(f"{template} has no [mlflow] section")
    config["mlflow"]["database_uri"] = database_uri
    config.remove_option("mlflow", "admin_password")  # the admin password comes from the environment only

    folder = os.environ.get("MLFLOW_AUTH_RUNTIME_DIR", "/tmp/mlflow-auth")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    os.chmod(folder, 0o700)
    path = os.path.join(folder, "basic_auth.ini")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        config.write(f)
    return path


def main() -> None:
    required("MLFLOW_FLASK_SERVER_SECRET_KEY")  # signs the UI's session cookies and CSRF tokens
    allowed_hosts = required("MLFLOW_ALLOWED_HOSTS")
    artifacts = required("MLFLOW_ARTIFACTS_DESTINATION")

    backend = os.environ.get("MLFLOW_BACKEND_STORE_URI") or postgres_uri(os.environ.get("POSTGRES_DB", "mlflow"))
    auth_db = os.environ.get("MLFLOW_AUTH_DATABASE_URI") or postgres_uri(os.environ.get("MLFLOW_AUTH_DB", "mlflow_auth"))
    auth_config = write_auth_config(auth_db)

    env = dict(os.environ, MLFLOW_AUTH_CONFIG_PATH=auth_config, MLFLOW_BACKEND_STORE_URI=backend)
    for name in ("POSTGRES_PASSWORD", "MLFLOW_AUTH_DATABASE_URI"):  # inside the files/URIs now
        env.pop(name, None)
    if not env.get("MLFLOW_AUTH_ADMIN_PASSWORD"):
        # after the first start: an empty value must not count as "set"
        env.pop("MLFLOW_AUTH_ADMIN_PASSWORD", None)
    args = ["mlflow", "server", "--app-name", "basic-auth",
            "--host", os.environ.get("MLFLOW_HOST", "0.0.0.0"),
            "--port", os.environ.get("MLFLOW_PORT", "5000"),
            "--workers", os.environ.get("MLFLOW_WORKERS", "2"),
            "--artifacts-destination", artifacts,
            "--allowed-hosts", allowed_hosts,
            *sys.argv[1:]]
    print(f"mlflow entrypoint: mlflow server --app-name basic-auth, artifacts {artifacts}, "
          f"allowed hosts {allowed_hosts}", flush=True)
    os.execvpe(args[0], args, env)


if __name__ == "__main__":
    main()
