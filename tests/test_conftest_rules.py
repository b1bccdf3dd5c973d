"""The suite's own rules (tests/conftest.py): a skipped core test fails the run; a test marked shared_data, or one
that asks for a ../shared fixture, may skip. Checked by running pytest on a scratch suite under this conftest."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SCRATCH_TESTS = '''
import pytest


def test_core_that_skips():
    pytest.skip("no data here")


@pytest.mark.shared_data
def test_marked_shared_that_skips():
    pytest.skip("no ../shared here")


def test_asks_for_the_wiki_corpus(wiki_corpus):
    pass


def test_core_that_passes():
    pass


@pytest.mark.xfail(reason="expected")
def test_expected_failure():
    assert False
'''


def run_scratch(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", ".", "-q", "-p", "no:cacheprovider", "--rootdir", ".",
                           "-c", "pytest.ini", *args], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CHORUS_SHARED_DATA": str(root / "absent")})


def test_a_skipped_core_test_fails_the_run_and_shared_data_tests_may_skip(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_scratch.py").write_text(SCRATCH_TESTS)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    shared_data: needs ../shared/data\n")
    run = run_scratch(tmp_path, "-rA")
    out = run.stdout
    assert run.returncode == 1, out
    assert "a core test skipped (Skipped: no data here); only tests marked shared_data may skip" in out
    assert "FAILED test_scratch.py::test_core_that_skips" in out
    assert "SKIPPED [1] test_scratch.py:11: no ../shared here" in out
    assert "enwiki2015_30k.jsonl.zst (../shared/data is absent on this machine)" in out  # asked for wiki_corpus
    assert "PASSED test_scratch.py::test_core_that_passes" in out
    assert "XFAIL test_scratch.py::test_expected_failure" in out
    assert "1 failed, 1 passed, 2 skipped, 1 xfailed" in out
    # -m shared_data selects the marked test and the one marked for asking for a ../shared fixture
    selected = run_scratch(tmp_path, "-m", "shared_data")
    assert "2 skipped, 3 deselected" in selected.stdout, selected.stdout
