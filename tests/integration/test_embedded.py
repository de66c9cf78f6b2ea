"""The embedded default: no server, a filesystem broker and an in-process worker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, clean_env

pytestmark = pytest.mark.integration


def run_script(args: list[str], cwd: Path) -> str:
    """Run a program with no LLMGINE_* settings; its stdout and stderr, in order."""
    out = subprocess.run(
        args,
        cwd=cwd,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=120,
    )
    text = out.stdout.decode()
    assert out.returncode == 0, text
    return text


def test_the_seed_example_runs_as_one_script_with_nothing_configured(tmp_path: Path) -> None:
    text = run_script([sys.executable, str(REPO / "examples" / "seed_example.py")], tmp_path)
    lines = text.splitlines()
    assert "Command result: success=True result='Command processed'" in lines
    handled = next(i for i, line in enumerate(lines) if "Event handled: Something happened" in line)
    assert handled < lines.index("Shutdown complete")  # handled before shutdown returned
    assert (tmp_path / ".llmgine" / "broker").is_dir()  # the embedded broker lives in the data dir


def test_the_demo_runs_on_the_embedded_default(tmp_path: Path) -> None:
    text = run_script([sys.executable, "-m", "llmgine_celery.cli", "demo"], tmp_path)
    assert "AskModel -> success=True result='command every carries celery'" in text
    assert "CountTokens -> success=True result=4" in text
    assert "answer recorded: 'command every carries celery'" in text
    assert text.rstrip().endswith("demo: done")


def test_a_failing_log_sink_is_reported_once_and_breaks_nothing(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "logs"
    not_a_folder.write_text("a file where the log folder should be\n")
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "seed_example.py")],
        cwd=tmp_path,
        env=clean_env(LLMGINE_LOG_DIR=str(not_a_folder)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=120,
    )
    text = out.stdout.decode()
    assert out.returncode == 0, text
    assert "Command result: success=True result='Command processed'" in text
    assert "Event handled: Something happened" in text
    assert text.count("observability sink") == 1, text  # reported once, then hidden
    assert "JsonlSink" in text
