"""What a safe checkpoint costs: dpo_support.checkpoint.Checkpoints.save (safetensors model, optimizer by parameter name, every file
fsynced, rename, `latest`) against the bare minimum, one torch.save of the model's and the optimizer's state dicts.
Then the way back: our resume (from_pretrained + set_optimizer_state_dict) against torch.load + load_state_dict.

    python benchmarks/bench_checkpoint.py                     # a Qwen2-0.5B-shaped policy (494M parameters), fp32
    python benchmarks/bench_checkpoint.py --hidden 256 --layers 4 --vocab 4096    # small, for a quick look

The model is random-init from a config (no Hub). Its AdamW state is filled by one step, as in training.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import online_dpo  # noqa: E402
from dpo_support import checkpoint  # noqa: E402

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny", "policy")


def size_gb(path: str) -> float:
    if os.path.isfile(path):
        return os.path.getsize(path) / 1e9
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files) / 1e9


def drop_page_cache(path: str) -> None:
    """Reads in the load timings come from the disk, not from the copy the write left in memory (where allowed)."""
    for root, _, files in os.walk(path) if os.path.isdir(path) else [(os.path.dirname(path), None, [os.path.basename(path)])]:
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    a = p.parse_args()

    config = Qwen2Config(hidden_size=a.hidden, num_hidden_layers=a.layers, intermediate_size=a.intermediate,
                         vocab_size=a.vocab, num_attention_heads=14 if a.hidden % 14 == 0 else 8, num_key_value_heads=2,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    model(input_ids=torch.randint(0, a.vocab, (1, 8)), labels=torch.randint(0, a.vocab, (1, 8))).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n = sum(p.numel() for p in model.parameters())
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    root = a.dir or tempfile.mkdtemp(prefix="bench-checkpoint-")
    args = online_dpo.Args(output_dir=root, reward_funcs=("x:y",), save_total_limit=1)
    mine = checkpoint.rank_state(torch.Generator(), online_dpo.MetricSums())
    saver = checkpoint.Checkpoints(args, None, model, optimizer, scheduler, tokenizer, None, [])
    print(f"policy: {n / 1e6:.0f}M parameters, fp32, AdamW state filled; writing under {root}")

    rows = {"bare torch.save": [], "Checkpoints.save": [], "the same without fsync (for the breakdown)": []}
    loads = {"bare torch.save": [], "Checkpoints.save": []}
    sizes = {}
    for r in range(a.repeats):
        bare = os.path.join(root, "bare.pt")
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, bare)
        rows["bare torch.save"].append(time.perf_counter() - t0)
        sizes["bare torch.save"] = size_gb(bare)

        state = {"step": r + 1, "epoch": 0.0, "micro_batches_done": r + 1, "world_size": 1, "nonfinite_steps": 0,
                 "nonfinite_in_a_row": 0, "wandb_id": None}
        t0 = time.perf_counter()
        saver.save(state, mine)
        rows["Checkpoints.save"].append(time.perf_counter() - t0)
        sizes["Checkpoints.save"] = size_gb(os.path.join(root, f"checkpoint-{r + 1}"))
        fsync, checkpoint.fsync_tree = checkpoint.fsync_tree, lambda path: None
        t0 = time.perf_counter()
        saver.save(state | {"step": 1000 + r}, mine)
        rows["the same without fsync (for the breakdown)"].append(time.perf_counter() - t0)
        checkpoint.fsync_tree = fsync
        sizes["the same without fsync (for the breakdown)"] = sizes["Checkpoints.save"]
        ours = os.path.join(root, f"checkpoint-{1000 + r}")  # save_total_limit=1 kept only this one: load it

        drop_page_cache(bare)
        t0 = time.perf_counter()
        saved = torch.load(bare, weights_only=True, mmap=True)
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        fresh.load_state_dict(saved["model"])
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-6)
        fresh_opt.load_state_dict(saved["optimizer"])
        loads["bare torch.save"].append(time.perf_counter() - t0)
        del saved, fresh, fresh_opt

        drop_page_cache(ours)
        t0 = time.perf_counter()
        fresh = AutoModelForCausalLM.from_pretrained(ours, dtype=torch.float32)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-6)
        torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0)  # as in main(): it adds initial_lr to the groups
        saved = torch.load(os.path.join(ours, "optimizer.pt"), weights_only=True, mmap=True)
        set_optimizer_state_dict(fresh, fresh_opt, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
        loads["Checkpoints.save"].append(time.perf_counter() - t0)
        assert all(torch.equal(x, y) for x, y in zip(fresh.parameters(), model.parameters()))
        del saved, fresh, fresh_opt

    base_save, base_load = min(rows["bare torch.save"]), min(loads["bare torch.save"])
    print(f"\n| writer | size GB | save s (best of {a.repeats}) | save / bare | load s | load / bare |")
    print("|---|---|---|---|---|---|")
    for k in rows:
        load = f"{min(loads[k]):.1f} | {min(loads[k]) / base_load:.2f}" if k in loads else "| "
        print(f"| {k} | {sizes[k]:.2f} | {min(rows[k]):.1f} | {min(rows[k]) / base_save:.2f} | {load} |")
    if a.dir is None:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
