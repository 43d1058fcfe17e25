"""Reward and KL curves of a run, from the metrics.jsonl that online_dpo.py writes into its output_dir.

    python -m pip install matplotlib
    python benchmarks/plot_rewards.py tiny-OnlineDPO/metrics.jsonl --out benchmarks/tiny_reward_curve.png

Top: the mean score of the sampled completions (objective/scores) and the RLHF reward (scores - beta * KL), with the
end-of-run held-out means of the reference and the trained policy as dashed lines. Bottom: objective/kl.
"""

import json
from dataclasses import dataclass

import tyro


@dataclass
class Plot:
    metrics: tyro.conf.Positional[str]
    """metrics.jsonl of a run"""
    out: str = "reward_curve.png"
    """PNG to write"""
    title: str = "online DPO, --preset tiny"
    """figure title"""


def main(cfg: Plot) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(cfg.metrics) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [r for r in rows if "objective/scores" in r]
    evals = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
    if not train:
        raise SystemExit(f"{cfg.metrics}: no training metrics (objective/scores) in it")
    steps = [r["step"] for r in train]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=(2, 1))
    top.plot(steps, [r["objective/scores"] for r in train], marker="o", ms=3, label="objective/scores (sampled completions)")
    top.plot(steps, [r["objective/rlhf_reward"] for r in train], marker="o", ms=3, label="objective/rlhf_reward")
    for key, color in (("eval/reward_reference", "grey"), ("eval/reward_trained", "tab:green")):
        if key in evals:
            top.axhline(evals[key], ls="--", color=color, label=f"{key} (held-out) = {evals[key]:+.2f}")
    top.set_ylabel("reward")
    top.legend(fontsize=8, loc="lower right")
    top.grid(alpha=0.3)
    top.set_title(cfg.title)
    bottom.plot(steps, [r["objective/kl"] for r in train], marker="o", ms=3, color="tab:red", label="objective/kl")
    bottom.set_ylabel("KL (nats)")
    bottom.set_xlabel("optimizer step")
    bottom.legend(fontsize=8, loc="upper left")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(cfg.out, dpi=110)
    print(f"wrote {cfg.out}")


if __name__ == "__main__":
    main(tyro.cli(Plot, config=(tyro.conf.FlagConversionOff,)))
