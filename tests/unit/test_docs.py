"""Docs generated from code (operator reference, example DAG) must match what is committed."""

import pytest

from scripts.docs import GENERATED, REPO


@pytest.mark.parametrize("relative", sorted(GENERATED))
def test_generated_docs_are_up_to_date(relative):
    committed = (REPO / relative).read_text()
    assert committed == GENERATED[relative](), f"{relative} is stale: run `python scripts/docs.py` and commit it"


def test_every_operator_parameter_is_documented():
    reference = (REPO / "docs/operators.md").read_text()
    for row in (line for line in reference.splitlines() if line.startswith("| `")):
        assert not row.rstrip().endswith("|  |"), f"undocumented parameter: {row}"
