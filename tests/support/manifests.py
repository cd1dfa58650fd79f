"""deploy/'s manifests as `kubectl kustomize` renders them, for the offline checks and the local cluster test.

No tool is skipped: a missing one fails the test with the command that installs it.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

INSTALL = {
    "kubectl": "the machine image's apt package `kubectl` (kubectl with kustomize v5)",
    "promtool": "apt-get install -y --no-install-recommends prometheus",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not on PATH; `make test` installs it ({INSTALL[name]})")
    return path


def run(args: list[str], cwd: Path | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@dataclass(frozen=True)
class Build:
    """One `kubectl kustomize` output, with look-ups by kind and by the pods a selector picks."""

    overlay: str
    docs: tuple[dict, ...]

    def of(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [d for d in self.of(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.overlay}: expected one {kind} {name}, found {len(found)}"
        return found[0]

    def deployments_selected(self, selector: dict[str, str]) -> list[dict]:
        return [d for d in self.of("Deployment") if selects(selector, pod_labels(d))]

    def services_selected(self, selector: dict[str, str]) -> list[dict]:
        return [s for s in self.of("Service") if selects(selector, s["metadata"].get("labels", {}))]


@cache
def build(overlay: str) -> Build:
    out = run([tool("kubectl"), "kustomize", str(DEPLOY / "overlays" / overlay)])
    return Build(overlay, tuple(d for d in yaml.safe_load_all(out) if d))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_labels(deployment: dict) -> dict[str, str]:
    return deployment["spec"]["template"]["metadata"]["labels"]
