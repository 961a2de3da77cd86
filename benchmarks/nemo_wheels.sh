#!/usr/bin/env bash
# Wheels that let gkd.backend nemo (and benchmarks/bench_nemo.py) run on this workplace's GPU machine
# (Python 3.12, torch 2.11, transformers 5.17, no network): what images/nemo-requirements.txt and this
# package need that its image lacks (the package list of /work/.library/device/KINDS.md), measured by
# importing and running the backend (docs/nemo.md). Two folders, each small enough to travel with the
# working tree in one call (64 MiB): .whl/nemo-a (~43 MiB) and .whl/nemo-b (~25 MiB); .whl/ is
# git-ignored. Usage: bash benchmarks/nemo_wheels.sh   (then the device commands in docs/nemo.md)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PLATFORMS=(--platform any)
for n in 17 24 27 28 31 34 35 39; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# The big ones, and transformers 5.24 (this package's pin; the machine has 5.17).
A=(nemo-toolkit==2.7.3 pulp==3.3.2 numcodecs==0.15.2 transformers==5.24.0)
B=(
    annotated-types==0.8.0 asciitree==1.0.0 bcrypt==5.0.0 catalogue==2.0.10 cffi==2.1.1
    contextlib2==21.6.0 cryptography==50.0.2 datasets==5.2.0 decorator==5.3.1 deprecated==1.3.1
    exceptiongroup==1.3.2
    dill==0.4.1 docstring-parser==0.18.0 fabric==3.2.3 fastapi==0.163.2 fiddle==0.3.1
    google-api-core==2.44.0 google-auth==2.63.0 googleapis-common-protos==1.76.0 graphviz==0.21
    h2==4.4.1 hpack==4.2.0 hydra-core==1.3.2 hyperframe==6.1.0 invoke==2.2.1
    jaraco-context==6.1.0 jaraco-functools==4.4.0 jaraco-text==4.0.0 lazy-importer==0.1.0
    ledoc-ui==0.1.0 leptonai==0.26.9 libcst==1.9.0 lightning==2.4.0 loguru==0.7.3
    megatron-core==0.16.1 more-itertools==10.8.0 multiprocess==0.70.19 nemo-run==0.11.1
    nv-one-logger-core==2.3.1 nv-one-logger-pytorch-lightning-integration==2.3.1
    nv-one-logger-training-telemetry==2.3.1 nvidia-modelopt==0.37.0 omegaconf==2.3.1
    opentelemetry-api==1.45.2 opentelemetry-exporter-prometheus==0.66b2
    opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2
    opentelemetry-semantic-conventions==0.66b2 overrides==7.7.0 paramiko==5.1.0
    prometheus-fastapi-instrumentator==7.0.0 pydantic-core==2.50.5 pydantic==2.14.4
    pynacl==1.6.2 python-multipart==0.0.34 sniffio==1.3.1 starlette==0.52.1 strenum==0.4.15
    toml==0.10.2 torchprofile==0.1.0 torchx==0.7.0 typing-inspection==0.4.5 uvicorn==0.54.0
    zarr==2.18.7
)
# Published as source only (pure Python): built here.
SOURCE_ONLY=(wget==3.2 antlr4-python3-runtime==4.9.3)
rm -rf .whl/nemo-a .whl/nemo-b
mkdir -p .whl/nemo-a .whl/nemo-b
get() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$@"; }
get .whl/nemo-a "${A[@]}"
get .whl/nemo-b "${B[@]}"
"$PY" -m pip wheel -q --no-deps -w .whl/nemo-b "${SOURCE_ONLY[@]}"
du -sh .whl/nemo-a .whl/nemo-b
ls .whl/nemo-a .whl/nemo-b | grep -c whl
