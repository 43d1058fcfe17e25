"""The judge over an OpenAI-compatible API (--judge_api_base, e.g. vLLM's server): every question sent at once,
retried with backoff, and a trial question before any model loads. online_dpo.ask_judge() turns the answers into
preferences as it does a local judge's."""

import concurrent.futures
import json
import os
import random
import time
import urllib.error
import urllib.request

import torch

from dpo_support.faults import UsageError, why
from dpo_support.ranks import say
from dpo_support.signals import STOP

WAIT_S = 30  # a step waiting this long on the judge says so, every 30 s


def ask(texts, args):
    """Every question to the API judge, concurrently. Returns q = P(A) / (P(A) + P(B)) and the mass P(A) + P(B), read
    off the answer (1 or 0 each), and which requests failed (their pairs become invalid)."""
    pool = concurrent.futures.ThreadPoolExecutor(args.judge_api_concurrency)
    futures = [pool.submit(request, text, args) for text in texts]
    start = time.perf_counter()
    noted = start
    waiting = concurrent.futures.wait(futures, timeout=1.0).not_done
    while waiting and not STOP:
        if time.perf_counter() - noted >= WAIT_S:
            noted = time.perf_counter()
            say(f"waiting for the judge at {args.judge_api_base}: {len(futures) - len(waiting)} of {len(futures)} "
                f"answers in {noted - start:.0f} s (timeout: {args.judge_api_timeout:g} s)")
        waiting = concurrent.futures.wait(futures, timeout=1.0).not_done
    pool.shutdown(wait=False, cancel_futures=True)
    answers = [f.result() if f.done() and not f.cancelled() and f.exception() is None else None for f in futures]
    # An answer other than exactly A or B, or none, is invalid: never guessed at.
    letters = [(a or "").strip() for a in answers]
    q = torch.tensor([float(x in "A") for x in letters])
    mass = torch.tensor([float(x in ("A", "B")) for x in letters])
    return q, mass, torch.tensor([a is None for a in answers])


def request(text, args, retries=None):
    """One question, retried (--judge_api_retries times, unless `retries`) with backoff after a timeout, 408, 429
    or 5xx; the answer."""
    key = os.environ.get("OPENAI_API_KEY")
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = json.dumps({"model": args.judge_api_model, "messages": [{"role": "user", "content": text}],
                       "temperature": 0, "max_tokens": 4}).encode()
    if retries is None:
        retries = args.judge_api_retries
    for attempt in range(retries + 1):
        if attempt:  # the jitter's own stream: Python's is in checkpoints, for an exact resume
            time.sleep(min(0.25 * 2 ** attempt, 8.0) * (0.5 + random.Random().random()))
        try:
            url = args.judge_api_base.rstrip("/") + "/chat/completions"
            sent = urllib.request.Request(url, body, headers)
            with urllib.request.urlopen(sent, timeout=args.judge_api_timeout) as response:
                return str(json.load(response)["choices"][0]["message"]["content"])
        except urllib.error.HTTPError as e:
            error = e
            if e.code not in (408, 429) and e.code < 500:
                break
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:  # timeout, connection, malformed body
            error = e
        if STOP:
            break
    raise error


def check(args, question):
    """A trial question before any model loads, asked once (no retries: a judge that never answers is reported
    after one --judge_api_timeout): a wrong URL, model or key fails now, and so does an answer other than A or B."""
    say(f"asking the judge at {args.judge_api_base} a trial question (waiting up to {args.judge_api_timeout:g} s)")
    try:
        answer = request(question, args, retries=0)
    except Exception as e:
        raise UsageError(f"--judge_api_base {args.judge_api_base!r}: a trial question failed ({why(e)});"
                         " is it running? Check --judge_api_model and $OPENAI_API_KEY") from None
    if answer.strip() not in ("A", "B"):
        raise UsageError(f"--judge_api_base {args.judge_api_base!r}: the judge answered {answer.strip()[:60]!r} to a "
                         "trial question, not A or B; check --judge_api_model, and --judge_prompt's instruction")
