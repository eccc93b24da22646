"""pika's connection errors as this package's: which node, which setting, what to fix; and which of
them are an outage worth waiting out (:func:`is_transient`)."""

from __future__ import annotations

import socket
import ssl
from typing import TYPE_CHECKING

import pika.exceptions

from workqueue_provider.exceptions import (
    BrokerAuthError,
    BrokerError,
    BrokerUnreachableError,
    ConfigurationError,
    QueueUnavailableError,
)

if TYPE_CHECKING:
    from workqueue_provider.amqp.connection import BrokerSettings


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
            f"TLS handshake with the broker at {settings.address} failed ({short(error)}): "
            "check the CA file, the server name and that the port speaks TLS."
        )
    if isinstance(error, socket.gaierror):
        return BrokerUnreachableError(
            f"Broker host {settings.host!r} could not be resolved ({error.strerror}): check the connection's host."
        )
    if len(settings.addresses) > 1:
        return BrokerUnreachableError(
            f"None of the broker nodes {settings.address} answered (the last: {short(error)}) in "
            f"{settings.connection_attempts} round(s): check that RabbitMQ runs there and the hosts and ports are right."
        )
    return BrokerUnreachableError(
        f"The broker at {settings.address} did not answer ({short(error)}) after "
        f"{settings.connection_attempts} attempt(s): check that RabbitMQ runs there and the host and port are right."
    )


# Errors that won't go away by waiting: wrong credentials or vhost, an unknown host name, TLS failures.
_PERMANENT = (pika.exceptions.ProbableAuthenticationError, pika.exceptions.ProbableAccessDeniedError,
              socket.gaierror, ssl.SSLError, BrokerAuthError, ConfigurationError)
# Errors of a broker that is down, restarting or unreachable, or of a connection it dropped.
_OUTAGE = (pika.exceptions.AMQPConnectionError, pika.exceptions.ConnectionWrongStateError,
           pika.exceptions.ChannelWrongStateError, ConnectionError, TimeoutError, QueueUnavailableError)


def is_transient(error: BaseException) -> bool:
    """Whether ``error`` (or what caused it) is a broker outage worth waiting out: no answer, a refused
    or dropped connection, a broker shutting down. Not a refusal of credentials, an unknown host, a
    TLS failure, a missing queue or bad input: those fail at once."""
    chain = _causes(error)
    if any(isinstance(e, _PERMANENT) or "TLS handshake" in str(e) for e in chain):
        return False
    return any(isinstance(e, _OUTAGE) or home_node_down(e) for e in chain)


def home_node_down(error: BaseException) -> bool:
    """A 404 that only means "not reachable now": the node holding a classic queue is down or cut off
    (RabbitMQ: "home node ... of durable queue ... is down or inaccessible"). It comes back with its node."""
    return (isinstance(error, pika.exceptions.ChannelClosedByBroker) and error.reply_code == 404
            and "down or inaccessible" in error.reply_text)


def _causes(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or (current.args[0] if current.args and isinstance(current.args[0], BaseException)
                                        else None)
    return chain


def short(error: BaseException) -> str:
    """``Type: message`` in under 200 characters; pika's connection errors often carry no message of
    their own, only what caused them (or nothing: the broker just didn't answer)."""
    detail = str(error).strip()
    if not detail:
        inner = next((e for e in _causes(error)[1:] if str(e).strip()), None)
        detail = f"{type(inner).__name__}: {inner}" if inner is not None else "no answer"
    text = f"{type(error).__name__}: {detail}"
    return text if len(text) < 200 else text[:197] + "..."
