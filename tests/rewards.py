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
