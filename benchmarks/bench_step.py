"""Seconds per online DPO step: TRL's OnlineDPOTrainer against online_dpo.py, same workload, side by side.

    pip install -e ".[bench]"                     # TRL (and matplotlib), for benchmarks only
    python benchmarks/bench_step.py               # short prompts: 2 model sizes x {TRL, ours} x checkpointing on/off
    python benchmarks/bench_step.py --workload tldr   # TL;DR-shaped: long prompts; ours with prefix sharing on/off
    python benchmarks/bench_step.py --device cuda --sizes qwen2-0.5b --configs trl ours ours-compile   # a GPU, bf16

Workload, identical for both: a random-init Qwen2 policy (hidden x layers as given) with a 4,096-token vocabulary
(the tiny world's BPE tokenizer padded with filler tokens), 8 prompts per step, 2 completions each at temperature
0.9, max_length 256, fp32 on the CPU, AdamW at lr 1e-4, and one reward function (`low_ids`: the fraction of
completion tokens in the lowest quarter of the vocabulary, which a random policy gets right a quarter of the time and
training can raise). Prompts: `tiny`, the tiny world's conversational prompts (about 20 tokens), up to 64 new tokens;
`tldr`, Reddit-post-shaped text prompts of 150-200 tokens built here ("SUBREDDIT: ... POST: ... TL;DR:"), up to 53
new tokens, as the spec's TL;DR job (whose prompts are cut to 256 - 53 = 203 tokens).

Configurations: trl, ours; -gc: gradient checkpointing on; -noshare: ours with --prefix_sharing False (today's
unshared path: every completion carries its own prompt through sampling and training); ours-compile: ours with
--torch_compile. Sizes are HIDDENxLAYERS, or qwen2-0.5b: Qwen2-0.5B's shape (896 x 24, 14 heads, 2 KV heads, MLP
4864) with the 4,096-token vocabulary. --device cuda: both in bf16 (autocast over fp32 weights), and the peak GPU
memory of each process is reported too. Each run is its own process
(peak RSS is that process's), the configurations alternate in order, and the figures are: median seconds per step
over the steps after the first, sampling seconds per step, the rest of the step (training: policy forward and
backward, reference forward, rewards, optimizer), peak RSS, and the mean reward (objective/scores) of the last 3 steps.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
VOCAB = 4096


def low_ids(prompts, completions, completion_ids, **kwargs):
    """Fraction of completion tokens whose id is in the lowest quarter of the vocabulary."""
    return [sum(t < VOCAB // 4 for t in ids) / max(1, len(ids)) for ids in completion_ids]


WORDS = ("i my boyfriend girlfriend friend roommate boss job work school college money rent car dog cat family mom dad "
         "brother sister week month year said told asked wanted never always really just think feel know want need "
         "help advice because but and so then when after before about with without time home house city party "
         "birthday wedding trip moved started stopped broke up together again still maybe should would could").split()


def tldr_prompts(path: str, tokenizer, n: int = 512, seed: int = 0) -> str:
    """n Reddit-post-shaped text prompts of 150-200 tokens (with this tokenizer) in path/train.jsonl."""
    import random

    out = os.path.join(path, "train.jsonl")
    if os.path.exists(out):
        return path
    os.makedirs(path, exist_ok=True)
    rng, rows = random.Random(seed), []
    while len(rows) < n:
        target, words = rng.randint(150, 200), []
        prompt = ""
        while True:
            text = (f"SUBREDDIT: r/relationships\n\nTITLE: {' '.join(words[:8])}\n\nPOST: {' '.join(words)}"
                    "\n\nTL;DR:")
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > target:
                break
            prompt, words = text, words + [rng.choice(WORDS)]
        if prompt:
            rows.append({"prompt": prompt})
    with open(out, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


SHAPES = {"qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                             intermediate_size=4864)}


def shape(size) -> dict:
    if size in SHAPES:
        return SHAPES[size]
    hidden, layers = (int(x) for x in size.split("x"))
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                num_key_value_heads=max(1, hidden // 128), intermediate_size=4 * hidden)


def build_assets(root: str, sizes: list[str]) -> dict:
    """Tokenizer (tiny world BPE + filler tokens up to VOCAB) and one random-init Qwen2 per size, saved under root."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    paths = {}
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO, "benchmarks", "tiny", "policy"))
    tokenizer.add_tokens([f"<filler{i}>" for i in range(VOCAB - len(tokenizer))])
    for size in sizes:
        path = os.path.join(root, f"qwen2-{size}")
        if not os.path.exists(os.path.join(path, "config.json")):
            torch.manual_seed(0)
            config = Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 bos_token_id=None, **shape(size))
            AutoModelForCausalLM.from_config(config).save_pretrained(path)
            tokenizer.save_pretrained(path)
        paths[size] = path
    paths["tiny"] = os.path.join(REPO, "benchmarks", "tiny", "prompts")
    paths["tldr"] = tldr_prompts(os.path.join(root, "tldr-prompts"), tokenizer)
    return paths


def run_ours(a) -> dict:
    import online_dpo

    args = online_dpo.Args(
        model_name_or_path=a.model, dataset_name=a.data, eval_prompts=0, prefix_sharing=bool(a.share),
        reward_funcs=(os.path.abspath(__file__) + ":low_ids",), output_dir=a.out, use_cpu=a.device == "cpu",
        bf16=bool(a.bf16) or a.device == "cuda", torch_compile=bool(a.compile), gradient_checkpointing=a.gc, per_device_train_batch_size=a.batch, max_new_tokens=a.max_new_tokens,
        max_length=256, learning_rate=a.lr, lr_scheduler_type="constant", max_steps=a.steps, logging_steps=1,
        save_steps=0, seed=a.seed)
    online_dpo.main(args)
    with open(os.path.join(a.out, "metrics.jsonl")) as f:
        logs = [json.loads(line) for line in f]
    return {"step": [m["time/step"] for m in logs], "sampling": [m["time/sampling"] for m in logs],
            "scores": [m["objective/scores"] for m in logs]}


def run_trl(a) -> dict:
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    data = datasets.load_dataset("json", data_files=os.path.join(a.data, "train.jsonl"), split="train")
    config = OnlineDPOConfig(
        output_dir=a.out, use_cpu=a.device == "cpu", bf16=a.device == "cuda", gradient_checkpointing=a.gc, per_device_train_batch_size=a.batch,
        max_new_tokens=a.max_new_tokens, max_length=256, learning_rate=a.lr, lr_scheduler_type="constant",
        max_steps=a.steps, logging_steps=1, save_strategy="no", report_to="none", seed=a.seed, temperature=0.9)
    times, sampling = [], []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()
            sampling.append(0.0)

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t0)

    trainer = OnlineDPOTrainer(model=model, reward_funcs=[low_ids], args=config, train_dataset=data,
                               processing_class=tokenizer, callbacks=[Clock()])
    generate = trainer._generate

    def timed_generate(*args, **kwargs):
        t0 = time.perf_counter()
        out = generate(*args, **kwargs)
        sampling[-1] += time.perf_counter() - t0
        return out

    trainer._generate = timed_generate
    trainer.train()
    scores = [m["objective/scores"] for m in trainer.state.log_history if "objective/scores" in m]
    return {"step": times, "sampling": sampling, "scores": scores}


def child(a) -> None:
    import torch

    torch.set_num_threads(a.threads)
    result = (run_ours if a.impl == "ours" else run_trl)(a)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    print("RESULT " + json.dumps(result))


def summary(result: dict) -> dict:
    scores = result["scores"]
    rest = [s - t for s, t in zip(result["step"][1:], result["sampling"][1:])]
    return {"s/step": statistics.median(result["step"][1:]),
            "sampling s/step": statistics.median(result["sampling"][1:]),
            "training s/step": statistics.median(rest), "peak RSS MB": result["peak_rss_mb"],
            "peak GPU MB": result["peak_gpu_mb"],
            "reward (last 3)": statistics.mean(scores[-3:]),
            "reward gain": statistics.mean(scores[-3:]) - statistics.mean(scores[:3])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=["tiny", "tldr"], default="tiny", help="the prompts (see above)")
    parser.add_argument("--sizes", nargs="+", help="policy sizes as HIDDENxLAYERS or qwen2-0.5b (default: 256x4 "
                        "512x8; tldr: 512x8)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: bf16 on a GPU")
    parser.add_argument("--build_only", action="store_true", help="write the models and prompts, print their paths")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="one run per seed and configuration")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, help="default: 64 (tiny), 53 (tldr)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--configs", nargs="+", help="trl-gc, ours-gc, trl, ours (-gc: gradient checkpointing on; "
                        "default: all four, tldr adds ours-gc-noshare and ours-noshare), -noshare: --prefix_sharing "
                        "False, ours-compile (--torch_compile), and ours-bf16 (bf16 autocast, not the same "
                        "workload: for information)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "online-dpo-bench-step"))
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--gc", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=42, help=argparse.SUPPRESS)
    parser.add_argument("--bf16", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--share", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--compile", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    a = parser.parse_args()
    tldr = a.workload == "tldr"
    a.sizes = a.sizes or (["512x8"] if tldr else ["256x4", "512x8"])
    a.max_new_tokens = a.max_new_tokens or (53 if tldr else 64)
    unshared = ["ours-gc-noshare", "ours-noshare"] if tldr else []
    a.configs = a.configs or ["trl-gc", "ours-gc", "trl", "ours"] + unshared
    if a.child:
        a.impl = a.child
        return child(a)

    sizes = a.sizes
    paths = build_assets(a.cache, sizes)
    if a.build_only:
        return print(json.dumps({"models": {s: paths[s] for s in sizes}, "prompts": paths[a.workload]}))
    env = os.environ | {"TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    rows = []
    for size in sizes:
        results = {c: [] for c in a.configs}
        for r, seed in enumerate(a.seeds):
            for config in a.configs if r % 2 == 0 else a.configs[::-1]:
                impl = config.split("-")[0]
                gc = int("-gc" in config)
                bf16 = int("-bf16" in config)
                share = int("-noshare" not in config)
                compile_ = int("-compile" in config)
                with tempfile.TemporaryDirectory() as out:
                    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl, "--model", paths[size],
                           "--gc", str(gc), "--out", out, "--steps", str(a.steps), "--batch", str(a.batch),
                           "--max_new_tokens", str(a.max_new_tokens), "--threads", str(a.threads), "--seed", str(seed),
                           "--lr", str(a.lr), "--bf16", str(bf16), "--share", str(share), "--data", paths[a.workload],
                           "--compile", str(compile_), "--device", a.device]
                    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
                if proc.returncode != 0:
                    sys.exit(f"{config} failed:\n{proc.stderr[-3000:]}")
                line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
                results[config].append(summary(json.loads(line[len("RESULT "):])))
                print(f"{size} {config} seed {seed}: {results[config][-1]}", file=sys.stderr)
        for config in a.configs:
            runs = results[config]
            v = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
            gains = [x["reward gain"] for x in runs]
            v["gain sd"] = statistics.stdev(gains) if len(gains) > 1 else float("nan")
            rows.append((size, config, v))
    precision = "bf16 autocast, CUDA" if a.device == "cuda" else "fp32"
    print(f"\n{a.workload} prompts, {a.batch} x 2 completions, {a.max_new_tokens} new tokens, {precision}, "
          f"{a.threads} threads, {a.steps} steps, lr {a.lr}, seeds {a.seeds}; medians over seeds, and the reward "
          "gain's standard deviation over seeds; training: the step without sampling\n")
    print("| policy | config | s/step | sampling s/step | training s/step | peak RSS MB | peak GPU MB | reward gain (sd) | "
          "s/step ours / TRL | training shared / unshared |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    table = {(size, config): v for size, config, v in rows}
    for size, config, v in rows:
        peer = table.get((size, config.replace("ours", "trl").replace("-bf16", "").replace("-noshare", "")
                          .replace("-compile", "")))
        ratio = f"{v['s/step'] / peer['s/step']:.2f}" if config.startswith("ours") and peer else ""
        unshared = table.get((size, config + "-noshare")) if config.startswith("ours") else None
        shared = f"{v['training s/step'] / unshared['training s/step']:.2f}" if unshared else ""
        print(f"| {size} | {config} | {v['s/step']:.2f} | {v['sampling s/step']:.2f} | {v['training s/step']:.2f} | "
              f"{v['peak RSS MB']:.0f} | {v['peak GPU MB']:.0f} | {v['reward gain']:+.3f} ({v['gain sd']:.3f}) | "
              f"{ratio} | {shared} |")


if __name__ == "__main__":
    main()
