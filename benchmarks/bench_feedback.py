"""What the feedback options cost per step, on the tiny preset: 2 samples scored by the reward model (the baseline)
against K = 4 samples, a local LLM judge, and a judge over HTTP (a local stub server answering at once, so the figure
is the client's own overhead: threads, JSON, both orders).

    python benchmarks/bench_feedback.py --steps 20

The local judge here is the tiny policy itself (a real Qwen2 with a chat template): its preferences mean nothing, its
cost is that of a judge the policy's size. One process, configurations one after the other, median s/step after the
first step.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import online_dpo  # noqa: E402
from tests.judges import JudgeServer  # noqa: E402

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")


def run(out: str, steps: int, **changes) -> dict:
    args = online_dpo.cli(["--preset", "tiny", "--max_steps", str(steps), "--logging_steps", "1", "--eval_prompts", "0",
                           "--output_dir", out])
    for k, v in changes.items():
        setattr(args, k, v)
    online_dpo.main(args)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        logs = [json.loads(line) for line in f][1:]
    return {"step": statistics.median(m["time/step"] for m in logs),
            "sampling": statistics.median(m["time/sampling"] for m in logs), "last": logs[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    server = JudgeServer()
    root = tempfile.mkdtemp(prefix="bench-feedback-")
    judge = dict(reward_model_path=(), reward_funcs=())
    configs = {
        "reward model, K = 2 (baseline)": {},
        "reward model, K = 4": dict(num_samples=4),
        "reward model, K = 4, --drop_ties": dict(num_samples=4, drop_ties=True),
        "local judge (the tiny policy)": judge | dict(judge_model_path=f"{TINY}/policy"),
        "HTTP judge (stub server)": judge | dict(judge_api_base=server.url, judge_api_model="stub"),
    }
    rows = {name: run(os.path.join(root, str(i)), a.steps, **c) for i, (name, c) in enumerate(configs.items())}
    server.close()
    base = rows["reward model, K = 2 (baseline)"]["step"]
    print("\n| configuration | s/step | sampling s/step | / baseline |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['step']:.3f} | {r['sampling']:.3f} | {r['step'] / base:.2f} |")


if __name__ == "__main__":
    main()
