"""Where the Klaviyo private API key comes from, read where it is used (on the worker).

Precedence, first found wins:
1. `--klaviyo_api_key_secret`: a Secret Manager version
   (`projects/P/secrets/S/versions/V`, `latest` allowed); the worker's service account needs
   `roles/secretmanager.secretAccessor` on it. The way to run on Dataflow.
2. The `KLAVIYO_API_KEY` environment variable of the process that sends.
3. `--klaviyo_api_key`: the key itself, for local runs only (pipeline options are part of a
   Dataflow job's graph, so the pipeline refuses it on Dataflow).
4. The config's `settings.apiKey`: `$secret.NAME` / `$env.NAME` read from the environment, or a
   literal (local runs only, for the same reason).

`ApiKeySource` holds only names and references, so pickling it into a job graph leaks nothing;
the key itself exists only inside `resolve()`'s caller. Errors never contain the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transforms.klaviyo.errors import KlaviyoConfigurationError
from transforms.walkeros.config import EnvReference

ENV_VAR = "KLAVIYO_API_KEY"


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

    @property
    def has_literal_only(self) -> bool:
        """True when the only source is a key written into options or the config."""
        return bool(self.literal) and not self.secret_version and self.config_reference is None

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
