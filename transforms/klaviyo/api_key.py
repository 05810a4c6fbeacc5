"""Where the Klaviyo private API key comes from, and the check that it works, at launch.

Precedence, first found wins:
1. `--klaviyo_api_key_secret`: a Secret Manager version
   (`projects/P/secrets/S/versions/V`, `latest` allowed); the worker's service account needs
   `roles/secretmanager.secretAccessor` on it. The only source allowed on Dataflow.
2. The `KLAVIYO_API_KEY` environment variable of the process that sends.
3. `--klaviyo_api_key`: the key itself (pipeline options are part of a job's graph).
4. The config's `settings.apiKey`: `$secret.NAME` / `$env.NAME` read from the environment, or a
   literal.

Sources 2-4 are for local runs: on Dataflow a key in options or the config would be stored in
the job graph, and `$env.`/`$secret.` references and KLAVIYO_API_KEY would be read from the
workers' environment, which Dataflow does not set (`dataflow_problem`).

`check_api_key` runs once at launch, before any input is read: it resolves the key where the
job is launched (the Flex Template launcher reads the same secret) and makes one cheap
authenticated request, so a missing, malformed or refused key stops the launch with one line
instead of a job that stalls or dead-letters everything.

`ApiKeySource` holds only names and references, so pickling it into a job graph leaks nothing;
the key itself exists only inside `resolve()`'s caller. Errors never contain the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transforms.klaviyo.client import KlaviyoClient
from transforms.klaviyo.errors import ErrorKind, KlaviyoCallError, KlaviyoConfigurationError
from transforms.walkeros.config import EnvReference

ENV_VAR = "KLAVIYO_API_KEY"
# "pk_" and a longer alphanumeric string (Klaviyo's docs); a public key is a 6-character site id.
_PRIVATE_KEY = re.compile(r"pk_[A-Za-z0-9_]{8,}")


@dataclass(frozen=True)
class ApiKeySource:
    """The places to look for the key, in precedence order."""

    secret_version: str | None = None
    literal: str | None = None  # --klaviyo_api_key, else a literal settings.apiKey
    config_reference: EnvReference | None = None

    def __repr__(self) -> str:  # never show a literal key
        literal = "<set>" if self.literal else None
        return (f"ApiKeySource(secret_version={self.secret_version!r}, literal={literal}, "
                f"config_reference={self.config_reference!r})")

    @classmethod
    def from_options(cls, *, secret_version: str | None, option_key: str | None,
                     config_api_key: Any) -> ApiKeySource:
        """Combine the options with the config's `settings.apiKey`."""
        reference = config_api_key if isinstance(config_api_key, EnvReference) else None
        literal = option_key or (config_api_key if isinstance(config_api_key, str) else None)
        return cls(secret_version or None, literal or None, reference)

    def dataflow_problem(self, runner: Any) -> str | None:
        """Why this source cannot serve a Dataflow job (module docstring); None when it can."""
        if "Dataflow" not in str(runner or "") or self.secret_version:
            return None
        return ("on Dataflow the API key must come from --klaviyo_api_key_secret (Secret "
                "Manager): a key in options or the config would be stored in the job graph, and "
                f"{ENV_VAR} or $env./$secret. references would be read from the workers' "
                "environment, which Dataflow does not set")

    def configured(self, environ: Mapping[str, str]) -> bool:
        """Whether any source is set up (checked at launch; the worker reads the key)."""
        return bool(self.secret_version or self.literal or self.config_reference
                    or environ.get(ENV_VAR))

    def resolve(self, environ: Mapping[str, str] | None = None) -> str:
        """The key; `KlaviyoConfigurationError` (without the key in it) when there is none."""
        environ = os.environ if environ is None else environ
        if self.secret_version:
            return _read_secret(self.secret_version)
        for found in (environ.get(ENV_VAR), self.literal,
                      self.config_reference.resolve(environ) if self.config_reference else None):
            if found:
                return found
        where = f"the environment variable {self.config_reference.name}" \
            if self.config_reference else "settings.apiKey"
        raise KlaviyoConfigurationError(
            f"no Klaviyo API key: give --klaviyo_api_key_secret, set {ENV_VAR}, give "
            f"--klaviyo_api_key, or set {where}")


def _read_secret(version: str) -> str:
    """Read a Secret Manager secret version (google-cloud-secret-manager)."""
    from google.api_core import exceptions
    from google.cloud import secretmanager

    try:
        client = secretmanager.SecretManagerServiceClient()
        payload = client.access_secret_version(name=version).payload.data
    except exceptions.GoogleAPICallError as error:
        raise KlaviyoConfigurationError(
            f"cannot read the Klaviyo API key from Secret Manager {version}: "
            f"{error.__class__.__name__} (the worker service account needs "
            f"roles/secretmanager.secretAccessor)") from None
    return payload.decode("utf-8").strip()


def check_api_key(source: ApiKeySource, *, base_url: str = "",
                  environ: Mapping[str, str] | None = None) -> str | None:
    """Check at launch that the key is there, looks like a private key and is accepted.

    Raises `KlaviyoConfigurationError` (one line, without the key) when it is missing,
    malformed or refused (401, or a JSON 403: a missing scope). Returns a warning when Klaviyo
    could not be asked (network, 5xx): the job may still start, its sink retries.
    The request is GET /api/profiles with a page of one: Klaviyo grants read access with a
    scope's write access, so a key scoped profiles:write and events:write may make it.
    """
    key = source.resolve(environ)
    if not _PRIVATE_KEY.fullmatch(key):
        raise KlaviyoConfigurationError(
            "the Klaviyo API key is malformed: a private API key is pk_ followed by letters "
            "and digits (not the 6-character public key, no spaces or quotes)")
    client = KlaviyoClient(key, test_host=base_url, connect_timeout=5.0, read_timeout=10.0)
    try:
        client.check_key()
    except KlaviyoCallError as error:
        failure = error.failure
        if failure.kind is ErrorKind.CONFIGURATION:
            raise KlaviyoConfigurationError(
                f"Klaviyo refused the API key ({failure.summary}); use a private key of this "
                "account with the profiles:write and events:write scopes") from None
        return f"could not check the Klaviyo API key ({failure.summary}); starting anyway"
    return None
