"""Reward functions for the tests and the README's first command (TRL's reward-function signature)."""


def low_token_ids(prompts, completions, completion_ids, **kwargs):
    """Fraction of completion tokens whose id is in the lowest quarter of the tiny 400-token vocabulary.

    A random-init policy samples them about a quarter of the time; online DPO can learn to raise that."""
    return [sum(t < 100 for t in ids) / max(1, len(ids)) for ids in completion_ids]


def with_topic(prompts, completions, completion_ids, topic, id, **kwargs):
    """Uses the dataset's extra columns: 1.0 for completions of prompts about the sky, else 0.0, None for id 0."""
    return [None if i == 0 else float(t == "sky") for t, i in zip(topic, id)]


def zero(prompts, completions, **kwargs):
    """No preference at all: 0.0 for every completion."""
    return [0.0] * len(prompts)


def one_value(prompts, completions, **kwargs):
    """Broken on purpose: one number for the whole batch instead of one per completion."""
    return [0.0]


def noisy_low_token_ids(prompts, completions, completion_ids, **kwargs):
    """low_token_ids plus noise from Python's and NumPy's global random streams, which a resumed run must restore."""
    import random

    import numpy as np

    noise = [0.01 * random.random() + 0.01 * float(np.random.rand()) for _ in completion_ids]
    return [r + n for r, n in zip(low_token_ids(prompts, completions, completion_ids), noise)]


def words(prompts, completions, **kwargs):
    """Broken on purpose: words instead of numbers."""
    return ["good"] * len(prompts)


def one_value_on_batches(prompts, completions, **kwargs):
    """Broken on purpose, but only for more than 2 completions: it passes the trial call that online_dpo.py makes
    before loading the models (2 completions) and fails in step 1."""
    return [0.0] * len(prompts) if len(prompts) <= 2 else [0.0]


def raises(prompts, completions, **kwargs):
    """Broken on purpose: looks up a column the dataset does not have."""
    return [row["answer"] for row in kwargs["solution"]]


def letter_e(prompts, completions, **kwargs):
    """A reward on the text alone: the fraction of its characters that are the letter e."""
    return [c.count("e") / max(1, len(c)) for c in completions]


CALLS = []


def breaks_on_call(prompts, completions, completion_ids, **kwargs):
    """low_token_ids, except that its call number $FAIL_ON_CALL (counting the trial call before training) raises, as
    a reward server that went down would. Reset with CALLS.clear()."""
    import os

    CALLS.append(1)
    if str(len(CALLS)) == os.environ.get("FAIL_ON_CALL"):
        raise ConnectionError("the reward server went away")
    return low_token_ids(prompts, completions, completion_ids)


def unscored(prompts, completions, **kwargs):
    """No opinion on any completion."""
    return [None] * len(prompts)


def infinite(prompts, completions, completion_ids, **kwargs):
    """An unbounded reward: +inf for the first completion of every batch, low_token_ids for the others."""
    return [float("inf")] + low_token_ids(prompts, completions, completion_ids)[1:]


def exits(prompts, completions, **kwargs):
    """Broken on purpose: ends the process as a script's sys.exit(0) would."""
    import sys

    sys.exit(0)


def interrupts(prompts, completions, **kwargs):
    """Broken on purpose: raises KeyboardInterrupt itself (no Ctrl-C was pressed)."""
    raise KeyboardInterrupt


def number_strings(prompts, completions, **kwargs):
    """Broken on purpose: numbers as text, which float() would take."""
    return ["1.5"] * len(prompts)


def edits_its_arguments(prompts, completions, completion_ids, **kwargs):
    """low_token_ids, after emptying every list it was given, as a careless function might."""
    scores = low_token_ids(prompts, completions, completion_ids)
    prompts.clear()
    completions.clear()
    for values in kwargs.values():
        if isinstance(values, list):  # the columns (trainer_state is no list)
            values.clear()
    return scores


def fails_on_held_out(prompts, completions, completion_ids, split, **kwargs):
    """Broken on purpose, only for the held-out rows (their `split` column is "test")."""
    if "test" in split:
        raise KeyError("no answer key for held-out rows")
    return low_token_ids(prompts, completions, completion_ids)


_TRAINING_CALLS = []


def ties_on_the_first_step(prompts, completions, completion_ids, **kwargs):
    """0 for every completion in the first call of training (the trial calls on placeholder completions aside), so that
    with --drop_ties step 1 keeps no pair; then low_token_ids. Each process counts its own calls."""
    if completions[0] != "A placeholder answer.":
        _TRAINING_CALLS.append(len(completions))
        if len(_TRAINING_CALLS) == 1:
            return [0.0] * len(completions)
    return low_token_ids(prompts, completions, completion_ids)


def fails_on_rank_1_in_step_3(prompts, completions, completion_ids, **kwargs):
    """low_token_ids, except on torchrun's rank 1 in its third call of training (step 3 with one micro-step a step,
    the trial call on placeholder completions aside), which raises, as a reward server that one node cannot reach."""
    import os

    if completions[0] != "A placeholder answer." and os.environ.get("RANK") == "1":
        _TRAINING_CALLS.append(len(completions))
        if len(_TRAINING_CALLS) == 3:
            raise ConnectionError("the reward server is unreachable from this node")
    return low_token_ids(prompts, completions, completion_ids)


def ties_on_short_prompts(prompts, completions, completion_ids, **kwargs):
    """low_token_ids, except that both samples of a prompt of four words or fewer tie (0.0): with --drop_ties, those
    pairs leave the loss, unevenly across micro-batches and ranks."""
    scores = low_token_ids(prompts, completions, completion_ids)
    return [0.0 if len(p.split()) <= 4 else s for p, s in zip(prompts, scores)]


def logged_abstaining(prompts, completions, completion_ids, trainer_state, **kwargs):
    """low_token_ids, but no score (None) for a completion whose first token id is odd; each call's completion ids,
    scores and trainer_state.global_step appended as a JSON line to $REWARD_LOG, for the tests to recompute the
    logged metrics from."""
    import json
    import os

    scores = low_token_ids(prompts, completions, completion_ids)
    scores = [None if ids[:1] and ids[0] % 2 else s for ids, s in zip(completion_ids, scores)]
    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps({"ids": completion_ids, "scores": scores, "global_step": trainer_state.global_step}) + "\n")
    return scores


def logged_prompts(prompts, completions, completion_ids, **kwargs):
    """low_token_ids; each call's prompts appended as a JSON line to $REWARD_LOG."""
    import json
    import os

    with open(os.environ["REWARD_LOG"], "a") as f:
        f.write(json.dumps(prompts) + "\n")
    return low_token_ids(prompts, completions, completion_ids)


def sampling_oom_on_rank_1_in_step_3(prompts, completions, completion_ids, **kwargs):
    """low_token_ids; its first call (the trial, before training) makes torchrun's rank 1 run out of memory while it
    decodes step 3 (in sample(), the policy gathered), as CUDA says it: online_dpo.py runs as __main__, whose rollout
    it wraps."""
    import os
    import sys

    import torch

    main = sys.modules["__main__"]
    if os.environ.get("RANK") == "1" and not hasattr(main.rollout, "original"):
        rollout = main.rollout
        sample = main.sample

        def out_of_memory(*args, **kw):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

        def failing(ctx, *args, **kw):
            main.sample = out_of_memory if ctx.trainer_state.global_step == 2 else sample
            return rollout(ctx, *args, **kw)

        failing.original = rollout
        main.rollout = failing
    return low_token_ids(prompts, completions, completion_ids)


def training_oom_on_rank_1_in_step_3(prompts, completions, completion_ids, **kwargs):
    """low_token_ids; its first call (the trial) makes torchrun's rank 1 run out of memory in the policy's forward of
    step 3's training, as the CPU allocator says it: online_dpo.py runs as __main__, whose functions it wraps."""
    import os
    import sys

    import torch

    main = sys.modules["__main__"]
    if os.environ.get("RANK") == "1" and not hasattr(main.rollout, "original"):
        rollout = main.rollout
        logprobs = main.completion_logprobs
        step = []

        def counting(ctx, *args, **kw):
            step[:] = [ctx.trainer_state.global_step + 1]
            return rollout(ctx, *args, **kw)

        def failing(*args, **kw):
            if step == [3] and torch.is_grad_enabled():
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")
            return logprobs(*args, **kw)

        counting.original = rollout
        main.rollout = counting
        main.completion_logprobs = failing
    return low_token_ids(prompts, completions, completion_ids)
