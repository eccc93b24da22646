"""The docs agree with the code: generated pages are fresh, the site builds strict, and what the README and the
how-to state (numbers, bounds, extras, variables, RBAC verbs, advice) is checked against the code it describes."""

import fnmatch
import inspect
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from scripts.docs import GENERATED, REPO

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("relative", sorted(GENERATED))
def test_generated_docs_are_up_to_date(relative):
    committed = (REPO / relative).read_text()
    assert committed == GENERATED[relative](), f"{relative} is stale: run `python scripts/docs.py` and commit it"


def test_every_operator_parameter_is_documented():
    reference = (REPO / "docs/operators.md").read_text()
    for row in (line for line in reference.splitlines() if line.startswith("| `")):
        assert not row.rstrip().endswith("|  |"), f"undocumented parameter: {row}"


def test_every_constructor_parameter_is_in_the_reference():
    """Read from the signatures, not from the generator: a parameter the generator skips (it once skipped every
    one named `args`) fails here."""
    from scripts.docs import OPERATORS, _load

    reference = (REPO / "docs/operators.md").read_text()
    for path in OPERATORS:
        cls = _load(path)
        section = reference.split(f"## `{cls.__name__}`", 1)[1].split("\n## ", 1)[0]
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                assert f"| `{name}` |" in section, f"{cls.__name__}({name}=...) is missing from docs/operators.md"


def test_docs_script_help_prints_usage_and_writes_nothing(tmp_path):
    before = {relative: (REPO / relative).stat().st_mtime_ns for relative in GENERATED}
    result = subprocess.run([sys.executable, str(REPO / "scripts/docs.py"), "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stdout + result.stderr
    assert "wrote" not in result.stdout
    assert {relative: (REPO / relative).stat().st_mtime_ns for relative in GENERATED} == before


def test_the_docs_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: fails on a broken link between pages, a missing anchor, a link to a file the
    repository doesn't have (scripts/docs.py's hook) or a page left out of mkdocs.yml's nav. Links to other
    sites are not checked: no internet here."""
    result = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"),
                             "--site-dir", str(tmp_path / "site")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    home = (tmp_path / "site/index.html").read_text()
    assert "The item account" in home  # the README is the home page
    assert 'href="operators/"' in home  # its links into docs/ are links of the site


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_readme_recommends_a_teardown_for_the_delete_not_all_done():
    """all_done on the last task makes a failed run end `state=success`; a teardown doesn't."""
    readme = _readme()
    row = next(line for line in readme.splitlines() if line.startswith("| `DeleteQueueOperator` |"))
    assert ".as_teardown(" in row, row
    for paragraph in readme.split("\n\n"):
        if "all_done" in paragraph:
            assert "not `trigger_rule=\"all_done\"`" in paragraph and "state=success" in paragraph, paragraph
    dag = (REPO / "dags/work_queue_example.py").read_text()
    assert ".as_teardown(" in dag and "all_done" not in dag


def test_readme_states_the_fill_window_of_the_code():
    from workqueue_provider.amqp.publisher import DEFAULT_WINDOW

    claims = re.findall(r"([\d,]+) (?:in flight|messages \(at most)", _readme())
    assert claims, "the README no longer states the fill's confirm window"
    assert {int(claim.replace(",", "")) for claim in claims} == {DEFAULT_WINDOW}, claims


def test_readme_states_the_cncf_kubernetes_bound_of_pyproject():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    [cncf] = [dep for dep in dependencies if dep.startswith("apache-airflow-providers-cncf-kubernetes")]
    lower = re.search(r">=\s*([\d.]+)", cncf)[1]  # type: ignore[index]
    assert f"`apache-airflow-providers-cncf-kubernetes` >= {lower}" in _readme(), cncf


def test_readme_says_the_package_is_not_on_pypi():
    assert "not on PyPI" in _readme()


def test_readme_lists_every_amqp_connection_extra():
    from workqueue_provider.amqp import connection
    from workqueue_provider.connection_form import EXTRA_FIELDS

    section = _readme().split("**AMQP**", 1)[1].split("**Kubernetes**", 1)[0]
    extras = {*EXTRA_FIELDS, *connection._FLOAT_OPTIONS, *connection._INT_OPTIONS}
    assert not {name for name in extras if f"`{name}`" not in section}


def test_readme_says_how_to_enable_test_connection():
    assert "AIRFLOW__CORE__TEST_CONNECTION=Enabled" in _readme()


def test_every_environment_variable_the_example_dag_reads_is_documented():
    dag = (REPO / "dags/work_queue_example.py").read_text()
    variables = set(re.findall(r"os\.environ\.get\(\"(\w+)\"", dag))
    assert variables, "the example DAG reads no environment variable any more: drop this test"
    readme, how_to = _readme(), (REPO / "docs/how-to-real-cluster.md").read_text()
    assert not {name for name in variables if f"`{name}`" not in readme or f"`{name}`" not in how_to}


def _rbac_rules() -> dict[str, set[str]]:
    [role] = [doc for doc in yaml.safe_load_all((REPO / "deploy/rbac.yaml").read_text()) if doc["kind"] == "Role"]
    return {resource: set(rule["verbs"]) for rule in role["rules"] for resource in rule["resources"]}


# the Kubernetes client's method -> (RBAC verb, resource); `watch` streams are list_* calls with watch=True
_VERB = {"read": "get", "list": "list", "create": "create", "patch": "patch", "replace": "update", "delete": "delete"}
_RESOURCE = {"job": "jobs", "pod": "pods", "pod_log": "pods/log", "secret": "secrets", "service": "services",
             "stateful_set": "statefulsets", "event": "events", "config_map": "configmaps"}


def test_deploy_rbac_allows_every_kubernetes_call_of_the_provider():
    rules = _rbac_rules()
    calls = set()
    for source in (REPO / "provider").rglob("*.py"):
        calls |= set(re.findall(r"\b(read|list|create|patch|replace|delete)_namespaced_(\w+?)(?:_status)?\b",
                                source.read_text()))
    assert calls, "no Kubernetes calls found: the pattern is stale"
    from workqueue_provider.hooks.kubernetes import OBJECT_APIS  # create_object/get_object name their calls by kind

    calls |= {(verb, resource) for _group, resource in OBJECT_APIS.values() for verb in ("create", "read")}
    missing = {(_VERB[verb], _RESOURCE[kind]) for verb, kind in calls
               if _VERB[verb] not in rules.get(_RESOURCE[kind], set())}
    assert not missing, f"deploy/rbac.yaml doesn't allow: {sorted(missing)}"
    assert "watch" in rules["jobs"]  # the trigger watches its Job


def test_the_how_to_lists_the_verbs_of_deploy_rbac():
    how_to = (REPO / "docs/how-to-real-cluster.md").read_text()
    for resource, verbs in _rbac_rules().items():
        [row] = [line for line in how_to.splitlines() if line.startswith(f"| `{resource}`")]
        listed = {verb.strip() for verb in row.split("|")[2].split(",")}
        assert listed == verbs, f"{resource}: the how-to lists {sorted(listed)}, deploy/rbac.yaml grants {sorted(verbs)}"


def test_the_how_to_creates_the_namespace_before_applying_into_it():
    how_to = (REPO / "docs/how-to-real-cluster.md").read_text()
    assert how_to.index("kubectl create namespace batch") < how_to.index("kubectl -n batch apply")


def test_the_how_to_starts_the_broker_before_its_port_forward():
    how_to = (REPO / "docs/how-to-real-cluster.md").read_text()
    assert how_to.index("start_broker") < how_to.index("kubectl -n batch port-forward svc/rabbitmq-service")


def test_the_docs_name_the_labels_jobs_carry():
    from workqueue_provider.kube.names import DAG_ID_LABEL, RUN_ID_LABEL, TASK_ID_LABEL

    how_to = (REPO / "docs/how-to-real-cluster.md").read_text()
    assert all(f"`{label}`" in how_to for label in (DAG_ID_LABEL, TASK_ID_LABEL, RUN_ID_LABEL))
    assert f"-l {DAG_ID_LABEL}=" in how_to


def test_the_docker_build_context_leaves_out_the_repository_clutter_but_not_what_the_images_copy():
    ignored = {line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")}
    assert {".git", "**/__pycache__", "dist", "site", "bench/results", ".venv"} <= ignored, ignored
    for dockerfile in ("worker/Dockerfile", "docker/airflow/Dockerfile"):
        for line in (REPO / dockerfile).read_text().splitlines():
            if line.startswith("COPY "):
                sources = [word for word in line.split()[1:-1] if not word.startswith("--")]
                assert not [source for source in sources if any(fnmatch.fnmatch(source, pattern) for pattern in ignored)], line


def test_the_next_commands_point_kubectl_and_airflow_at_the_cluster(tmp_path):
    """What `make cluster` and `make demo` print: the Kubernetes connection URI must carry the kubeconfig path."""
    from airflow.models.connection import Connection

    from scripts.cluster import next_commands

    kubeconfig = tmp_path / "a dir" / "kubeconfig"
    commands = next_commands(kubeconfig, kubectl="/bin/kubectl")
    assert f"export KUBECONFIG='{kubeconfig}'" in commands
    assert "/bin/kubectl -n default get jobs,pods -l app.kubernetes.io/managed-by=airflow-provider-workqueue" in commands
    [uri] = [line.split("=", 1)[1].strip("'") for line in commands if line.startswith("export AIRFLOW_CONN_KUBERNETES_DEFAULT=")]
    assert Connection(uri=uri).extra_dejson == {"kube_config_path": str(kubeconfig)}
    [amqp] = [line.split("=", 1)[1].split()[0].strip("'") for line in commands if "AIRFLOW_CONN_AMQP_DEFAULT=" in line]
    assert Connection(uri=amqp).password is None  # the local broker's guest user: no password printed
    assert not any("AIRFLOW_CONN_AMQP_DEFAULT=" in line for line in next_commands(kubeconfig, local_broker=False))


def test_make_cluster_on_a_real_node_prints_the_example_settings_without_a_password(tmp_path):
    """`make cluster` (a real node): the DAG starts RabbitMQ in the cluster; the printed connection names the Secret
    its generated password goes into, never a password, and every setting is one shell word."""
    import shlex

    from airflow.models.connection import Connection

    from scripts.cluster import example_environment, next_commands

    [line] = [c for c in next_commands(tmp_path / "kubeconfig", environment=example_environment("10.244.7.1"))
              if "AIRFLOW_CONN_AMQP_DEFAULT=" in c]
    words = dict(word.split("=", 1) for word in shlex.split(line.split("#")[0])[1:])
    amqp = Connection(uri=words["AIRFLOW_CONN_AMQP_DEFAULT"])
    assert (amqp.host, amqp.port, amqp.password) == ("10.244.7.1", 30672, None)
    assert amqp.extra_dejson == {"credentials_secret": "rabbitmq-credentials"}
    assert (words["WORKQUEUE_POD_BROKER_HOST"], words["WORKQUEUE_POD_BROKER_PORT"]) == ("rabbitmq-service", "5672")


def test_the_docs_say_the_example_deletes_a_stuck_job_only_if_it_does():
    """A Job whose pods can't start never finishes, so its TTL never removes it: the docs may say the example
    cleans it up only when the example's sensor is set to."""
    dag = (REPO / "dags/work_queue_example.py").read_text()
    for doc in ("README.md", "docs/how-to-real-cluster.md"):
        if "delete_job_on_failure=True" in (REPO / doc).read_text():
            assert "delete_job_on_failure=True" in dag, f"{doc} says the example DAG deletes a stuck Job; it doesn't"


def test_every_dag_is_in_the_example_page():
    page = (REPO / "docs/example-dag.md").read_text()
    for path in sorted((REPO / "dags").glob("*.py")):
        names = re.findall(r"^# \[START (\w+)\]$", path.read_text(), re.M)
        assert names, f"dags/{path.name} has no [START name]/[END name] markers for docs/example-dag.md"
        assert all(f"## `{name}`" in page for name in names), f"dags/{path.name} is missing from docs/example-dag.md"


def test_every_environment_variable_a_dag_reads_is_documented():
    docs = _readme() + "".join(path.read_text() for path in (REPO / "docs").glob("*.md"))
    for path in (REPO / "dags").glob("*.py"):
        variables = set(re.findall(r"os\.environ\.get\(\"(\w+)\"", path.read_text()))
        assert not {name for name in variables if f"`{name}`" not in docs}, f"dags/{path.name}: {variables}"
