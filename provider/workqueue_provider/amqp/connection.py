"""Broker settings and connections.

One place decides the timeouts that keep every call from hanging, how an ``amqp://`` or
``amqps://`` URL is read, and which nodes of a cluster are tried (in order, the first that answers;
see :mod:`~workqueue_provider.amqp.addresses`). pika's errors are translated in :mod:`~workqueue_provider.amqp.errors`.
"""

from __future__ import annotations

import dataclasses
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import pika
import pika.exceptions

from workqueue_provider.amqp.addresses import Address, format_hosts, parse_hosts, split_url_authority, url_authority
from workqueue_provider.amqp.errors import is_transient as is_transient  # re-exported: callers import it from here
from workqueue_provider.amqp.errors import short, translate_connect_error
from workqueue_provider.exceptions import ConfigurationError

log = logging.getLogger(__name__)

AMQP_PORT = 5672
AMQPS_PORT = 5671
DEFAULT_OUTAGE_WINDOW = 300.0  # a broker restart, upgrade or node reboot takes minutes, not hours

# Options accepted both as connection extras and as URL query parameters.
_FLOAT_OPTIONS = ("blocked_connection_timeout", "retry_delay", "socket_timeout", "stack_timeout", "outage_window")
_INT_OPTIONS = ("heartbeat", "connection_attempts")
_TLS_FILE_OPTIONS = {"ca_certs": "ca_file", "cafile": "ca_file", "ca_file": "ca_file",
                     "certfile": "cert_file", "cert_file": "cert_file",
                     "keyfile": "key_file", "key_file": "key_file"}
# Connection extras that are not about the AMQP connection: accepted, and left to their reader.
_OTHER_EXTRAS = ("management_url",)  # the RabbitMQ management UI, for the UI's extra link (links.py)


@dataclass(frozen=True)
class BrokerSettings:
    """Where and how to reach the broker. Defaults bound every wait, so no call hangs forever.

    ``host`` is one host or the nodes of a cluster, comma-separated (``h1,h2:5673,h3``); ``port`` is
    the port of every entry that names none."""

    host: str = "localhost"
    port: int | None = None
    login: str = "guest"
    password: str = field(default="guest", repr=False)
    vhost: str = "/"
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify: bool = True
    server_hostname: str | None = None
    heartbeat: int = 60
    blocked_connection_timeout: float = 60.0
    connection_attempts: int = 3
    retry_delay: float = 1.0
    socket_timeout: float = 10.0
    stack_timeout: float = 15.0
    outage_window: float = DEFAULT_OUTAGE_WINDOW  # seconds the Airflow side rides out a broker outage

    def __post_init__(self) -> None:
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigurationError(f"Broker port {self.port} is out of range: use 1-65535 (AMQP is 5672).")
        self.addresses  # noqa: B018 - a malformed host list fails here, before anything connects
        for name in ("heartbeat", "connection_attempts", "blocked_connection_timeout", "socket_timeout",
                     "stack_timeout"):
            if getattr(self, name) <= 0 and not (name == "heartbeat" and self.heartbeat == 0):
                raise ConfigurationError(f"Broker option {name}={getattr(self, name)!r} must be positive.")
        for name in ("retry_delay", "outage_window"):
            if not getattr(self, name) >= 0:
                raise ConfigurationError(f"Broker option {name}={getattr(self, name)!r} must not be negative.")

    @property
    def effective_port(self) -> int:
        """The port of the addresses that name none."""
        return self.port or (AMQPS_PORT if self.tls else AMQP_PORT)

    @property
    def addresses(self) -> tuple[Address, ...]:
        """Every node to try, in order."""
        return parse_hosts(self.host, self.effective_port)

    @property
    def address(self) -> str:
        """``host:port`` (``h1:5672,h2:5672`` for several) as shown in messages."""
        return format_hosts(self.addresses)

    def describe(self) -> str:
        """A password-free description for logs and errors."""
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{self.login}@{self.address}/{quote(self.vhost, safe='')}"

    def with_options(self, options: Mapping[str, Any]) -> BrokerSettings:
        """Return a copy with extras/URL query options applied (strings are converted)."""
        return dataclasses.replace(self, **_parse_options(options))

    def address_for(self, *, host: str | None = None, port: int | None = None) -> str:
        """``host:port`` of :meth:`url` with the same ``host`` and ``port`` (no password): for logs."""
        return format_hosts(parse_hosts(host or self.host, port or self.effective_port))

    def url(self, *, host: str | None = None, port: int | None = None) -> str:
        """The full URL **with the password**, for a Kubernetes Secret only. Never log it.

        Every address goes in (``amqp://u:p@h1:5672,h2:5672/%2F``, read back by :meth:`from_url`).
        ``host`` (one host or a list) replaces them; ``port`` is the port of each address that names none."""
        scheme = "amqps" if self.tls else "amqp"
        addresses = parse_hosts(host or self.host, port or self.effective_port)
        authority = url_authority(self.login, self.password, addresses)
        return f"{scheme}://{authority}/{quote(self.vhost, safe='')}{self._tls_query()}"

    def _tls_query(self) -> str:
        """The TLS options a reader of :meth:`url` needs to verify the broker as this side does."""
        if not self.tls:
            return ""
        options = {"ca_certs": self.ca_file, "server_hostname": self.server_hostname,
                   "verify": None if self.verify else "false"}
        present = {key: value for key, value in options.items() if value}
        return f"?{urlencode(present)}" if present else ""

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> BrokerSettings:
        """Read ``amqp://user:pass@host:port/vhost?heartbeat=30`` (or ``amqps://``); several nodes as
        ``amqp://user:pass@h1:5672,h2:5672,h3:5672/vhost``."""
        expected = "Expected amqp://user:password@host:5672/vhost (several nodes: host1:5672,host2:5672)"
        parts = urlsplit(url)
        user, password, hosts = split_url_authority(parts.netloc)
        if parts.scheme not in ("amqp", "amqps") or not hosts:
            raise ConfigurationError(f"Malformed broker URL: {expected} or amqps://... "
                                     f"(got scheme {parts.scheme!r}, host {hosts!r}).")
        tls = parts.scheme == "amqps"
        try:
            addresses = parse_hosts(hosts, AMQPS_PORT if tls else AMQP_PORT)
        except ConfigurationError as e:
            raise ConfigurationError(f"Malformed broker URL: {e} {expected}.") from None
        single = len(addresses) == 1  # one host: its port in `port`, as before
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        settings = cls(
            host=addresses[0].host if single else format_hosts(addresses),
            port=addresses[0].port if single else None,
            login=unquote(user) if user else "guest",
            password=unquote(password) if password else "guest",
            vhost=unquote(path) or "/",
            tls=tls,
        )
        settings = settings.with_options(dict(parse_qsl(parts.query)))
        return dataclasses.replace(settings, **overrides) if overrides else settings

    def for_address(self, address: Address) -> BrokerSettings:
        """These settings with one node only (for a client that takes one, e.g. a SelectConnection)."""
        return dataclasses.replace(self, host=address.host, port=address.port)

    def connection_parameters(self) -> list[pika.ConnectionParameters]:
        """One pika parameter set per node, in order: pika's BlockingConnection tries each in turn,
        ``connection_attempts`` rounds with ``retry_delay`` between rounds."""
        return [self.pika_parameters(address) for address in self.addresses]

    def pika_parameters(self, address: Address | None = None) -> pika.ConnectionParameters:
        """pika's parameters for ``address`` (by default the first node; with several, that client
        fails over to no other node, and says so in the log: prefer :meth:`connection_parameters`)."""
        if address is None:
            address = self.addresses[0]
            if len(self.addresses) > 1:
                log.warning("This client connects to one node only: %s of %s (no failover).", address, self.address)
        ssl_options = None
        if self.tls:
            try:
                context = ssl.create_default_context(cafile=self.ca_file)
                if self.cert_file:
                    context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as e:
                raise ConfigurationError(
                    f"TLS files for the broker can't be used ({short(e)}): check ca_certs "
                    f"({self.ca_file!r}), certfile ({self.cert_file!r}) and keyfile ({self.key_file!r})."
                ) from None
            if not self.verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            ssl_options = pika.SSLOptions(context, self.server_hostname or address.host)
        return pika.ConnectionParameters(
            host=address.host,
            port=address.port,
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(self.login, self.password),
            ssl_options=ssl_options,
            heartbeat=self.heartbeat,
            blocked_connection_timeout=self.blocked_connection_timeout,
            connection_attempts=self.connection_attempts,
            retry_delay=self.retry_delay,
            socket_timeout=self.socket_timeout,
            stack_timeout=self.stack_timeout,
        )


def _parse_options(options: Mapping[str, Any]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for key, value in options.items():
        try:
            if key in _FLOAT_OPTIONS:
                parsed[key] = float(value)
            elif key in _INT_OPTIONS:
                parsed[key] = int(value)
            elif key in _TLS_FILE_OPTIONS:
                parsed[_TLS_FILE_OPTIONS[key]] = value or None
            elif key in ("verify", "ssl", "tls"):
                flag = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
                parsed["verify" if key == "verify" else "tls"] = flag
            elif key == "server_hostname":
                parsed[key] = value or None
            elif key == "vhost":
                parsed[key] = value
            elif key in _OTHER_EXTRAS:
                continue
            else:
                known = {*_FLOAT_OPTIONS, *_INT_OPTIONS, *_TLS_FILE_OPTIONS, "verify", "ssl", "server_hostname", "vhost"}
                raise ConfigurationError(f"Unknown broker option {key!r}. Known options: {', '.join(sorted(known))}.")
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigurationError):
                raise
            raise ConfigurationError(f"Broker option {key}={value!r} is not a number.") from None
    return parsed


def server_properties(connection: Any) -> dict[str, str]:
    """What the broker said of itself when the connection opened (``product``, ``version``, ``cluster_name``...),
    as text. pika keeps them only on the connection under a BlockingConnection: the one place that reads it."""
    impl = getattr(connection, "_impl", connection)
    properties = getattr(impl, "server_properties", None) or {}
    return {key: value.decode(errors="replace") if isinstance(value, bytes) else str(value)
            for key, value in properties.items() if isinstance(value, bytes | str | int)}


def connected_address(connection: Any) -> Address | None:
    """The node a connection is open to (the first of its settings that answered); None if unknown."""
    params = getattr(getattr(connection, "_impl", connection), "params", None)
    return Address(params.host, params.port) if params is not None else None


def broker_version(connection: Any) -> tuple[int, ...]:
    """The broker's version from the connection's server properties, e.g. (4, 0, 5); () if unknown."""
    numbers = []
    for part in server_properties(connection).get("version", "").split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def open_connection(settings: BrokerSettings) -> pika.BlockingConnection:
    """Open a blocking connection to the first node that answers (in the settings' order), translating
    failures. Says in the log when that is not the first node."""
    try:
        connection = pika.BlockingConnection(settings.connection_parameters())
    except (pika.exceptions.AMQPError, OSError, ssl.SSLError) as e:
        raise translate_connect_error(settings, e) from e
    node = connected_address(connection)
    if node is not None and node != settings.addresses[0]:
        log.warning("Connected to the broker node %s (%s did not answer).", node,
                    format_hosts(settings.addresses[:settings.addresses.index(node)]))
    return connection
