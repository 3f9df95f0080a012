"""Secrets from Google Secret Manager at a step's start, where steps get no Kubernetes secrets
(Vertex AI Pipelines). `COCKATOO_SECRETS` names them, never their values: `VAR=SECRET,...`. Each
is read from the run's project, latest version, into the variable VAR unless VAR is set already.
A secret that does not exist is skipped, as an optional Kubernetes secret key is; any other
failure (no permission, no project) is one line naming the secret."""

from __future__ import annotations

import os

from cockatoo_lib.errors import CockatooError, first_line

SECRETS_ENV = "COCKATOO_SECRETS"
# Where the run's project is: Vertex AI sets the first in a step's container.
PROJECT_ENVS = ("CLOUD_ML_PROJECT_ID", "GOOGLE_CLOUD_PROJECT")


def secrets_spec(wanted: dict[str, str]) -> str:
    """The value of COCKATOO_SECRETS for {variable: secret name}."""
    return ",".join(f"{variable}={secret}" for variable, secret in wanted.items())


def load_secrets() -> list[str]:
    """Set the variables COCKATOO_SECRETS names from Secret Manager; the variables set."""
    wanted = [item.split("=", 1) for item in os.environ.get(SECRETS_ENV, "").split(",") if item.strip()]
    wanted = [(variable, secret) for variable, secret in wanted if not os.environ.get(variable)]
    if not wanted:
        return []
    import google.auth
    from google.api_core import exceptions
    from google.cloud import secretmanager

    project = next((os.environ[v] for v in PROJECT_ENVS if os.environ.get(v)), None)
    try:
        credentials, found = google.auth.default()
        client = secretmanager.SecretManagerServiceClient(credentials=credentials)
    except Exception as exc:  # noqa: BLE001 - google.auth raises several kinds
        raise CockatooError(f"{SECRETS_ENV}: no Google credentials to read secrets with: "
                            f"{first_line(exc, 'message')}") from None
    project = project or found
    if not project:
        raise CockatooError(f"{SECRETS_ENV}: no project to read secrets from; set {PROJECT_ENVS[0]}")
    loaded = []
    for variable, secret in wanted:
        name = f"projects/{project}/secrets/{secret}/versions/latest"
        try:
            payload = client.access_secret_version(name=name).payload.data
        except exceptions.NotFound:
            continue
        except Exception as exc:  # noqa: BLE001 - api_core raises one type per status
            raise CockatooError(f"{SECRETS_ENV}: cannot read secret {name} for {variable}: "
                                f"{first_line(exc, 'message')}") from None
        os.environ[variable] = payload.decode()
        loaded.append(variable)
    return loaded


def step_environment() -> None:
    """What every step does first: its secrets (Vertex AI), then the team's CA if one is given."""
    from cockatoo_lib.storage.trust import trust_extra_ca_certs

    load_secrets()
    trust_extra_ca_certs()
