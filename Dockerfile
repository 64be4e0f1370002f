# syntax=docker/dockerfile:1
# The extproc service (and its mock LLM upstream): `docker build -t extproc:0.1.0 .`
# Used by docker-compose.yml and deploy/k8s. The entrypoint is the `extproc` command, so
# any subcommand runs as `docker run extproc:0.1.0 <subcommand> ...`, e.g. `check`, `keys`.

# Build stage: the project's wheel and wheels of all its dependencies. Build tools and
# pip's caches stay in this stage.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY protos ./protos
COPY extproc ./extproc
# setup.py compiles protos/ (the admin API) into extproc/admin/ while building the wheel.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: only the installed wheels, the example policy and an unprivileged user.
FROM python:3.11-slim-bookworm AS runtime
# Logs reach `docker logs` / kubectl logs as they are written.
ENV PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 extproc \
 && useradd --system --uid 10001 --gid extproc --no-create-home --shell /usr/sbin/nologin extproc
# xds-protos ships an older copy of OpenTelemetry's protos at opentelemetry-proto's paths:
# the OTLP exporter needs its own, installed last.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels extproc \
 && pip install --no-cache-dir --no-index --find-links /wheels --force-reinstall --no-deps \
    opentelemetry-proto
# A policy to start with; docker-compose.yml mounts policies/ over it and Kubernetes
# passes --policy with its ConfigMap.
COPY policies/example.yaml /etc/extproc/policies/example.yaml
ENV EXTPROC_POLICY=/etc/extproc/policies/example.yaml
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# 50051 ext_authz + ext_proc + gRPC health · 50052 HTTP authorizer (envoy/gateway.yaml)
# · 9464 /healthz + /metrics · 8099 mock upstream
EXPOSE 50051 50052 9464 8099 8098
ENTRYPOINT ["extproc"]
# In a container the service must listen on the container's interfaces, not loopback.
CMD ["serve", "--grpc", "0.0.0.0:50051", "--authz", "0.0.0.0:50052", "--admin-host", "0.0.0.0"]
