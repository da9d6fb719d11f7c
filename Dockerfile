# syntax=docker/dockerfile:1
#
# Spendgate's one image: `spendgate gateway`, `spendgate ledger`, `spendgate auditor` and
# `spendgate migrate` (the Kubernetes manifests pick one with `args`). See docs/deploy.md.
#
# Built from uv.lock exactly (`uv sync --locked`): the `spendgate` member and what it
# needs (the three services and libs/common), without the developer tools and without
# the `embedded` extra (the laptop's NATS and Postgres binaries).
#
#   docker build -t spendgate .                # the production image (the last stage)
#   docker build --target dev -t spendgate .   # Tilt's image: sources writable for live update
#
# The image runs as an unprivileged user on a read-only root filesystem: bytecode is
# compiled at build time, and nothing writes outside /tmp (an emptyDir in Kubernetes).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS python
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/app/.venv/bin:$PATH
RUN groupadd --system --gid 10001 spendgate \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin spendgate
WORKDIR /app

FROM python AS builder
# Keep equal to UV_VERSION in the Makefile (deploy/check.py checks it).
ARG UV_VERSION=0.13.9
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
RUN pip install --no-cache-dir "uv==${UV_VERSION}"
# Third-party dependencies first: this layer changes only when the lock file does.
COPY pyproject.toml uv.lock ./
COPY libs/common/pyproject.toml libs/common/
COPY libs/cli/pyproject.toml libs/cli/
COPY services/ledger/pyproject.toml services/ledger/
COPY services/gateway/pyproject.toml services/gateway/
COPY services/auditor/pyproject.toml services/auditor/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable --package spendgate --no-install-workspace
# Then our own packages, installed (not linked) into the virtual environment.
COPY libs/ libs/
COPY services/ services/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-dev --no-editable --package spendgate

# Tilt's target: the virtual environment belongs to the app user, so that live update
# can sync changed sources into site-packages (the dev overlay allows a writable root).
FROM python AS dev
COPY --from=builder --chown=10001:10001 /app/.venv /app/.venv
COPY --chown=10001:10001 deploy/ops/ /app/ops/
USER 10001:10001
ENTRYPOINT ["spendgate"]
CMD ["--help"]

# The production image (the default target): everything root-owned and read-only.
FROM python AS runtime
COPY --from=builder /app/.venv /app/.venv
COPY deploy/ops/ /app/ops/
USER 10001:10001
ENTRYPOINT ["spendgate"]
CMD ["--help"]
