"""Our KV-cache sampler (online_dpo.sample) against transformers' model.generate: tokens per second, same outputs.

    python benchmarks/bench_sampler.py                       # random-init Qwen2 512x8, vocab 4096, fp32, CPU
    python benchmarks/bench_sampler.py --hidden 896 --layers 24 --vocab 151936 --dtype bfloat16 --device cuda

Both decode the same left-padded batch of the tiny world's prompts (chat template) greedily, with the same stop
tokens, and must produce the same tokens (checked on every run). Timed: `--repeats` alternating runs of each after one
warm-up; reported: the median tokens/s, where tokens are the completion tokens both produce (EOS included).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import online_dpo  # noqa: E402


def prompts(n: int) -> list:
    with open(os.path.join(REPO, "benchmarks", "tiny", "prompts", "train.jsonl")) as f:
        return [json.loads(line)["prompt"] for line, _ in zip(f, range(n))]


def make_model(a, tokenizer):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_hidden_layers=a.layers,
                         num_attention_heads=max(1, a.hidden // 64), num_key_value_heads=max(1, a.hidden // 128),
                         max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return AutoModelForCausalLM.from_config(config).to(a.device, getattr(torch, a.dtype)).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(model, tokenizer, ids, mask, T: int, stop_ids: list[int], repeats: int, device: str):
    """-> completion tokens, {name: tokens/s}, whether both produced the same tokens."""
    def ours():
        return online_dpo.sample(model, ids, mask, T, stop_ids, tokenizer.pad_token_id, do_sample=False)

    def generate():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=T, do_sample=False,
                             eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)
        return out[:, ids.size(1):]

    with torch.no_grad():
        (ours_ids, ours_mask), theirs = ours(), generate()  # warm-up, and the outputs to compare
        theirs = theirs.masked_fill(ours_mask[:, : theirs.size(1)] == 0, tokenizer.pad_token_id)
        same = theirs.shape == ours_ids.shape and torch.equal(theirs, ours_ids)
        tokens = int(ours_mask.sum())
        times = {"ours": [], "generate": []}
        for _ in range(repeats):
            for name, fn in (("generate", generate), ("ours", ours)):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - t0)
    return tokens, {k: tokens / statistics.median(v) for k, v in times.items()}, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--new_tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    a = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(REPO, "benchmarks", "tiny", "policy"))
    model = make_model(a, tokenizer)
    stop_ids = online_dpo.sampling_settings(online_dpo.Args(), tokenizer, model)[1]
    rows = []
    for B in a.batches:
        ids, mask = (t.to(a.device) for t in online_dpo.encode_prompts(tokenizer, prompts(B), 192))
        for T in a.new_tokens:
            tokens, speed, same = measure(model, tokenizer, ids, mask, T, stop_ids, a.repeats, a.device)
            rows.append((B, T, tokens, speed["generate"], speed["ours"], same))
            print(f"batch {B} x {T} tokens: {speed}", file=sys.stderr)
    print(f"\nQwen2 {a.hidden}x{a.layers}, vocab {a.vocab}, {a.dtype}, {a.device}, {torch.get_num_threads()} threads, "
          f"greedy, median of {a.repeats}\n")
    print("| batch | new tokens | tokens | generate tok/s | ours tok/s | ours / generate | same tokens |")
    print("|---|---|---|---|---|---|---|")
    for B, T, tokens, gen, ours, same in rows:
        print(f"| {B} | {T} | {tokens} | {gen:.0f} | {ours:.0f} | {ours / gen:.2f} | {same} |")


if __name__ == "__main__":
    main()
