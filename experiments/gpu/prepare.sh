#!/bin/bash
# Here (with network), from the project root after `make setup`: what a GPU machine without network
# needs to run experiments/gpu/run.sh, into two folders git ignores:
#   .whl/  wheels of the packages a torch + Triton image lacks (the venv's versions): hydra-core,
#          omegaconf, antlr4 (built from its sdist), the sweep launchers and optuna with their
#          needs, pyreft, pyvene, datasets, dill, multiprocess, gguf; plus the venv's transformers,
#          tokenizers and peft unless KEEP_IMAGE_TRANSFORMERS=1 (then the image's own are tested).
#   .gpu/  the embedded model's tokenizer and config (random weights are built there from it).
# Then, there: bash experiments/gpu/run.sh OUTDIR   (carry .whl and .gpu)
set -euo pipefail
[ -x .venv/bin/python ] || { echo "run from the project root after make setup" >&2; exit 2; }
for d in /.whl/ /.gpu/; do grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
rm -rf .whl .gpu; mkdir -p .whl .gpu/smol
pin() { .venv/bin/python -c "import importlib.metadata as m; print('$1=='+m.version('$1'))"; }
pkgs=(hydra-core omegaconf hydra-joblib-launcher hydra-submitit-launcher submitit hydra-optuna-sweeper optuna sqlalchemy
      alembic mako cmaes colorlog cliff stevedore autopage cmd2 prettytable greenlet pyreft pyvene datasets dill
      multiprocess gguf)
[ "${KEEP_IMAGE_TRANSFORMERS:-0}" = 1 ] || pkgs+=(transformers tokenizers peft)
specs=(); for p in "${pkgs[@]}"; do specs+=("$(pin "$p")"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 "${specs[@]}"
t=$(mktemp -d); python3 -m pip download -q --no-deps --no-binary=:all: -d "$t" "$(pin antlr4-python3-runtime)"
python3 -m pip wheel -q --no-deps "$t"/*.tar.gz -w .whl
m=${REFT_LAB_CACHE:-$HOME/.cache/reft_lab}/models/smollm2-135m-instruct
[ -f "$m/config.json" ] || .venv/bin/python -c "from reft_lab.models import ModelConfig, load_model; load_model(ModelConfig(device='cpu'))"
cp "$m"/{config.json,generation_config.json,tokenizer.json,tokenizer_config.json} .gpu/smol/
cp "$m"/chat_template.jinja .gpu/smol/ 2>/dev/null || true
du -sh .whl .gpu
