"""Kubernetes manifests and the Dockerfile: valid against the Kubernetes schema (offline), and
consistent with the server's settings and health service names."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from usersvc.config import Settings
from usersvc.server import AUTH_SERVICE, USER_SERVICE

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
BASE = KUBE / "base"
OVERLAY = KUBE / "overlays" / "example"
KUBERNETES_VERSION = "1.30.0"
# Seconds between SIGTERM and the start of the drain, and after the grace, that shutdown may
# take besides the configured drain and grace (closing pools, flushing logs).
SHUTDOWN_SLACK_SECONDS = 5


def load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kustomization(directory: Path) -> dict[str, Any]:
    (doc,) = load(directory / "kustomization.yaml")
    return doc


def base_resources() -> list[dict[str, Any]]:
    return [doc for name in kustomization(BASE)["resources"] for doc in load(BASE / name)]


def _merge(target: Any, patch: Any) -> Any:
    """A strategic merge as kustomize does it for what the overlay uses: maps merge; lists of
    maps with a `name` merge by name; other lists are replaced."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for key, value in patch.items():
            merged[key] = _merge(target[key], value) if key in target else value
        return merged
    if (
        isinstance(target, list)
        and isinstance(patch, list)
        and all(isinstance(x, dict) and "name" in x for x in target + patch)
    ):
        by_name = {x["name"]: x for x in target}
        for item in patch:
            by_name[item["name"]] = _merge(by_name.get(item["name"], {}), item)
        return list(by_name.values())
    return patch


def overlay_resources() -> list[dict[str, Any]]:
    """The example overlay, built: namespace, images and patches applied to the base."""
    spec = kustomization(OVERLAY)
    assert spec["resources"] == ["../../base"]
    docs = copy.deepcopy(base_resources())
    patches = [doc for p in spec["patches"] for doc in load(OVERLAY / p["path"])]
    built = []
    for doc in docs:
        for patch in patches:
            if (patch["kind"], patch["metadata"]["name"]) == (doc["kind"], doc["metadata"]["name"]):
                doc = _merge(doc, patch)
        doc["metadata"]["namespace"] = spec["namespace"]
        for container in _containers(doc):
            for image in spec["images"]:
                name, _, tag = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image['newName']}:{image.get('newTag', tag)}"
        built.append(doc)
    for patch in patches:
        assert any(
            (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
            for d in built
        ), f"patch {patch['kind']}/{patch['metadata']['name']} matches nothing"
    return built


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    template = doc.get("spec", {}).get("template", {})
    containers: list[dict[str, Any]] = template.get("spec", {}).get("containers", [])
    return containers


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return found


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def settings_of(env: dict[str, str]) -> Settings:
    """The server's settings from a container's plain USERSVC_* values (secrets left out)."""
    values = {
        key.removeprefix("USERSVC_").lower(): value
        for key, value in env.items()
        if key.startswith("USERSVC_") and key != "USERSVC_ENVIRONMENT"
    }
    return Settings.model_validate(values)


def every_manifest() -> list[tuple[str, dict[str, Any]]]:
    files = [*sorted(BASE.glob("*.yaml")), *sorted(OVERLAY.glob("*.yaml"))]
    return [
        (f"{path.relative_to(KUBE)}#{i}", doc)
        for path in files
        if path.name != "kustomization.yaml" and not path.name.endswith("-patch.yaml")
        for i, doc in enumerate(load(path))
    ] + [(f"overlay:{d['kind']}/{d['metadata']['name']}", d) for d in overlay_resources()]


@pytest.mark.parametrize(("where", "manifest"), every_manifest(), ids=lambda x: str(x)[:60])
def test_manifest_is_valid_against_the_kubernetes_schema(
    where: str, manifest: dict[str, Any]
) -> None:
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_can_fail() -> None:
    deployment = copy.deepcopy(one(base_resources(), "Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["port"] = (
        "grpc"  # native gRPC probes take a number, not a port name
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_every_file_of_the_base_is_in_its_kustomization() -> None:
    listed = set(kustomization(BASE)["resources"])
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("docs", [base_resources(), overlay_resources()], ids=["base", "overlay"])
def test_probes_ports_and_services_match_the_server(docs: list[dict[str, Any]]) -> None:
    deployment = one(docs, "Deployment")
    (container,) = _containers(deployment)
    env = env_of(container)
    settings = settings_of(env)
    grpc_port = int(settings.listen_address.rpartition(":")[2])
    host = settings.listen_address.rpartition(":")[0]
    assert host == "0.0.0.0", "the kubelet probes the pod IP: listen on every interface"
    metrics_port = int(settings.metrics_address.rpartition(":")[2])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": grpc_port, "metrics": metrics_port}

    assert container["livenessProbe"]["grpc"] == {"port": grpc_port, "service": ""}
    assert container["startupProbe"]["grpc"] == {"port": grpc_port, "service": ""}
    assert container["readinessProbe"]["grpc"] == {"port": grpc_port, "service": USER_SERVICE}
    assert USER_SERVICE == "userservice.v1.UserService"
    assert AUTH_SERVICE == "userservice.v1.AuthService"

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)

    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for name in ("usersvc", "usersvc-headless"):
        service = one(docs, "Service", name)
        assert service["spec"]["selector"].items() <= labels.items()
        (port,) = service["spec"]["ports"]
        assert port["targetPort"] in ports
        assert ports[port["targetPort"]] == grpc_port
    assert one(docs, "Service", "usersvc-headless")["spec"]["clusterIP"] == "None"
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        doc = one(docs, kind)
        selector = doc["spec"].get("selector") or doc["spec"]["podSelector"]
        assert selector["matchLabels"].items() <= labels.items()
    ingress = one(docs, "NetworkPolicy")["spec"]["ingress"]
    policy_ports = {port["port"] for rule in ingress for port in rule["ports"]}
    assert policy_ports == set(ports)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


@pytest.mark.parametrize("docs", [base_resources(), overlay_resources()], ids=["base", "overlay"])
def test_termination_grace_exceeds_drain_plus_grace(docs: list[dict[str, Any]]) -> None:
    deployment = one(docs, "Deployment")
    (container,) = _containers(deployment)
    env = env_of(container)
    drain = float(env["USERSVC_SHUTDOWN_DRAIN_SECONDS"])
    grace = float(env["USERSVC_SHUTDOWN_GRACE_SECONDS"])
    pod_grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert pod_grace > drain + grace + SHUTDOWN_SLACK_SECONDS


@pytest.mark.parametrize("docs", [base_resources(), overlay_resources()], ids=["base", "overlay"])
def test_pods_run_locked_down_with_secrets_from_a_secret(docs: list[dict[str, Any]]) -> None:
    for kind in ("Deployment", "Job"):
        workload = one(docs, kind)
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        (container,) = _containers(workload)
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"] and container["resources"]["limits"]
        from_secret = {
            e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
            for e in container["env"]
            if "valueFrom" in e
        }
        assert from_secret == {"USERSVC_DATABASE_URL": "usersvc", "USERSVC_SECRET_KEY": "usersvc"}
        env = env_of(container)
        assert env["USERSVC_ENVIRONMENT"] == "production"
        key_dir = str(Path(env["USERSVC_JWT_SIGNING_KEY_FILE"]).parent)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes[mounts[key_dir]]["secret"]["secretName"] == "usersvc"


def test_the_migration_job_runs_migrate_with_the_server_image() -> None:
    docs = overlay_resources()
    (job_container,) = _containers(one(docs, "Job"))
    (server_container,) = _containers(one(docs, "Deployment"))
    assert job_container["args"] == ["migrate"]
    assert job_container["image"] == server_container["image"]
    assert job_container["image"] == "registry.example.com/platform/usersvc:0.1.0"
    assert one(docs, "Job")["metadata"]["labels"]["app.kubernetes.io/component"] == "migration"


def test_dockerfile_runs_as_non_root_and_stops_and_checks_health_like_kubernetes() -> None:
    parser = DockerfileParser(path=str(ROOT / "Dockerfile"))
    instructions = [i for i in parser.structure if i["instruction"] != "COMMENT"]
    stages = [i for i in instructions if i["instruction"] == "FROM"]
    assert len(stages) == 2, "multi-stage: install, then a final image without pip"
    assert all("${BASE_IMAGE}" in s["value"] for s in stages)
    first = instructions[0]
    assert first["instruction"] == "ARG"
    assert first["value"].startswith("BASE_IMAGE=python:3.11-slim")
    final = instructions[instructions.index(stages[-1]) :]

    def last(name: str) -> str:
        values = [i["value"] for i in final if i["instruction"] == name]
        assert values, f"no {name} in the final stage"
        return str(values[-1])

    user = last("USER").split(":")[0]
    assert user not in ("root", "0") and int(user) > 0
    assert last("STOPSIGNAL") == "SIGTERM"
    healthcheck = last("HEALTHCHECK")
    assert '"usersvc", "healthcheck"' in healthcheck
    assert USER_SERVICE in healthcheck
    env = parser.envs
    assert env["USERSVC_LISTEN_ADDRESS"] == "0.0.0.0:50051"
    assert "50051" in last("EXPOSE").split()
    # The final stage copies the environment; it never installs anything.
    for instruction in final:
        assert "pip install" not in instruction["value"]
        assert "apt-get" not in instruction["value"]
