"""Start the work queue's RabbitMQ broker in Kubernetes when none answers (the tutorial's step 1)."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseOperator

from workqueue_provider.amqp.connection import AMQP_PORT, BrokerSettings, open_connection
from workqueue_provider.exceptions import (
    BrokerAuthError,
    BrokerError,
    BrokerUnreachableError,
    ConfigurationError,
    CredentialsSecretNotFoundError,
)
from workqueue_provider.hooks import broker_credentials as creds
from workqueue_provider.hooks.amqp import AmqpHook, amqp_connection, connection_settings
from workqueue_provider.hooks.kubernetes import DEFAULT_CONN_ID, KubernetesApi
from workqueue_provider.kube import broker_manifests as manifests

if TYPE_CHECKING:
    from airflow.sdk import Context


class EnsureBrokerOperator(BaseOperator):
    """Make sure the broker of an AMQP connection answers; start it in Kubernetes if it doesn't.

    A broker that accepts an AMQP login: nothing is changed. Otherwise (and with
    ``create_if_missing``) it creates, in ``namespace``, a credentials Secret, the tutorial's Service
    ``rabbitmq-service`` and StatefulSet ``rabbitmq``, and waits until the pod is Ready and AMQP
    answers at the connection's address with the Secret's credentials. Existing objects are kept
    (one that differs is named in a warning, never overwritten), so running it again changes nothing.

    With ``replicas`` > 1 it starts a RabbitMQ cluster: before the Service and StatefulSet it creates
    the Erlang cookie Secret ``<statefulset>-erlang-cookie`` (an existing one is kept: a new cookie
    would split a running cluster), the headless Service ``<statefulset>-nodes`` naming each node and
    the ConfigMap ``<statefulset>-cluster`` listing them for peer discovery; each node keeps its data on
    a PersistentVolumeClaim. It waits until every replica is Ready and AMQP answers at one of the
    connection's hosts. Give the connection every node as its Host (comma-separated, logged and returned
    as ``nodes``), so clients fail over. An existing StatefulSet of another size is refused, never
    converted in place.

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
    :param container_resources: the broker container's requests/limits (default: the tutorial's). Templated.
        (Not ``resources``: that is BaseOperator's own argument.)
    :param username: user generated into a new Secret with ``credentials_secret``.
    :param replicas: 1 (the tutorial's single node) or an odd cluster size (3, 5, 7).
    :param cluster_domain: the Kubernetes cluster's DNS domain, in each node's name (a cluster only).
    :param data_size: each node's PersistentVolumeClaim size (a cluster only).
    :param storage_class: the claims' StorageClass (a cluster only; default: the cluster's default class).
    :param node_port: also expose the Service on this port of every node (type NodePort, 30000-32767), for
        Airflow outside the cluster: its AMQP connection then names a node's address and this port, and
        QueueJobOperator's pods use ``pod_broker_host="rabbitmq-service"``, ``pod_broker_port=5672``.
    :param startup_timeout: seconds to wait for the pod(s) to be Ready and AMQP to answer.
    :param poll_interval: seconds between checks while waiting.
    :return: ``{"started": bool, "address": host:port, "namespace": ..., "created": [kind/name, ...]}``,
        for a cluster also ``"nodes": [each node's DNS name, ...]``.
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
                 replicas: int = 1, cluster_domain: str = manifests.DEFAULT_CLUSTER_DOMAIN,
                 data_size: str = manifests.DEFAULT_DATA_SIZE, storage_class: str | None = None,
                 node_port: int | None = None, startup_timeout: float = 300.0, poll_interval: float = 2.0, **kwargs: Any) -> None:
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
        self.replicas = replicas
        self.cluster_domain = cluster_domain
        self.data_size = data_size
        self.storage_class = storage_class
        self.node_port = node_port
        self.startup_timeout = startup_timeout
        self.poll_interval = poll_interval

    # -- plan: everything decided and validated before any side effect

    def _plan(self) -> tuple[manifests.BrokerManifestSpec, creds.SecretRef | None, BrokerSettings, str]:
        """The manifests' spec, the connection's Secret reference, its settings without the
        Secret's credentials, and the Kubernetes connection id."""
        settings, ref = connection_settings(amqp_connection(self.amqp_conn_id))
        kubernetes_conn_id = self.kubernetes_conn_id or (ref.kubernetes_conn_id if ref else DEFAULT_CONN_ID)
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
            replicas=self.replicas, cluster_domain=self.cluster_domain, data_size=self.data_size,
            storage_class=self.storage_class, node_port=self.node_port,
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

    def _advise_hosts(self, spec: manifests.BrokerManifestSpec, settings: BrokerSettings) -> None:
        """For a cluster, a warning when the connection names one host (its clients can't fail over)."""
        if spec.clustered and len(settings.addresses) == 1:
            self.log.warning(
                "AMQP connection %r names one host (%s) for a %d-node cluster: unless that is a Service in front "
                "of every node, its clients can't fail over to another node. Set its Host to %s.",
                self.amqp_conn_id, settings.address, spec.replicas, ",".join(spec.node_hosts()))

    # -- execute

    def execute(self, context: Context) -> dict[str, Any]:
        spec, ref, settings, kubernetes_conn_id = self._plan()
        self._advise_hosts(spec, settings)
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
                return _result(spec, started=False, address=address, created=[])
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
        self.log.info("No broker answers at %s (%s): starting RabbitMQ (%s, %s) in namespace %r.",
                      address, reason, spec.image, f"{spec.replicas} nodes" if spec.clustered else "one node",
                      spec.namespace)
        starter = _Starter(KubernetesApi(kubernetes_conn_id), spec, self.log, self.amqp_conn_id)
        credentials, given = own or (self.username, manifests.generate_password()), own is not None
        found = starter.existing_credentials(credentials, must_match=given)  # first: an RBAC refusal names the Secret
        starter.refuse_resize()  # before anything is created
        username, password = found or starter.create_secret(credentials, must_match=given)
        starter.ensure_objects()
        # with credentials_secret, log in exactly as every other task will: AmqpHook reads the Secret
        final = AmqpHook(amqp_conn_id=self.amqp_conn_id).settings if ref else dataclasses.replace(
            settings, login=username, password=password)
        starter.wait_until_ready(final, timeout=self.startup_timeout, poll_interval=self.poll_interval)
        if spec.clustered:
            self.log.info("The cluster's nodes: set AMQP connection %r's Host to %s (clients try them in order).",
                          self.amqp_conn_id, ",".join(spec.node_hosts()))
        return _result(spec, started=True, address=address, created=starter.created)


def _result(spec: manifests.BrokerManifestSpec, *, started: bool, address: str, created: list[str]) -> dict[str, Any]:
    """The task's return value (XCom); a cluster's also names its nodes."""
    result: dict[str, Any] = {"started": started, "address": address, "namespace": spec.namespace, "created": created}
    if spec.clustered:
        result["nodes"] = spec.node_hosts()
    return result


class _Starter:
    """Creates the broker's objects (keeping existing ones) and waits for the broker."""

    def __init__(self, api: KubernetesApi, spec: manifests.BrokerManifestSpec, log: Any, amqp_conn_id: str) -> None:
        self.api = api
        self.spec = spec
        self.log = log
        self.amqp_conn_id = amqp_conn_id
        self.created: list[str] = []

    def existing_credentials(self, credentials: tuple[str, str], *, must_match: bool) -> tuple[str, str] | None:
        """The credentials Secret's username and password, None if it doesn't exist. With ``must_match``,
        other credentials than ``credentials`` are an error."""
        ns, name = self.spec.namespace, self.spec.secret_name
        existing = self.api.get_secret(name, ns)
        if existing is None:
            return None
        ref = creds.SecretRef(name=name, namespace=ns, kubernetes_conn_id=self.api.kubernetes_conn_id)
        found = creds.decode_credentials(existing.get("data"), ref)
        if must_match and found != credentials:
            raise ConfigurationError(
                f"{ref.describe()} already exists with other credentials than AMQP connection "
                f"{self.amqp_conn_id!r}: set the connection's extra credentials_secret={name!r} (and "
                f"credentials_namespace={ns!r}) to use them, or delete the Secret."
            )
        self.log.info("Secret %r exists: the broker uses its credentials (user %r).", name, found[0])
        return found

    def create_secret(self, credentials: tuple[str, str], *, must_match: bool) -> tuple[str, str]:
        """Create the credentials Secret; the credentials the broker will use (theirs if someone else
        created it meanwhile)."""
        name = self.spec.secret_name
        if self.api.create_secret(manifests.credentials_secret(self.spec, *credentials)):
            self.created.append(f"Secret/{name}")
            self.log.info("Created Secret %r with a %s password for user %r.", name,
                          "generated" if not must_match else "given", credentials[0])
            return credentials
        found = self.existing_credentials(credentials, must_match=must_match)
        if found is None:
            raise BrokerError(f"Secret {name!r} in namespace {self.spec.namespace!r} keeps appearing and disappearing: "
                              "check who else manages it.")
        return found

    def refuse_resize(self) -> None:
        """An existing StatefulSet of another size is an error, raised before anything is created."""
        name, ns, wanted = self.spec.statefulset_name, self.spec.namespace, self.spec.replicas
        existing = self.api.get_object("StatefulSet", name, ns)
        have = ((existing or {}).get("spec") or {}).get("replicas")
        if existing is None or have == wanted:
            return
        raise ConfigurationError(
            f"StatefulSet {name!r} in namespace {ns!r} already runs {have} replica(s) and this task asks for "
            f"{wanted}: a broker is not resized in place (a single node can't join a cluster with its data, nor "
            f"a cluster's nodes leave it). Delete the StatefulSet and its data (kubectl -n {ns} delete statefulset "
            f"{name}, and its PersistentVolumeClaims rabbitmq-data-{name}-*, if any) to start anew, or give "
            "another statefulset_name."
        )

    def ensure_objects(self) -> None:
        """The broker's objects after its credentials Secret, in the order its pods need them."""
        spec = self.spec
        if spec.clustered:
            self.ensure(manifests.cookie_secret(spec, manifests.generate_cookie()))  # an existing one is kept
            self.ensure(manifests.nodes_service(spec))
            self.ensure(manifests.cluster_config_map(spec))
        self.ensure(manifests.rabbitmq_service(spec))
        self.ensure(manifests.rabbitmq_statefulset(spec))

    def ensure(self, body: dict[str, Any]) -> None:
        """Create the object unless one of that name exists (kept as is; a differing one: a warning)."""
        kind, name, ns = body["kind"], body["metadata"]["name"], self.spec.namespace
        secret = kind == "Secret"
        if self.api.create_secret(body) if secret else self.api.create_object(body):
            self.created.append(f"{kind}/{name}")
            self.log.info("Created %s %r in namespace %r.", kind, name, ns)
            return
        existing = self.api.get_secret(name, ns) if secret else self.api.get_object(kind, name, ns)
        diffs = manifests.differences(existing or {}, body)
        if diffs:
            self.log.warning("%s %r in namespace %r already exists and differs from the tutorial's (%s): kept as is.",
                             kind, name, ns, "; ".join(diffs))
        else:
            self.log.info("%s %r already exists in namespace %r: kept as is.", kind, name, ns)

    def broker_state(self) -> tuple[bool, str]:
        """Whether the broker is Ready (one node: its pod; a cluster: every replica), and a one-line description."""
        if not self.spec.clustered:
            return self.pod_state(self.spec.pod_name)
        name, replicas = self.spec.statefulset_name, self.spec.replicas
        sts = self.api.get_object("StatefulSet", name, self.spec.namespace)
        if sts is None:
            return False, f"StatefulSet {name!r} not found"
        ready = int((sts.get("status") or {}).get("readyReplicas") or 0)
        pods = "; ".join(self.pod_state(f"{name}-{i}")[1] for i in range(replicas))
        return ready == replicas, f"StatefulSet {name!r} {ready}/{replicas} ready ({pods})"

    def pod_state(self, pod_name: str) -> tuple[bool, str]:
        """Whether the pod is Ready, and a one-line description of it."""
        pod = self.api.get_pod(pod_name, self.spec.namespace)
        if pod is None:
            return False, f"pod {pod_name!r} not created yet"
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        containers = status.get("containerStatuses") or []
        waiting = [f"{w.get('reason')}: {w.get('message') or ''}".rstrip(": ")
                   for w in ((cs.get("state") or {}).get("waiting") for cs in containers) if w]
        restarts = sum(int(cs.get("restartCount") or 0) for cs in containers)
        text = f"pod {pod_name!r} phase {status.get('phase')}, {'ready' if ready else 'not ready'}"
        if waiting:
            text += f", waiting ({'; '.join(waiting)})"
        if restarts:
            text += f", {restarts} restart(s)"
        return ready, text

    def wait_until_ready(self, settings: BrokerSettings, *, timeout: float, poll_interval: float) -> None:
        """Until the broker is Ready and an AMQP login at ``settings`` (any of its hosts) succeeds; a clear error
        on timeout."""
        started = time.monotonic()
        deadline = started + timeout
        last_logged, amqp_error = "", "not tried yet (the pod is not ready)"
        while True:
            ready, state = self.broker_state()
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
                    f"{state}; last AMQP error: {amqp_error}. {self._where_to_look()}"
                )
            time.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))

    def _where_to_look(self) -> str:
        """The timeout's advice: the pods to describe, and what the connection's hosts must reach."""
        spec, ns = self.spec, self.spec.namespace
        service = f"Service {spec.service_name!r} ({spec.host()}:{AMQP_PORT} in the cluster)"
        if not spec.clustered:
            return (f"Check the pod's events and log (kubectl -n {ns} describe pod {spec.pod_name}), and that the "
                    f"AMQP connection's host and port reach {service}.")
        return (f"Check the pods' events and logs (kubectl -n {ns} describe statefulset {spec.statefulset_name}; "
                f"kubectl -n {ns} describe pod {spec.statefulset_name}-0 ... {spec.statefulset_name}-{spec.replicas - 1}), "
                f"and that the AMQP connection's hosts reach the nodes ({','.join(spec.node_hosts())}) or {service}.")


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
    """Whether something listens at any of the connection's addresses."""
    for address in settings.addresses:
        try:
            with socket.create_connection((address.host, address.port), timeout=3):
                return True
        except OSError:
            continue
    return False
