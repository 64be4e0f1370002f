"""The mesh configuration (envoy/mesh.yaml): ext_authz decides, ext_proc rewrites, mTLS names.

Envoy runs the shipped mesh config with one change: the workload certificate and the
mesh CA come from files made here instead of the mesh agent (SDS), so a real mTLS client
with a SPIFFE id in its certificate can be tested without a mesh.
"""

from __future__ import annotations

import datetime as dt
import http.client
import ipaddress
import json
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from extproc.stack import ROOT, Ports, Stack, running
from tests.e2e.conftest import ADMIN_KEY, EXAMPLE_POLICY, RESTRICTED_KEY, Http, Mock

pytestmark = pytest.mark.e2e

WORKLOAD = "spiffe://cluster.local/ns/search/sa/indexer"


def _certificate(
    subject: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    san: list[x509.GeneralName],
    ca: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def mesh_config_with_files(tmp: Path) -> Path:
    """envoy/mesh.yaml with file-based certificates in place of the SDS mesh agent."""
    ca, ca_key = _certificate("mesh-ca", None, [], ca=True)
    gateway = _certificate(
        "gateway",
        (ca.subject, ca_key),
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")],
        ca=False,
    )
    client = _certificate(
        "indexer", (ca.subject, ca_key), [x509.UniformResourceIdentifier(WORKLOAD)], ca=False
    )
    stranger = _certificate(
        "stranger",
        (ca.subject, ca_key),
        [x509.UniformResourceIdentifier("spiffe://other.domain/ns/x/sa/y")],
        ca=False,
    )
    (tmp / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, (cert, key) in {"gateway": gateway, "client": client, "stranger": stranger}.items():
        _write(tmp / name, cert, key)

    config = yaml.safe_load((ROOT / "envoy" / "mesh.yaml").read_text())
    mtls = config["static_resources"]["listeners"][0]["filter_chains"][0]
    tls = mtls["transport_socket"]["typed_config"]["common_tls_context"]
    validation = tls.pop("combined_validation_context")["default_validation_context"]
    del tls["tls_certificate_sds_secret_configs"]
    tls["tls_certificates"] = [
        {
            "certificate_chain": {"filename": str(tmp / "gateway.crt")},
            "private_key": {"filename": str(tmp / "gateway.key")},
        }
    ]
    tls["validation_context"] = {**validation, "trusted_ca": {"filename": str(tmp / "ca.crt")}}
    clusters = config["static_resources"]["clusters"]
    config["static_resources"]["clusters"] = [c for c in clusters if c["name"] != "mesh_agent"]
    path = tmp / "mesh-files.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    tmp = tmp_path_factory.mktemp("mesh")
    policy = tmp / "policy.yaml"
    policy.write_text(
        EXAMPLE_POLICY.read_text() + f"\nworkloads:\n  {WORKLOAD}: {{ team: apps }}\n"
    )
    stack = Stack(
        policy=policy, ports=Ports.free(), envoy_config=mesh_config_with_files(tmp), log_dir=tmp
    )
    with running(stack):
        yield stack, tmp


@pytest.fixture
def upstream(mesh: tuple[Stack, Path]) -> Mock:
    m = Mock(mesh[0].ports.mock)
    m.clear()
    return m


def authz_denied(stack: Stack) -> int:
    url = f"http://127.0.0.1:{stack.ports.envoy_admin}/stats?filter=^http\\.gateway\\.ext_authz\\.denied$"
    with urllib.request.urlopen(url) as resp:
        lines = resp.read().decode().splitlines()
    return sum(int(line.rsplit(": ", 1)[1]) for line in lines if line.endswith(tuple("0123456789")))


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi from the mesh"}], **extra}


@pytest.mark.parametrize(
    ("path", "key", "body", "status"),
    [
        pytest.param("/v1/chat/completions", "sk-unknown", chat("gpt-4o"), 401, id="401-openai"),
        pytest.param(
            "/v1/messages", RESTRICTED_KEY, chat("gpt-4o", max_tokens=5), 403, id="403-anthropic"
        ),
        pytest.param(
            "/v1/chat/completions",
            "sk-demo-capped",
            chat("gpt-4o-mini", max_tokens=5000),
            429,
            id="429-budget",
        ),
    ],
)
def test_ext_authz_decides_denials_in_the_callers_dialect(
    mesh: tuple[Stack, Path], upstream: Mock, path: str, key: str, body: Any, status: int
) -> None:
    stack, _ = mesh
    before = authz_denied(stack)
    got, headers, payload = Http(stack.ports.gateway).post_json(path, body, key=key)
    assert got == status
    if path == "/v1/messages":
        assert payload["type"] == "error" and payload["error"]["type"] == "permission_error"
    else:
        assert set(payload["error"]) == {"message", "type", "code", "param"}
    if status == 429:
        assert int(headers["retry-after"]) >= 1
    assert authz_denied(stack) == before + 1  # ext_authz said no, not ext_proc
    assert upstream.requests() == []


def test_allowed_requests_carry_trusted_identity_and_ext_proc_still_rewrites(
    mesh: tuple[Stack, Path], upstream: Mock
) -> None:
    stack, _ = mesh
    body = {"model": "mini", "messages": [{"role": "user", "content": "mail jo@example.com"}]}
    status, _, _ = Http(stack.ports.gateway).post_json(
        "/v1/chat/completions",
        body,
        key=ADMIN_KEY,
        **{"x-gateway-team": "forged", "x-gateway-key-id": "forged"},
    )
    assert status == 200
    seen = upstream.last()
    # PII is still rewritten: body mutation is ext_proc's, after ext_authz allowed the call.
    assert json.loads(seen["body"])["messages"][0]["content"] == "mail <EMAIL_ADDRESS>"
    assert seen["headers"]["x-gateway-team"] == "platform"
    assert seen["headers"]["x-gateway-key-id"] == "demo-admin"
    assert "authorization" not in seen["headers"]
    # The alias was rewritten in the body: only ext_proc can do that.
    assert json.loads(seen["body"])["model"] == "gpt-4o-mini-2024-07-18"


def _mtls(tmp: Path, who: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(tmp / "ca.crt"))
    context.load_cert_chain(str(tmp / f"{who}.crt"), str(tmp / f"{who}.key"))
    return context


def _mtls_chat(stack: Stack, tmp: Path, who: str, model: str) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection(
        "127.0.0.1", stack.ports.gateway, context=_mtls(tmp, who), timeout=30
    )
    try:
        # No gateway key: the SDK-less workload is identified by its certificate alone.
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(chat(model)).encode(),
            {"content-type": "application/json"},
        )
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_spiffe_principal_maps_to_its_team(mesh: tuple[Stack, Path], upstream: Mock) -> None:
    stack, tmp = mesh
    status, _ = _mtls_chat(stack, tmp, "client", "gpt-4o-mini")
    assert status == 200
    assert upstream.last()["headers"]["x-gateway-team"] == "apps"
    status, body = _mtls_chat(stack, tmp, "client", "gpt-4o")
    assert status == 403, body


def test_certificates_of_another_trust_domain_are_refused(mesh: tuple[Stack, Path]) -> None:
    stack, tmp = mesh
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _mtls_chat(stack, tmp, "stranger", "gpt-4o-mini")
