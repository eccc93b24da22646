import pytest

from workqueue_provider.exceptions import ConfigurationError
from workqueue_provider.kube import failure_policy
from workqueue_provider.kube.failure_policy import queue_failure_policy
from workqueue_provider.kube.job_manifest import (
    SPEC_HASH_ANNOTATION,
    JobOptions,
    build_job,
    completions_for,
    job_name_for,
    merge,
)
from workqueue_provider.worker import consume


def test_job_names_are_deterministic_valid_and_unique_per_run():
    name = job_name_for("dag", "run_job", "manual__2026-11-28T10:00:00+00:00")
    assert name == job_name_for("dag", "run_job", "manual__2026-11-28T10:00:00+00:00")
    assert name != job_name_for("dag", "run_job", "scheduled__2026-11-28T00:00:00+00:00")
    assert name.startswith("run-job-") and len(name) <= 63
    long = job_name_for("d" * 300, "T" * 300 + "_x", "r" * 300)
    assert len(long) <= 63 and long[0].isalnum() and long[-1].isalnum()
    assert job_name_for("dag", "___", "run").startswith("job-")


@pytest.mark.parametrize(
    ("prefix", "fragment"),
    [("Bad_Name", "not a valid RFC 1123"), ("x" * 53, "leave room"), ("-x", "not a valid RFC 1123")],
)
def test_bad_job_name_prefixes(prefix, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        job_name_for("dag", "task", "run", prefix=prefix)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        pytest.param({"parallelism": 0}, "parallelism=0 must be a positive integer", id="zero-parallelism"),
        pytest.param({"parallelism": -2}, "parallelism=-2", id="negative-parallelism"),
        pytest.param({"completions": 0}, "completions=0", id="zero-completions"),
        pytest.param({"image": " "}, "image is empty", id="empty-image"),
        pytest.param({"namespace": "Prod"}, "not a valid RFC 1123", id="bad-namespace"),
        pytest.param({"namespace": "n" * 64}, "at most 63", id="long-namespace"),
        pytest.param({"queue_name": ""}, "queue name is empty", id="empty-queue"),
        pytest.param({"restart_policy": "Always"}, "restart_policy='Always'", id="restart-always"),
        pytest.param({"pod_failure_policy": {"rules": []}}, "needs restart_policy='Never'", id="pfp-onfailure"),
        pytest.param({"node_selector": ["a"]}, "must be a mapping", id="selector-list"),
        pytest.param({"command": "worker.py"}, "must be a list", id="command-string"),
        pytest.param({"labels": {"team": "a b"}}, "not a valid label value", id="bad-label"),
        pytest.param({"backoff_limit": -1}, "backoff_limit=-1", id="negative-backoff"),
    ],
)
def test_bad_job_options_are_refused(kwargs, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        JobOptions(**{"image": "job-wq-1", "queue_name": "job1", **kwargs})


def test_completions_follow_the_queue():
    base = JobOptions(image="i", queue_name="q")
    assert completions_for(base, 8) == 8
    assert completions_for(JobOptions(image="i", queue_name="q", items_per_pod=3), 8) == 3
    assert completions_for(JobOptions(image="i", queue_name="q", items_per_pod=None), 8) is None
    assert completions_for(JobOptions(image="i", queue_name="q", completions=5), 8) == 5


def test_the_seed_job_manifest():
    options = JobOptions(
        image="job-wq-1", queue_name="job1", parallelism=2, backoff_limit=3, ttl_seconds_after_finished=60,
        node_selector={"pool": "batch"}, resources={"limits": {"cpu": "1"}}, image_pull_secrets=["regcred"],
        labels={"team": "data"}, annotations={"note": "x"}, image_pull_policy="IfNotPresent")
    job = build_job("job-wq-1-abc", options, completions=8, secret_name="job-wq-1-abc-broker")
    spec = job["spec"]
    assert (spec["completions"], spec["parallelism"], spec["backoffLimit"], spec["ttlSecondsAfterFinished"]) == (8, 2, 3, 60)
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure" and pod["nodeSelector"] == {"pool": "batch"}
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    secret_ref = {"secretKeyRef": {"name": "job-wq-1-abc-broker", "key": "BROKER_URL"}}
    assert env["BROKER_URL"] == {"name": "BROKER_URL", "valueFrom": secret_ref}
    assert env["QUEUE"]["value"] == "job1" and "command" not in container
    assert container["imagePullPolicy"] == "IfNotPresent"
    default = build_job("n", JobOptions(image="i", queue_name="q"), completions=1, secret_name="s")
    assert "imagePullPolicy" not in default["spec"]["template"]["spec"]["containers"][0]  # Kubernetes' own default
    assert job["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == options.fingerprint()
    assert job["metadata"]["labels"]["team"] == "data"


def test_templates_fill_in_anything_else_and_explicit_options_win():
    options = JobOptions(
        image="job-wq-1", queue_name="q",
        job_template={"spec": {"suspend": False, "parallelism": 99}},
        pod_template={"spec": {"priorityClassName": "batch",
                               "containers": [{"name": "worker", "securityContext": {"runAsNonRoot": True}},
                                              {"name": "sidecar", "image": "busybox"}]}},
    )
    job = build_job("n", options, completions=1, secret_name="s")
    assert job["spec"]["suspend"] is False and job["spec"]["parallelism"] == 2
    pod = job["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "batch"
    worker = [c for c in pod["containers"] if c["name"] == "worker"][0]
    assert worker["securityContext"] == {"runAsNonRoot": True, "allowPrivilegeEscalation": False,
                                         "capabilities": {"drop": ["ALL"]}} and worker["image"] == "job-wq-1"
    assert [c["name"] for c in pod["containers"]] == ["worker", "sidecar"]


def test_fingerprint_changes_with_the_spec():
    default, wider = JobOptions(image="a", queue_name="q"), JobOptions(image="a", queue_name="q", parallelism=3)
    assert default.fingerprint() != wider.fingerprint()
    assert merge({"a": {"b": 1}}, {"a": {"c": 2}}) == {"a": {"b": 1, "c": 2}}


def test_a_finished_jobs_successor_is_the_next_generation_within_63_characters():
    from workqueue_provider.kube.job_manifest import next_generation

    assert next_generation("run-job-0123456789") == "run-job-0123456789-g2"
    assert next_generation("run-job-0123456789-g2") == "run-job-0123456789-g3"
    long = "a" * 52 + "-0123456789"
    assert len(long) == 63
    second = next_generation(long)
    assert len(second) <= 63 and second.endswith("-g2") and next_generation(second).endswith("-g3")
    assert len({long, second, next_generation(second)}) == 3


def test_service_account_names_may_have_dots_as_kubernetes_allows():
    assert JobOptions(image="i", queue_name="q", service_account_name="team.batch-runner").service_account_name
    with pytest.raises(ConfigurationError, match="RFC 1123 subdomain"):
        JobOptions(image="i", queue_name="q", service_account_name="Team..runner")


def test_pods_meet_the_restricted_pod_security_standard_by_default():
    pod = build_job("n", JobOptions(image="i", queue_name="q"), completions=1, secret_name="s")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    (worker,) = pod["containers"]
    assert worker["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def test_a_pod_template_overrides_the_security_defaults_key_by_key():
    options = JobOptions(image="i", queue_name="q", pod_template={"spec": {"securityContext": {"runAsUser": 0,
                                                                                              "runAsNonRoot": False}}})
    pod = build_job("n", options, completions=1, secret_name="s")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 0 and pod["securityContext"]["runAsNonRoot"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}


def test_the_worker_image_runs_as_the_uid_the_pods_ask_for():
    from pathlib import Path

    from workqueue_provider.kube.job_manifest import WORKER_UID

    dockerfile = (Path(__file__).resolve().parents[2] / "worker" / "Dockerfile").read_text()
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users == [f"{WORKER_UID}:{WORKER_UID}"], "worker/Dockerfile must end as the pods' numeric non-root user"


def test_a_replacement_pod_starts_only_once_the_old_one_failed_by_default():
    job = build_job("j", JobOptions(image="i", queue_name="q"), completions=1, secret_name="s")
    assert job["spec"]["podReplacementPolicy"] == "Failed"
    unset = build_job("j", JobOptions(image="i", queue_name="q", pod_replacement_policy=None), completions=1, secret_name="s")
    assert "podReplacementPolicy" not in unset["spec"]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        pytest.param({"pod_replacement_policy": "Terminating"}, "use one of", id="unknown-replacement"),
        pytest.param({"pod_replacement_policy": "TerminatingOrFailed", "restart_policy": "Never",
                      "pod_failure_policy": queue_failure_policy()}, "allows only 'Failed'", id="replacement-with-pfp"),
        pytest.param({"pod_failure_policy": queue_failure_policy()}, "pass restart_policy='Never'", id="preset-onfailure"),
    ],
)
def test_policies_that_kubernetes_would_refuse_are_refused_first(kwargs, fragment):
    with pytest.raises(ConfigurationError, match=fragment):
        JobOptions(image="i", queue_name="q", **kwargs)


def test_the_queue_failure_policy_ignores_disruptions_counts_broker_outages_and_fails_on_poison():
    options = JobOptions(image="i", queue_name="q", restart_policy="Never",
                         pod_failure_policy=queue_failure_policy(poison_exit_code=3))
    spec = build_job("j", options, completions=1, secret_name="s")["spec"]
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert spec["podFailurePolicy"] == {"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "Count", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [69]}},
        {"action": "FailJob", "onExitCodes": {"containerName": "worker", "operator": "In", "values": [3]}},
    ]}
    assert [r["action"] for r in queue_failure_policy()["rules"]] == ["Ignore", "Count"]


@pytest.mark.parametrize("code", [0, 69, 75, 78, 127, 137, -1, True, "3"])
def test_a_poison_exit_code_must_be_the_workers_own(code):
    with pytest.raises(ConfigurationError, match="poison_exit_code"):
        queue_failure_policy(poison_exit_code=code)


def test_the_reserved_exit_codes_are_workqueue_consumes():
    assert failure_policy.RESERVED_EXIT_CODES == (consume.EXIT_BROKER, consume.EXIT_REQUEUED, consume.EXIT_CONFIG,
                                                  consume.EXIT_CANNOT_RUN)
