"""Progress lines of long work (export/progress.py): one per step with elapsed and ETA, on a terminal
only and never under CI. The terminal is a real pseudo-terminal, so `isatty` is the real check."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from export.progress import Progress, watched

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"\[(\d+)/(\d+)\] (.+) (\d+\.\d) s, elapsed (\d+\.\d) s, ETA (\d+\.\d) s")


def test_each_step_reports_elapsed_and_an_eta_from_the_mean_step() -> None:
    stream = io.StringIO()
    progress = Progress(4, stream=stream, enabled=True)
    for name in ("a", "b", "c", "d"):
        progress.step(f"cell {name}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    for index, line in enumerate(lines, start=1):
        match = LINE.fullmatch(line)
        assert match, line
        done, total, name, _, elapsed, eta = match.groups()
        assert (int(done), int(total), name) == (index, 4, f"cell {'abcd'[index - 1]}")
        assert float(eta) == pytest.approx(float(elapsed) / index * (4 - index), abs=0.11)
    assert LINE.fullmatch(lines[-1]).group(6) == "0.0"


def test_quiet_when_not_a_terminal_or_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        monkeypatch.delenv("CI", raising=False)
        assert watched(terminal)
        assert not watched(io.StringIO())
        for value in ("true", "1", "yes"):
            monkeypatch.setenv("CI", value)
            assert not watched(terminal)
        monkeypatch.setenv("CI", "false")
        assert watched(terminal)
    os.close(leader)
    quiet = io.StringIO()
    Progress(2, stream=quiet).step("x")
    assert quiet.getvalue() == ""


def export_on_terminal(repository: Path) -> str:
    """`vitserve export` of a one-block ViT at two buckets with stderr on a pseudo-terminal."""
    leader, follower = os.openpty()
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    command = [sys.executable, "-m", "service.cli", "export", "--model", "vit_tiny_patch16_224"]
    command += ["--set", "depth=1", "--buckets", "32,48", "--name", "tiny", "--repository", str(repository)]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    chunks: list[bytes] = []
    reader = threading.Thread(target=drain, args=(leader, chunks))
    reader.start()
    stdout, _ = process.communicate(timeout=300)
    reader.join(30)
    os.close(leader)
    assert process.returncode == 0, stdout
    return b"".join(chunks).decode(errors="replace")


def drain(fd: int, chunks: list[bytes]) -> None:
    """Read a pseudo-terminal until its last writer closes it (EIO on Linux)."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return
        if not chunk:
            return
        chunks.append(chunk)


def test_export_reports_each_bucket_on_a_terminal(tmp_path: Path) -> None:
    """The CLI's export writes one line per bucket to its terminal (CI quietness: the test above)."""
    shown = export_on_terminal(tmp_path)
    steps = [LINE.search(line) for line in shown.splitlines() if LINE.search(line)]
    assert [(m.group(1), m.group(2), m.group(3)) for m in steps] == [
        ("1", "2", "exported and verified tiny_32"),
        ("2", "2", "exported and verified tiny_48"),
    ], shown
