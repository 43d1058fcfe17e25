"""A refactor changes no number: run the same configurations with an earlier commit's online_dpo.py and with the
working tree's, and compare what each wrote.

    python benchmarks/same_numbers.py --against HEAD            # every configuration, about 8 minutes on 2 cores
    python benchmarks/same_numbers.py --against HEAD --only ddp fsdp
    python benchmarks/same_numbers.py --against HEAD --only ddp --new_flags "--generation_batch_size 4"

Compared per configuration: metrics.jsonl and completions.jsonl (the time/* values aside), the printed lines
(times and paths aside) and every .safetensors file the run wrote (the trained model, checkpoints, adapters), byte
for byte. The tiny preset itself (150 steps, 2 minutes a side) is `--only tiny`; it is not in the default set.
The configurations cover what issue 14's refactor diffed, and what came since (prefix sharing off, LoRA).
Exit code 1 if anything differs.
"""

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# In one process, so that the tests' rule judge (a registered transformers class) and the HTTP judge server can run.
WORKER = r"""
import os, sys
tree, argv = sys.argv[1], sys.argv[2:]
sys.path.insert(0, tree)
os.chdir(tree)
import online_dpo
from tests.judges import JudgeServer
server = None
if "JUDGE_URL" in argv:
    server = JudgeServer()
    argv = [server.url if a == "JUDGE_URL" else a for a in argv]
code = online_dpo.run(argv)
if server:
    server.close()
sys.exit(code)
"""


RESUMED = ("checkpoints+resume", "fsdp")  # run, then resumed from their last checkpoint


def configurations(assets):
    a = assets
    base = ["--model_name_or_path", f"{a}/policy", "--dataset_name", f"{a}/prompts.jsonl", "--max_new_tokens", "8",
            "--max_length", "48", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3",
            "--logging_steps", "1", "--save_steps", "0", "--eval_prompts", "0"]
    reward = ["--reward_funcs", "tests.rewards:low_token_ids"]
    return {
        "tiny": (1, ["--preset", "tiny"]),
        "rewards+ga+beta+eval": (1, base + [
            "--reward_model_path", f"{a}/reward", "--reward_funcs", "tests.rewards:low_token_ids",
            "--reward_weights", "0.5", "2.0", "--gradient_accumulation_steps", "2", "--num_train_epochs", "2",
            "--beta", "0.1", "0.3", "--eval_steps", "2", "--eval_prompts", "8", "--dataset_test_split", "train",
            "--missing_eos_penalty", "0.5"]),
        "chat+ipo+cosine+filters": (1, base + reward + [
            "--dataset_name", f"{a}/prompts_chat.jsonl", "--loss_type", "ipo", "--lr_scheduler_type", "cosine",
            "--warmup_steps", "0.25", "--max_steps", "4", "--top_k", "50", "--top_p", "0.9", "--min_p", "0.05",
            "--repetition_penalty", "1.3", "--generation_kwargs", '{"suppress_tokens": [5, 6]}']),
        "k4+drop_ties": (1, base + ["--reward_funcs", "tests.rewards:low_token_ids", "--num_samples", "4",
                                    "--drop_ties", "--max_steps", "4", "--eval_steps", "2"]),
        "local_judge": (1, base + ["--judge_model_path", f"{a}/judge", "--judge_prompt",
                                   "{prompt}<|ra|>{response_a}<|rb|>{response_b}<|ans|>", "--max_steps", "3",
                                   "--eval_steps", "3", "--eval_prompts", "4", "--dataset_test_split", "train"]),
        "http_judge": (1, base + ["--judge_api_base", "JUDGE_URL", "--judge_api_model", "judge", "--max_steps", "2",
                                  "--eval_steps", "2"]),
        "unshared+bf16": (1, base + reward + ["--prefix_sharing", "False", "--bf16", "--max_steps", "3"]),
        "checkpoints+resume": (1, base + reward + ["--max_steps", "4", "--save_steps", "2", "--save_total_limit", "1",
                                                   "--gradient_checkpointing", "False"]),
        "lora": (1, base + reward + ["--use_peft", "--lora_r", "4", "--lora_dropout", "0.1", "--disable_dropout",
                                     "False", "--max_steps", "3", "--save_steps", "2"]),
        "ddp": (2, base + ["--reward_funcs", "tests/rewards.py:low_token_ids", "--gradient_accumulation_steps", "2",
                           "--max_steps", "2"]),
        "fsdp": (2, base + ["--reward_funcs", "tests/rewards.py:low_token_ids", "--distributed", "fsdp",
                            "--max_steps", "3", "--save_steps", "2", "--reward_model_path", f"{a}/reward"]),
    }


def run_one(tree, nproc, argv, out, resume=False):
    """-> the exit code and what was printed (stdout, then stderr), with the configuration's output_dir `out`."""
    env = os.environ | {"OMP_NUM_THREADS": "1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"),
                        "PYTHONPATH": tree, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    argv = argv + ["--output_dir", out]
    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   os.path.join(tree, "online_dpo.py"), *argv]
    else:
        command = [sys.executable, "-c", WORKER, tree, *argv]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tree, env=env)
    if resume:  # again from the last checkpoint: the steps after it are trained a second time, the same way
        again = command + ["--resume_from_checkpoint", "latest"]
        proc2 = subprocess.run(again, capture_output=True, text=True, cwd=tree, env=env)
        return proc.returncode or proc2.returncode, proc.stdout + proc2.stdout, proc.stderr + proc2.stderr
    return proc.returncode, proc.stdout, proc.stderr


def fingerprint(code, stdout, stderr, out, tree):
    """What must not change, with times and paths taken out."""
    def records(name):
        path = os.path.join(out, name)
        if not os.path.exists(path):
            return []
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in open(path)]

    def clean(text):
        text = text.replace(out, "OUT").replace(tree, "TREE")
        text = re.sub(r"time/\S+=\S+", "", text)
        text = re.sub(r"http://127\.0\.0\.1:\d+", "URL", text)
        text = re.sub(r"\(\d+ min \d+ s[^)]*\)|\d+(\.\d+)? ?s\b", "T", text)
        return [line.rstrip() for line in text.splitlines() if line.strip() and "it/s]" not in line
                and "s/it]" not in line and "Warning" not in line and "warn" not in line]

    weights = {}
    for root, _, files in os.walk(out):
        for name in sorted(files):
            if name.endswith(".safetensors"):
                with open(os.path.join(root, name), "rb") as f:
                    weights[os.path.relpath(os.path.join(root, name), out)] = hashlib.sha256(f.read()).hexdigest()
    return {"exit code": code, "metrics": records("metrics.jsonl"), "completions": records("completions.jsonl"),
            "printed": clean(stdout) + [line for line in clean(stderr) if "online_dpo.py: error" in line],
            "weights": weights}


def build_assets(root):
    from tests import assets
    from tests.judges import make_rule_judge

    assets.build(root)
    make_rule_judge(os.path.join(root, "judge"), os.path.join(root, "policy"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="HEAD", help="the commit whose online_dpo.py is the reference")
    parser.add_argument("--only", nargs="*", help="configuration names (default: all but tiny)")
    parser.add_argument("--keep", help="keep the runs' output directories here")
    parser.add_argument("--new_flags", default="", help="flags for the working tree's runs only, in one string: a new "
                        "flag's setting that should reproduce the old behaviour (\"--generation_batch_size 4\")")
    opts = parser.parse_args()
    root = opts.keep or tempfile.mkdtemp(prefix="same_numbers_")
    os.makedirs(root, exist_ok=True)
    old = os.path.join(root, "old_tree")
    if not os.path.isdir(old):
        os.makedirs(old)
        archive = subprocess.run(["git", "archive", opts.against], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", old], input=archive, check=True)
    build_assets(os.path.join(root, "assets"))
    configs = configurations(os.path.join(root, "assets"))
    names = opts.only or [n for n in configs if n != "tiny"]
    rows, failed = [], False
    for name in names:
        nproc, argv = configs[name]
        seen = {}
        for side, tree in (("old", old), ("new", REPO)):
            out = os.path.join(root, side, name)
            extra = opts.new_flags.split() if side == "new" else []
            code, stdout, stderr = run_one(tree, nproc, argv + extra, out, resume=name in RESUMED)
            seen[side] = fingerprint(code, stdout, stderr, out, tree)
            if code:
                print(f"{name} ({side}): exit code {code}\n{stderr[-3000:]}", file=sys.stderr)
        verdicts = []
        for part in ("exit code", "metrics", "completions", "printed", "weights"):
            same = seen["old"][part] == seen["new"][part]
            failed |= not same
            verdicts.append("same" if same else "DIFFERENT")
            if not same and part == "printed":
                for a, b in zip(seen["old"][part] + [""] * 99, seen["new"][part]):
                    if a != b:
                        print(f"  {name}: old {a!r}\n  {' ' * len(name)}  new {b!r}", file=sys.stderr)
                        break
        lines, files = len(seen["new"]["metrics"]), len(seen["new"]["weights"])
        rows.append(f"| {name} | {lines} | {files} | " + " | ".join(verdicts) + " |")
        print(rows[-1], flush=True)
    print(f"\nold: {opts.against}, new: the working tree ({root})\n")
    print("| configuration | metrics lines | weight files | exit code | metrics.jsonl | completions.jsonl | printed "
          "lines | weights |\n|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
