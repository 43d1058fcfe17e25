"""The objectives on the tiny world: sigmoid (DPO), ipo, hinge, robust, RPO and TR-DPO, a few seeds each.

    python benchmarks/bench_objectives.py                # 150 steps (the preset), seeds 42 1 2: ~30 min on 2 cores
    python benchmarks/bench_objectives.py --steps 40     # what tests/test_tiny.py's margins rest on
    python benchmarks/bench_objectives.py --sync_cost    # seconds per TR-DPO sync, tiny and Qwen2-0.5B-shaped

Each run is `online_dpo.py --preset tiny --seed S [the objective's flags]`; the runs alternate (seed by seed, every
objective once per seed). Per objective: the held-out mean reward of the trained policy minus the reference's (64
prompts, the reward model), the win rate over the reference, the KL and s/step (the median of each run's mean
`time/step` over its logged windows after the first). TR-DPO moves the reference every --sync_steps steps (TRL's 512
would not come in 150 steps). s/step also follows the completions' lengths, which the objectives change; --sync_cost
times a sync alone.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def objectives(sync_steps):
    return {
        "sigmoid": [],
        "ipo": ["--loss_type", "ipo"],
        "hinge": ["--loss_type", "hinge"],
        "robust (label_smoothing 0.1)": ["--loss_type", "robust", "--label_smoothing", "0.1"],
        "rpo_alpha 1.0": ["--rpo_alpha", "1.0"],
        f"TR-DPO (alpha 0.6, every {sync_steps} steps)": ["--sync_ref_model", "--ref_model_sync_steps",
                                                           str(sync_steps)],
    }


def run(flags, seed, steps, out):
    cmd = [sys.executable, os.path.join(REPO, "online_dpo.py"), "--preset", "tiny", "--seed", str(seed),
           "--max_steps", str(steps), "--output_dir", out, *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    train = [m for m in lines if "loss" in m]
    final = lines[-1]
    return {"reward_gain": final["eval/reward_trained"] - final["eval/reward_reference"],
            "win_rate": final["eval/win_rate"], "kl": train[-1]["objective/kl"],
            "s_step": statistics.mean(m["time/step"] for m in train[1:]),
            "syncs": sum("ref_model_sync" in m for m in lines)}


def sync_cost(repeats=5):
    """Seconds per TR-DPO sync (online_dpo.mix_reference) on the tiny policy and on a random Qwen2-0.5B-shaped one,
    fp32, on this machine: what --sync_ref_model adds to one step in ref_model_sync_steps."""
    import time

    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, REPO)
    import online_dpo

    tiny = os.path.join(REPO, "benchmarks", "tiny", "policy")
    shape = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
    pairs = {"tiny policy": lambda: AutoModelForCausalLM.from_pretrained(tiny),
             "Qwen2-0.5B shape": lambda: Qwen2ForCausalLM(shape)}
    for name, make in pairs.items():
        policy, ref = make(), make()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            online_dpo.mix_reference(ref, policy, 0.6)
            times.append(time.perf_counter() - t0)
        n = sum(p.numel() for p in policy.parameters())
        print(f"sync cost, {name} ({n / 1e6:.1f}M parameters): {statistics.median(times) * 1e3:.2f} ms per sync "
              f"(median of {repeats})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--sync_steps", type=int, default=None, help="TR-DPO's --ref_model_sync_steps; None: steps/5")
    parser.add_argument("--only", nargs="*", default=None, help="names (their start) of the objectives to run")
    parser.add_argument("--sync_cost", action="store_true", help="only time one TR-DPO sync (mix_reference)")
    a = parser.parse_args()
    if a.sync_cost:
        return sync_cost()
    sync_steps = a.sync_steps or max(1, a.steps // 5)
    chosen = {k: v for k, v in objectives(sync_steps).items() if a.only is None or any(k.startswith(o) for o in a.only)}
    results = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            for i, (name, flags) in enumerate(chosen.items()):
                r = run(flags, seed, a.steps, os.path.join(tmp, f"{i}-{seed}"))
                results[name].append(r)
                print(f"seed {seed:>3} {name:36} reward {r['reward_gain']:+.3f}  win {r['win_rate']:.3f}  "
                      f"kl {r['kl']:.2f}  {r['s_step']:.3f} s/step  syncs {r['syncs']}", flush=True)
    print(f"\n{a.steps} steps, seeds {' '.join(map(str, a.seeds))}: mean over seeds (each seed's value)\n")
    print("| objective | held-out reward, trained - reference | win rate | KL (last log) | s/step (median) |")
    print("|---|---|---|---|---|")
    for name, rs in results.items():
        gains = [r["reward_gain"] for r in rs]
        wins = [r["win_rate"] for r in rs]
        cells = [f"{statistics.mean(v):+.2f} ({', '.join(f'{x:+.2f}' for x in v)})" for v in (gains,)]
        cells.append(f"{statistics.mean(wins):.3f} ({', '.join(f'{x:.2f}' for x in wins)})")
        cells.append(f"{statistics.mean(r['kl'] for r in rs):.2f}")
        cells.append(f"{statistics.median(r['s_step'] for r in rs):.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
