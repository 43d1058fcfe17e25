"""Per-token log-probs from the last hidden states, forward + backward: naive (float32 logits, log_softmax, gather)
against dpo_kernels.linear_logprobs (lm_head fused, tile by tile).

    python benchmarks/bench_logprobs.py                     # CPU cases; each in a fresh process, peak RSS growth
    python benchmarks/bench_logprobs.py --full --device cuda   # N in {2k, 8k} x H in {896, 2048} x V in {32k, 152k}

Both get the same hidden (N, H), weight (V, H) and targets, and a sign-changing upstream gradient; time is the median
of --repeats runs after a warm-up, memory the peak above what the inputs already hold, gradients included (CPU: ru_maxrss;
CUDA: max_memory_allocated)."""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_CASES = [(2048, 896, 32_000), (2048, 896, 151_936), (8192, 896, 32_000), (2048, 2048, 151_936)]  # (N, H, V)
FULL_CASES = [(n, h, v) for n in (2048, 8192) for h in (896, 2048) for v in (32_000, 151_936)]


def one(impl: str, n: int, h: int, v: int, dtype: str, device: str, repeats: int) -> tuple[float, float]:
    """In its own process: (median seconds, peak memory growth in MB) of forward + backward."""
    import torch

    from dpo_kernels import linear_logprobs, naive_linear_logprobs

    fn = naive_linear_logprobs if impl == "naive" else linear_logprobs
    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    # Made in their own dtype, scaled in place: no temporary copy raises the baseline of ru_maxrss.
    hidden = torch.randn(n, h, generator=g, dtype=dt).to(device).requires_grad_()
    weight = torch.randn(v, h, generator=g, dtype=dt).div_(h**0.5).to(device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    upstream = torch.randn(n, generator=g).to(device)

    def run():
        (fn(hidden, weight, targets) * upstream).sum().backward()
        hidden.grad = weight.grad = None
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    run()  # warm-up; the gradients' own memory counts in both
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return statistics.median(times), (peak - base) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full grid (slow on a CPU)")
    parser.add_argument("--cases", nargs="+", help="N,H,V triples instead of the default cases, e.g. 8192,896,151936")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        impl, n, h, v, dtype = a.child
        print(*one(impl, int(n), int(h), int(v), dtype, a.device, a.repeats))
        return
    import torch

    print(f"torch {torch.__version__}, {a.device}, {torch.get_num_threads()} threads; median of {a.repeats}; memory: peak above "
          "the inputs, gradients included\n")
    print("| N x H x V | dtype | naive s | fused s | time ratio | naive MB | fused MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    cases = [tuple(map(int, c.split(","))) for c in a.cases] if a.cases else FULL_CASES if a.full else CPU_CASES
    for n, h, v in cases:
        for dtype in a.dtypes:
            r = {}
            for impl in ("naive", "fused"):
                cmd = [sys.executable, __file__, "--device", a.device, "--repeats", str(a.repeats), "--child", impl,
                       str(n), str(h), str(v), dtype]
                r[impl] = [float(x) for x in subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()]
            (tn, mn), (tf, mf) = r["naive"], r["fused"]
            print(f"| {n} x {h} x {v} | {dtype} | {tn:.3f} | {tf:.3f} | {tf / tn:.2f} | {mn:.0f} | {mf:.0f} | "
                  f"{mf / max(mn, 1):.3f} |", flush=True)


if __name__ == "__main__":
    main()
