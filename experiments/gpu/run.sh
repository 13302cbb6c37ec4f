#!/bin/bash
# The GPU check: `make gpu-check` (or `[BUDGET_S=N] bash experiments/gpu/run.sh [OUTDIR [SECTION ...]]`)
# on a CUDA machine, from the project root. No network needed. All of it took about 8 minutes on an
# H100 before the compiled section, the compiled training jobs and the recompute section were added.
# SECTIONs run in the order given (default: tests kernels bench compiled train recompute):
#   tests       the whole test suite on the GPU (5.5 min on the H100 with 8 workers)
#   tests-cuda  only the test files that build models and tensors on the device under test
#   kernels     the fused kernel against eager and pyreft, the batched factors, registers and spills
#   bench       one training step at four scales, each provider alone (floor and MFU included)
#   compiled    compiled blocks, and replayed as CUDA graphs, at config A and 1B
#   train       short real `reft-lab train` jobs, the goal comparisons first
#   recompute   the opt-in MLP recompute at the 7B shape
# BUDGET_S (seconds, optional) bounds the whole call: each command's timeout is cut to what is left
# (20 s kept for the goals table), and a command that would get under its minimum is skipped with a
# line saying so. For a lease of 15 minutes of device time, one call of
# `PACK=1 BUDGET_S=480 bash experiments/gpu/run.sh $OUT bench train kernels tests-cuda compiled recompute`
# gets the goals' figures first (later calls append to the same OUTDIR's CSV/JSONL). PACK=1 leaves
# OUTDIR as gpu-check.tar.gz (everything), goals.md and run.log; a later call on a fresh OUTDIR
# continues from an earlier archive unpacked into it first (`tar xzf ARCHIVE -C OUTDIR`).
#
# Needs torch and Triton (any CUDA build pyproject allows), pytest with pytest-xdist and
# pytest-timeout, and the project's other packages. A machine without them takes wheels made
# elsewhere by `bash experiments/gpu/prepare.sh` (copy .whl/ and .gpu/ beside this checkout): they
# install into /tmp/site. The training job builds random weights from the embedded model's config
# in .gpu/smol (prepare.sh copies it; else the model must already be converted in the cache).
#
# Writes into OUTDIR (default experiments/gpu/latest): pytest_cuda.log, kernels.csv (the kernel
# benchmark), factors.csv (LoReFT's batched factors against a QR per intervention), kernel_resources.csv
# (the kernels' registers and spills as this machine's Triton compiles them), bench/train_step.{jsonl,csv} (`reft-lab bench --scale` at four scales, floor and MFU
# included; compiled blocks and CUDA graphs at two; the opt-in MLP recompute at 7B), train.jsonl (short real `reft-lab train` jobs: tokens/s, first
# step, compile and CUDA graphs among them), goals.md (the GPU issue's goals table, `goals.py`) and run.log.
set -uo pipefail
OUT=${1:-experiments/gpu/latest}; mkdir -p "$OUT/bench"
SECTIONS=(tests kernels bench compiled train recompute)
[ $# -gt 1 ] && SECTIONS=("${@:2}")
ALL="tests tests-cuda kernels bench compiled train recompute"
for s in "${SECTIONS[@]}"; do
  [[ " $ALL " == *" $s "* ]] || { echo "run.sh: unknown section '$s' ($ALL)"; exit 2; }
done
[[ "${BUDGET_S:-}" =~ ^[0-9]*$ ]] || { echo "run.sh: BUDGET_S='$BUDGET_S' is not a number of seconds"; exit 2; }
# bounded LIMIT MIN LABEL CMD...: CMD under `timeout LIMIT`, cut to the budget left (20 s kept for the
# goals table); skipped, with a line on the console, when that leaves under MIN seconds (status 99)
bounded() {
  local limit=$1 min=$2 label=$3; shift 3
  if [ -n "${BUDGET_S:-}" ]; then
    local left=$((BUDGET_S - SECONDS - 20))
    ((left < limit)) && limit=$left
    if ((limit < min)); then echo "$label: skipped: ${left} s of BUDGET_S=$BUDGET_S usable, needs $min" >&3; return 99; fi
  fi
  timeout "$limit" "$@"
}
exec > >(tee -a "$OUT/run.log") 2>&1 3>&1  # 3: the console, for lines of commands whose output goes to a file
echo "== sections: ${SECTIONS[*]} ($(date -u +%FT%TZ))${BUDGET_S:+, budget $BUDGET_S s}"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2  # 8 test workers × 2 threads
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no CUDA device"; exit 2; }
$PY -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

pytest_on() {  # LABEL LIMIT FILES...: the suite (or those files) on the GPU, wandb's own test left out without wandb
  local label=$1 limit=$2; shift 2
  local sel; sel=$($PY -c "import wandb" 2>/dev/null && echo "" || echo "not wandb")
  bounded "$limit" 90 "$label" $PY -m pytest -q -p no:cacheprovider -n 8 --timeout 400 --durations 8 -m "not slow" ${sel:+-k "$sel"} "$@" \
    > "$OUT/pytest_cuda.log" 2>&1
  echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed|s call" "$OUT/pytest_cuda.log" | tail -30
}

section_tests() {
  echo "== CUDA tests, the whole suite"
  pytest_on tests 420 tests
}

section_tests-cuda() {
  echo "== CUDA tests: the files that build models and tensors on the device under test"
  pytest_on tests-cuda 240 tests/test_kernels.py tests/test_hot_path.py tests/test_methods.py tests/test_interventions.py \
    tests/test_models.py tests/test_pyreft_parity.py tests/test_positions.py tests/test_analysis.py \
    tests/test_sweeps.py::test_one_job_on_two_processes_saves_once
}

section_kernels() {
  echo "== fused kernel vs eager vs pyreft"
  bounded 150 60 kernels $PY experiments/kernels/bench_kernels.py --out "$OUT/kernels.csv" > "$OUT/kernels.log" 2>&1; echo "kernels rc=$?"
  bounded 60 30 factors $PY experiments/kernels/bench_factors.py --device cuda --out "$OUT/factors.csv"; echo "factors rc=$?"
  bounded 90 30 "kernel resources" $PY experiments/kernels/kernel_resources.py --widths 576 2048 4096 --ranks 4 16 \
    --label "this machine's Triton" --out "$OUT/kernel_resources.csv" > "$OUT/kernel_resources.log" 2>&1; echo "kernel resources rc=$?"
}

bench_at() {  # SCALE LABEL MIN WARMUP STEPS PROVIDERS...: one `reft-lab bench` call, its median lines
  local scale=$1 label=$2 min=$3 warmup=$4 steps=$5; shift 5
  bounded 200 "$min" "$label" $PY -m reft_lab.cli bench --scale "$scale" --warmup "$warmup" --steps "$steps" --out "$OUT/bench" \
    --providers "$@" 2>&1 | grep -E "median|Error|error|skipped"
  echo "$label rc=${PIPESTATUS[0]}"
}

section_bench() {
  echo "== one training step at four scales (each provider alone)"
  for scale in smol_A smol_b32 llama1b_b16; do
    bench_at "$scale" "$scale" 60 3 10 reft_lab_loreft reft_lab_loreft_eager pyreft_loreft peft_lora reft_lab_lora floor
  done
  # 7B: fewer steps, no eager edit (the same step within 1% on the H100)
  for scale in llama7b_b8; do bench_at "$scale" "$scale" 90 2 6 reft_lab_loreft pyreft_loreft peft_lora floor; done
}

section_compiled() {
  echo "== compiled blocks, and replayed as CUDA graphs (trainer.compile, trainer.cuda_graphs): launch-bound config A, and 1B"
  for scale in smol_A llama1b_b16; do
    bench_at "$scale" "$scale compiled" 90 4 10 reft_lab_loreft reft_lab_loreft_compiled reft_lab_loreft_graphs floor
  done
}

section_train() {
  echo "== short real training jobs (random SmolLM2 weights, its tokenizer): LoRA and LoReFT on the default bf16 base (model.dtype=auto) first, then an fp32 base, then compiled"
  local model=$PWD/.gpu/smol
  [ -f "$model/config.json" ] || model=${REFT_LAB_CACHE:-$HOME/.cache/reft_lab}/models/smollm2-135m-instruct
  local rnd=/tmp/reft_lab_random_smol; mkdir -p $rnd; cp "$model"/*.json "$model"/*.jinja $rnd/ 2>/dev/null
  $PY -c "
import torch; from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0); AutoModelForCausalLM.from_config(AutoConfig.from_pretrained('$rnd')).save_pretrained('$rnd')" > /dev/null 2>&1
  for v in "method=lora" "method=loreft method.layers=[6,12,18,24] trainer.prefix_cache=true" "method=loreft" \
           "method=loreft method.layers=[6,12,18,24] trainer.prefix_cache=false" \
           "method=lora model.dtype=float32" "method=loreft method.layers=[6,12,18,24] model.dtype=float32" \
           "method=loreft method.layers=[6,12,18,24] trainer.compile=true" \
           "method=loreft method.layers=[6,12,18,24] trainer.compile=true trainer.cuda_graphs=true"; do
    rm -rf /tmp/reft_lab_job
    bounded 150 60 "train $v" $PY -m reft_lab.cli train model=hf model.name_or_path=$rnd logger=none trainer.max_steps=60 task.train_size=64 \
      task.test_size=8 retention.knowledge_probe=8 retention.kl_prompts=4 retention.leakage_prompts=4 $v hydra.run.dir=/tmp/reft_lab_job \
      > /tmp/reft_lab_job.log 2>&1
    [ $? -eq 99 ] && { cat /tmp/reft_lab_job.log; continue; }
    $PY -c "
import json, sys, datetime; m = json.load(open('/tmp/reft_lab_job/metrics.json'))
row = {'job': sys.argv[1], 'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), 'status': m['status'], 'tokens_per_s': m.get('tokens_per_s'), 'first_step_s': m.get('first_step_s'),
       'train_wall_s': m.get('train_wall_s'), 'final_loss': m.get('final_loss')}
print(json.dumps(row)); open(sys.argv[2], 'a').write(json.dumps(row) + '\n')" "$v" "$OUT/train.jsonl" || tail -3 /tmp/reft_lab_job.log
    grep -h "prefix cache" /tmp/reft_lab_job.log
  done
}

section_recompute() {
  echo "== the opt-in MLP recompute (trainer.recompute_mlp) at the 7B shape: its memory and step"
  for scale in llama7b_b8; do bench_at "$scale" "$scale recompute" 90 2 6 reft_lab_loreft_recompute; done
}

for s in "${SECTIONS[@]}"; do "section_$s"; done
echo "== the GPU issue's goals, from everything in $OUT so far ($SECONDS s)"
$PY experiments/gpu/goals.py "$OUT" | tee "$OUT/goals.md"
if [ -n "${PACK:-}" ]; then  # one archive of everything (a transfer that takes back few files), goals.md beside it
  archive=$(mktemp -d)/gpu-check.tar.gz
  tar czf "$archive" -C "$OUT" . && find "$OUT" -mindepth 1 ! -name goals.md ! -name run.log -delete \
    && mv "$archive" "$OUT/" && echo "packed into $OUT/gpu-check.tar.gz"
fi
