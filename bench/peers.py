"""LiteLLM proxy as a peer, in its own virtualenv, on the same upstream as our gateway.

``make bench-peers`` creates ``bench/.venv-litellm`` and installs ``litellm[proxy]`` there
(it pins its own versions of pydantic, openai, ...; it must not share our venv). The config
is the equivalent of ours: one model name routed to the same OpenAI-compatible upstream.
Two modes, because virtual keys (LiteLLM's per-key budgets and model lists, the feature that
would match our policy) need PostgreSQL + Prisma, which cannot be installed offline:

* ``keyless``: no master key at all. Recent LiteLLM refuses to start that way unless told
  (``LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY=true``); it then accepts anything.
* ``master-key``: ``general_settings.master_key`` set; every request carries it. This is the
  closest to our identity + RBAC scenarios that runs without a database.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench import payloads
from bench.services import Process, free_port

VENV = Path(__file__).resolve().parent / ".venv-litellm"
MASTER_KEY = "sk-bench-litellm-master-0001"


@dataclass(frozen=True, slots=True)
class PeerMode:
    key: str
    title: str
    master_key: bool

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {MASTER_KEY}"} if self.master_key else {}


MODES = (
    PeerMode("litellm-keyless", "LiteLLM, no key", master_key=False),
    PeerMode("litellm-master-key", "LiteLLM, master key", master_key=True),
)


def available() -> bool:
    return (VENV / "bin" / "litellm").exists()


def version() -> str:
    done = subprocess.run(
        [
            str(VENV / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout.strip() or "?"


def config(upstream_port: int, mode: PeerMode) -> str:
    general: dict[str, object] = {}
    if mode.master_key:
        general["master_key"] = MASTER_KEY
    else:
        general["dangerously_permit_weak_or_unset_master_key"] = True
    return yaml.safe_dump(
        {
            "model_list": [
                {
                    "model_name": payloads.MODEL,
                    "litellm_params": {
                        "model": f"openai/{payloads.MODEL}",
                        "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                        "api_key": "sk-upstream-not-checked",
                    },
                }
            ],
            "litellm_settings": {"set_verbose": False, "telemetry": False},
            "general_settings": general,
        },
        sort_keys=False,
    )


def litellm(upstream_port: int, mode: PeerMode, log_dir: Path) -> Process:
    """The LiteLLM proxy (one uvicorn worker) for ``mode``; ``ready_seconds`` on start."""
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{mode.key}.yaml"
    path.write_text(config(upstream_port, mode))
    port = free_port()
    argv = [
        str(VENV / "bin" / "litellm"),
        "--config",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download of the price list at start
        "LITELLM_LOG": "ERROR",
        "BENCH_PORT": str(port),
    }
    if not mode.master_key:
        env["LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY"] = "true"
    return Process(mode.key, argv, f"http://127.0.0.1:{port}/health/liveliness", log_dir, env)
