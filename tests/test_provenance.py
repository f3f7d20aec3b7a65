"""influx.provenance: the commit and cleanliness of a checkout, and the fields of a record."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from influx import provenance

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git(root, *args):
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@example.com")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "examples" / "results").mkdir(parents=True)
    (tmp_path / "examples" / "results" / "r.json").write_text("{}")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "init")
    return tmp_path


def test_clean_tree_and_results_folders_do_not_count(repo):
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    assert provenance.git_state(repo) == {"git_sha": sha, "dirty": False, "changed": []}
    (repo / "examples" / "results" / "r.json").write_text('{"new": 1}')
    (repo / "examples" / "results" / "new.png").write_bytes(b"png")
    assert provenance.git_state(repo)["dirty"] is False


def test_modified_and_untracked_code_make_the_tree_dirty(repo):
    (repo / "code.py").write_text("x = 2\n")
    state = provenance.git_state(repo)
    assert state["dirty"] is True and state["changed"] == ["code.py"]
    _git(repo, "checkout", "code.py")
    (repo / "new_module.py").write_text("")
    assert provenance.git_state(repo)["changed"] == ["new_module.py"]


def test_outside_a_checkout_the_state_is_unknown(tmp_path):
    assert provenance.git_state(tmp_path / "nowhere") == {"git_sha": None, "dirty": None,
                                                          "changed": []}  # fmt: skip


def test_a_record_has_every_field():
    record = provenance.finish(provenance.capture(command=["script.py", "--seeds", "8"]))
    assert {"git_sha", "dirty", "versions", "device", "command", "date",
            "wall_seconds"} <= record.keys()  # fmt: skip
    assert set(record["versions"]) == {"python", "torch", "numpy", "influx"}
    assert record["command"] == ["script.py", "--seeds", "8"] and record["wall_seconds"] >= 0
    assert "_start" not in record
