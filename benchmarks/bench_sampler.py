"""Our KV-cache sampler (online_dpo.sample): against transformers' model.generate, or eager against --torch_compile.

    python benchmarks/bench_sampler.py                       # ours vs generate: random-init Qwen2 512x8, fp32, CPU
    python benchmarks/bench_sampler.py --torch_compile --model tiny --batches 8 --new_tokens 12     # (a)
    python benchmarks/bench_sampler.py --torch_compile --batches 8 32 --new_tokens 64               # (b) 512x8
    python benchmarks/bench_sampler.py --torch_compile --shape qwen2-0.5b --dtype bfloat16 --device cuda   # (c)
    python benchmarks/bench_sampler.py --tiny_runs 3          # whole `--preset tiny` runs, eager vs --torch_compile
    python benchmarks/bench_sampler.py --passes --shape qwen2-0.5b --accumulation 2 4   # one pass a step vs GA passes
    python benchmarks/bench_sampler.py --tiny_passes 3 --accumulation 2 4                # the same, whole tiny runs

All decode the same left-padded batch of the tiny world's prompts (chat template) greedily with the same stop tokens,
--samples completions per prompt from one prefill each (as training does), and must produce the same tokens (checked
on every run). Timed: `--repeats` alternating runs of each after a warm-up (which, compiled, includes the compile:
its seconds are reported apart). Reported: the median tokens/s, where tokens are the completion tokens (EOS
included), and the share of eager sampling spent in the prefill (a run with one new token). --tiny_runs alternates
whole `online_dpo.py --preset tiny` runs with and without --torch_compile, the first compiled one with an empty
compile cache (cold), and reports the median wall time and time/sampling per step.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import online_dpo  # noqa: E402
from dpo_kernels import CompiledDecoder  # noqa: E402

SHAPES = {"qwen2-0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936)}


def prompts(n: int) -> list:
    with open(os.path.join(REPO, "benchmarks", "tiny", "prompts", "train.jsonl")) as f:
        return [json.loads(line)["prompt"] for line, _ in zip(f, range(n))]


def make_model(a, tokenizer):
    from transformers import AutoModelForCausalLM, Qwen2Config

    dtype = getattr(torch, a.dtype)
    if a.model == "tiny":
        return AutoModelForCausalLM.from_pretrained(os.path.join(REPO, "benchmarks", "tiny", "policy"),
                                                    dtype=dtype).to(a.device).eval()
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate or 4 * a.hidden,
                         num_hidden_layers=a.layers, num_attention_heads=a.heads or max(1, a.hidden // 64),
                         num_key_value_heads=a.kv_heads or max(1, a.hidden // 128), max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return AutoModelForCausalLM.from_config(config).to(a.device, dtype).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def measure(model, tokenizer, ids, mask, T, stop_ids, a):
    """-> completion tokens, {name: tokens/s}, whether both produced the same tokens, extra columns."""
    pad = tokenizer.pad_token_id
    K = a.samples

    def ours(decoder=online_dpo.EAGER, new_tokens=T):
        how = online_dpo.Sampling(new_tokens, stop_ids, pad, do_sample=False)
        return online_dpo.sample(model, ids, mask, how, K, decoder=decoder)

    if a.torch_compile:
        decoder = CompiledDecoder(online_dpo.EAGER, model, ids.size(1) + T, torch.device(a.device))
        runs = {"eager": ours, "compiled": lambda: ours(decoder)}
    else:
        def generate():
            out = model.generate(input_ids=ids.repeat(K, 1), attention_mask=mask.repeat(K, 1), max_new_tokens=T,
                                 do_sample=False, eos_token_id=stop_ids, pad_token_id=pad)
            return out[:, ids.size(1):]

        runs = {"generate": generate, "eager": ours}
    with torch.no_grad():
        outputs, first = {}, {}
        for name, fn in runs.items():  # warm-up (and compile), and the outputs to compare
            outputs[name], first[name] = timed(fn, a.device)
        reference, reference_mask = outputs["eager"]
        other = outputs["compiled" if a.torch_compile else "generate"]
        other = other[0] if isinstance(other, tuple) else other
        other = other.masked_fill(reference_mask[:, : other.size(1)] == 0, pad)
        same = other.shape == reference.shape and torch.equal(other, reference)
        tokens = int(reference_mask.sum())
        times = {name: [] for name in runs}
        prefill = []
        for _ in range(a.repeats):
            for name, fn in runs.items():
                times[name].append(timed(fn, a.device)[1])
            prefill.append(timed(lambda: ours(new_tokens=1), a.device)[1])
    speed = {k: tokens / statistics.median(v) for k, v in times.items()}
    extra = {"prefill share": statistics.median(prefill) / statistics.median(times["eager"])}
    if a.torch_compile:
        extra |= {"compile s": decoder.compile_seconds, "graphs": decoder.graphs,
                  "first call s": first["compiled"]}
    return tokens, speed, same, extra


def tiny_runs(a) -> None:
    """Whole tiny-preset runs, eager and --torch_compile alternating; the first compiled run compiles cold."""
    cache = tempfile.mkdtemp(prefix="inductor_cache_")
    results = {"eager": [], "compiled": []}
    for i in range(a.tiny_runs):
        for name, flags in (("eager", []), ("compiled", ["--torch_compile"])):
            out = tempfile.mkdtemp(prefix="tiny_run_")
            env = os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache}
            t0 = time.perf_counter()
            subprocess.run([sys.executable, os.path.join(REPO, "online_dpo.py"), "--preset", "tiny", "--output_dir",
                            out, *flags], check=True, env=env, capture_output=True)
            wall = time.perf_counter() - t0
            lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
            steps = [m for m in lines if "time/step" in m]
            record = {"wall": wall, "s/step": statistics.median(m["time/step"] for m in steps),
                      "sampling": statistics.median(m["time/sampling"] for m in steps),
                      "compile": steps[-1].get("time/compile", 0.0), "reward": lines[-1]["eval/reward_trained"]}
            results[name].append(record)
            print(f"run {i} {name}: {record}", file=sys.stderr)
    print(f"\n`--preset tiny`, {a.tiny_runs} alternating runs each, {torch.get_num_threads()} threads; compiled run 1 "
          f"with an empty compile cache\n")
    print("| run | wall s (median) | median s/step | median time/sampling | time/compile | held-out reward |")
    print("|---|---|---|---|---|---|")
    for name, rs in results.items():
        cold = f" (cold: {rs[0]['wall']:.1f} s, compile {rs[0]['compile']:.1f} s)" if name == "compiled" else ""
        warm = rs[1:] if name == "compiled" and len(rs) > 1 else rs
        print(f"| {name} | {statistics.median(r['wall'] for r in warm):.1f}{cold} | "
              f"{statistics.median(r['s/step'] for r in warm):.3f} | {statistics.median(r['sampling'] for r in warm):.3f}"
              f" | {statistics.median(r['compile'] for r in warm):.1f} | "
              f"{statistics.median(r['reward'] for r in warm):+.3f} |")


def passes(model, tokenizer, a) -> None:
    """A step's sampling (rollout(), sampled as in training: temperature 0.9, K samples per prompt from one prefill),
    its GA x B prompts in one pass against GA passes of B (--generation_batch_size B, the old way), alternating."""
    B, K, T = a.batches[0], a.samples, a.new_tokens[0]
    rows = []
    for GA in a.accumulation:
        step_prompts = prompts(B * GA)
        times = {"GA passes": [], "one pass": []}
        for repeat in range(a.repeats + 1):  # the first: a warm-up
            for name, size in (("GA passes", B), ("one pass", None)):
                args = online_dpo.Args(max_new_tokens=T, max_length=192 + T, generation_batch_size=size)
                how = online_dpo.Sampling(T, [tokenizer.eos_token_id], tokenizer.pad_token_id, temperature=0.9)
                ctx = online_dpo.Context(args=args, tokenizer=tokenizer, rank=0, world=1, device=torch.device(a.device),
                                         autocast=torch.autocast(a.device, enabled=False), sampling=how,
                                         reward_models=[], reward_funcs=[], local_judge=None)
                generator = torch.Generator(a.device).manual_seed(repeat)
                samples, seconds = timed(lambda: online_dpo.rollout(ctx, model, step_prompts, generator, K), a.device)
                if repeat:
                    times[name].append(seconds)
                print(f"GA {GA} {name}: {seconds:.2f} s, {int(samples.completion_mask.sum())} tokens", file=sys.stderr)
        rows.append((GA, {k: statistics.median(v) for k, v in times.items()}))
    name = "the tiny world's policy" if a.model == "tiny" else f"Qwen2 {a.hidden}x{a.layers}, vocab {a.vocab}"
    print(f"\n{name}, {a.dtype}, {a.device}, {torch.get_num_threads()} threads; a step of GA x B = GA x {B} prompts, "
          f"K = {K} samples each, {T} new tokens, temperature 0.9; median of {a.repeats} alternating runs\n")
    print("| GA | rows per pass: GA passes / one pass | GA passes s/step | one pass s/step | one / GA passes |")
    print("|---|---|---|---|---|")
    for GA, t in rows:
        print(f"| {GA} | {B * K} / {GA * B * K} | {t['GA passes']:.2f} | {t['one pass']:.2f} | "
              f"{t['one pass'] / t['GA passes']:.2f} |")


def tiny_passes(a) -> None:
    """Whole `--preset tiny` runs with the step's 16 prompts as GA micro-batches of 16 / GA: one sampling pass per
    step against GA (--generation_batch_size 16 / GA), alternating; time/sampling per step and the held-out reward."""
    rows = []
    for GA in a.accumulation:
        B = 16 // GA
        results = {"GA passes": [], "one pass": []}
        for _ in range(a.tiny_passes):
            for name, extra in (("GA passes", ["--generation_batch_size", str(B)]), ("one pass", [])):
                out = tempfile.mkdtemp(prefix="tiny_passes_")
                subprocess.run([sys.executable, os.path.join(REPO, "online_dpo.py"), "--preset", "tiny", "--max_steps",
                                str(a.tiny_steps), "--per_device_train_batch_size", str(B),
                                "--gradient_accumulation_steps", str(GA), "--output_dir", out, *extra],
                               check=True, capture_output=True)
                lines = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
                steps = [m for m in lines if "time/step" in m]
                results[name].append((statistics.median(m["time/sampling"] for m in steps),
                                      statistics.median(m["time/step"] for m in steps), lines[-1]["eval/reward_trained"]))
                print(f"GA {GA} {name}: {results[name][-1]}", file=sys.stderr)
        rows.append((GA, B, {k: [statistics.median(r[i] for r in v) for i in range(3)] for k, v in results.items()}))
    print(f"\n`--preset tiny --max_steps {a.tiny_steps}` (16 prompts a step), {a.tiny_passes} alternating runs each, "
          f"medians\n")
    print("| GA x B | GA passes: sampling s/step | one pass: sampling s/step | one / GA passes | s/step: GA passes / "
          "one pass | held-out reward: GA passes / one pass |")
    print("|---|---|---|---|---|---|")
    for GA, B, r in rows:
        g, o = r["GA passes"], r["one pass"]
        print(f"| {GA} x {B} | {g[0]:.3f} | {o[0]:.3f} | {o[0] / g[0]:.2f} | {g[1]:.3f} / {o[1]:.3f} | "
              f"{g[2]:+.3f} / {o[2]:+.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["random", "tiny"], default="random", help="tiny: the tiny world's policy")
    parser.add_argument("--shape", choices=list(SHAPES), help="a random model of this shape")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--kv_heads", type=int)
    parser.add_argument("--intermediate", type=int)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32], help="prompts per batch")
    parser.add_argument("--samples", type=int, default=1, help="completions per prompt, from one prefill")
    parser.add_argument("--new_tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--torch_compile", action="store_true", help="eager against the compiled decode step")
    parser.add_argument("--tiny_runs", type=int, default=0, help="whole tiny-preset runs instead, this many each")
    parser.add_argument("--passes", action="store_true", help="a step sampled in one pass against GA passes")
    parser.add_argument("--accumulation", type=int, nargs="+", default=[2, 4], help="GA, with --passes")
    parser.add_argument("--tiny_passes", type=int, default=0, help="--passes as whole tiny runs, this many each")
    parser.add_argument("--tiny_steps", type=int, default=30, help="steps of each run, with --tiny_passes")
    a = parser.parse_args()
    for k, v in SHAPES.get(a.shape, {}).items():
        setattr(a, k, v)
    if a.tiny_runs:
        return tiny_runs(a)
    if a.tiny_passes:
        return tiny_passes(a)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO, "benchmarks", "tiny", "policy"))
    model = make_model(a, tokenizer)
    if a.passes:
        return passes(model, tokenizer, a)
    stop_ids = online_dpo.sampling_settings(online_dpo.Args(), tokenizer, model).stop_ids
    rows = []
    for B in a.batches:
        ids, mask = (t.to(a.device) for t in online_dpo.encode_prompts(tokenizer, prompts(B), 192))
        for T in a.new_tokens:
            tokens, speed, same, extra = measure(model, tokenizer, ids, mask, T, stop_ids, a)
            rows.append((B * a.samples, T, tokens, speed, same, extra))
            print(f"{B * a.samples} rows x {T} tokens: {speed} {extra}", file=sys.stderr)
    name = "the tiny world's policy" if a.model == "tiny" else f"Qwen2 {a.hidden}x{a.layers}, vocab {a.vocab}"
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"\n{name} ({params:.1f}M), {a.dtype}, {a.device}, {torch.get_num_threads()} threads, greedy, "
          f"{a.samples} sample(s) per prompt, median of {a.repeats}\n")
    base, other = ("eager", "compiled") if a.torch_compile else ("generate", "eager")
    ratio = "compiled / eager time" if a.torch_compile else "ours / generate"
    extra_names = list(rows[0][5]) if rows else []
    print(f"| rows | new tokens | tokens | {base} tok/s | {other} tok/s | {ratio} | same tokens | "
          + " | ".join(extra_names) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(extra_names))
    for n, T, tokens, speed, same, extra in rows:
        r = speed[base] / speed[other] if a.torch_compile else speed[other] / speed[base]
        cells = [f"{v:.2f}" if isinstance(v, float) else str(v) for v in extra.values()]
        print(f"| {n} | {T} | {tokens} | {speed[base]:.0f} | {speed[other]:.0f} | {r:.2f} | {same} | "
              + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
