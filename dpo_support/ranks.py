"""Who does what under torchrun: rank 0 alone prints and writes files, and what every rank must know is gathered."""

import os

import torch.distributed as dist


def is_main():
    """Rank 0 alone prints and writes files."""
    return os.environ.get("RANK", "0") == "0"


def say(text):
    """Print on rank 0."""
    if is_main():
        print(text)


def gather_lists(items):
    """All ranks' lists, concatenated in rank order."""
    if not dist.is_initialized():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]
