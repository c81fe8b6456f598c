#!/usr/bin/env bash
# Run here, before the device check: downloads into wheels/ (ignored by git; the device tool
# carries it: carry ["wheels"]) the wheels the device machine needs beside its own torch, Triton
# and CUDA, for its Python 3.12 on x86-64 Linux: this project's runtime dependencies and what
# tests/test_engine_cuda.py and bench/gpu.py use (pytest, transformers), at the versions this
# checkout's .venv runs. Not torch, Triton or NVIDIA's libraries: the machine has its own.
set -euo pipefail
cd "$(dirname "$0")/.."
venv_python="${VENV_PYTHON:-.venv/bin/python}"
# what the engine, the tiers, the tests of the CUDA path and the bench import, and their dependencies
keep='^(granian|uvloop|pydantic|pydantic[-_]core|pydantic[-_]settings|annotated[-_]types|typing[-_]extensions|typing[-_]inspection|python[-_]dotenv|watchfiles|anyio|idna|sniffio|tomli|structlog|pyzmq|msgspec|prometheus[-_]client|safetensors|numpy|tokenizers|huggingface[-_]hub|filelock|fsspec|packaging|pyyaml|requests|urllib3|certifi|charset[-_]normalizer|tqdm|jinja2|markupsafe|xgrammar|transformers|regex|pytest|pytest[-_]timeout|pytest[-_]xdist|execnet|iniconfig|pluggy|pygments|httpx|httpcore|h11|h2|hpack|hyperframe|click|typer|shellingham|rich|markdown[-_]it[-_]py|mdurl|sentencepiece|ninja|pybind11)=='
"$venv_python" -m pip freeze --exclude-editable | grep -iE "$keep" > wheels.txt || true
mkdir -p wheels
"$venv_python" -m pip download --dest wheels --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_5_x86_64 --platform linux_x86_64 --platform any \
  -r wheels.txt
rm -f wheels.txt
du -sh wheels
