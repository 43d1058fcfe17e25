"""One process with the global batch against N torchrun ranks with 1/N of it each: seconds per optimizer step.

    python benchmarks/bench_ranks.py                                  # tiny preset, 2 CPU ranks (gloo)
    python benchmarks/bench_ranks.py --nproc 8 --batch 64 --flags "--preset qwen2-0.5b --max_steps 20"  # a GPU node

Both runs train on the same prompts (same global batch, see README "Several processes"); the runs alternate, and each
figure is the median over repeats of the mean `time/step` of the logged windows after the first (warm-up) one.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(nproc: int, batch: int, flags: list[str], out: str) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, os.path.join(REPO, "online_dpo.py"), *flags, "--per_device_train_batch_size", str(batch),
           "--eval_prompts", "0", "--save_steps", "0", "--output_dir", out]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        logs = [json.loads(line) for line in f][1:]
    return {k: statistics.mean(m[k] for m in logs) for k in ("time/step", "time/sampling", "time/tokens_per_s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the torchrun run")
    parser.add_argument("--batch", type=int, default=16, help="global batch of prompts per micro-step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--flags", default="--preset tiny --max_steps 30 --logging_steps 5", help="online_dpo.py flags")
    a = parser.parse_args()
    if a.batch % a.nproc:
        sys.exit(f"--batch {a.batch} must be a multiple of --nproc {a.nproc}")
    flags = shlex.split(a.flags)
    results = {1: [], a.nproc: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for nproc in results:
                results[nproc].append(run(nproc, a.batch // nproc, flags, os.path.join(tmp, f"{nproc}-{r}")))
                print(f"repeat {r + 1}: {nproc} process(es): {results[nproc][-1]}", file=sys.stderr)
    one, many = ({k: statistics.median(x[k] for x in results[n]) for k in results[n][0]} for n in results)
    print(f"flags: {a.flags}; global batch {a.batch} prompts per micro-step; median of {a.repeats}\n")
    print(f"| | 1 process x {a.batch} | {a.nproc} ranks x {a.batch // a.nproc} | ratio |")
    print("|---|---|---|---|")
    for k in one:
        print(f"| {k} | {one[k]:.3f} | {many[k]:.3f} | {many[k] / one[k]:.2f} |")


if __name__ == "__main__":
    main()
