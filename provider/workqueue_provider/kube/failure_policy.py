"""A Job ``podFailurePolicy`` that fits a work queue, and the ``podReplacementPolicy`` the Job gets.

:func:`queue_failure_policy` returns the preset, in the order the Job controller checks its rules:

1. a pod with the ``DisruptionTarget`` condition (a node drain, an eviction, a preemption) is
   ``Ignore``d: it doesn't use up ``backoffLimit``, and its item is back in the queue for another pod;
2. ``workqueue-consume``'s exit 69 (the broker unreachable past the outage window) is ``Count``ed, as
   any other failure: a broker that stays away fails the Job after ``backoffLimit`` pods instead of
   pods being replaced forever (written out so ``kubectl get job -o yaml`` shows the decision);
3. with ``poison_exit_code``, a worker exiting with that code ``FailJob``s at once: the item can never
   be processed, so retrying it would only use up the backoff. Its item is requeued (or dead-lettered).

Kubernetes allows a ``podFailurePolicy`` only with the pods' ``restartPolicy: Never`` and
``podReplacementPolicy: Failed``.
"""

from __future__ import annotations

from typing import Any

from workqueue_provider.exceptions import ConfigurationError

#: Start a replacement pod only once the old one has failed (GA in Kubernetes 1.34). The default,
#: ``TerminatingOrFailed``, starts it while the old pod still terminates and may still hold an item.
REPLACEMENT_POLICIES = ("Failed", "TerminatingOrFailed")
#: workqueue-consume's own exit codes (worker/consume.py), which a poison exit code must not reuse
EXIT_BROKER, EXIT_REQUEUED, EXIT_CONFIG, EXIT_CANNOT_RUN = 69, 75, 78, 127
RESERVED_EXIT_CODES = (EXIT_BROKER, EXIT_REQUEUED, EXIT_CONFIG, EXIT_CANNOT_RUN)


def validate_replacement_policy(value: Any, *, with_failure_policy: bool) -> None:
    """``value`` is one of :data:`REPLACEMENT_POLICIES` or None (the Kubernetes default), and ``Failed``
    (or None) when the Job has a podFailurePolicy."""
    if value is not None and value not in REPLACEMENT_POLICIES:
        raise ConfigurationError(f"pod_replacement_policy={value!r}: use one of {REPLACEMENT_POLICIES}, or None "
                                 "to leave it to Kubernetes.")
    if with_failure_policy and value not in (None, "Failed"):
        raise ConfigurationError(f"pod_replacement_policy={value!r} with a pod_failure_policy: Kubernetes allows only "
                                 "'Failed' there; pass pod_replacement_policy='Failed'.")


def queue_failure_policy(*, poison_exit_code: int | None = None, container_name: str = "worker") -> dict[str, Any]:
    """The preset ``podFailurePolicy`` (see the module docstring); needs ``restart_policy="Never"``.

    :param poison_exit_code: the worker's exit code for an item it can never process (1-127, none of
        workqueue-consume's own 69, 75, 78, 127); the Job then fails at once. None: no such rule.
    :param container_name: the worker container (the one QueueJobOperator generates is ``worker``).
    """
    rules: list[dict[str, Any]] = [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "Count", "onExitCodes": {"containerName": container_name, "operator": "In", "values": [EXIT_BROKER]}},
    ]
    if poison_exit_code is not None:
        if (isinstance(poison_exit_code, bool) or not isinstance(poison_exit_code, int)
                or not 1 <= poison_exit_code <= 127 or poison_exit_code in RESERVED_EXIT_CODES):
            raise ConfigurationError(
                f"poison_exit_code={poison_exit_code!r}: pick an exit code from 1 to 127 that workqueue-consume doesn't "
                f"use itself ({', '.join(map(str, RESERVED_EXIT_CODES))}); codes above 128 mean a signal.")
        rules.append({"action": "FailJob",
                      "onExitCodes": {"containerName": container_name, "operator": "In", "values": [poison_exit_code]}})
    return {"rules": rules}
