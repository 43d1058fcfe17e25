"""Runs online_dpo.main in one process or under torchrun for tests/test_distributed.py, recording what each rank did.

    torchrun --nproc_per_node 2 tests/dist_worker.py OUT {sampled,fixed} [online_dpo flags]
    python tests/dist_worker.py OUT fixed [online_dpo flags]          # the one-process run to compare with

Writes OUT/rank{r}.pt with, per micro-step, the inputs of step_metrics (log-probs, scores, pairs, ...) and the prompt
and completion ids the policy was trained on; and this rank's parameters after training: its FSDP2 shard (to_local)
or, under DDP and one process, the whole tensor.

fixed: the completions are a function of the prompt text and of which of its two samples it is, instead of sampled,
so that runs with different numbers of processes and batch sizes train on exactly the same completions.
"""

import os
import sys
import zlib
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import online_dpo  # noqa: E402


def fixed_sample(model, prompt_ids, prompt_mask, how, num_samples=1, *_, **__):
    """rows [all first samples, all second samples] as online_dpo lays them out; each row's tokens depend only on
    (prompt, sample index): a length in 1..max_new_tokens, random non-stop tokens, and a stop token for 2 in 3."""
    max_new_tokens, stop_ids, pad_id = how.max_new_tokens, how.stop_ids, how.pad_id
    prompt_ids, prompt_mask = prompt_ids.repeat(num_samples, 1), prompt_mask.repeat(num_samples, 1)
    N, vocab = prompt_ids.size(0), model.config.vocab_size
    filler = min(set(range(vocab)) - set(stop_ids))
    rows = []
    for i in range(N):
        key = zlib.crc32(prompt_ids[i][prompt_mask[i].bool()].cpu().numpy().tobytes()) * 2 + (i >= N // 2)
        g = torch.Generator().manual_seed(key)
        length = int(torch.randint(1, max_new_tokens + 1, (1,), generator=g))
        row = torch.randint(0, vocab, (length,), generator=g)
        row[torch.isin(row, torch.tensor(stop_ids))] = filler
        if key % 3:
            row[-1] = stop_ids[0]
        rows.append(row)
    T = max(len(r) for r in rows)
    ids = torch.full((N, T), pad_id, dtype=torch.long)
    mask = torch.zeros((N, T), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)], mask[i, : len(row)] = row, 1
    return ids.to(prompt_ids.device), mask.to(prompt_ids.device)


def main() -> None:
    out, mode, flags = sys.argv[1], sys.argv[2], sys.argv[3:]
    records, trained_on = [], []
    step_metrics, completion_logprobs = online_dpo.step_metrics, online_dpo.completion_logprobs

    def recording_step_metrics(logps, ref_logps, completion_mask, pairs, samples, losses, beta):
        # As rows of the 2B pair completions (chosen, then rejected): the kept pairs' chosen and rejected rows,
        # the completions' scores and EOS.
        B = len(pairs.kept)
        pick = torch.cat([pairs.chosen, pairs.rejected])
        chosen = torch.arange(B)[pairs.kept.cpu()]
        names = ("logps", "ref_logps", "completion_mask", "scores", "chosen", "rejected", "has_eos", "losses")
        values = (logps, ref_logps, completion_mask, pairs.scores[pick], chosen, chosen + B, samples.has_eos[pick],
                  losses)
        records.append({k: v.detach().cpu() for k, v in zip(names, values)} | {"beta": beta} | trained_on.pop())
        return step_metrics(logps, ref_logps, completion_mask, pairs, samples, losses, beta)

    def recording_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *rest, **kw):
        training = torch.is_grad_enabled()
        if training:  # the policy's call, the one that trains
            n = completion_ids.size(0) // prompt_ids.size(0)  # packed pairs: one prompt row for two completions
            trained_on.append({"prompt_ids": prompt_ids.repeat(n, 1).cpu(),
                               "prompt_mask": prompt_mask.repeat(n, 1).cpu(), "completion_ids": completion_ids.cpu(),
                               # gradients already there: the earlier micro-steps' (FSDP2: their reduced shards)
                               "had_grads": all(p.grad is not None for p in model.parameters() if p.requires_grad)})
        out = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, *rest, **kw)
        if not training and trained_on:  # the reference's call, after the policy's: is it sharded again after it?
            trained_on[-1]["ref_sharded"] = all(hasattr(p, "to_local") for p in model.parameters())
        return out

    online_dpo.step_metrics, online_dpo.completion_logprobs = recording_step_metrics, recording_logprobs
    if mode == "loaded":
        return loaded(out, online_dpo.cli(flags))
    if mode == "fixed":
        online_dpo.sample = fixed_sample
    try:
        policy = online_dpo.main(online_dpo.cli(flags))
        params = {name: (p.to_local() if hasattr(p, "to_local") else p).detach().cpu().clone()
                  for name, p in policy.named_parameters()}
        rank = int(os.environ.get("RANK", "0"))
        mesh = next((tuple(p.device_mesh.shape) for p in policy.parameters() if hasattr(p, "device_mesh")), None)
        torch.save({"records": records, "params": params, "world": int(os.environ.get("WORLD_SIZE", "1")), "mesh": mesh},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def loaded(out, args):
    """loaded: the models as online_dpo loads them (rank 0 reads the weights, the others get them from it), each whole
    (gathered), with its buffers and whether its embeddings are tied; nothing trains."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForSequenceClassification

    try:
        rank, world, device = online_dpo.init_distributed(args)
        models = {"policy_fsdp": online_dpo.load_policy(args, device, world, False)[0],
                  "policy_ddp": online_dpo.load_policy(replace(args, distributed="ddp"), device, world, False)[1].module}
        for shard in (False, True):
            models[f"reward_sharded={shard}"] = online_dpo.load_frozen(
                AutoModelForSequenceClassification, args.reward_model_path[0], args, device, shard, False, num_labels=1)
        record = {}
        for name, model in models.items():
            record[name] = {"weights": get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)),
                            "buffers": {k: b.clone() for k, b in model.named_buffers()},
                            "tied": model.get_input_embeddings().weight is model.get_output_embeddings().weight
                            if model.get_output_embeddings() is not None else None}
        torch.save(record, os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
