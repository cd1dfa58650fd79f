"""A real Prometheus for tests: started on 127.0.0.1 with a generated config, scraping local processes
the way the Prometheus Operator scrapes pods through deploy/'s ServiceMonitors.

The Operator turns a ServiceMonitor endpoint into a scrape job whose targets carry the labels job
(the Service), instance, namespace, service, pod, container and endpoint (the port name), and whose
target relabelings see the pod's labels as `__meta_kubernetes_pod_label_*`. Here each target is a
file_sd entry with exactly those labels, and the ServiceMonitor's own `relabelings` and
`metricRelabelings` are copied into the job verbatim, so what Prometheus stores is what it would store
in a cluster, label collisions included.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from support.server import free_port

INSTALL = "apt-get install -y --no-install-recommends prometheus (or `make tools`)"
STARTUP_TIMEOUT_S = 30


def prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail(f"prometheus is not on PATH; install it with: {INSTALL}")
    return path


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def relabel_configs(operator_relabelings: list[dict]) -> list[dict]:
    """Operator RelabelConfig objects (camelCase) as Prometheus relabel_configs (snake_case)."""
    return [{_snake(key): value for key, value in r.items()} for r in operator_relabelings]


def pod_label_meta(pod_labels: dict[str, str]) -> dict[str, str]:
    """A pod's labels as Kubernetes service discovery exposes them to target relabeling."""
    return {
        f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v for k, v in pod_labels.items()
    }


@dataclass(frozen=True)
class Target:
    """One scraped process standing for a pod behind a Service."""

    address: str
    namespace: str
    service: str
    pod: str
    container: str
    port_name: str
    pod_labels: dict[str, str]

    def file_sd(self) -> dict:
        labels = {
            "namespace": self.namespace,
            "service": self.service,
            "pod": self.pod,
            "container": self.container,
            "endpoint": self.port_name,
            **pod_label_meta(self.pod_labels),
        }
        return {"targets": [self.address], "labels": labels}


def write_targets(path: Path, targets: list[Target]) -> None:
    """Replace a job's file_sd list atomically (Prometheus watches the file and reloads it)."""
    staged = path.with_suffix(".tmp")
    staged.write_text(json.dumps([t.file_sd() for t in targets]))
    os.replace(staged, path)


def duration(seconds: float) -> str:
    """A Prometheus duration string (which takes no decimal point)."""
    return f"{round(seconds * 1000)}ms"


def scrape_job(job: str, monitor_endpoint: dict, targets_file: Path, interval_s: float) -> dict:
    """The scrape job the Operator generates for one ServiceMonitor endpoint, fed by `targets_file`."""
    return {
        "job_name": job,
        "scrape_interval": duration(interval_s),
        "scrape_timeout": duration(interval_s),
        "metrics_path": monitor_endpoint.get("path", "/metrics"),
        "honor_labels": bool(monitor_endpoint.get("honorLabels", False)),
        "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
        "relabel_configs": relabel_configs(monitor_endpoint.get("relabelings", [])),
        "metric_relabel_configs": relabel_configs(monitor_endpoint.get("metricRelabelings", [])),
    }


class Prometheus:
    """A `prometheus` process with its own storage under `workdir`; `query` runs instant PromQL queries."""

    def __init__(self, workdir: Path, jobs: list[dict], interval_s: float = 1.0) -> None:
        binary = prometheus_binary()
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "global": {"scrape_interval": duration(interval_s), "evaluation_interval": duration(interval_s)},
            "scrape_configs": jobs,
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "prometheus.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={workdir / 'prometheus.yml'}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"prometheus not ready after {STARTUP_TIMEOUT_S} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def query(self, expr: str) -> list[dict]:
        """The instant vector `expr` evaluates to now: [{"metric": {labels}, "value": [t, "v"]}, ...]."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body.get("status") == "success", f"{expr}: {body}"
        assert body["data"]["resultType"] == "vector", f"{expr} is not an instant vector: {body}"
        return body["data"]["result"]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
