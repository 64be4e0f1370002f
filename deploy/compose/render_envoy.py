"""Write deploy/compose/envoy.yaml: envoy/gateway.yaml for docker-compose's network.

    python deploy/compose/render_envoy.py           # rewrite deploy/compose/envoy.yaml
    python deploy/compose/render_envoy.py --check   # exit 1 if it is out of date (the tests)

The gateway config is the single source; for containers only addresses change:

* Envoy's listener and admin bind 0.0.0.0, the container's interfaces (docker-compose.yml
  publishes them on the host's loopback only);
* every cluster becomes STRICT_DNS on the compose service names ``extproc``, ``mock``
  (the OpenAI mock) and ``mock-anthropic``: STATIC clusters take IP addresses only, and DNS
  follows a container that restarts with a new address (or ``--scale extproc=3``).

Ports stay as they are: the contract's 10000, 9901, 50051, 50052 and 8099, and 8098. Any
other change to the text fails loudly, so an edit of gateway.yaml that this script does not
understand is caught by the tests instead of producing a subtly different compose config.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "envoy" / "gateway.yaml"
TARGET = ROOT / "deploy" / "compose" / "envoy.yaml"

ADDRESS_BY_PORT = {
    9901: "0.0.0.0",  # admin
    10000: "0.0.0.0",  # gateway listener
    50051: "extproc",  # the extproc service
    50052: "extproc",  # its HTTP authorizer
    8099: "mock",  # the mock LLM upstream (OpenAI; the "openai" primary)
    8098: "mock-anthropic",  # the second mock (Anthropic; the "openai" fail-over target)
    8097: "mcp-demo",  # the demo MCP server
}
DNS_CLUSTERS = (
    "extproc",
    "extproc_authz",
    "llm_default",
    "openai_primary",
    "openai_secondary",
    "mcp_demo",
    "anthropic",
)

HEADER = """\
# GENERATED from envoy/gateway.yaml by deploy/compose/render_envoy.py: do not edit.
# Regenerate after changing envoy/gateway.yaml:  python deploy/compose/render_envoy.py
# The same gateway on docker-compose's network: listener and admin bind the container's
# interfaces, clusters resolve the compose services `extproc` and `mock` by name.
"""


def render(source: str) -> str:
    text = source
    for port, address in ADDRESS_BY_PORT.items():
        pattern = re.compile(
            r"socket_address: \{ address: 127\.0\.0\.1, port_value: " + str(port) + r" \}"
        )
        text, count = pattern.subn(
            f"socket_address: {{ address: {address}, port_value: {port} }}", text
        )
        if count == 0:
            raise SystemExit(f"{SOURCE}: expected a 127.0.0.1:{port} address, found none")
    for cluster in DNS_CLUSTERS:
        pattern = re.compile(r"(- name: " + re.escape(cluster) + r"\n\s+type: )STATIC\n")
        text, count = pattern.subn(r"\1STRICT_DNS\n", text)
        if count != 1:
            raise SystemExit(f"{SOURCE}: expected cluster {cluster} of type STATIC, found {count}")
    if "127.0.0.1" in text:
        raise SystemExit(f"{SOURCE}: an address this script does not know about is left")
    return HEADER + text


def main(argv: list[str]) -> int:
    rendered = render(SOURCE.read_text())
    if argv == ["--check"]:
        if not TARGET.exists() or TARGET.read_text() != rendered:
            print(
                f"{TARGET.relative_to(ROOT)} is out of date: "
                "run python deploy/compose/render_envoy.py",
                file=sys.stderr,
            )
            return 1
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    TARGET.write_text(rendered)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
