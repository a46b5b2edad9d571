#!/usr/bin/env bash
# Training throughput alone and beside a second busy process (issue 15): the same short full-training job (the embedded
# model's shape, byte-level tokenizer so that any LoraMix build can run it) timed
#   alone | beside a CPU hog (2 busy single-threaded processes) | beside a second identical training job
# with the CLI given as $1 (default: this checkout's ./loramix). Run it once with a build from before the OpenMP wait-policy
# change and once after, on an otherwise idle machine:
#   bench/contention/run.sh                                   # this checkout
#   bench/contention/run.sh "dotnet /path/to/old/LoraMix.Cli.dll"
# Prints one line per condition: tokens/s (steps 5..N of metrics.jsonl) and the slowdown against "alone".
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cli="${1:-$root/loramix}"
steps="${STEPS:-20}"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
cat > "$work/recipe.yaml" <<YAML
model_init: {hidden_size: 384, intermediate_size: 1024, num_hidden_layers: 6, num_attention_heads: 6, num_key_value_heads: 2,
             head_dim: 64, max_position_embeddings: 512, tie_word_embeddings: true, tokenizer: byte-level, seed: 0}
dataset: {task_world: {families: pretrain, count: 2000, seed: 0, split: train, placement: mixed}}
cutoff_len: 256
learning_rate: 1.0e-3
max_steps: $steps
batch_size: 8
logging_steps: 5
save_steps: 100000
overwrite_output_dir: true
YAML
# tokens/s over the logged windows after the first (libtorch warm-up), from metrics.jsonl
rate() { python3 -c '
import json,sys
rows=[json.loads(l) for l in open(sys.argv[1]) if "tokens_per_s" in l]
r=rows[1:] or rows
print(round(sum(x["tokens_per_s"] for x in r)/len(r),1))' "$1/metrics.jsonl"; }
train() { $cli train --config "$work/recipe.yaml" --set "output_dir=$1" >"$1.log" 2>&1; }
run_alone() { train "$work/alone"; rate "$work/alone"; }
run_hog() {
  for _ in 1 2; do (sha256sum /dev/zero >/dev/null 2>&1 &) ; done
  train "$work/hog"; pkill -f "sha256sum /dev/zero" || true; rate "$work/hog"; }
run_twin() { train "$work/twin2" & local pid=$!; train "$work/twin"; wait $pid; rate "$work/twin"; }
echo "cli: $cli; OMP_WAIT_POLICY in the environment: ${OMP_WAIT_POLICY:-unset}; $(nproc) cores; $(date -u +%F)"
a=$(run_alone); echo "alone:                      $a tokens/s"
h=$(run_hog);   echo "beside a CPU hog (2 procs):  $h tokens/s  ($(python3 -c "print(round($a/$h,2))")x slower)"
t=$(run_twin);  echo "beside a second training:    $t tokens/s  ($(python3 -c "print(round($a/$t,2))")x slower)"
