import pytest

from workqueue_provider.kube.job_status import JobPhase, assess


def job(*conditions, succeeded=0, failed=0, active=0, completions=8):
    return {
        "spec": {"completions": completions},
        "status": {"succeeded": succeeded, "failed": failed, "active": active,
                   "conditions": [{"type": t, "status": s, "reason": f"{t}Reason", "message": f"{t} message"}
                                  for t, s in conditions]},
    }


@pytest.mark.parametrize(
    ("conditions", "phase"),
    [
        pytest.param([], JobPhase.RUNNING, id="no-conditions"),
        pytest.param([("Complete", "True")], JobPhase.SUCCEEDED, id="complete"),
        pytest.param([("Complete", "False")], JobPhase.RUNNING, id="complete-false-is-not-success"),
        pytest.param([("SuccessCriteriaMet", "True")], JobPhase.RUNNING, id="success-coming"),
        pytest.param([("SuccessCriteriaMet", "True"), ("Complete", "True")], JobPhase.SUCCEEDED, id="success-then-complete"),
        pytest.param([("FailureTarget", "True")], JobPhase.FAILED, id="failure-target"),
        pytest.param([("FailureTarget", "True"), ("Failed", "True")], JobPhase.FAILED, id="failed"),
        pytest.param([("Failed", "False")], JobPhase.RUNNING, id="failed-false"),
        pytest.param([("Suspended", "True")], JobPhase.RUNNING, id="suspended"),
    ],
)
def test_conditions_are_looked_up_by_type_and_true_status(conditions, phase):
    assert assess(job(*conditions)).phase is phase


def test_failure_carries_reason_and_message():
    verdict = assess(job(("FailureTarget", "True"), ("Failed", "True")))
    assert verdict.reason == "FailedReason" and verdict.message == "Failed message"


def test_progress_line():
    assert assess(job(succeeded=40, active=10, failed=1, completions=100)).progress() == "succeeded 40/100, active 10, failed 1"
    assert assess(job(completions=None)).progress() == "succeeded 0/?, active 0, failed 0"
    assert assess({"metadata": {}}).progress() == "succeeded 0/?, active 0, failed 0"


def test_success_coming_is_flagged():
    assert assess(job(("SuccessCriteriaMet", "True"))).finishing
