# fcdistill GPU image: serve a student with the vLLM engine (default command) or train it with
# `accelerate launch -m fcdistill.train`. Build and run commands: docs/docker.md.
#
# Two virtual environments, because one cannot hold both:
#   /opt/vllm   vllm + fcdistill with what serving imports (no training or BFCL extras). The default
#               command runs /opt/vllm/bin/fcd.
#   /opt/train  torch + fcdistill[ml] (transformers, peft, trl, accelerate, bfcl-eval, ...): training,
#               export, data, eval. /opt/train/bin is on PATH, so `accelerate`, `fcd` and `python`
#               given as a command are this environment's.
# bfcl-eval pins filelock==3.20.0 and vllm requires filelock>=3.20.3; vllm also pins transformers
# below the version the training stack uses. No resolver can satisfy both in one environment.
# Both environments take the same torch (TORCH_VERSION, the one VLLM_VERSION pins), so the image
# has one CUDA (13.0, from the torch wheels); the CUDA base image only supplies the driver
# integration, hence its `base` variant. The host driver must support CUDA 13.0.
# VLLM_VERSION: 0.33.0 needs certifi>=2026.10.19, which the package index this was checked against
# did not have yet; 0.32.0 (torch 2.13.0, the torch the CPU environment tests) resolves.

FROM nvidia/cuda:13.0.0-base-ubuntu24.04 AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive
# python3.12-dev and gcc stay in the final image: Triton (used by vllm and torch) compiles small C
# launchers against Python.h at run time. tini reaps vllm's worker processes as PID 1.
# Ubuntu's security updates replace exact package versions, so apt versions are not pinned.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates gcc libc6-dev python3.12 python3.12-dev python3.12-venv tini \
    && rm -rf /var/lib/apt/lists/*

FROM base AS build
ARG VLLM_VERSION=0.32.0
ARG TORCH_VERSION=2.13.0
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# The heavy, rarely changing layers first: they are reused while only fcdistill's source changes.
RUN python3.12 -m venv /opt/vllm \
    && /opt/vllm/bin/pip install --no-cache-dir "vllm==${VLLM_VERSION}"
RUN python3.12 -m venv /opt/train \
    && /opt/train/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md /src/
COPY fcdistill /src/fcdistill
# vllm is named again so that the resolver keeps its pin while adding fcdistill's `serve` extra (what
# `fcd serve` imports beside the engine). `pip check` fails the build on any broken requirement.
RUN /opt/vllm/bin/pip install --no-cache-dir "vllm==${VLLM_VERSION}" "/src[serve]" \
    && /opt/vllm/bin/pip check
RUN /opt/train/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" "/src[ml]" \
    && /opt/train/bin/pip check

FROM base
RUN groupadd --gid 10001 fcd \
    && useradd --create-home --uid 10001 --gid 10001 --shell /bin/bash fcd \
    && mkdir -p /workspace/runs /models /cache \
    && chown fcd:fcd /workspace /workspace/runs \
    && chmod 1777 /cache
COPY --from=build /opt/vllm /opt/vllm
COPY --from=build /opt/train /opt/train
COPY configs /workspace/configs
# Caches live under /cache (world-writable), so `docker run --user UID:GID` works too; mount a volume
# there to keep downloaded weights and compiled kernels between runs.
ENV PATH="/opt/train/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    FCD_CACHE=/cache/fcdistill \
    XDG_CACHE_HOME=/cache \
    TRITON_CACHE_DIR=/cache/triton
WORKDIR /workspace
USER 10001:10001
EXPOSE 8000
# vLLM loads and compiles for minutes before /health answers: a long start period.
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD ["/opt/vllm/bin/python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=8)"]
ENTRYPOINT ["/usr/bin/tini", "--"]
# Binds 0.0.0.0 because inside a container the published port (-p 8000:8000) reaches the server
# only on the container's own interface; fcd's default elsewhere is 127.0.0.1. Set FCD_API_KEY
# (docker run -e FCD_API_KEY=...) to require a Bearer key on /v1/*. Mount a merged student at
# /models/student, or give another command (docs/docker.md).
CMD ["/opt/vllm/bin/fcd", "serve", "--engine", "vllm", "--host", "0.0.0.0", "--port", "8000", \
     "--model", "/models/student", "--served-model-name", "student"]
