"""The mutation check itself (tests/privacy_mutations.py): it stops without the real data, every
mutation applies to today's code and names test functions that exist, and a catch needs every
named test to fail."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import privacy_mutations as pm
import pytest
from conftest import REPO


def test_it_stops_without_the_shared_data(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "SYNTHFACTORY_SHARED_DATA": str(tmp_path / "absent")}
    res = subprocess.run(
        [sys.executable, str(REPO / "tests" / "privacy_mutations.py")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert res.returncode == 2 and "is absent" in res.stderr and len(res.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("m", pm.MUTATIONS, ids=lambda m: m.name)
def test_each_mutation_applies_and_names_existing_tests(m, tmp_path: Path) -> None:
    pm.mutated_copy(m, tmp_path)  # LookupError when the mutated text is not there exactly once
    assert m.tests
    for node in m.tests:
        file, name = node.split("::")
        tree = ast.parse((REPO / file).read_text())
        assert name in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}, node


def test_a_catch_needs_every_named_test_to_fail() -> None:
    failed = {"tests/test_a.py::test_x[hooks]", "tests/test_a.py::test_y"}
    assert pm._named("tests/test_a.py::test_x", failed) and pm._named("tests/test_a.py::test_y", failed)
    assert not pm._named("tests/test_a.py::test_x_other", failed)
    assert not pm._named("tests/test_b.py::test_y", failed)
    out = "FAILED tests/test_a.py::test_x[hooks] - AssertionError\nERROR tests/test_a.py::test_z - boom\n"
    assert pm.outcomes(out) == ({"tests/test_a.py::test_x[hooks]"}, {"tests/test_a.py::test_z"})
