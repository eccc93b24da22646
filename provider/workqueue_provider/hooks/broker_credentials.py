"""Broker credentials kept in a Kubernetes Secret instead of the Airflow connection.

An AMQP connection whose extras name a Secret logs in with that Secret's ``username`` and
``password`` keys (read through the cncf ``KubernetesHook``), not with the connection's own login
and password. ``EnsureBrokerOperator`` generates that Secret when it starts the broker, so the
password never has to be copied anywhere. Extras:

- ``credentials_secret``: the Secret's name (setting it turns the feature on);
- ``credentials_namespace``: its namespace (default ``default``);
- ``kubernetes_conn_id``: the Kubernetes connection to read it with (default ``kubernetes_default``).

The Secret is read through :class:`~workqueue_provider.hooks.kubernetes.KubernetesApi`; no error carries a password.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from workqueue_provider.amqp.connection import BrokerSettings
from workqueue_provider.exceptions import ConfigurationError, CredentialsSecretNotFoundError
from workqueue_provider.kube.broker_manifests import PASSWORD_KEY, USERNAME_KEY

if TYPE_CHECKING:
    from workqueue_provider.hooks.kubernetes import KubernetesApi

SECRET_EXTRA = "credentials_secret"
NAMESPACE_EXTRA = "credentials_namespace"
KUBERNETES_CONN_EXTRA = "kubernetes_conn_id"
EXTRAS = (SECRET_EXTRA, NAMESPACE_EXTRA, KUBERNETES_CONN_EXTRA)
DEFAULT_NAMESPACE = "default"
DEFAULT_KUBERNETES_CONN_ID = "kubernetes_default"


@dataclass(frozen=True)
class SecretRef:
    """Where a connection's broker credentials live."""

    name: str
    namespace: str = DEFAULT_NAMESPACE
    kubernetes_conn_id: str = DEFAULT_KUBERNETES_CONN_ID

    def describe(self) -> str:
        return f"Secret {self.name!r} in namespace {self.namespace!r}"


def pop_secret_ref(extras: dict[str, Any]) -> SecretRef | None:
    """Remove this module's keys from ``extras`` (so BrokerSettings never sees them); the Secret
    they name, or None without ``credentials_secret``."""
    values = {key: extras.pop(key, None) for key in EXTRAS}
    if not values[SECRET_EXTRA]:
        return None
    return SecretRef(
        name=str(values[SECRET_EXTRA]),
        namespace=str(values[NAMESPACE_EXTRA] or DEFAULT_NAMESPACE),
        kubernetes_conn_id=str(values[KUBERNETES_CONN_EXTRA] or DEFAULT_KUBERNETES_CONN_ID),
    )


def decode_credentials(secret_data: Mapping[str, str] | None, ref: SecretRef) -> tuple[str, str]:
    """``(username, password)`` from a Secret's base64 ``data``."""
    data = secret_data or {}
    missing = [key for key in (USERNAME_KEY, PASSWORD_KEY) if not data.get(key)]
    if missing:
        raise ConfigurationError(
            f"{ref.describe()} has no {' or '.join(repr(key) for key in missing)} key: it must hold the broker's "
            f"{USERNAME_KEY!r} and {PASSWORD_KEY!r} (delete it and let EnsureBrokerOperator generate it)."
        )
    try:
        return tuple(base64.b64decode(data[key], validate=True).decode() for key in (USERNAME_KEY, PASSWORD_KEY))  # type: ignore[return-value]
    except (binascii.Error, UnicodeDecodeError):
        raise ConfigurationError(f"{ref.describe()} holds credentials that aren't base64-encoded UTF-8.") from None


def read_credentials(ref: SecretRef, api: KubernetesApi | None = None) -> tuple[str, str]:
    """``(username, password)`` read from the Secret (through ``api``, default: the ref's Kubernetes
    connection). A missing Secret raises :class:`CredentialsSecretNotFoundError`."""
    from workqueue_provider.hooks.kubernetes import KubernetesApi

    api = api or KubernetesApi(ref.kubernetes_conn_id)
    secret = api.get_secret(ref.name, ref.namespace)
    if secret is None:
        raise CredentialsSecretNotFoundError(
            f"The AMQP connection's credentials_secret, {ref.describe()}, doesn't exist: the broker was "
            "never started there. Start it with EnsureBrokerOperator (which generates the Secret), or create "
            f"the Secret with keys {USERNAME_KEY!r} and {PASSWORD_KEY!r}."
        )
    return decode_credentials(secret.get("data"), ref)


def with_secret_credentials(settings: BrokerSettings, secret: SecretRef | None) -> BrokerSettings:
    """For ``AmqpHook.settings``: the settings with the Secret's credentials when the connection names one."""
    if secret is None:
        return settings
    login, password = read_credentials(secret)
    from workqueue_provider.compat import mask_secret

    mask_secret(password)  # Airflow then masks it in task logs, errors and rendered fields
    return dataclasses.replace(settings, login=login, password=password)
