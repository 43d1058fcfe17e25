"""Per-token log-probs, forward + backward: naive log_softmax + gather vs kernels.token_logprobs (chunked).

    python benchmarks/bench_logprobs.py            # CPU: each case in a fresh subprocess, peak RSS above baseline

Prints a table with time (median of 3) and peak memory for both, and their ratios."""

import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CASES = [(1024, 32_000), (1024, 151_936), (4096, 32_000)]  # (N tokens, V vocabulary)


def one(impl: str, n: int, v: int, dtype: str) -> tuple[float, float]:
    """Runs in its own process: (median seconds, peak RSS growth in MB) of forward + backward."""
    import torch

    from kernels import naive_token_logprobs, token_logprobs

    fn = naive_token_logprobs if impl == "naive" else token_logprobs
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, v, generator=g, dtype=getattr(torch, dtype)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times = []
    for _ in range(3):
        t = time.perf_counter()
        (fn(logits, targets) * upstream).sum().backward()
        times.append(time.perf_counter() - t)
        logits.grad = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return statistics.median(times), peak - base


def main() -> None:
    if len(sys.argv) == 5:  # child process
        seconds, mb = one(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        print(seconds, mb)
        return
    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    print("| N x V | dtype | naive s | ours s | time ratio | naive MB | ours MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for n, v in CASES:
        for dtype in ("float32", "bfloat16"):
            r = {}
            for impl in ("naive", "ours"):
                out = subprocess.run([sys.executable, __file__, impl, str(n), str(v), dtype], capture_output=True, text=True, check=True)
                r[impl] = [float(x) for x in out.stdout.split()]
            (tn, mn), (to, mo) = r["naive"], r["ours"]
            print(f"| {n} x {v} | {dtype} | {tn:.3f} | {to:.3f} | {to / tn:.2f} | {mn:.0f} | {mo:.0f} | {mo / mn:.2f} |")


if __name__ == "__main__":
    main()
