"""`make serve` and `make export` honour every VITSERVE_* variable: the Makefile passes a flag only for a
make variable given on its command line, so a Makefile default never overrides the environment.

`-o .venv/.installed` keeps make from reinstalling the (shared) virtualenv; everything else is the
real Makefile, and the last test runs the real `make serve` on a port chosen through the environment.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import httpx

from service.settings import Settings
from support.server import PNG, SMALL_PNG, free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
KEEP_VENV = ("-o", ".venv/.installed")


# Set by an enclosing `make test`: a nested make would print "Entering/Leaving directory" lines and
# inherit its flags, so the dry run would not show what a user typing the command gets.
OUTER_MAKE = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")


def run_make(*arguments: str, env: dict[str, str] | None = None) -> list[str]:
    """The output of `make ARGUMENTS` in the checkout, one line per item, as from a shell (not under make)."""
    outer = {k: v for k, v in os.environ.items() if k not in OUTER_MAKE}
    result = subprocess.run(
        ["make", *arguments],
        cwd=ROOT,
        env={**outer, **(env or {})},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.splitlines()


def make_dry_run(
    target: str, *assignments: str, env: dict[str, str] | None = None, options: tuple[str, ...] = KEEP_VENV
) -> list[str]:
    """The commands `make -n TARGET` would run, one per line."""
    return run_make("-n", *options, target, *assignments, env=env)


def serve_line(lines: list[str]) -> list[str]:
    (line,) = [line for line in lines if "service.cli serve" in line]
    return line.split()


def test_no_flag_overrides_any_vitserve_variable(tmp_path: Path) -> None:
    """With every setting in the environment, `make serve` passes no flag but the repository, and that
    one is the environment's: the server reads each VITSERVE_* value itself."""
    repository = tmp_path / "repo"
    env = {f"VITSERVE_{name.upper()}": "1" for name in Settings.model_fields}
    env["VITSERVE_REPOSITORY"] = str(repository)
    words = serve_line(make_dry_run("serve", env=env))
    flags = [word for word in words if word.startswith("--")]
    assert flags == ["--repository"], words
    assert words[words.index("--repository") + 1] == str(repository)


def test_export_writes_into_the_environment_repository(tmp_path: Path) -> None:
    """`make export` builds the first bucket of both backbones, then the others, all in VITSERVE_REPOSITORY."""
    repository = tmp_path / "elsewhere"
    lines = make_dry_run(
        "export",
        "GLOBAL_BUCKETS=224,384",
        "WINDOWED_BUCKETS=448,896",
        env={"VITSERVE_REPOSITORY": str(repository)},
    )
    exports = [line for line in lines if "service.cli export" in line]
    assert [line.count(f"--repository {repository} &") for line in exports] == [2, 2], lines
    first, others = (re.findall(r"--buckets (\S+)", line) for line in exports)
    assert (first, others) == (["224", "448"], ["384", "896"])
    assert lines[-1] == f"touch {repository}/.default-complete"


def test_command_line_variables_become_flags() -> None:
    words = serve_line(make_dry_run("serve", "HOST=127.0.0.2", "PORT=9123", "POLL_S=2.5"))
    assert words[words.index("--host") + 1] == "127.0.0.2"
    assert words[words.index("--port") + 1] == "9123"
    assert words[words.index("--poll-s") + 1] == "2.5"


def test_install_for_serving_is_one_resolver_pass_with_a_current_pip() -> None:
    """The quick start's install (issue 12): a virtualenv without ensurepip's pip (which byte-compiles
    itself), a current pip from the system's, then one `pip install -e .` of the base dependencies only
    (no test or benchmark extras), without byte-compiling what it installs."""
    lines = make_dry_run(".venv/.installed", options=("-W", "pyproject.toml"))
    assert lines[0].endswith("-m venv --without-pip .venv"), lines
    assert "--python .venv/bin/python install -qq --no-compile 'pip>=26" in lines[1], lines
    (project,) = [line for line in lines if line.endswith(" -e .")]
    assert project.split() == [".venv/bin/pip", "install", "-qq", "--no-compile", "-e", "."]
    assert not [line for line in lines if ".[" in line], lines


def served_environment(repository: Path, name: str, env: dict[str, str] | None = None) -> str:
    """The value of `name` in the environment the real `make serve` recipe gives the server: the
    server command is replaced by one that prints it, on a repository whose exports are done."""
    repository.mkdir(exist_ok=True)
    for stamp in (".first-buckets-complete", ".default-complete"):
        (repository / stamp).touch()
    lines = run_make(
        *KEEP_VENV,
        "--no-print-directory",
        "serve",
        f"REPOSITORY={repository}",
        f"VITSERVE=sh -c 'echo served {name}=$${name}' vitserve",
        env=env,
    )
    (line,) = [line for line in lines if line.startswith(f"served {name}=")]
    return line.partition("=")[2]


def test_serve_calibrates_in_the_background_unless_the_environment_says(tmp_path: Path) -> None:
    """`make serve` is ready before it measures any entry (the first request waits for no calibration);
    VITSERVE_CALIBRATION_MODE in the environment still decides."""
    name = "VITSERVE_CALIBRATION_MODE"
    assert served_environment(tmp_path / "repo", name) == "background"
    assert served_environment(tmp_path / "repo", name, env={name: "startup"}) == "startup"


def test_make_serve_listens_on_vitserve_port(photo_repository: Path, tmp_path: Path) -> None:
    """The issue's case: `VITSERVE_PORT=N make serve` must listen on N (it listened on 8000)."""
    repository = tmp_path / "repo"
    shutil.copytree(photo_repository, repository)
    for stamp in (".first-buckets-complete", ".default-complete"):
        (repository / stamp).touch()
    port = free_port()
    # gRPC off: its default port 8001 may be another test server's.
    env = {
        **os.environ,
        "VITSERVE_PORT": str(port),
        "VITSERVE_REPOSITORY": str(repository),
        "VITSERVE_GRPC_PORT": "0",
    }
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["make", *KEEP_VENV, "serve"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def ready() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, f"make serve to listen on {port}", timeout=180, interval=0.2)
        response = httpx.post(
            f"http://127.0.0.1:{port}/v1/classify", content=SMALL_PNG, headers=PNG, timeout=60
        )
        assert response.status_code == 200, response.text
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(60)
