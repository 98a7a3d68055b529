#!/usr/bin/env bash
# LoRA vs DyLoRA vs Matryoshka on SmolLM2-135M-Instruct and GSM8K: a learning-rate sweep, three final runs with
# the same data, steps and r_max, and the loss and accuracy at every rank of S. docs/results.md reports the
# outcome.
#
# Usage: GSM8K_DIR=/path/to/gsm8k experiments/gsm8k/run.sh [sweep|final|eval|package|all]
# GSM8K_DIR must hold GSM8K's train.jsonl and test.jsonl. Finished runs are skipped, so the script can be resumed.
set -euo pipefail

GSM8K_DIR=${GSM8K_DIR:?set GSM8K_DIR to a folder with GSM8K train.jsonl and test.jsonl}
WORK=${WORK:-runs/gsm8k}
MATLORA=${MATLORA:-matlora}
STEPS=${STEPS:-120}                 # optimizer steps of a final run (batch 8: 960 examples)
SWEEP_STEPS=${SWEEP_STEPS:-60}      # optimizer steps of a sweep run
LEARNING_RATES=${LEARNING_RATES:-"1e-4 3e-4 1e-3"}
KINDS=${KINDS:-"lora dylora matryoshka"}
LOSS_EXAMPLES=${LOSS_EXAMPLES:-300}          # test questions for the answer-token loss
ACCURACY_EXAMPLES=${ACCURACY_EXAMPLES:-300}  # test questions for greedy exact-match accuracy
ACCURACY_RANKS=${ACCURACY_RANKS:-0,1,2,4,8,16,32}  # ranks at which accuracy is measured
ACCURACY_BATCH=${ACCURACY_BATCH:-96}         # running sequences of the engine that generates the answers

mkdir -p "$WORK/sweep" "$WORK/final"
# The last 200 training examples are held out for choosing the learning rate; training reads the first 7,200.
tail -n 200 "$GSM8K_DIR/train.jsonl" > "$WORK/validation.jsonl"

COMMON=(--model smollm2-135m-instruct --train-file "$GSM8K_DIR/train.jsonl" --train-limit 7200
        --r-max 32 --ranks 1,2,4,8,16,32 --scale-rule sqrt --batch-size 8 --max-length 384
        --dtype bfloat16 --seed 0 --lr-schedule cosine --no-progress --log-every 10)

run_sweep() {
  for kind in $KINDS; do
    for lr in $LEARNING_RATES; do
      out="$WORK/sweep/$kind-lr$lr"
      [ -f "$out/adapter_model.safetensors" ] || \
        "$MATLORA" train "${COMMON[@]}" --adapter-kind "$kind" --learning-rate "$lr" \
          --max-steps "$SWEEP_STEPS" --warmup-steps 3 --output-dir "$out" 2>&1 | tee "$out.log"
      [ -f "$out.eval.json" ] || \
        "$MATLORA" eval --model smollm2-135m-instruct --adapter "$out" --data "$WORK/validation.jsonl" \
          --limit 100 --ranks 1,2,4,8,16,32 --metrics loss --dtype bfloat16 --output "$out.eval.json"
    done
  done
}

# Print the sweep learning rate with the lowest validation loss: log2 AURAC over S for dylora and matryoshka,
# the loss at r_max for lora (its only trained rank).
best_lr() {
  python3 - "$WORK/sweep" "$1" $LEARNING_RATES <<'EOF'
import json, sys
folder, kind, *rates = sys.argv[1:]
def score(rate):
    curve = json.load(open(f"{folder}/{kind}-lr{rate}.eval.json"))["curves"][0]
    if kind == "lora":
        return [r["answer_loss"] for r in curve["ranks"] if r["rank"] == 32][0]
    return curve["aurac"]["answer_loss"]["log2"]
print(min(rates, key=score))
EOF
}

run_final() {
  for kind in $KINDS; do
    lr=$(best_lr "$kind")
    out="$WORK/final/$kind"
    [ -f "$out/adapter_model.safetensors" ] || \
      "$MATLORA" train "${COMMON[@]}" --adapter-kind "$kind" --learning-rate "$lr" \
        --max-steps "$STEPS" --warmup-steps 12 --save-every 60 --save-dtype bfloat16 --output-dir "$out" \
        2>&1 | tee "$out.log"
  done
}

# Both curves cover every rank of S on the same test questions. Accuracy generates the answers of all ranks of a
# curve through the serving engine in one continuous batch (see docs/training.md).
run_eval() {
  local adapters=(--adapter "$WORK/final/lora" --label LoRA --rule paper
                  --adapter "$WORK/final/dylora" --label DyLoRA --rule paper
                  --adapter "$WORK/final/matryoshka" --label Matryoshka --rule paper,partial_sum)
  [ -f "$WORK/final/eval_loss.json" ] || \
    "$MATLORA" eval --model smollm2-135m-instruct "${adapters[@]}" --data "$GSM8K_DIR/test.jsonl" \
      --limit "$LOSS_EXAMPLES" --ranks 0,1,2,4,8,16,32 --metrics loss --batch-size 16 --dtype float32 \
      --output "$WORK/final/eval_loss.json" --plot "$WORK/final/loss_curves.png" | tee "$WORK/final/eval_loss.txt"
  [ -f "$WORK/final/eval_accuracy.json" ] || \
    "$MATLORA" eval --model smollm2-135m-instruct "${adapters[@]}" --data "$GSM8K_DIR/test.jsonl" \
      --limit "$ACCURACY_EXAMPLES" --ranks "$ACCURACY_RANKS" --metrics accuracy --max-new-tokens 256 \
      --batch-size "$ACCURACY_BATCH" --dtype float32 \
      --output "$WORK/final/eval_accuracy.json" --plot "$WORK/final/accuracy_curves.png" \
      | tee "$WORK/final/eval_accuracy.txt"
}

# Package the Matryoshka run as the bundled adapter, with the rule whose loss curve measured better.
run_package() {
  local accuracy=()
  [ -f "$WORK/final/eval_accuracy.json" ] && accuracy=(--accuracy "$WORK/final/eval_accuracy.json")
  python3 "$(dirname "$0")/package_adapter.py" "$WORK/final/matryoshka" "$WORK/final/eval_loss.json" \
    "${ADAPTER_OUT:-adapters/smollm2-135m-gsm8k-matryoshka}" "${accuracy[@]}"
}

case "${1:-all}" in
  sweep) run_sweep ;;
  final) run_final ;;
  eval) run_eval ;;
  package) run_package ;;
  all) run_sweep; run_final; run_eval; run_package ;;
  *) echo "usage: $0 [sweep|final|eval|package|all]" >&2; exit 2 ;;
esac
