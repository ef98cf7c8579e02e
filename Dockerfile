# The tokenheap worker: slim, non-root, vocabularies inside, no network needed at runtime.
#
#   docker build -t tokenheap .
#   docker run --rm -e TOKENHEAP_BOOTSTRAP_SERVERS=broker:9092 -p 8080:8080 tokenheap
#   docker run --rm -v "$PWD/examples:/examples:ro" tokenheap fit /examples/request.json --table
#
# ENTRYPOINT + CMD is `tokenheap worker`; tests/integration/test_image_entrypoint.py runs that
# exact argv (parsed from this file) against a real broker, with the compose file's env.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: the package and its dependencies into a virtual environment -----------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python -m venv /opt/tokenheap
WORKDIR /src
# Only what the wheel needs (.dockerignore keeps everything else out of the context).
COPY pyproject.toml README.md ./
COPY config ./config
COPY worker ./worker
# Every dependency ships wheels for linux amd64 and arm64: no compiler in this stage.
RUN /opt/tokenheap/bin/pip install --no-cache-dir .

# -- runtime -----------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 tokenheap \
    && useradd --system --uid 10001 --gid tokenheap --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin tokenheap
COPY --from=build /opt/tokenheap /opt/tokenheap
# DL3064 flags any name containing "TOKEN"; TOKENHEAP_* are ordinary settings, not secrets.
# hadolint ignore=DL3064
ENV PATH=/opt/tokenheap/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/opt/tokenheap/cache \
    TOKENHEAP_HEALTH_HOST=0.0.0.0 \
    TOKENHEAP_HEALTH_PORT=8080
# The vocabularies ship inside the package (worker/count/vocab/*.tiktoken): check them
# against their sha256 now, and keep the parsed rank tables and config files in
# XDG_CACHE_HOME (worker/diskcache.py) so the worker starts without re-parsing them.
# Read-only at runtime; a damaged copy is simply re-parsed.
RUN python -c "from worker.count.vocab import SHA256, encoding; [encoding(n) for n in SHA256]" \
    && python -c "from worker.catalog import default_catalog; default_catalog()" \
    && tokenheap config-docs > /dev/null
USER 10001:10001
EXPOSE 8080
# Liveness of the worker's health endpoint on TOKENHEAP_HEALTH_PORT (no curl in a slim image).
# /livez rather than /readyz: a worker with no partitions (more replicas than partitions) is
# idle, not broken. docker-compose.yml gates on /readyz instead.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/livez' % os.environ.get('TOKENHEAP_HEALTH_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["tokenheap"]
CMD ["worker"]
