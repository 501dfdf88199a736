#!/usr/bin/env bash
# The GPU checks of issue 14, prepared on the CPU. A session with a GPU copies this file to .gpu/after_tests.sh
# (after `bash ../shared/gpu/prepare.sh`); `.gpu/run_on_gpu.sh` runs it after the test suite with megatron-core
# 0.16.1 and the project on PYTHONPATH and $OUT for results. Every section has its own time limit and writes as it
# goes, so a run cut short still reports what finished (docs/performance.md, GPU section).
#   1. train_gpt_dpo.py, train_gpt_spin.py, train_gpt_self_rewarding.py: a few steps on a ~0.6B Llama (random weights,
#      benchmarks/common.py shape "0.5b") in bf16 + megatron_amp_O2; the first DPO loss must be log 2 (bf16 tolerance).
#   2. benchmarks/dpo_throughput.py (ours vs TRL default and precompute_ref_log_probs, 512-token pairs) and
#      benchmarks/generation_throughput.py (ours vs HF generate at batch 1 and 64), JSON into $OUT.
# Knobs: AFTER_S (seconds per section, default 150), SKIP (space-separated section names to skip).
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
WORK=${WORK:-/tmp/gpu_work}; mkdir -p "$WORK"
export HYDRA_FULL_ERROR=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
LIMIT=${AFTER_S:-150}
T0=$(date +%s)
say() { echo "[after_tests $(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/after_tests_summary.txt"; }
skip() { [[ " ${SKIP:-} " == *" $1 "* ]]; }
section() {  # section NAME COMMAND...: run with a time limit, log to $OUT/NAME.log, report rc
  local name=$1; shift
  if skip "$name"; then say "$name: skipped"; return; fi
  timeout "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
  say "$name: rc=$? $(tail -1 "$OUT/$name.log" | cut -c1-200)"
}
BF16=(trainer.precision=bf16 model.megatron_amp_O2=true)

python3 -c "import sys; sys.path.insert(0, '.'); from benchmarks.common import build_models; from pathlib import Path; \
print(build_models(Path('$WORK'), '0.5b')[1])" > "$WORK/nemo_path.txt" 2> "$OUT/build_model.log"
NEMO=$(tail -1 "$WORK/nemo_path.txt"); say "model: $NEMO"

section dpo python3 examples/nlp/gpt/train_gpt_dpo.py "${BF16[@]}" \
  pretrained_checkpoint.restore_from_path="$NEMO" exp_manager.explicit_log_dir="$OUT/dpo_run" \
  model.global_batch_size=8 model.micro_batch_size=4 trainer.dpo.max_steps=3 trainer.dpo.val_check_interval=3 \
  trainer.dpo.save_interval=3 trainer.dpo.limit_val_batches=1 model.optim.name=distributed_fused_adam \
  model.optim.lr=1e-5 model.optim.sched.name=Constant
python3 - "$OUT/dpo_run/csv/metrics.csv" <<'PY' 2>&1 | tee -a "$OUT/after_tests_summary.txt"
import csv, math, sys
try:
    rows = [r for r in csv.DictReader(open(sys.argv[1])) if r.get("train/loss")]
    first = float(rows[0]["train/loss"])
    print(f"first DPO loss {first:.6f} vs log 2 {math.log(2):.6f}: {'OK' if abs(first - math.log(2)) < 2e-2 else 'WRONG'}")
except Exception as err:  # noqa: BLE001
    print(f"first DPO loss: not available ({err})")
PY

section spin python3 examples/nlp/gpt/train_gpt_spin.py --config-name gpt_spin_tiny "${BF16[@]}" \
  pretrained_checkpoint.restore_from_path="$NEMO" exp_manager.explicit_log_dir="$OUT/spin_run" \
  trainer.spin.max_iterations=1 trainer.spin.limit_train_batches=2 trainer.spin.limit_val_batches=1 \
  model.global_batch_size=8 model.micro_batch_size=4 model.spin.length_params.max_length=32

section self_rewarding python3 examples/nlp/gpt/train_gpt_self_rewarding.py --config-name gpt_self_rewarding_tiny \
  "${BF16[@]}" pretrained_checkpoint.restore_from_path="$NEMO" exp_manager.explicit_log_dir="$OUT/sr_run" \
  trainer.self_rewarding.max_iterations=1 trainer.self_rewarding.limit_train_batches=1 \
  trainer.self_rewarding.limit_val_batches=1 model.spin.length_params.max_length=32

GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo gpu)
section generation_bench python3 benchmarks/generation_throughput.py --device cuda --precision bf16 --model 0.5b \
  --batches 1 64 --prompt_length 128 --new_tokens 128 --rounds 2 --arms ours hf --work_dir "$WORK" \
  --out "$OUT/generation_0.5b_$GPU.json"
section dpo_bench python3 benchmarks/dpo_throughput.py --device cuda --precision bf16 --model 0.5b --pair_tokens 512 \
  --pairs 128 --batch 16 --epochs 1 --rounds 1 --arms ours trl_default trl_precompute --work_dir "$WORK" \
  --out "$OUT/dpo_0.5b_$GPU.json"
say done
