"""The chart rendered offline with each shipped values file, checked against the
Kubernetes API schemas and against what the server really does: its ports, its health
service names, its settings, and the Dockerfile's user."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import dockerfile
import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from sparseserve.server.app import V2_SERVICE
from sparseserve.settings import Settings
from tests.deploy.chart import (
    CHART,
    KUBE_VERSIONS,
    ROOT,
    VALUES_FILES,
    component,
    config_map_data,
    mounted_file,
    notes,
    of_kind,
    render,
    server_container,
    values_of,
)

# prometheus-operator's kinds: no Kubernetes schema to validate them against; their
# fields are checked one by one below, and against the operator's docs on paper.
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor"}
DEFAULTS = Settings()

# Options the shipped values files leave off, rendered too so every template is checked.
EVERYTHING_ON: dict[str, Any] = {
    "models": {"source": "pvc", "pvc": {"claimName": "models", "subPath": "repo"}},
    "autoscaling": {"enabled": True, "inflightRequests": {"enabled": True}},
    "metrics": {"podMonitor": {"enabled": True}, "serviceMonitor": {"enabled": True}},
    "networkPolicy": {
        "enabled": True,
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
    },
    "triton": {"enabled": True},
    "grafanaDashboard": {"enabled": True},
    "trafficPolicies": {"families": {"digits-mlp": {"default": "dense"}}},
    "service": {"headless": True},
}
# TLS from a Secret, with the probes then run as commands in the container.
TLS_ON: dict[str, Any] = {"tls": {"enabled": True, "secretName": "sparseserve-tls", "mutual": True}}
CASES = {path.name: values_of(path) for path in VALUES_FILES} | {
    "everything-on": EVERYTHING_ON,
    "tls": TLS_ON,
}


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request: pytest.FixtureRequest) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    values = CASES[request.param]
    return values, render(values)


def server_config(documents: list[dict[str, Any]]) -> Settings:
    """The server's settings as the pod loads them: the mounted config file, parsed by
    sparseserve's own Settings (which refuses unknown or invalid settings)."""
    container = server_container(documents)
    args = container["args"]
    assert args[0] == "serve"
    path = args[args.index("--config") + 1]
    text = mounted_file(documents, path)
    return Settings(**yaml.safe_load(text))


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_objects_are_valid_kubernetes(case, kube_version: str) -> None:
    _, documents = case
    checked = 0
    for document in documents:
        if document["kind"] in OPERATOR_KINDS:
            continue
        kubernetes_validate.validate(document, kube_version, strict=True)
        checked += 1
    assert checked >= 5


def test_validation_catches_a_misspelt_field() -> None:
    """The validation above can fail: strict mode refuses an unknown field."""
    documents = render()
    deployment = component(documents, "Deployment", "server")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["servce"] = (
        "x"
    )
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[0], strict=True)


def test_default_ports_are_the_servers_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text(encoding="utf-8"))
    assert values["ports"] == {
        "http": DEFAULTS.http_port,
        "grpc": DEFAULTS.grpc_port,
        "metrics": DEFAULTS.metrics_port,
    }
    assert values["shutdown"]["graceSeconds"] == DEFAULTS.shutdown_grace_seconds


def test_config_file_is_valid_settings_with_the_charts_ports(case) -> None:
    values, documents = case
    settings = server_config(documents)
    container = server_container(documents)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {
        "grpc": settings.grpc_port,
        "http": settings.http_port,
        "metrics": settings.metrics_port,
    }
    assert settings.allow_http
    assert settings.host == "0.0.0.0"  # the kubelet probes the pod IP
    # Every setting of the values file reaches the server as written.
    loaded = settings.model_dump(mode="json")
    for key, value in values.get("config", {}).items():
        if isinstance(value, dict):
            assert value.items() <= loaded[key].items(), key
        else:
            assert loaded[key] == value, key


def probed_service(probe: dict[str, Any], settings: Settings) -> str:
    """The health service a probe asks for: Kubernetes' gRPC probe on the server's
    port, or `sparseserve health` with the server's own config file."""
    if "grpc" in probe:
        assert probe["grpc"]["port"] == settings.grpc_port
        return probe["grpc"]["service"]
    command = probe["exec"]["command"]
    assert command[:4] == ["sparseserve", "health", "--config", "/etc/sparseserve/config.yaml"]
    return command[command.index("--service") + 1]


def test_probes_ask_the_servers_health_service(case) -> None:
    _, documents = case
    settings = server_config(documents)
    container = server_container(documents)
    probes = {name: container[f"{name}Probe"] for name in ("startup", "liveness", "readiness")}
    for probe in probes.values():
        assert set(probe) >= {"periodSeconds", "failureThreshold"}
        # Kubernetes' own gRPC probe speaks plaintext only: a TLS port needs the command.
        assert ("exec" in probe) == settings.grpc_tls.enabled
    # "" is the whole server; the readiness probe asks for the inference API itself.
    assert probed_service(probes["startup"], settings) == ""
    assert probed_service(probes["liveness"], settings) == ""
    assert probed_service(probes["readiness"], settings) == V2_SERVICE


def test_termination_outlasts_the_drain(case) -> None:
    _, documents = case
    settings = server_config(documents)
    pod = component(documents, "Deployment", "server")["spec"]["template"]["spec"]
    pre_stop = server_container(documents)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + settings.shutdown_grace_seconds
    assert pod["terminationGracePeriodSeconds"] > needed


def test_pod_runs_as_the_images_non_root_user(case) -> None:
    _, documents = case
    pod = component(documents, "Deployment", "server")["spec"]["template"]["spec"]
    container = server_container(documents)
    (user,) = [
        c.value[0]
        for c in dockerfile.parse_file(str(ROOT / "deploy" / "Dockerfile"))
        if c.cmd == "USER"
    ][-1:]
    uid, gid = (int(part) for part in user.split(":"))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}
    assert pod["automountServiceAccountToken"] is False
    # No service links: a Service named sparseserve-metrics would set SPARSESERVE_METRICS_PORT.
    assert pod["enableServiceLinks"] is False


def test_headless_service_lists_the_server_pods() -> None:
    documents = render(EVERYTHING_ON)
    settings = server_config(documents)
    headless = component(documents, "Service", "server-headless")
    assert headless["spec"]["clusterIP"] == "None"
    assert (
        headless["spec"]["selector"]
        == component(documents, "Service", "server")["spec"]["selector"]
    )
    assert [p["port"] for p in headless["spec"]["ports"]] == [settings.grpc_port]
    assert len(of_kind(render(), "Service")) == 1  # off by default


def test_service_exposes_named_grpc_http_and_metrics_ports(case) -> None:
    _, documents = case
    settings = server_config(documents)
    service = component(documents, "Service", "server")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == settings.grpc_port
    assert ports["http"]["port"] == settings.http_port
    assert ports["metrics"]["port"] == settings.metrics_port
    assert {p["targetPort"] for p in ports.values()} == {"grpc", "http", "metrics"}
    pod = component(documents, "Deployment", "server")["spec"]["template"]["metadata"]
    assert service["spec"]["selector"].items() <= pod["labels"].items()


def test_pod_annotations_point_plain_prometheus_at_the_metrics_port() -> None:
    documents = render()
    settings = server_config(documents)
    annotations = component(documents, "Deployment", "server")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("kind", sorted(OPERATOR_KINDS))
def test_monitors_label_targets_with_the_release_name(kind: str) -> None:
    documents = render(EVERYTHING_ON, release="sparse")
    (monitor,) = of_kind(documents, kind)
    endpoints = monitor["spec"].get("endpoints") or monitor["spec"]["podMetricsEndpoints"]
    (endpoint,) = endpoints
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in server_container(documents)["ports"]}
    assert endpoint["port"] == "metrics"
    relabel = {"sourceLabels": ["__meta_kubernetes_pod_label_app_kubernetes_io_instance"],
               "targetLabel": "deployment"}  # fmt: skip
    assert relabel in endpoint["relabelings"]
    # The operator names the job after the Service or PodMonitor (sparse-sparseserve);
    # the alerts (up{job="sparseserve"}) and the dashboard match job="sparseserve".
    assert {"targetLabel": "job", "replacement": "sparseserve"} in endpoint["relabelings"]
    rules = (ROOT / "deploy" / "prometheus" / "rules" / "sparseserve.alerts.yml").read_text()
    assert 'up{job="sparseserve"}' in rules
    pod_labels = component(documents, "Deployment", "server")["spec"]["template"]["metadata"][
        "labels"
    ]
    assert pod_labels["app.kubernetes.io/instance"] == "sparse"
    assert pod_labels["deployment"] == "sparse"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_dense_and_sparse_releases_coexist() -> None:
    dense = render(values_of(CHART / "values-dense.yaml"), release="dense")
    sparse = render(values_of(CHART / "values-sparse.yaml"), release="sparse")
    names = lambda docs: {(d["kind"], d["metadata"]["name"]) for d in docs}  # noqa: E731
    assert not names(dense) & names(sparse)
    selector = lambda docs: component(docs, "Service", "server")["spec"]["selector"]  # noqa: E731
    assert selector(dense) != selector(sparse)
    assert server_config(dense).startup_models != server_config(sparse).startup_models
    # One dashboard for the pair: two would be two copies in Grafana.
    assert len(of_kind(dense, "ConfigMap")) + len(of_kind(sparse, "ConfigMap")) >= 2
    assert yaml.safe_load(CHART.joinpath("values-sparse.yaml").read_text())["grafanaDashboard"] == {
        "enabled": False
    }


def test_traffic_policies_are_mounted_where_the_setting_points() -> None:
    policies = {
        "families": {
            "digits-mlp": {
                "default": "dense",
                "split": {"dense": 0.5, "pruned90": 0.5},
                "shadow": {"variants": ["dense"], "fraction": 0.1},
            }
        }
    }
    documents = render({"trafficPolicies": policies})
    env = {e["name"]: e["value"] for e in server_container(documents).get("env", [])}
    path = env["SPARSESERVE_TRAFFIC__POLICY_FILE"]
    assert yaml.safe_load(mounted_file(documents, path)) == policies
    # A directory mount, never subPath: the kubelet then updates the file in place and
    # the server's hot reload sees the change.
    assert not any("subPath" in m for m in server_container(documents)["volumeMounts"]
                   if m["name"] == "config")  # fmt: skip
    assert "SPARSESERVE_TRAFFIC__POLICY_FILE" not in {
        e["name"] for e in server_container(render()).get("env", [])
    }


def test_policy_changes_do_not_restart_pods_but_config_changes_do() -> None:
    checksum = lambda docs: component(docs, "Deployment", "server")["spec"]["template"][  # noqa: E731
        "metadata"
    ]["annotations"]["checksum/config"]
    base = checksum(render({"trafficPolicies": {"families": {"f": {"default": "a"}}}}))
    policy = checksum(render({"trafficPolicies": {"families": {"f": {"default": "b"}}}}))
    config = checksum(
        render(
            {
                "trafficPolicies": {"families": {"f": {"default": "a"}}},
                "config": {"log_level": "DEBUG"},
            }
        )
    )
    assert base == policy != config


def test_env_var_names_are_settings() -> None:
    """Unknown SPARSESERVE_* variables are ignored by the settings loader, so a typo
    would pass silently: every name the chart sets must be a real setting."""
    documents = render(EVERYTHING_ON)
    for var in server_container(documents).get("env", []):
        path = var["name"].removeprefix("SPARSESERVE_").lower().split("__")
        model: Any = Settings
        for part in path:
            assert part in model.model_fields, f"{var['name']}: no setting {part!r}"
            model = model.model_fields[part].annotation


def test_model_repository_from_an_image() -> None:
    documents = render(values_of(CHART / "values-dense.yaml"))
    settings = server_config(documents)
    pod = component(documents, "Deployment", "server")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["image"] == "sparseserve-models:1"
    (target,) = (m for m in init["volumeMounts"] if m["name"] == "models")
    assert init["command"] == ["cp", "-R", "/models/.", target["mountPath"] + "/"]
    (mount,) = (m for m in server_container(documents)["volumeMounts"] if m["name"] == "models")
    assert Path(mount["mountPath"]) == settings.repository and mount["readOnly"]
    (volume,) = (v for v in pod["volumes"] if v["name"] == "models")
    assert "emptyDir" in volume


def test_model_repository_from_a_claim() -> None:
    documents = render({"models": {"source": "pvc", "pvc": {"claimName": "shared-models"}}})
    pod = component(documents, "Deployment", "server")["spec"]["template"]["spec"]
    (volume,) = (v for v in pod["volumes"] if v["name"] == "models")
    assert volume["persistentVolumeClaim"] == {"claimName": "shared-models", "readOnly": True}
    assert "initContainers" not in pod


def test_model_repository_baked_into_the_image() -> None:
    documents = render()
    pod = component(documents, "Deployment", "server")["spec"]["template"]["spec"]
    assert "models" not in {v["name"] for v in pod["volumes"]}
    assert server_config(documents).repository == Path("/models")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"models": {"source": "pvc"}}, "models.pvc.claimName is required"),
        ({"models": {"source": "image"}}, "models.image.repository is required"),
        ({"triton": {"enabled": True}}, "triton.enabled needs models.source image or pvc"),
        (
            {**EVERYTHING_ON, "config": {"triton": {"url": "elsewhere:8001"}}},
            "remove config.triton.url",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_message(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as failed:
        render(values)
    assert message in str(failed.value)


def test_autoscaling_on_cpu_and_in_flight_requests() -> None:
    documents = render(values_of(CHART / "values-gpu.yaml"))
    (hpa,) = of_kind(documents, "HorizontalPodAutoscaler")
    deployment = component(documents, "Deployment", "server")
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert kinds["Pods"]["pods"]["metric"]["name"] == "sparseserve_inflight_requests"
    assert of_kind(render(), "HorizontalPodAutoscaler") == []


def test_disruption_budget_covers_the_server_pods(case) -> None:
    _, documents = case
    (pdb,) = of_kind(documents, "PodDisruptionBudget")
    labels = component(documents, "Deployment", "server")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] >= 1


def test_network_policy_opens_the_servers_ports() -> None:
    documents = render(EVERYTHING_ON)
    settings = server_config(documents)
    policy = component(documents, "NetworkPolicy", "server")
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert ports == {settings.grpc_port, settings.http_port, settings.metrics_port}
    triton = component(documents, "NetworkPolicy", "triton")
    (grpc_rule,) = (r for r in triton["spec"]["ingress"] if r["ports"][0]["port"] == 8001)
    server_labels = component(documents, "Deployment", "server")["spec"]["template"]["metadata"][
        "labels"
    ]
    assert grpc_rule["from"][0]["podSelector"]["matchLabels"].items() <= server_labels.items()


def test_gpu_mode_wires_triton_as_the_backend() -> None:
    values = values_of(CHART / "values-gpu.yaml")
    documents = render(values, release="gpu")
    settings = server_config(documents)
    triton = component(documents, "Deployment", "triton")
    service = component(documents, "Service", "triton")
    pod = triton["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == values["triton"]["gpus"]
    assert pod["nodeSelector"] == values["triton"]["nodeSelector"]
    assert pod["tolerations"] == values["triton"]["tolerations"]
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert settings.triton.url == f"{service['metadata']['name']}:{grpc_port}"
    assert settings.dispatch.value == "triton" and settings.dispatch_fallback
    assert (
        service["spec"]["selector"].items()
        <= triton["spec"]["template"]["metadata"]["labels"].items()
    )
    # Triton reads the same repository at the same path as sparseserve.
    assert f"--model-repository={settings.repository}" in container["args"]
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {str(settings.repository)}
    assert "--model-control-mode=explicit" in container["args"]
    # The server's Service does not select Triton's pods, nor the other way round.
    server_service = component(documents, "Service", "server")
    assert (
        not server_service["spec"]["selector"].items()
        <= triton["spec"]["template"]["metadata"]["labels"].items()
    )


def test_dashboard_config_map_renders_nothing_without_dashboards(tmp_path: Path) -> None:
    chart = shutil.copytree(CHART, tmp_path / "sparseserve")
    for path in chart.glob("dashboards/*.json"):
        path.unlink()
    documents = render({"grafanaDashboard": {"enabled": True}}, chart=chart)
    assert [
        d for d in of_kind(documents, "ConfigMap") if "dashboards" in d["metadata"]["name"]
    ] == []


def test_dashboard_config_map_carries_the_charts_dashboards(tmp_path: Path) -> None:
    chart = shutil.copytree(CHART, tmp_path / "sparseserve")
    dashboard = {"title": "sparseserve", "uid": "sparseserve", "panels": []}
    (chart / "dashboards" / "extra.json").write_text(json.dumps(dashboard))
    documents = render({"grafanaDashboard": {"enabled": True}}, chart=chart)
    (config_map,) = (d for d in of_kind(documents, "ConfigMap") if d["metadata"]["name"].endswith(
        "-dashboards"))  # fmt: skip
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["extra.json"]) == dashboard
    assert set(config_map["data"]) == {"extra.json", "sparseserve.json"}
    assert not [d for d in of_kind(render(chart=chart), "ConfigMap") if "dashboards" in
                d["metadata"]["name"]]  # fmt: skip  # off unless enabled


DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "sparseserve.json"


def test_charts_dashboard_is_the_compose_dashboard() -> None:
    """The chart can only read files inside itself, so it keeps a copy of the dashboard
    that compose provisions (and tests/integration/test_prometheus.py checks against a
    live Prometheus): the two must stay identical."""
    copy = CHART / "dashboards" / "sparseserve.json"
    assert copy.exists(), f"copy {DASHBOARD.relative_to(ROOT)} to {copy.relative_to(ROOT)}"
    assert copy.read_bytes() == DASHBOARD.read_bytes(), (
        f"{copy.relative_to(ROOT)} differs from {DASHBOARD.relative_to(ROOT)}: copy it again"
    )


def test_the_release_ships_the_dashboard() -> None:
    """With grafanaDashboard.enabled, the release's ConfigMap carries the dashboard
    byte for byte, for Grafana's sidecar to load (a ConfigMap holds at most 1 MiB)."""
    documents = render({"grafanaDashboard": {"enabled": True}})
    (config_map,) = (
        d for d in of_kind(documents, "ConfigMap") if d["metadata"]["name"].endswith("-dashboards")
    )
    assert config_map["data"] == {"sparseserve.json": DASHBOARD.read_text(encoding="utf-8")}
    assert json.loads(config_map["data"]["sparseserve.json"])["uid"] == "sparseserve"
    assert len(DASHBOARD.read_bytes()) < 2**20


def test_notes_say_how_to_call_the_service() -> None:
    text = notes(release="dense")
    documents = render(release="dense")
    service = component(documents, "Service", "server")["metadata"]["name"]
    settings = server_config(documents)
    assert f"svc/{service} {settings.grpc_port}:{settings.grpc_port}" in text
    assert f"{service}.ml.svc:{settings.metrics_port}/metrics" in text
    assert "grafanaDashboard.enabled=true" in text


def test_config_map_holds_only_the_server_files(case) -> None:
    values, documents = case
    keys = set(config_map_data(documents))
    assert keys == ({"config.yaml", "traffic.yaml"} if values.get("trafficPolicies") else {
        "config.yaml"})  # fmt: skip


def secret_volume_at(documents: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    """The Secret volume the server container mounts over `path`'s folder."""
    pod = component(documents, "Deployment", "server")["spec"]["template"]["spec"]
    (mount,) = (
        m for m in server_container(documents)["volumeMounts"] if m["mountPath"] == str(path.parent)
    )
    assert mount["readOnly"] and "subPath" not in mount  # the kubelet can swap in new files
    (volume,) = (v for v in pod["volumes"] if v["name"] == mount["name"])
    return volume["secret"]


def test_model_repository_is_restricted_by_default_with_a_generated_secret() -> None:
    """Default values: the repository RPCs need triton-grpc-protocol-admin-key, whose
    value the server reads from a generated Secret (never from the ConfigMap)."""
    documents = render()
    settings = server_config(documents)
    (restriction,) = settings.grpc_restricted_protocols
    assert settings.http_restricted_apis == [restriction]  # REST is no way around it
    assert [g.value for g in restriction.groups] == ["model-repository"]
    assert restriction.key == "admin-key" and restriction.value is None
    assert restriction.value_file is not None
    secret = secret_volume_at(documents, restriction.value_file)
    (generated,) = of_kind(documents, "Secret")
    assert secret["secretName"] == generated["metadata"]["name"]
    assert secret["items"] == [{"key": "model-repository", "path": restriction.value_file.name}]
    assert len(base64.b64decode(generated["data"]["model-repository"])) == 32
    assert "admin-key" not in json.dumps(generated["data"])
    # The NetworkPolicy is on by default too.
    assert of_kind(documents, "NetworkPolicy")


def test_restrictions_from_a_secret_of_your_own_or_none() -> None:
    own = render(
        {"restrictedProtocols": [{"groups": ["model-repository", "statistics"], "key": "k",
                                  "existingSecret": "mine", "secretKey": "token"}]}
    )  # fmt: skip
    (restriction,) = server_config(own).grpc_restricted_protocols
    assert secret_volume_at(own, restriction.value_file)["secretName"] == "mine"
    assert of_kind(own, "Secret") == []
    bare = render({"restrictedProtocols": []})
    assert server_config(bare).grpc_restricted_protocols == []
    assert of_kind(bare, "Secret") == []


def test_tls_files_come_from_the_secret() -> None:
    documents = render(TLS_ON)
    tls = server_config(documents).grpc_tls
    assert tls.enabled and tls.mutual
    files = (tls.server_cert, tls.server_key, tls.root_cert)
    assert [f.name for f in files] == ["tls.crt", "tls.key", "ca.crt"]
    assert {secret_volume_at(documents, f)["secretName"] for f in files} == {"sparseserve-tls"}
    readiness = server_container(documents)["readinessProbe"]["exec"]["command"]
    server_name = readiness[readiness.index("--server-name") + 1]
    assert server_name == component(documents, "Service", "server")["metadata"]["name"]


def test_restricting_health_turns_the_probes_into_commands() -> None:
    """Kubernetes' gRPC probe sends no headers: a restricted health group needs the
    command, which finds the header in the server's settings."""
    values = {"restrictedProtocols": [{"groups": ["health"], "key": "k", "secretKey": "v"}]}
    container = server_container(render(values))
    assert all("exec" in container[f"{n}Probe"] for n in ("startup", "liveness", "readiness"))


def test_rest_turned_off_leaves_its_port_out_and_probes_stay_on_grpc() -> None:
    documents = render({**EVERYTHING_ON, "config": {"allow_http": False}})
    settings = server_config(documents)
    assert not settings.allow_http
    container = server_container(documents)
    assert {p["name"] for p in container["ports"]} == {"grpc", "metrics"}
    service = component(documents, "Service", "server")
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}
    policy = component(documents, "NetworkPolicy", "server")
    ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert settings.http_port not in ports
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == settings.grpc_port
    default = server_container(render())
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert default[probe]["grpc"]["port"] == settings.grpc_port
