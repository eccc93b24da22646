"""Start the work queue's RabbitMQ broker in Kubernetes when none answers (the seed's step 1)."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
from airflow.sdk import BaseOperator

from workqueue_provider.amqp.connection import BrokerSettings, open_connection
from workqueue_provider.exceptions import (
    BrokerAuthError,
    BrokerError,
    BrokerUnreachableError,
    ConfigurationError,
    CredentialsSecretNotFoundError,
)
from workqueue_provider.hooks import broker_credentials as creds
from workqueue_provider.hooks.amqp import AmqpHook, amqp_connection
from workqueue_provider.hooks.kube_errors import api_error, transport_error
from workqueue_provider.kube import broker_manifests as manifests

if TYPE_CHECKING:
    from airflow.sdk import Context


class EnsureBrokerOperator(BaseOperator):
    """Make sure the broker of an AMQP connection answers; start it in Kubernetes if it doesn't.

    A broker that accepts an AMQP login: nothing is changed. Otherwise (and with
    ``create_if_missing``) it creates, in ``namespace``, a credentials Secret, the seed's Service
    ``rabbitmq-service`` and StatefulSet ``rabbitmq``, and waits until the pod is Ready and AMQP
    answers at the connection's address with the Secret's credentials. Existing objects are kept
    (one that differs is named in a warning, never overwritten), so running it again changes nothing.

    Credentials: with the connection extra ``credentials_secret`` a random password is generated
    into that Secret (and AmqpHook reads it from there); without it, the connection's own login and
    password go into the Secret, and guest/guest is refused. The password is never logged,
    returned or templated.

    :param amqp_conn_id: the broker's AMQP connection; its host and port must reach the Service.
    :param kubernetes_conn_id: Kubernetes connection (default: the AMQP connection's
        ``kubernetes_conn_id`` extra, else ``kubernetes_default``).
    :param namespace: where to create the broker (default: the connection's ``credentials_namespace``,
        else ``default``). Templated.
    :param create_if_missing: start the broker when none answers; if False that is an error.
    :param image: RabbitMQ image. Templated.
    :param secret_name: credentials Secret (default: the connection's ``credentials_secret``, else
        ``rabbitmq-credentials``). Templated.
    :param service_name: the Service. Templated.
    :param statefulset_name: the StatefulSet. Templated.
    :param container_resources: the broker container's requests/limits (default: the seed's). Templated.
        (Not ``resources``: that is BaseOperator's own argument.)
    :param username: user generated into a new Secret with ``credentials_secret``.
    :param startup_timeout: seconds to wait for the pod to be Ready and AMQP to answer.
    :param poll_interval: seconds between checks while waiting.
    :return: ``{"started": bool, "address": host:port, "namespace": ..., "created": [kind/name, ...]}``.
    """

    template_fields: Sequence[str] = ("namespace", "image", "secret_name", "service_name", "statefulset_name",
                                      "container_resources")
    template_fields_renderers = {"container_resources": "json"}
    ui_color = "#ffd8b1"

    def __init__(self, *, amqp_conn_id: str = AmqpHook.default_conn_name, kubernetes_conn_id: str | None = None,
                 namespace: str | None = None, create_if_missing: bool = True,
                 image: str = manifests.DEFAULT_IMAGE, secret_name: str | None = None,
                 service_name: str = manifests.DEFAULT_SERVICE_NAME,
                 statefulset_name: str = manifests.DEFAULT_STATEFULSET_NAME,
                 container_resources: Mapping[str, Mapping[str, str]] | None = None, username: str = "workqueue",
                 startup_timeout: float = 300.0, poll_interval: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.amqp_conn_id = amqp_conn_id
        self.kubernetes_conn_id = kubernetes_conn_id
        self.namespace = namespace
        self.create_if_missing = create_if_missing
        self.image = image
        self.secret_name = secret_name
        self.service_name = service_name
        self.statefulset_name = statefulset_name
        self.container_resources = container_resources
        self.username = username
        self.startup_timeout = startup_timeout
        self.poll_interval = poll_interval

    # -- plan: everything decided and validated before any side effect

    def _plan(self) -> tuple[manifests.BrokerManifestSpec, creds.SecretRef | None, BrokerSettings, str]:
        """The manifests' spec, the connection's Secret reference, its settings without the
        Secret's credentials, and the Kubernetes connection id."""
        conn = amqp_connection(self.amqp_conn_id)
        extras = {k.split("__")[-1]: v for k, v in conn.extra_dejson.items() if v not in (None, "")}
        ref = creds.pop_secret_ref(extras)
        settings = BrokerSettings(
            host=conn.host or "", port=conn.port, login=conn.login or "guest", password=conn.password or "guest",
            vhost=conn.schema or "/", tls=conn.conn_type == "amqps",
        ).with_options(extras)
        kubernetes_conn_id = self.kubernetes_conn_id or (ref.kubernetes_conn_id if ref else KubernetesHook.default_conn_name)
        namespace = self.namespace or (ref.namespace if ref else creds.DEFAULT_NAMESPACE)
        secret_name = self.secret_name or (ref.name if ref else manifests.DEFAULT_SECRET_NAME)
        if ref and (ref.name, ref.namespace) != (secret_name, namespace):
            raise ConfigurationError(
                f"The AMQP connection {self.amqp_conn_id!r} reads its credentials from {ref.describe()}, but this "
                f"task would create Secret {secret_name!r} in namespace {namespace!r}: make secret_name/namespace "
                "match the connection's credentials_secret/credentials_namespace (or leave them unset)."
            )
        if self.startup_timeout <= 0 or self.poll_interval <= 0:
            raise ConfigurationError(
                f"startup_timeout={self.startup_timeout!r} and poll_interval={self.poll_interval!r} must be positive."
            )
        spec = manifests.BrokerManifestSpec(
            namespace=namespace, image=self.image, secret_name=secret_name, service_name=self.service_name,
            statefulset_name=self.statefulset_name,
            resources=self.container_resources if self.container_resources is not None else manifests.DEFAULT_RESOURCES,
        )
        return spec, ref, settings, kubernetes_conn_id

    def _own_credentials(self, settings: BrokerSettings) -> tuple[str, str]:
        """The connection's login/password for a broker Secret; guest/guest is refused."""
        if settings.login == "guest" or settings.password == "guest" or not settings.login or not settings.password:
            raise ConfigurationError(
                f"Refusing to start a broker for AMQP connection {self.amqp_conn_id!r} with the guest user "
                "(guest/guest is for localhost only and never used in a cluster). Set the connection's extra "
                "credentials_secret (a random password is generated into that Secret), or give the connection "
                "its own login and password."
            )
        return settings.login, settings.password

    # -- execute

    def execute(self, context: Context) -> dict[str, Any]:
        spec, ref, settings, kubernetes_conn_id = self._plan()
        known: BrokerSettings | None = settings
        if ref is not None:
            try:
                login, password = creds.read_credentials(ref)
                known = dataclasses.replace(settings, login=login, password=password)
            except CredentialsSecretNotFoundError:
                known = None
        address = settings.address
        if known is not None:
            error = _probe(known)
            if error is None:
                self.log.info("The broker at %s answers (AMQP login as %r): nothing to do.", address, known.login)
                return {"started": False, "address": address, "namespace": spec.namespace, "created": []}
            if isinstance(error, BrokerAuthError):
                raise BrokerAuthError(f"{error} A broker answers there, so none is started.") from error
            reason = str(error)
        else:
            if _tcp_open(settings):
                raise BrokerError(
                    f"Something listens at {address} but the AMQP connection's credentials {ref.describe()} "  # type: ignore[union-attr]
                    "don't exist, so it can't be used and a new broker would collide: create that Secret with the "
                    "running broker's username and password, or point the connection at another address."
                )
            reason = f"nothing listens at {address} and {ref.describe()} doesn't exist yet"  # type: ignore[union-attr]
        if not self.create_if_missing:
            raise BrokerUnreachableError(
                f"No broker answers at {address} for AMQP connection {self.amqp_conn_id!r} ({reason}) and "
                "create_if_missing=False: start RabbitMQ there, fix the connection's host and port, or set "
                f"create_if_missing=True to start it in namespace {spec.namespace!r}."
            )
        own = self._own_credentials(settings) if ref is None else None
        self.log.info("No broker answers at %s (%s): starting RabbitMQ (%s) in namespace %r.",
                      address, reason, spec.image, spec.namespace)
        kube = KubernetesHook(conn_id=kubernetes_conn_id)
        starter = _Starter(kube, kubernetes_conn_id, spec, self.log)
        username, password = starter.ensure_secret(own or (self.username, manifests.generate_password()),
                                                   must_match=own is not None, amqp_conn_id=self.amqp_conn_id)
        starter.ensure(manifests.rabbitmq_service(spec))
        starter.ensure(manifests.rabbitmq_statefulset(spec))
        # with credentials_secret, log in exactly as every other task will: AmqpHook reads the Secret
        final = AmqpHook(amqp_conn_id=self.amqp_conn_id).settings if ref else dataclasses.replace(
            settings, login=username, password=password)
        starter.wait_until_ready(final, timeout=self.startup_timeout, poll_interval=self.poll_interval)
        return {"started": True, "address": address, "namespace": spec.namespace, "created": starter.created}


class _Starter:
    """Creates the broker's objects (keeping existing ones) and waits for the broker."""

    def __init__(self, kube: KubernetesHook, conn_id: str, spec: manifests.BrokerManifestSpec, log: Any) -> None:
        from kubernetes import client

        self.conn_id = conn_id
        self.spec = spec
        self.log = log
        self.core = creds.core_v1(kube)
        self.apps = client.AppsV1Api(kube.api_client)
        self.created: list[str] = []

    def _call(self, action: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args)``; a 404 returns None, other failures become this package's errors."""
        from kubernetes.client.exceptions import ApiException

        try:
            return fn(*args, **kwargs)
        except ApiException as e:
            if e.status == 404 and fn.__name__.startswith("read_"):
                return None
            raise api_error(e, action, kubernetes_conn_id=self.conn_id, namespace=self.spec.namespace,
                            default=BrokerError) from e
        except Exception as e:
            raise transport_error(e, self.conn_id, default=BrokerError) from e

    def ensure_secret(self, credentials: tuple[str, str], *, must_match: bool, amqp_conn_id: str) -> tuple[str, str]:
        """Create the credentials Secret unless it exists; the credentials the broker will use."""
        from kubernetes.client.exceptions import ApiException

        ns, name = self.spec.namespace, self.spec.secret_name
        ref = creds.SecretRef(name=name, namespace=ns, kubernetes_conn_id=self.conn_id)
        for _attempt in range(2):
            existing = self._call(f"read Secret {name!r}", self.core.read_namespaced_secret, name, ns)
            if existing is not None:
                found = creds.decode_credentials(existing.data, ref)
                if must_match and found != credentials:
                    raise ConfigurationError(
                        f"{ref.describe()} already exists with other credentials than AMQP connection "
                        f"{amqp_conn_id!r}: set the connection's extra credentials_secret={name!r} (and "
                        f"credentials_namespace={ns!r}) to use them, or delete the Secret."
                    )
                self.log.info("Secret %r exists: the broker uses its credentials (user %r).", name, found[0])
                return found
            body = manifests.credentials_secret(self.spec, *credentials)
            try:
                self.core.create_namespaced_secret(ns, body)
            except ApiException as e:
                if e.status == 409:  # created meanwhile by someone else: use theirs
                    continue
                raise api_error(e, f"create Secret {name!r}", kubernetes_conn_id=self.conn_id, namespace=ns,
                                default=BrokerError) from e
            except Exception as e:
                raise transport_error(e, self.conn_id, default=BrokerError) from e
            self.created.append(f"Secret/{name}")
            self.log.info("Created Secret %r with a %s password for user %r.", name,
                          "generated" if not must_match else "given", credentials[0])
            return credentials
        raise BrokerError(f"{ref.describe()} keeps appearing and disappearing: check who else manages it.")

    def ensure(self, body: dict[str, Any]) -> None:
        """Create a Service or StatefulSet unless one of that name exists (a differing one: a warning)."""
        from kubernetes.client.exceptions import ApiException

        kind, name, ns = body["kind"], body["metadata"]["name"], self.spec.namespace
        if kind == "Service":
            read, create = self.core.read_namespaced_service, self.core.create_namespaced_service
        else:
            read, create = self.apps.read_namespaced_stateful_set, self.apps.create_namespaced_stateful_set
        try:
            create(ns, body)
        except ApiException as e:
            if e.status != 409:
                raise api_error(e, f"create {kind} {name!r}", kubernetes_conn_id=self.conn_id, namespace=ns,
                                default=BrokerError) from e
        except Exception as e:
            raise transport_error(e, self.conn_id, default=BrokerError) from e
        else:
            self.created.append(f"{kind}/{name}")
            self.log.info("Created %s %r in namespace %r.", kind, name, ns)
            return
        existing = self._call(f"read {kind} {name!r}", read, name, ns)
        current = self.core.api_client.sanitize_for_serialization(existing) if existing is not None else {}
        diffs = manifests.differences(current, body)
        if diffs:
            self.log.warning("%s %r in namespace %r already exists and differs from the seed's (%s): kept as is.",
                             kind, name, ns, "; ".join(diffs))
        else:
            self.log.info("%s %r already exists in namespace %r: kept as is.", kind, name, ns)

    def pod_state(self) -> tuple[bool, str]:
        """Whether the StatefulSet's pod is Ready, and a one-line description of it."""
        pod = self._call("read the broker's pod", self.core.read_namespaced_pod, self.spec.pod_name, self.spec.namespace)
        if pod is None:
            return False, f"pod {self.spec.pod_name!r} not created yet"
        status = pod.status
        ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
        waiting = [f"{cs.state.waiting.reason}: {cs.state.waiting.message or ''}".rstrip(": ")
                   for cs in status.container_statuses or [] if cs.state and cs.state.waiting]
        restarts = sum(cs.restart_count or 0 for cs in status.container_statuses or [])
        text = f"pod {self.spec.pod_name!r} phase {status.phase}, {'ready' if ready else 'not ready'}"
        if waiting:
            text += f", waiting ({'; '.join(waiting)})"
        if restarts:
            text += f", {restarts} restart(s)"
        return ready, text

    def wait_until_ready(self, settings: BrokerSettings, *, timeout: float, poll_interval: float) -> None:
        """Until the pod is Ready and an AMQP login at ``settings`` succeeds; a clear error on timeout."""
        started = time.monotonic()
        deadline = started + timeout
        last_logged, amqp_error = "", "not tried yet (the pod is not ready)"
        while True:
            ready, state = self.pod_state()
            if ready:
                error = _probe(settings)
                if error is None:
                    self.log.info("The broker answers at %s after %.1f s (%s).", settings.address,
                                  time.monotonic() - started, state)
                    return
                amqp_error = str(error)
            line = f"{state}; AMQP at {settings.address}: {amqp_error if ready else 'waiting for readiness'}"
            if line != last_logged:
                self.log.info("Waiting for the broker (%.0f s): %s", time.monotonic() - started, line)
                last_logged = line
            if time.monotonic() >= deadline:
                raise BrokerUnreachableError(
                    f"The broker started in namespace {self.spec.namespace!r} did not answer within {timeout:g} s: "
                    f"{state}; last AMQP error: {amqp_error}. Check the pod's events and log "
                    f"(kubectl -n {self.spec.namespace} describe pod {self.spec.pod_name}), and that the AMQP "
                    f"connection's host and port reach Service {self.spec.service_name!r} "
                    f"({self.spec.host()}:{manifests.AMQP_PORT} in the cluster)."
                )
            time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))


def _probe(settings: BrokerSettings) -> BrokerError | None:
    """One AMQP login attempt: None if it worked, else the (translated) error."""
    quick = dataclasses.replace(settings, connection_attempts=1, retry_delay=0.0,
                                socket_timeout=min(settings.socket_timeout, 5.0),
                                stack_timeout=min(settings.stack_timeout, 10.0))
    try:
        open_connection(quick).close()
    except BrokerError as e:
        return e
    return None


def _tcp_open(settings: BrokerSettings) -> bool:
    try:
        with socket.create_connection((settings.host, settings.effective_port), timeout=3):
            return True
    except OSError:
        return False
