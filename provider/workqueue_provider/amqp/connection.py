"""Broker settings, connection parameters and pika error translation.

One place decides the timeouts that keep every call from hanging, how an ``amqp://`` or
``amqps://`` URL is read, and how pika's exceptions become this package's errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import ssl
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import pika
import pika.exceptions

from workqueue_provider.exceptions import (
    BrokerAuthError,
    BrokerError,
    BrokerUnreachableError,
    ConfigurationError,
)

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
    """Where and how to reach the broker. Defaults bound every wait, so no call hangs forever."""

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
        if not self.host:
            raise ConfigurationError("The broker connection has no host: set the connection's Host.")
        if self.port is not None and not 0 < self.port < 65536:
            raise ConfigurationError(f"Broker port {self.port} is out of range: use 1-65535 (AMQP is 5672).")
        for name in ("heartbeat", "connection_attempts", "blocked_connection_timeout", "socket_timeout",
                     "stack_timeout"):
            if getattr(self, name) <= 0 and not (name == "heartbeat" and self.heartbeat == 0):
                raise ConfigurationError(f"Broker option {name}={getattr(self, name)!r} must be positive.")
        for name in ("retry_delay", "outage_window"):
            if not getattr(self, name) >= 0:
                raise ConfigurationError(f"Broker option {name}={getattr(self, name)!r} must not be negative.")

    @property
    def effective_port(self) -> int:
        return self.port or (AMQPS_PORT if self.tls else AMQP_PORT)

    @property
    def address(self) -> str:
        """``host:port`` as shown in messages."""
        return f"{self.host}:{self.effective_port}"

    def describe(self) -> str:
        """A password-free description for logs and errors."""
        scheme = "amqps" if self.tls else "amqp"
        return f"{scheme}://{self.login}@{self.address}/{quote(self.vhost, safe='')}"

    def with_options(self, options: Mapping[str, Any]) -> BrokerSettings:
        """Return a copy with extras/URL query options applied (strings are converted)."""
        return dataclasses.replace(self, **_parse_options(options))

    def url(self, *, host: str | None = None, port: int | None = None) -> str:
        """The full URL **with the password**, for a Kubernetes Secret only. Never log it."""
        scheme = "amqps" if self.tls else "amqp"
        creds = f"{quote(self.login, safe='')}:{quote(self.password, safe='')}"
        host = host or self.host
        if ":" in host and not host.startswith("["):  # an IPv6 address
            host = f"[{host}]"
        port = port or self.effective_port
        return f"{scheme}://{creds}@{host}:{port}/{quote(self.vhost, safe='')}{self._tls_query()}"

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
        """Read ``amqp://user:pass@host:port/vhost?heartbeat=30`` (or ``amqps://``)."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ConfigurationError(f"Malformed broker URL: {e}. Expected amqp://user:password@host:5672/vhost.") from None
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ConfigurationError(
                "Malformed broker URL: expected amqp://user:password@host:5672/vhost or amqps://... "
                f"(got scheme {parts.scheme!r}, host {parts.hostname!r})."
            )
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        settings = cls(
            host=parts.hostname,
            port=port,
            login=unquote(parts.username) if parts.username else "guest",
            password=unquote(parts.password) if parts.password else "guest",
            vhost=unquote(path) or "/",
            tls=parts.scheme == "amqps",
        )
        settings = settings.with_options(dict(parse_qsl(parts.query)))
        return dataclasses.replace(settings, **overrides) if overrides else settings

    def pika_parameters(self) -> pika.ConnectionParameters:
        ssl_options = None
        if self.tls:
            try:
                context = ssl.create_default_context(cafile=self.ca_file)
                if self.cert_file:
                    context.load_cert_chain(self.cert_file, self.key_file)
            except (OSError, ssl.SSLError) as e:
                raise ConfigurationError(
                    f"TLS files for the broker can't be used ({_short(e)}): check ca_certs "
                    f"({self.ca_file!r}), certfile ({self.cert_file!r}) and keyfile ({self.key_file!r})."
                ) from None
            if not self.verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            ssl_options = pika.SSLOptions(context, self.server_hostname or self.host)
        return pika.ConnectionParameters(
            host=self.host,
            port=self.effective_port,
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
                raise ConfigurationError(
                    f"Unknown broker option {key!r}. Known options: "
                    f"{', '.join(sorted({*_FLOAT_OPTIONS, *_INT_OPTIONS, *_TLS_FILE_OPTIONS, 'verify', 'ssl', 'server_hostname', 'vhost'}))}."
                )
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigurationError):
                raise
            raise ConfigurationError(f"Broker option {key}={value!r} is not a number.") from None
    return parsed


def translate_connect_error(settings: BrokerSettings, error: BaseException) -> BrokerError:
    """Turn a pika/socket connection failure into an error that names host, port and the fix; the
    original error is its ``__cause__`` (see :func:`is_transient`)."""
    translated = _translate_connect_error(settings, error)
    translated.__cause__ = error
    return translated


def _translate_connect_error(settings: BrokerSettings, error: BaseException) -> BrokerError:
    if isinstance(error, pika.exceptions.ProbableAuthenticationError):
        return BrokerAuthError(
            f"The broker at {settings.address} refused the credentials of user {settings.login!r}: "
            "check the connection's login and password."
        )
    if isinstance(error, pika.exceptions.ProbableAccessDeniedError):
        return BrokerAuthError(
            f"The broker at {settings.address} refused vhost {settings.vhost!r} for user {settings.login!r}: "
            "the vhost doesn't exist or the user has no permission on it "
            "(rabbitmqctl add_vhost / set_permissions, or fix the connection's vhost)."
        )
    if isinstance(error, ssl.SSLError) or "SSL" in repr(error) or "CERTIFICATE" in repr(error).upper():
        return BrokerUnreachableError(
            f"TLS handshake with the broker at {settings.address} failed ({_short(error)}): "
            "check the CA file, the server name and that the port speaks TLS."
        )
    if isinstance(error, socket.gaierror):
        return BrokerUnreachableError(
            f"Broker host {settings.host!r} could not be resolved ({error.strerror}): check the connection's host."
        )
    return BrokerUnreachableError(
        f"The broker at {settings.address} did not answer ({_short(error)}) after "
        f"{settings.connection_attempts} attempt(s): check that RabbitMQ runs there and the host and port are right."
    )


# Errors that won't go away by waiting: wrong credentials or vhost, an unknown host name, TLS failures.
_PERMANENT = (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError,
              socket.gaierror, ssl.SSLError, BrokerAuthError, ConfigurationError)
# Errors of a broker that is down, restarting or unreachable, or of a connection it dropped.
_OUTAGE = (pika.exceptions.AMQPConnectionError, pika.exceptions.ConnectionWrongStateError,
           pika.exceptions.ChannelWrongStateError, ConnectionError, TimeoutError)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a broker outage worth waiting out: no answer, a refused
    or dropped connection, a broker shutting down. Not a refusal of credentials, an unknown host, a
    TLS failure, a missing queue or bad input: those fail at once."""
    chain = _causes(error)
    if any(isinstance(e, _PERMANENT) or "TLS handshake" in str(e) for e in chain):
        return False
    return any(isinstance(e, _OUTAGE) for e in chain)


def _causes(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or (current.args[0] if current.args and isinstance(current.args[0], BaseException)
                                        else None)
    return chain


def broker_version(connection: Any) -> tuple[int, ...]:
    """The broker's version from the connection's server properties, e.g. (4, 0, 5); () if unknown."""
    impl = getattr(connection, "_impl", connection)
    version = (getattr(impl, "server_properties", None) or {}).get("version", b"")
    text = version.decode() if isinstance(version, bytes) else str(version)
    numbers = []
    for part in text.split("."):
        if not part.isdigit():
            break
        numbers.append(int(part))
    return tuple(numbers)


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) < 200 else text[:197] + "..."


def open_connection(settings: BrokerSettings) -> pika.BlockingConnection:
    """Open a blocking connection, translating failures."""
    try:
        return pika.BlockingConnection(settings.pika_parameters())
    except (pika.exceptions.AMQPError, OSError, ssl.SSLError) as e:
        raise translate_connect_error(settings, e) from e


@contextlib.contextmanager
def blocking_channel(settings: BrokerSettings) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A channel on a fresh connection that is always closed afterwards."""
    connection = open_connection(settings)
    try:
        yield connection.channel()
    finally:
        with contextlib.suppress(Exception):
            connection.close()
