#!/usr/bin/env bash
# The lent-GPU check, in one call: every figure the project needs from a GPU, as tables under $OUT.
#
#   bash benchmarks/gpu_check.sh --wheels     # on the CPU machine, once: the wheels the device lacks, into .whl/
#   bash benchmarks/gpu_check.sh              # on the device (the `device` tool: carry [".whl"], timeout_s 600)
#   bash benchmarks/gpu_check.sh --cpu        # the same stages on small shapes, here: a rehearsal of the GPU call
#
# Stages, each with its own time limit, each writing $OUT/<stage>.log, and one line each in $OUT/summary.txt:
#   1 kernels   tests/test_kernels.py: on CUDA the Triton kernels natively against the PyTorch tiles, and bf16 logits
#               tiles from the tensor-core matmul (out_dtype float32) as exact as float32 tiles (the test prints both
#               errors; expected: equal to a few float32 ulps); tests/test_sampler.py's exponential race: the tokens
#               torch.multinomial draws, bit for bit, on CUDA too
#   1b tiles    bench_logprobs.py, 8192 tokens x 896 x 151936: bf16 inputs (tensor-core tiles) against float32 ones
#               (what bf16 inputs cost until now); expected: bf16 several times faster
#   2 sampler   bench_sampler.py --torch_compile: eager against the compiled decode step, tokens/s, same tokens
#               (GPU: a random Qwen2-0.5B-shaped model, bf16)
#   3 step      bench_step.py: seconds per step, TRL against ours and ours with --torch_compile, same workload
#   3b passes   bench_sampler.py --passes: a step's sampling at GA = 2 and 4, its GA x B prompts in one pass against GA
#               passes of B (issue 39); expected: one pass well under GA passes, as a decode step reads the weights
#               whatever its rows
#   4 run       a 20-step online_dpo.py run, random Qwen2-0.5B-shaped policy, a reward function, --torch_compile,
#               bf16; its metrics.jsonl and the peak GPU memory
# The limits add up to 9.25 minutes (75 + 45 + 150 + 135 + 45 + 105 s); a stage cut short still leaves its log. The compile of
# stage 4 finds the graph of stage 3 (the same model) in the inductor cache.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-gpu}
if [ "$mode" = "--wheels" ]; then
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  for p in transformers==5.24.0 datasets tyro docstring-parser typeguard shtab dill multiprocess ${EXTRA_WHEELS:-}; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$p"
  done
  du -sh .whl
  exit 0
fi
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/online-dpo-inductor}
if [ "$mode" = "--cpu" ]; then
  device=cpu
  echo "rehearsal on the CPU: $(nproc) cores" > "$OUT/device.txt"
else
  device=cuda
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "could not install the carried wheels (.whl/)" | tee "$OUT/summary.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
                'transformers', transformers.__version__)"
    # datasets needs pyarrow >= 24 and fsspec <= 2026.9; older ones: add their wheels (EXTRA_WHEELS="pyarrow fsspec")
    python3 -m pip show pyarrow fsspec | grep -E "^(Name|Version)"; } > "$OUT/device.txt" 2>&1
fi
cat "$OUT/device.txt"
: > "$OUT/summary.txt"

stage() {  # stage NAME SECONDS COMMAND...: run it with a time limit, keep its log, say how it ended
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit $limit s): $*"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
  grep -E "^\|" "$OUT/$name.log" | tail -12 || tail -5 "$OUT/$name.log"
}

if [ $device = cuda ]; then
  stage kernels 75 python3 -m pytest -q -s -p no:cacheprovider tests/test_kernels.py \
    tests/test_sampler.py::test_the_exponential_race_draws_the_tokens_multinomial_draws
  stage tiles 45 python3 benchmarks/bench_logprobs.py --device cuda --cases 8192,896,151936 --dtypes float32 bfloat16 \
    --repeats 3
  stage sampler 150 python3 benchmarks/bench_sampler.py --torch_compile --shape qwen2-0.5b --dtype bfloat16 \
    --device cuda --batches 8 32 --samples 2 --new_tokens 64 --repeats 3
  paths=$(python3 benchmarks/bench_step.py --build_only --sizes qwen2-0.5b --cache /tmp/online-dpo-bench-step)
  stage step 135 python3 benchmarks/bench_step.py --device cuda --sizes qwen2-0.5b --configs trl ours ours-compile \
    --steps 8 --cache /tmp/online-dpo-bench-step
  stage passes 45 python3 benchmarks/bench_sampler.py --passes --shape qwen2-0.5b --dtype bfloat16 --device cuda \
    --batches 8 --samples 2 --new_tokens 64 --accumulation 2 4 --repeats 3
  steps=20
  run_limit=105
else
  stage kernels 300 python3 -m pytest -q -s -p no:cacheprovider tests/test_kernels.py \
    tests/test_sampler.py::test_the_exponential_race_draws_the_tokens_multinomial_draws
  stage tiles 120 python3 benchmarks/bench_logprobs.py --cases 2048,256,8192 --dtypes float32 bfloat16 --repeats 1
  stage sampler 300 python3 benchmarks/bench_sampler.py --torch_compile --model tiny --batches 8 --samples 2 \
    --new_tokens 12 --repeats 2
  paths=$(python3 benchmarks/bench_step.py --build_only --sizes 128x2 --cache /tmp/online-dpo-bench-step)
  stage step 600 python3 benchmarks/bench_step.py --sizes 128x2 --configs trl ours ours-compile --steps 3 \
    --cache /tmp/online-dpo-bench-step
  stage passes 120 python3 benchmarks/bench_sampler.py --passes --model tiny --batches 4 --samples 2 --new_tokens 12 \
    --accumulation 2 4 --repeats 1
  steps=4
  run_limit=120
fi
model=$(python3 -c "import json, sys; print(next(iter(json.loads(sys.argv[1])['models'].values())))" "$paths")
stage run $run_limit python3 - "$OUT/run" "$model" "$steps" <<'PY'
import os, sys
import torch
sys.path.insert(0, os.getcwd())
import online_dpo
out, model, steps = sys.argv[1], sys.argv[2], sys.argv[3]
argv = ["--model_name_or_path", model, "--dataset_name", "benchmarks/tiny/prompts", "--output_dir", out,
        "--reward_funcs", "benchmarks/bench_step.py:low_ids", "--max_steps", steps, "--logging_steps", "1",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-5", "--eval_prompts", "16", "--save_steps", "0",
        "--torch_compile", "--overwrite_output_dir"]
code = online_dpo.run(argv)
if torch.cuda.is_available():
    print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB "
          f"(reserved {torch.cuda.max_memory_reserved() / 2**30:.2f} GiB)")
sys.exit(code)
PY
python3 - "$OUT/run/metrics.jsonl" >> "$OUT/run.log" 2>&1 <<'PY'
import json, statistics, sys
lines = [json.loads(line) for line in open(sys.argv[1])]
steps = [m for m in lines if "time/step" in m]
print("| steps | median s/step | median time/sampling | compile/graphs | time/compile | scores first -> last |")
print("|---|---|---|---|---|---|")
print(f"| {len(steps)} | {statistics.median(m['time/step'] for m in steps[1:] or steps):.3f} | "
      f"{statistics.median(m['time/sampling'] for m in steps[1:] or steps):.3f} | {steps[-1].get('compile/graphs')} | "
      f"{steps[-1].get('time/compile', 0):.1f} | {steps[0]['objective/scores']:.3f} -> {steps[-1]['objective/scores']:.3f} |")
PY
grep -E "^\||peak GPU|decoding eagerly" "$OUT/run.log" | tail -5
echo "== summary"
cat "$OUT/summary.txt"
