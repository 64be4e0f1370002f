"""The ``extproc`` command: serve, check a policy, mint keys, run the mock upstream or stack."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import secrets
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from extproc.policy.store import PolicyStore

DEFAULT_POLICY = "policies/example.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return int(args.run(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extproc", description=__doc__)
    commands = parser.add_subparsers(metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the ext_proc gRPC service")
    serve.add_argument("--policy", default=_env("EXTPROC_POLICY", DEFAULT_POLICY))
    serve.add_argument(
        "--grpc",
        default=_env("EXTPROC_GRPC", "127.0.0.1:50051"),
        help="host:port for the gRPC service (default %(default)s)",
    )
    serve.add_argument(
        "--authz",
        default=_env("EXTPROC_AUTHZ", "127.0.0.1:50052"),
        help="host:port for the HTTP authorizer, Envoy's ext_authz http_service in "
        "envoy/gateway.yaml; 'off' to serve gRPC only (default %(default)s)",
    )
    serve.add_argument("--admin-host", default=_env("EXTPROC_ADMIN_HOST", "127.0.0.1"))
    serve.add_argument(
        "--admin-port",
        type=_whole_number,
        default=_env_to_convert("EXTPROC_ADMIN_PORT", "9464"),
        help="port of /healthz and /metrics (default %(default)s)",
    )
    serve.add_argument(
        "--workers",
        type=_whole_number,
        default=_env_to_convert("EXTPROC_WORKERS", "1"),
        help="worker processes sharing the gRPC port (default %(default)s)",
    )
    _redis_options(
        serve,
        "Redis for budgets shared by workers and replicas (default: $REDIS_URL; "
        "without it counters live in this process)",
    )
    serve.add_argument(
        "--audit-file",
        type=Path,
        default=_env("EXTPROC_AUDIT_FILE"),
        help="append one JSON audit record per exchange to this file (rotated at 100 MB)",
    )
    serve.add_argument(
        "--audit-stdout", action="store_true", help="also write audit records to stdout"
    )
    serve.add_argument(
        "--audit-redis-stream",
        default=_env("EXTPROC_AUDIT_REDIS_STREAM"),
        help="also XADD audit records to this Redis Stream (on --redis-url, MAXLEN ~1M)",
    )
    serve.add_argument(
        "--otlp-endpoint",
        default=_env("EXTPROC_OTLP_ENDPOINT"),
        help="export one span per exchange to this OTLP/HTTP traces URL "
        "(e.g. http://collector:4318/v1/traces); off by default",
    )
    serve.add_argument(
        "--admin-token-env",
        default="EXTPROC_ADMIN_TOKEN",
        help="environment variable holding the admin API token; the API (usage, recent "
        "audit events) is served on the gRPC port only when it is set",
    )
    serve.add_argument(
        "--reload-interval",
        type=float,
        default=1.0,
        help="seconds between policy file checks (default %(default)s)",
    )
    serve.add_argument(
        "--grace",
        type=_seconds,
        default=20.0,
        help="seconds in-flight streams get to finish on SIGTERM (default %(default)s)",
    )
    serve.set_defaults(run=_serve)

    check = commands.add_parser("check", help="validate a policy file")
    check.add_argument("file", type=Path)
    check.set_defaults(run=_check)

    envoy_config = commands.add_parser(
        "envoy-config",
        help="render Envoy's clusters and canary routes from a policy's upstreams",
        description="Prints BASE (an Envoy bootstrap) with the policy's upstreams as its "
        "clusters and split routes. --check instead exits 1 if BASE does not match.",
    )
    envoy_config.add_argument("policy", type=Path)
    envoy_config.add_argument(
        "--base", type=Path, default=None, help="Envoy config to render onto (envoy/gateway.yaml)"
    )
    envoy_config.add_argument("--check", action="store_true", help="verify BASE, print nothing")
    envoy_config.set_defaults(run=_envoy_config)

    keys = commands.add_parser("keys", help="manage gateway keys")
    key_commands = keys.add_subparsers(metavar="ACTION")
    create = key_commands.add_parser("create", help="mint a key; prints it once with its entry")
    create.add_argument("--team", required=True)
    create.add_argument("--user")
    create.add_argument("--id", dest="key_id", help="policy key id (default: random)")
    create.set_defaults(run=_keys_create)

    usage = commands.add_parser(
        "usage", help="each budget's usage, limit and reset time in its current window"
    )
    usage.add_argument("--policy", default=_env("EXTPROC_POLICY", DEFAULT_POLICY))
    _redis_options(usage, "the Redis that serve keeps budgets in (default: $REDIS_URL)")
    usage.add_argument(
        "--remote",
        metavar="HOST:PORT",
        help="ask a running service's admin API (its gRPC port) instead of Redis; "
        "the token comes from $EXTPROC_ADMIN_TOKEN",
    )
    usage.add_argument("--team", help="only this team's budgets (its users and keys too)")
    usage.add_argument("--json", action="store_true", help="one JSON object per budget")
    usage.set_defaults(run=_usage)

    evaluate = commands.add_parser(
        "eval", help="measure the guardrail detectors on the shared evaluation data sets"
    )
    evaluate.add_argument(
        "--data",
        type=Path,
        default=Path(__file__).resolve().parents[2] / "shared" / "data",
        help="the data sets' folder (default: ../shared/data beside the project)",
    )
    evaluate.add_argument("--json", action="store_true", help="the report as JSON")
    evaluate.set_defaults(run=_eval)

    schema = commands.add_parser("schema", help="print the policy JSON Schema")
    schema.set_defaults(run=_schema)

    mock = commands.add_parser("mock-upstream", help="run the mock LLM upstream")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8099)
    mock.add_argument(
        "--name", default="mock", help="this mock's name, for x-mock-fail (fail-over demos)"
    )
    mock.set_defaults(run=_mock_upstream)

    demo = commands.add_parser("mcp-demo", help="run the demo MCP server (official MCP SDK)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8097)
    demo.add_argument("--path", default="/mcp")
    demo.add_argument("--json", action="store_true", help="answer JSON instead of SSE")
    demo.add_argument("--stateful", action="store_true", help="open sessions (Mcp-Session-Id)")
    demo.set_defaults(run=_mcp_demo)

    up = commands.add_parser("up", help="run Envoy, the service and the mock upstream")
    up.add_argument("--policy", default=DEFAULT_POLICY)
    up.set_defaults(run=_up)
    return parser


def _env(variable: str, fallback: str | None = None) -> str | None:
    """An environment default; empty is unset, as Compose and Helm render unset variables."""
    return os.environ.get(variable) or fallback


class _FromEnvironment(str):
    """An environment default argparse converts: it does so for the command run only (a
    bad value fails that command alone, with exit 2, not every command with a traceback),
    and the error names the variable, which the command line does not show."""

    variable = ""


def _env_to_convert(variable: str, fallback: str) -> str:
    """:func:`_env` for an option with a ``type``: the value left for argparse to convert."""
    value = _env(variable)
    if value is None:
        return fallback
    default = _FromEnvironment(value)
    default.variable = variable
    return default


def _whole_number(text: str) -> int:
    """``int``, with argparse's own error, saying where a bad value came from."""
    try:
        return int(text)
    except ValueError:
        origin = f" (from ${text.variable})" if isinstance(text, _FromEnvironment) else ""
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}{origin}") from None


def _seconds(text: str) -> float:
    """A duration: negative, the supervisor's wait for its workers timed out at once and
    they were killed without their grace."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be seconds, 0 or more (got {text!r})")
    return value


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _logging() -> None:
    """Log at $EXTPROC_LOG_LEVEL (INFO when unset or empty); an unknown level stops the
    command with exit 2, as a bad option does (not a traceback)."""
    value = os.environ.get("EXTPROC_LOG_LEVEL") or "INFO"
    level = value.strip().upper()
    if level not in _LOG_LEVELS:
        print(
            f"extproc: EXTPROC_LOG_LEVEL must be one of {', '.join(_LOG_LEVELS)} (got {value!r})",
            file=sys.stderr,
        )
        raise SystemExit(2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _redis_options(command: argparse.ArgumentParser, url_help: str) -> None:
    """Where the budget store is and how its keys sit; ``serve`` and ``usage`` must agree."""
    command.add_argument("--redis-url", default=_env("REDIS_URL"), help=url_help)
    command.add_argument(
        "--redis-cluster",
        action="store_true",
        default=os.environ.get("EXTPROC_REDIS_CLUSTER", "").lower() in ("1", "true", "yes"),
        help="--redis-url names a node of a Redis Cluster (default: $EXTPROC_REDIS_CLUSTER)",
    )
    command.add_argument(
        "--redis-prefix",
        default=_env("EXTPROC_REDIS_PREFIX", "budget"),
        help="the prefix (hash tag) of every key; one per deployment sharing a Redis "
        "(default %(default)s, or $EXTPROC_REDIS_PREFIX)",
    )


@contextlib.contextmanager
def _multiprocess_metrics(workers: int) -> Iterator[None]:
    """With ``workers`` > 1, have them write their metrics to files in a fresh directory,
    which the supervisor adds up on /metrics and which is removed on exit.

    prometheus_client chooses that mode from ``PROMETHEUS_MULTIPROC_DIR`` when it is first
    imported, and the workers are forked from a supervisor that has already imported
    everything (server.py), so the directory is set before anything imports the server.
    """
    if workers <= 1:
        yield
        return
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="extproc-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _serve(args: argparse.Namespace) -> int:
    # Until the event loop takes SIGTERM over, let it unwind the stack (so the metrics
    # directory is removed) instead of killing the process during its seconds of loading.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with _multiprocess_metrics(args.workers):
        return _serve_with(args)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _serve_with(args: argparse.Namespace) -> int:
    from extproc.policy.loader import PolicyError
    from extproc.serve_settings import ConfigurationError, ServeSettings, check
    from extproc.ticket import KEY_VARIABLE

    _logging()
    settings = ServeSettings(
        grpc_address=args.grpc,
        authz_address=None if args.authz == "off" else args.authz,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        workers=args.workers,
        reload_interval=args.reload_interval,
        grace_seconds=args.grace,
        redis_url=args.redis_url,
        redis_cluster=args.redis_cluster,
        redis_prefix=args.redis_prefix,
        audit_file=args.audit_file,
        audit_stdout=args.audit_stdout,
        audit_redis_stream=args.audit_redis_stream,
        admin_token=(os.environ.get(args.admin_token_env) or "").strip() or None,
        otlp_endpoint=args.otlp_endpoint,
        ticket_secret=os.environ.get(KEY_VARIABLE) or None,
    )
    try:
        check(settings)  # before the seconds of loading, and whatever the policy holds
        policies = load_for_serving(Path(args.policy))
    except ConfigurationError as exc:
        print(f"extproc: cannot start: {exc}", file=sys.stderr)
        return 2
    except PolicyError as exc:
        print(
            f"extproc: cannot start, the policy is invalid:\n{_bullets(exc.problems)}",
            file=sys.stderr,
        )
        return 1
    from extproc.server import serve

    try:
        return serve(settings, policies)
    except OSError as exc:  # a port taken (another instance, or a stale one)
        print(f"extproc: cannot start: {exc}", file=sys.stderr)
        return 1


def load_for_serving(path: Path) -> PolicyStore:
    """The policy at ``path``, compiled, and the BPE tables it counts with, loaded before
    gRPC, uvloop and most of the service are imported.

    Building a table reads its extension's file pages (o200k ~33 MB), given back once it is
    built (:mod:`extproc.budgets.file_pages`); built first, those pages add to a process
    holding ~65 MB rather than ~95 MB (gRPC, uvloop and the rest of the service), so they
    stay under what it holds once serving (measured with the benchmark's full policy,
    ready and idle: peak 160-176 MB before, 139 MB since, as much as it then holds).
    """
    from extproc.budgets.tokens import warm_up
    from extproc.policy.store import PolicyStore

    policies = PolicyStore(path)
    warm_up(policies.current.counted_tokenizers)
    return policies


def _check(args: argparse.Namespace) -> int:
    from extproc.policy.loader import PolicyError, load_policy

    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        print(f"{args.file}: invalid\n{_bullets(exc.problems)}", file=sys.stderr)
        return 1
    print(
        f"{args.file}: ok (version {policy.version}; {len(policy.team_models)} teams, "
        f"{len(policy.keys_by_digest)} keys, {len(policy.catalogue)} models)"
    )
    return 0


def _envoy_config(args: argparse.Namespace) -> int:
    import yaml

    from extproc.envoy_config import RenderError, differences, render_text
    from extproc.policy.loader import PolicyError, parse_policy
    from extproc.stack import GATEWAY_CONFIG

    base_path: Path = args.base or GATEWAY_CONFIG
    try:
        policy = parse_policy(args.policy.read_text(), str(args.policy))
        base_text = base_path.read_text()
        if args.check:
            problems = differences(policy, yaml.safe_load(base_text))
            if problems:
                print(
                    f"{base_path}: does not match {args.policy}'s upstreams\n{_bullets(problems)}",
                    file=sys.stderr,
                )
                return 1
            print(f"{base_path}: matches {args.policy}")
            return 0
        print(render_text(policy, base_text, str(args.policy)), end="")
    except PolicyError as exc:
        print(f"{args.policy}: invalid\n{_bullets(exc.problems)}", file=sys.stderr)
        return 1
    except (OSError, yaml.YAMLError, RenderError) as exc:
        print(f"envoy-config: {exc}", file=sys.stderr)
        return 1
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from extproc.keys import new_key, policy_entry
    from extproc.policy.schema import NAME_PATTERN

    key_id = args.key_id or f"key-{secrets.token_hex(4)}"
    for flag, value in (("--id", key_id), ("--team", args.team), ("--user", args.user)):
        if value is not None and not NAME_PATTERN.fullmatch(value):
            print(
                f"extproc keys create: {flag} {value!r}: use letters, digits and . _ : @ / - "
                "(at most 128, starting with a letter or digit)",
                file=sys.stderr,
            )
            return 2
    key = new_key()
    print(f"Key (shown once, store it now): {key}\n")
    print("Add this entry under keys: in your policy file:\n")
    print(policy_entry(key, key_id, args.team, args.user), end="")
    return 0


def _usage(args: argparse.Namespace) -> int:
    import asyncio
    from datetime import UTC, datetime

    from extproc.budgets.redis_store import RedisStore, RedisTarget
    from extproc.budgets.report import format_table, usage_report
    from extproc.budgets.store import StoreUnavailable
    from extproc.policy.loader import PolicyError, load_policy
    from extproc.serve_settings import ConfigurationError, check_redis

    if args.remote:
        return _usage_remote(args)
    if not args.redis_url:
        print(
            "extproc usage reads the shared budget store: pass --redis-url (or set REDIS_URL),"
            " or --remote HOST:PORT to ask a running service",
            file=sys.stderr,
        )
        return 2
    try:
        check_redis(args.redis_url, args.redis_prefix)
    except ConfigurationError as error:
        print(f"extproc usage: {error}", file=sys.stderr)
        return 2
    try:
        policy = load_policy(Path(args.policy), credentials=False)  # limits only
    except PolicyError as exc:
        print(f"{args.policy}: invalid\n{_bullets(exc.problems)}", file=sys.stderr)
        return 1

    async def report() -> list[Any]:
        store = RedisStore.at(RedisTarget(args.redis_url, args.redis_cluster, args.redis_prefix))
        try:
            return await usage_report(policy, store, datetime.now(UTC), args.team)
        finally:
            await store.close()

    try:
        lines = asyncio.run(report())
    except StoreUnavailable as exc:
        print(f"extproc usage: Redis is unavailable: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([line.as_dict() for line in lines], indent=2))
    else:
        print(format_table(lines) if lines else "no budgets configured")
    return 0


def _usage_remote(args: argparse.Namespace) -> int:
    import grpc

    from extproc.admin.v1 import admin_pb2, admin_pb2_grpc
    from extproc.budgets.report import UsageLine, format_table

    # Stripped as the service strips it: a Secret file's newline is no header value.
    token = os.environ.get("EXTPROC_ADMIN_TOKEN", "").strip()
    with grpc.insecure_channel(args.remote) as channel:
        try:
            stub = admin_pb2_grpc.AdminStub(channel)  # type: ignore[no-untyped-call]
            reply = stub.GetUsage(
                admin_pb2.GetUsageRequest(team=args.team or ""),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=10,
            )
        except grpc.RpcError as exc:
            print(f"extproc usage: {exc.code().name}: {exc.details()}", file=sys.stderr)
            if exc.code() is grpc.StatusCode.UNIMPLEMENTED:
                print(
                    "extproc usage: the service serves the admin API only when started with "
                    "EXTPROC_ADMIN_TOKEN set (e.g. EXTPROC_ADMIN_TOKEN=... make up)",
                    file=sys.stderr,
                )
            return 1
    fields = [f.name for f in admin_pb2.BudgetUsage.DESCRIPTOR.fields]
    lines = [UsageLine(**{f: getattr(b, f) for f in fields}) for b in reply.budgets]
    if args.json:
        print(json.dumps([line.as_dict() for line in lines], indent=2))
    else:
        print(format_table(lines) if lines else "no budgets configured")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from extproc.guardrails.evaluate import format_report, run_eval

    if not args.data.is_dir():
        print(f"extproc eval: no data sets at {args.data} (pass --data)", file=sys.stderr)
        return 2
    report = run_eval(args.data)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _schema(_: argparse.Namespace) -> int:
    from extproc.policy.schema import Policy

    print(json.dumps(Policy.model_json_schema(), indent=2))
    return 0


def _mock_upstream(args: argparse.Namespace) -> int:
    from extproc.mock_upstream import run

    _logging()
    run(args.host, args.port, args.name)
    return 0


def _mcp_demo(args: argparse.Namespace) -> int:
    from extproc.mcp.demo_server import run_demo_server

    _logging()
    run_demo_server(
        args.host, args.port, args.path, json_response=args.json, stateful=args.stateful
    )
    return 0


def _up(args: argparse.Namespace) -> int:
    from extproc.stack import run_stack

    _logging()
    return run_stack(Path(args.policy))


def _bullets(lines: list[str]) -> str:
    return "\n".join(f"  - {line}" for line in lines)
