"""The README's commands install what they need once: a second run fetches nothing, a fresh machine is checked."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from kafka_dlq.testing import KAFKA_VERSION, cache_dir, ensure_kafka_libs

REPO = Path(__file__).resolve().parent.parent


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_a_second_run_takes_kafkas_jars_from_the_cache_without_maven(monkeypatch, tmp_path):
    libs = ensure_kafka_libs()  # resolved by an earlier run (or by this one, once)
    before = _snapshot(cache_dir() / f"kafka-{KAFKA_VERSION}")
    monkeypatch.setenv("PATH", str(tmp_path))  # no `mvn`, no `java`: nothing can be fetched

    assert ensure_kafka_libs() == libs

    assert any(libs.glob(f"kafka_2.13-{KAFKA_VERSION}.jar"))
    assert _snapshot(cache_dir() / f"kafka-{KAFKA_VERSION}") == before


def _tool(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


@pytest.fixture
def checkout(tmp_path):
    """A copy of the set-up script in a checkout of its own, on a PATH where java, mvn and redis-server are
    present, the user is not root, and python3 has no ensurepip (a base Debian without python3-venv)."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "setup", repo / "scripts" / "setup")
    shutil.copy2(REPO / "pyproject.toml", repo / "pyproject.toml")
    tools = tmp_path / "bin"
    tools.mkdir()
    for name in ("java", "mvn", "redis-server"):
        _tool(tools, name, "exit 0")
    _tool(tools, "id", "echo 1000")
    _tool(tools, "python3", "echo 'No module named ensurepip' >&2; exit 1")
    env = dict(os.environ, PATH=f"{tools}{os.pathsep}{os.environ['PATH']}")
    env.pop("JAVA_HOME", None)
    return repo, env


def _setup(repo: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(repo / "scripts" / "setup")], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def test_setup_on_a_python_without_venv_support_names_the_package(checkout):
    repo, env = checkout

    result = _setup(repo, env)

    assert result.returncode == 1
    assert "setup: missing python3-venv: install them (sudo apt-get install python3-venv)" in result.stderr
    assert not (repo / ".venv").exists()


def test_setup_run_again_installs_nothing(checkout):
    repo, env = checkout
    # Given a checkout set up before: its .venv exists, with the dependencies of this pyproject.toml.
    venv_bin = repo / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    _tool(venv_bin, "python", "exit 0")
    stamp = hashlib.sha256((repo / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (repo / ".venv" / ".kafka-dlq-installed").write_text(stamp + "\n")

    result = _setup(repo, env)

    assert result.returncode == 0, result.stderr
    assert "java, mvn and redis-server already installed" in result.stdout
    assert "Python dependencies already installed" in result.stdout
    assert "installing" not in result.stdout + result.stderr


def test_a_test_run_keeps_tmp_path_folders_only_for_failed_tests(pytestconfig):
    assert pytestconfig.getini("tmp_path_retention_policy") == "failed"
