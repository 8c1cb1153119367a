#!/usr/bin/env bash
# Evaluate a saved cascade with 2 processes (GPUs when present, else CPU + gloo) through accelerate's launcher.
# Every process takes its share of the batches; the gathered numbers equal a single-process run.
#
#   bash examples/evaluate_multiprocess.sh CASCADE_DIR DATASET SPLIT RESULTS_FILE [NUM_PROCESSES]
#   bash examples/evaluate_multiprocess.sh cifar10-cascade cifar10 'test[50%:]' results.json
#
# The same works with torchrun:  torchrun --nproc_per_node 2 -m hf_tinysaver.commands evaluate ...
set -euo pipefail
model=${1:?cascade folder or Hub id}
dataset=${2:?dataset (zoo name, folder or Hub id)}
split=${3:?split, e.g. 'test[50%:]'}
results=${4:?results JSON file}
processes=${5:-2}
# On CPU, `--cpu --num_processes N` silently runs a single process; --multi_gpu falls back to CPU + gloo.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
accelerate launch --multi_gpu --num_processes "$processes" --num_machines 1 --mixed_precision no \
  --dynamo_backend no -m hf_tinysaver.commands evaluate \
  --model "$model" --dataset "$dataset" --split "$split" --results-file "$results" --no-progress
