"""Peak memory and seconds per step: full fine-tuning against --use_peft (LoRA), and TRL with a peft LoraConfig.

    pip install -e ".[bench,test]"                # TRL and peft, for benchmarks and tests only
    python benchmarks/bench_lora.py         # 88M Qwen2: full, LoRA, TRL + peft; Qwen2-0.5B-shaped: full, LoRA

Workload: bench_step.py's (random-init Qwen2 with a 4,096-token vocabulary, the tiny world's prompts, 8 prompts x 2
completions, up to 32 new tokens, fp32 on the CPU, 2 threads, AdamW, one reward function), with gradient checkpointing on (the
spec's default) and off. LoRA: r 16, alpha 32, dropout 0.05 on every linear layer of the decoder blocks (TRL's defaults with
target_modules all-linear). Each run is its own process; peak RSS is that process's (policy, gradients, AdamW
moments and, for full fine-tuning, the reference copy). Figures: median s/step over the steps after the first.

glibc's malloc keeps the heap that one step's activations freed (its mmap threshold grows past them), so a CPU
process's RSS counts memory it no longer uses; the runs set MALLOC_MMAP_THRESHOLD_=1048576, which returns it, unless
--malloc-default. On a GPU the activations live in CUDA's allocator and this does not arise.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402  (its workload, assets and reward function)

# hidden, layers, intermediate, key/value heads: 88M parameters; Qwen2-0.5B's decoder (362M with this vocabulary)
SHAPES = {"88m": (768, 12, 2304, 6), "qwen2-0.5b": (896, 24, 4864, 2)}


def build(root, name):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    path = os.path.join(root, name)
    if not os.path.exists(os.path.join(path, "config.json")):
        hidden, layers, inter, kv_heads = SHAPES[name]
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(bench_step.REPO, "benchmarks", "tiny", "policy"))
        tokenizer.add_tokens([f"<filler{i}>" for i in range(bench_step.VOCAB - len(tokenizer))])
        torch.manual_seed(0)
        config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter,
                             num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=kv_heads,
                             max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
    return path


def run_ours(a):
    import online_dpo

    args = online_dpo.Args(
        model_name_or_path=a.model, dataset_name=os.path.join(bench_step.REPO, "benchmarks", "tiny", "prompts"),
        eval_prompts=0, reward_funcs=(os.path.abspath(bench_step.__file__) + ":low_ids",), output_dir=a.out,
        use_cpu=True, bf16=False, gradient_checkpointing=a.gc, per_device_train_batch_size=8, max_new_tokens=32,
        max_length=128, learning_rate=a.lr, lr_scheduler_type="constant", max_steps=a.steps, logging_steps=1,
        save_steps=0, use_peft=a.lora, seed=42)
    online_dpo.main(args)
    with open(os.path.join(a.out, "metrics.jsonl")) as f:
        return [json.loads(line)["time/step"] for line in f if '"time/step"' in line]


def run_trl(a):
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    data = datasets.load_dataset("json", data_files=os.path.join(bench_step.REPO, "benchmarks", "tiny", "prompts",
                                                                 "train.jsonl"), split="train")
    config = OnlineDPOConfig(output_dir=a.out, use_cpu=True, bf16=False, gradient_checkpointing=a.gc,
                             per_device_train_batch_size=8, max_new_tokens=32, max_length=128, learning_rate=a.lr,
                             lr_scheduler_type="constant", max_steps=a.steps, logging_steps=1, save_strategy="no",
                             report_to="none", seed=42, temperature=0.9)
    times = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.t0)

    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    OnlineDPOTrainer(model=model, reward_funcs=[bench_step.low_ids], args=config, train_dataset=data,
                     processing_class=tokenizer, peft_config=peft_config, callbacks=[Clock()]).train()
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--gc", nargs="+", type=int, default=[1, 0], choices=[0, 1],
                        help="gradient checkpointing: 1 on (the default), 0 off")
    parser.add_argument("--malloc-default", action="store_true", help="leave glibc's mmap threshold as it is")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "online-dpo-bench-lora"))
    parser.add_argument("--child", choices=["full", "lora", "trl-lora"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        import torch

        torch.set_num_threads(2)
        a.lora, a.gc = a.child == "lora", bool(a.gc[0])
        times = run_trl(a) if a.child == "trl-lora" else run_ours(a)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps({"times": times, "rss": rss}))
        return
    env = os.environ | {"TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if not a.malloc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "1048576"
    rows = []
    for name in a.models:
        path = build(a.cache, name)
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).parameters())
        for gc in a.gc:
            for config in ["full", "lora"] + (["trl-lora"] if name == "88m" else []):
                with tempfile.TemporaryDirectory() as out:
                    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", config, "--model",
                                           path, "--out", out, "--steps", str(a.steps), "--lr", str(a.lr), "--gc",
                                           str(gc)], capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.exit(f"{name} {config} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
                rows.append((name, n, gc, config, statistics.median(r["times"][1:]), r["rss"]))
                print(rows[-1], file=sys.stderr)
    malloc = "default malloc" if a.malloc_default else "MALLOC_MMAP_THRESHOLD_=1048576"
    print(f"\n{a.steps} steps, fp32, 2 threads, {malloc}; median s/step over steps 2 on\n")
    print("| policy | parameters | gradient checkpointing | config | s/step | peak RSS MB | RSS / full |")
    print("|---|---|---|---|---|---|---|")
    full = {(name, gc): rss for name, _, gc, config, _, rss in rows if config == "full"}
    for name, n, gc, config, step, rss in rows:
        print(f"| {name} | {n / 1e6:.0f}M | {'on' if gc else 'off'} | {config} | {step:.2f} | {rss:.0f} | "
              f"{rss / full[name, gc]:.2f} |")


if __name__ == "__main__":
    main()
