#!/bin/bash
# The GPU check: `make gpu-check` (or `bash experiments/gpu/run.sh [OUTDIR [SECTION ...]]`) on a CUDA
# machine, from the project root. No network needed. About 8 minutes on an H100 before the compiled
# section and the compiled training jobs were added (their cold compiles are not yet timed).
# SECTIONs (default: all, in this order): tests kernels bench compiled train recompute. A device lent
# for calls of at most 10 minutes runs them as two calls: `tests kernels bench`, then `compiled train
# recompute`
# (later calls append to the same OUTDIR's CSV/JSONL).
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
for s in "${SECTIONS[@]}"; do
  case $s in tests|kernels|bench|compiled|train|recompute) ;; *) echo "run.sh: unknown section '$s' (tests kernels bench compiled train recompute)"; exit 2;; esac
done
want() { [[ " ${SECTIONS[*]} " == *" $1 "* ]]; }
exec > >(tee -a "$OUT/run.log") 2>&1
echo "== sections: ${SECTIONS[*]} ($(date -u +%FT%TZ))"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2  # 8 test workers × 2 threads
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || { echo "no CUDA device"; exit 2; }
$PY -c "import torch, triton, transformers, peft; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

if want tests; then
echo "== CUDA tests (wandb's own test needs the wandb package: left out when it is missing)"
sel=$($PY -c "import wandb" 2>/dev/null && echo "" || echo "not wandb")
timeout 420 $PY -m pytest -q -p no:cacheprovider -n 8 --timeout 400 --durations 8 -m "not slow" ${sel:+-k "$sel"} tests > "$OUT/pytest_cuda.log" 2>&1
echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)|passed|failed|s call" "$OUT/pytest_cuda.log" | tail -30
fi

if want kernels; then
echo "== fused kernel vs eager vs pyreft"
timeout 150 $PY experiments/kernels/bench_kernels.py --out "$OUT/kernels.csv" > "$OUT/kernels.log" 2>&1; echo "kernels rc=$?"
timeout 60 $PY experiments/kernels/bench_factors.py --device cuda --out "$OUT/factors.csv"; echo "factors rc=$?"
timeout 90 $PY experiments/kernels/kernel_resources.py --widths 576 2048 4096 --ranks 4 16 --label "this machine's Triton" \
  --out "$OUT/kernel_resources.csv" > "$OUT/kernel_resources.log" 2>&1; echo "kernel resources rc=$?"
fi

if want bench; then
echo "== one training step at four scales (each provider alone)"
for scale in smol_A smol_b32 llama1b_b16 llama7b_b8; do
  timeout 200 $PY -m reft_lab.cli bench --scale "$scale" --warmup 3 --steps 10 --out "$OUT/bench" \
    --providers reft_lab_loreft reft_lab_loreft_eager pyreft_loreft peft_lora reft_lab_lora floor 2>&1 | grep -E "median|Error|error" ; echo "$scale rc=$?"
done
fi
if want compiled; then
echo "== compiled blocks, and replayed as CUDA graphs (trainer.compile, trainer.cuda_graphs): launch-bound config A, and 1B"
for scale in smol_A llama1b_b16; do
  timeout 200 $PY -m reft_lab.cli bench --scale "$scale" --warmup 4 --steps 10 --out "$OUT/bench" \
    --providers reft_lab_loreft reft_lab_loreft_compiled reft_lab_loreft_graphs floor 2>&1 | grep -E "median|Error|error" ; echo "$scale compiled rc=$?"
done
fi

if want train; then
echo "== short real training jobs (random SmolLM2 weights, its tokenizer): LoReFT with and without the prefix cache, LoRA; the default bf16 base (model.dtype=auto), and both on an fp32 one"
model=$PWD/.gpu/smol
[ -f "$model/config.json" ] || model=${REFT_LAB_CACHE:-$HOME/.cache/reft_lab}/models/smollm2-135m-instruct
rnd=/tmp/reft_lab_random_smol; mkdir -p $rnd; cp "$model"/*.json "$model"/*.jinja $rnd/ 2>/dev/null
$PY -c "
import torch; from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0); AutoModelForCausalLM.from_config(AutoConfig.from_pretrained('$rnd')).save_pretrained('$rnd')" > /dev/null 2>&1
for v in "method=lora" "method=loreft method.layers=[6,12,18,24] trainer.prefix_cache=false" \
         "method=loreft method.layers=[6,12,18,24] trainer.prefix_cache=true" "method=loreft" \
         "method=lora model.dtype=float32" "method=loreft method.layers=[6,12,18,24] model.dtype=float32" \
         "method=loreft method.layers=[6,12,18,24] trainer.compile=true" \
         "method=loreft method.layers=[6,12,18,24] trainer.compile=true trainer.cuda_graphs=true"; do
  rm -rf /tmp/reft_lab_job
  timeout 150 $PY -m reft_lab.cli train model=hf model.name_or_path=$rnd logger=none trainer.max_steps=60 task.train_size=64 \
    task.test_size=8 retention.knowledge_probe=8 retention.kl_prompts=4 retention.leakage_prompts=4 $v hydra.run.dir=/tmp/reft_lab_job \
    > /tmp/reft_lab_job.log 2>&1
  $PY -c "
import json, sys, datetime; m = json.load(open('/tmp/reft_lab_job/metrics.json'))
row = {'job': sys.argv[1], 'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), 'status': m['status'], 'tokens_per_s': m.get('tokens_per_s'), 'first_step_s': m.get('first_step_s'),
       'train_wall_s': m.get('train_wall_s'), 'final_loss': m.get('final_loss')}
print(json.dumps(row)); open(sys.argv[2], 'a').write(json.dumps(row) + '\n')" "$v" "$OUT/train.jsonl" || tail -3 /tmp/reft_lab_job.log
  grep -h "prefix cache" /tmp/reft_lab_job.log
done
fi

if want recompute; then
echo "== the opt-in MLP recompute (trainer.recompute_mlp) at the 7B shape: its memory and step"
for scale in llama7b_b8; do
  timeout 150 $PY -m reft_lab.cli bench --scale "$scale" --warmup 2 --steps 6 --out "$OUT/bench" \
    --providers reft_lab_loreft_recompute 2>&1 | grep -E "median|Error|error" ; echo "$scale recompute rc=$?"
done
fi

echo "== the GPU issue's goals, from everything in $OUT so far"
$PY experiments/gpu/goals.py "$OUT" | tee "$OUT/goals.md"
