"""One process with the global batch against N torchrun ranks with 1/N of it each: seconds per optimizer step.
With --rss: the peak host memory of every rank, as online_dpo.py loads now (rank 0 reads the weights, the others
get them from it) against an earlier commit's (every rank read them), FSDP2, on 2 and 4 ranks.

    python benchmarks/bench_ranks.py                                  # tiny preset, 2 CPU ranks (gloo)
    python benchmarks/bench_ranks.py --nproc 8 --batch 64 --flags "--preset qwen2-0.5b --max_steps 20"  # a GPU node
    python benchmarks/bench_ranks.py --rss --against 6d250b3         # a random Qwen2-0.5B-shaped model, 1 step

Both runs train on the same prompts (same global batch, see README "Several processes"); the runs alternate, and each
figure is the median over repeats of the mean `time/step` of the logged windows after the first (warm-up) one.
--rss: each rank's ru_maxrss once its models are loaded and sharded (before anything gathers them), per rank and
their sum. On a GPU that is the host's peak (what is gathered later lands on the device); on CPU ranks, sampling
later gathers the whole policy into every rank's memory anyway.
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
# Runs online_dpo.run() from the tree given until every model is loaded and placed (check_packing's trial forward,
# which gathers the models, comes next), then writes this rank's peak RSS so far (MB) and ends the run.
RSS_WORKER = r"""
import os, resource, sys
tree, out, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, tree)
import online_dpo
from dpo_support import checks

def loaded(*args, **kwargs):
    with open(os.path.join(out, f"rss{os.environ.get('RANK', '0')}.txt"), "w") as f:
        f.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
    raise SystemExit(0)

checks.check_packing = loaded
sys.exit(online_dpo.run(argv))
"""


def run(nproc: int, batch: int, flags: list[str], out: str) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    cmd = [*launcher, os.path.join(REPO, "online_dpo.py"), *flags, "--per_device_train_batch_size", str(batch),
           "--eval_prompts", "0", "--save_steps", "0", "--output_dir", out]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        logs = [json.loads(line) for line in f][1:]
    return {k: statistics.mean(m[k] for m in logs) for k in ("time/step", "time/sampling", "time/tokens_per_s")}


def peak_rss(tree: str, nproc: int, model: str, out: str) -> list[float]:
    """Every rank's peak RSS (MB) over loading the policy and its reference and sharding them (FSDP2)."""
    os.makedirs(out)
    worker = os.path.join(out, "worker.py")
    with open(worker, "w") as f:
        f.write(RSS_WORKER)
    flags = ["--model_name_or_path", model, "--dataset_name", os.path.join(REPO, "benchmarks", "tiny", "prompts"),
             "--reward_funcs", os.path.join(REPO, "benchmarks", "bench_step.py") + ":low_ids", "--use_cpu",
             "--distributed", "fsdp", "--max_steps", "1", "--per_device_train_batch_size", "1", "--max_new_tokens", "4",
             "--eval_prompts", "0", "--save_steps", "0", "--output_dir", os.path.join(out, "run")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), worker, tree,
           out, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tree, env=os.environ | {"PYTHONPATH": REPO})
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    return [float(open(os.path.join(out, f"rss{r}.txt")).read()) for r in range(nproc)]


def rss(a) -> None:
    sys.path.insert(0, REPO)
    from benchmarks.bench_step import build_assets

    with tempfile.TemporaryDirectory() as tmp:
        model = build_assets(os.path.join(tmp, "assets"), [a.size])[a.size]
        earlier = os.path.join(tmp, "earlier")
        os.makedirs(earlier)
        archive = subprocess.run(["git", "archive", a.against], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", earlier], input=archive, check=True)
        rows = []
        for nproc in a.nprocs:
            figures = {}
            for name, tree in ((f"every rank reads ({a.against})", earlier), ("rank 0 reads (now)", REPO)):
                figures[name] = peak_rss(tree, nproc, model, os.path.join(tmp, f"{nproc}-{len(figures)}"))
                print(f"{nproc} ranks, {name}: {figures[name]}", file=sys.stderr)
            rows.append((nproc, figures))
        size = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model) if f.endswith(".safetensors"))
    print(f"random Qwen2 {a.size} ({size / 2**20:.0f} MB of fp32 weights), policy and reference, FSDP2 on CPU ranks "
          "(gloo); peak RSS per rank in MB once loaded and sharded\n")
    print("| ranks | loading | rank 0 | other ranks (max) | all ranks | ratio (all) |")
    print("|---|---|---|---|---|---|")
    for nproc, figures in rows:
        before = sum(next(iter(figures.values())))
        for name, mb in figures.items():
            print(f"| {nproc} | {name} | {mb[0]:.0f} | {max(mb[1:]):.0f} | {sum(mb):.0f} | {sum(mb) / before:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the torchrun run")
    parser.add_argument("--batch", type=int, default=16, help="global batch of prompts per micro-step")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--flags", default="--preset tiny --max_steps 30 --logging_steps 5", help="online_dpo.py flags")
    parser.add_argument("--rss", action="store_true", help="peak host RSS per rank, rank-0 loading against --against")
    parser.add_argument("--against", default="6d250b3", help="--rss: the commit whose online_dpo.py every rank loads in")
    parser.add_argument("--nprocs", type=int, nargs="+", default=[2, 4], help="--rss: the rank counts")
    parser.add_argument("--size", default="qwen2-0.5b", help="--rss: bench_step.py's size (HIDDENxLAYERS or a shape)")
    a = parser.parse_args()
    if a.rss:
        return rss(a)
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
