"""Errors raised by workqueue_provider.

Every error names the thing that is wrong and how to fix it; none carries a password.
Library errors (pika, kubernetes) are translated at the boundary with ``raise ... from e``::

    WorkQueueError
    ├── ConfigurationError          bad input, raised before any side effect
    │   ├── ItemSourceError         an item source that can't be read or encoded
    │   └── CredentialsSecretNotFoundError  the connection's credentials Secret doesn't exist yet
    ├── BrokerError                 talking to RabbitMQ failed
    │   ├── BrokerUnreachableError  no TCP/TLS connection to host:port
    │   ├── BrokerAuthError         wrong credentials, or no access to the vhost
    │   ├── QueueNotFoundError      a queue that should exist doesn't
    │   ├── QueueUnavailableError   a queue exists but doesn't answer (a quorum queue without a leader)
    │   ├── QueueMismatchError      an existing queue has other arguments
    │   └── PublishError            a message was nacked or returned unroutable
    ├── KubernetesError             a Kubernetes API call failed (hooks/kube_errors.py words it)
    │   ├── KubernetesAuthError     401/403: the connection's identity is refused or lacks RBAC rights
    │   ├── KubernetesNotFoundError a namespace or object that must exist doesn't
    │   └── KubernetesUnreachableError  the API server didn't answer
    └── JobError                    the Job failed, or its result can't be trusted
"""

from __future__ import annotations


class WorkQueueError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigurationError(WorkQueueError, ValueError):
    """Invalid input: raised before anything is published or created."""


class ItemSourceError(ConfigurationError):
    """An item source that is empty, unreadable, or holds an item that can't be encoded."""


class CredentialsSecretNotFoundError(ConfigurationError):
    """The AMQP connection's ``credentials_secret`` doesn't exist (yet): the broker was never started."""


class BrokerError(WorkQueueError):
    """Talking to the AMQP broker failed."""


class BrokerUnreachableError(BrokerError):
    """The broker's host:port didn't answer within the connection timeouts."""


class BrokerAuthError(BrokerError):
    """The broker refused the credentials or the vhost."""


class QueueNotFoundError(BrokerError):
    """A queue that must exist does not."""


class QueueUnavailableError(BrokerError):
    """A queue exists but doesn't answer: a quorum queue whose leader is down, paused or being elected.
    An outage (ridden out like one): it answers again once its nodes are back."""


class QueueMismatchError(BrokerError):
    """An existing queue was declared with other arguments than requested."""

    def __init__(self, queue: str, differences: dict[str, tuple[object, object]], vhost: str = "/"):
        self.queue = queue
        self.differences = differences
        shown = ", ".join(
            f"{name}: existing {current!r}, requested {wanted!r}"
            for name, (current, wanted) in sorted(differences.items())
        )
        super().__init__(
            f"Queue {queue!r} in vhost {vhost!r} already exists with other arguments ({shown}). "
            "Use the existing arguments, pick another queue name, or delete the queue first."
        )


class PublishError(BrokerError):
    """The broker nacked or returned a message; ``confirmed`` items were safely stored."""

    def __init__(self, message: str, *, confirmed: int, total: int):
        self.confirmed = confirmed
        self.total = total
        super().__init__(f"{message} ({confirmed} of {total} items were confirmed before the failure)")


class KubernetesError(WorkQueueError):
    """A Kubernetes API call failed; the message says what was being done, where, and the fix."""


class KubernetesAuthError(KubernetesError):
    """The API server rejected the connection's credentials (401) or its RBAC rights (403)."""


class KubernetesNotFoundError(KubernetesError):
    """A namespace or object that must exist does not."""


class KubernetesUnreachableError(KubernetesError):
    """The Kubernetes API server didn't answer (connection refused, timeouts, TLS)."""


class JobError(WorkQueueError):
    """The Kubernetes Job failed, or its result can't be trusted."""
