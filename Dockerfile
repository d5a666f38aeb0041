# syntax=docker/dockerfile:1
# Two images from one file: `api` (no torch: small, starts fast) and `worker` (torch with CUDA).

FROM python:3.11-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /srv

FROM base AS api-deps
COPY pyproject.toml README.md ./
COPY app ./app
COPY worker ./worker
RUN python -m venv /venv && /venv/bin/pip install .

FROM api-deps AS worker-deps
# PyPI's Linux torch wheel carries its CUDA libraries; the GPU is reached through the NVIDIA runtime.
RUN /venv/bin/pip install ".[worker]"

FROM base AS api
COPY --from=api-deps /venv /venv
COPY migrations ./migrations
COPY app ./app
COPY worker ./worker
ENV PATH=/venv/bin:$PATH COMPACTOR_DATA_DIR=/data
RUN useradd --uid 10001 compactor && mkdir -p /data && chown compactor /data
USER compactor
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
CMD ["compactor", "serve", "--no-worker", "--host", "0.0.0.0", "--port", "8000", "--workers", "2"]

FROM base AS worker
# bubblewrap is the sandbox every uploaded model runs in (README, "The model sandbox").
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*
COPY --from=worker-deps /venv /venv
COPY migrations ./migrations
COPY app ./app
COPY worker ./worker
ENV PATH=/venv/bin:$PATH COMPACTOR_DATA_DIR=/data COMPACTOR_WORKER_DEVICE=auto
RUN useradd --uid 10001 compactor && mkdir -p /data && chown compactor /data
USER compactor
CMD ["compactor", "worker", "--concurrency", "1"]
