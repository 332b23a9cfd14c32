# syntax=docker/dockerfile:1
# flex-proxy container image. Build from the repository root: docker build -t flex-proxy .
# Both stages use the same base so the virtualenv copied between them finds the same interpreter path.

FROM python:3.11.13-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Dependencies first, pinned exactly (deploy/docker/constraints.txt), so this layer is reused until the
# pins change. The venv has no pip of its own: the builder's pip installs into it
# (`pip --python`, which must come before the sub-command).
COPY deploy/docker/constraints.txt /tmp/constraints.txt
RUN python -m venv --without-pip /opt/flex-proxy \
    && pip --python /opt/flex-proxy/bin/python install --no-cache-dir --requirement /tmp/constraints.txt

# Then our own wheel, built without network access to a build backend other than the pinned setuptools.
# --no-deps plus `pip check` makes the build fail if pyproject.toml gains a dependency the pins lack.
WORKDIR /src
# LICENSE goes into the wheel's metadata (setuptools picks it up by name), so the image carries it.
COPY pyproject.toml README.md LICENSE ./
COPY proxy/ proxy/
RUN pip install --no-cache-dir setuptools==80.9.0 \
    && pip wheel --no-cache-dir --no-build-isolation --no-deps --wheel-dir /tmp/wheels . \
    && pip --python /opt/flex-proxy/bin/python install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && pip --python /opt/flex-proxy/bin/python check


FROM python:3.11.13-slim-bookworm

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="flex-proxy" \
      org.opencontainers.image.description="OpenAI API reverse proxy that sends eligible requests on the flex tier" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

# A fixed numeric uid/gid so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 flexproxy \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /nonexistent \
       --no-create-home --shell /usr/sbin/nologin flexproxy

# Code and dependencies stay root-owned: the proxy cannot modify itself. Bytecode was compiled at
# install time, so nothing needs to be written at run time (read-only root filesystems work).
COPY --from=builder /opt/flex-proxy /opt/flex-proxy
COPY deploy/docker/healthcheck.py /opt/flex-proxy/healthcheck.py

ENV PATH=/opt/flex-proxy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FLEX_PROXY_HOST=0.0.0.0 \
    FLEX_PROXY_PORT=8080

USER 10001:10001
# One port for everything: /v1 for clients, /metrics for Prometheus, and the control plane (the savings page at /,
# /flex/*, /docs). The control plane answers callers on the container's loopback without a key (kubectl
# port-forward, `docker exec CONTAINER flex-proxy report --url http://127.0.0.1:8080`); through a published port
# the caller is not on loopback, so set FLEX_PROXY_ADMIN_KEY and send it as a bearer or at the page's login.
EXPOSE 8080

# slim has no curl; the probe is stdlib urllib and ignores HTTP(S)_PROXY meant for the upstream.
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
    CMD ["python", "/opt/flex-proxy/healthcheck.py"]

# No init (tini): the proxy starts no child processes, so there are no zombies to reap, and uvicorn
# installs its own SIGTERM/SIGINT handlers, which PID 1 needs. Exec form keeps the proxy PID 1 so
# SIGTERM reaches it directly and starts the graceful drain (FLEX_PROXY_SHUTDOWN_GRACE_S).
STOPSIGNAL SIGTERM
ENTRYPOINT ["flex-proxy"]
