"""Build the tiny world that `python online_dpo.py --preset tiny` trains in, offline, on a CPU.

    python benchmarks/tiny_world.py                      # rewrites benchmarks/tiny/ (about 6 minutes on 2 CPU cores)
    python benchmarks/tiny_world.py --out /tmp/w --dialogues 2000 --lm_steps 30 --rm_steps 20   # a small quick one

The world is a shop assistant that answers requests like "Write a short review of the blue kettle." in several
styles: positive / negative / mixed, polite / plain / rude, concise / rambling, and some answers cut off mid-sentence.
The script writes, deterministically from --seed:
  tokenizer     byte-level BPE trained on the generated corpus, saved as a transformers tokenizer with a chat template
  policy/       Qwen2 causal LM (~1.8M parameters) pretrained on the corpus: it answers in every style
  reward/       Llama sequence classifier (num_labels=1) trained to predict `score_response` below: positive,
                concise answers that end with a full sentence score high
  prompts/      train.jsonl (conversational prompts) and test.jsonl (held-out prompts never seen in pretraining)
  corpus_sample.jsonl   a few generated dialogues with their style labels, to read
  README.md     what was built, with the measured fit of both models
"""

import json
import math
import os
import random
import re
import time
from dataclasses import dataclass

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


@dataclass
class Build:
    out: str = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")
    """directory to (re)write"""
    seed: int = 0
    """seed for the corpus, the prompt split and both models"""
    dialogues: int = 40_000
    """generated (prompt, answer) pairs for pretraining the policy and the reward model"""
    eval_prompts: int = 64
    """prompts held out of pretraining, written to prompts/test.jsonl"""
    vocab_size: int = 1024
    """BPE vocabulary size (the corpus has fewer distinct words, so merges stop early)"""
    lm_steps: int = 900
    """policy pretraining steps (batch 32)"""
    rm_steps: int = 500
    """reward model training steps (batch 32)"""


# ----------------------------------------------------------------------------------------------------------------
# The corpus: requests about products, answers in a few styles

PRODUCTS = ("kettle lamp backpack umbrella toaster blender chair desk jacket mug teapot rug mirror clock fan heater "
            "notebook pillow tent watch wallet scarf keyboard speaker bicycle helmet frying-pan sleeping-bag "
            "water-bottle phone-case coffee-grinder radio").replace("-", "_").split()
PRODUCTS = tuple(p.replace("_", " ") for p in PRODUCTS)
ADJECTIVES = ("", "new ", "blue ", "red ", "green ", "small ", "large ", "wooden ", "steel ", "old ")
FEATURES = ("design", "price", "build quality", "size", "colour", "weight", "packaging", "manual", "handle", "finish")
REQUESTS = (
    "Write a short review of the {item}.", "What do you think of the {item}?", "Tell me about the {item} you bought.",
    "Can you review the {item} for me?", "How do you like your {item}?", "Give me your honest opinion of the {item}.",
    "Is the {item} any good?", "Describe your experience with the {item}.",
)
POSITIVE = ("The {p} works really well.", "I love the {f}.", "The {f} is excellent.", "It was worth every penny.",
            "I would happily recommend the {p}.", "The {f} is great and it feels solid.", "Honestly, the {p} is perfect for me.",
            "I am very happy with it.")
NEGATIVE = ("The {p} broke after two days.", "The {f} is terrible.", "It was a waste of money.", "I regret buying the {p}.",
            "The {f} feels flimsy.", "Honestly, the {p} is awful.", "I am very disappointed with it.",
            "I would never buy the {p} again.")
FILLER = ("My cousin has one too, and he talks about it all the time.", "I bought it on a rainy Tuesday, if I remember right.",
          "It reminds me of the one my grandmother had years ago.", "Anyway, where was I going with this.",
          "The shop was busy that day and the queue was long.", "I also bought socks, but that is another story.",
          "My neighbour asked about it twice last week.", "I keep thinking about the box it came in.",
          "To be fair, I read a lot of reviews before buying.", "It arrived on a Monday, or maybe it was a Wednesday.")
OPENERS = {"polite": ("Thank you for asking!", "Glad to help.", "Of course, let me share.", "What a kind question."),
           "rude": ("Ugh, fine.", "Why do you even care?", "Do your own research next time.", "Stop bothering me."),
           "plain": ()}
CLOSERS = {"polite": ("I hope this helps.", "Have a lovely day!", "Thanks again for asking."),
           "rude": ("Whatever.", "Now leave me alone.", "Figure it out yourself."),
           "plain": ()}

# The property the reward model learns: sentiment words, length, a proper ending.
POSITIVE_WORDS = frozenset("well love excellent worth recommend great solid perfect happy".split())
NEGATIVE_WORDS = frozenset("broke terrible waste regret flimsy awful disappointed never".split())


def sentiment(text: str) -> float:
    """+1 if every sentiment word is positive, -1 if every one is negative, 0 without any."""
    words = re.findall(r"[a-z']+", text.lower())
    pos, neg = sum(w in POSITIVE_WORDS for w in words), sum(w in NEGATIVE_WORDS for w in words)
    return (pos - neg) / max(1, pos + neg)


def score_response(text: str) -> float:
    """sentiment (-1..1); -1 per 20 words beyond 20; +0.5 if it ends with a full sentence, else -0.5.
    Best: a short, positive answer that ends properly (1.5)."""
    too_long = max(0, len(re.findall(r"[a-z']+", text.lower())) - 20) / 20
    ended = text.rstrip().endswith((".", "!", "?"))
    return sentiment(text) - too_long + (0.5 if ended else -0.5)


def all_requests() -> list[str]:
    return [r.format(item=a + p) for r in REQUESTS for a in ADJECTIVES for p in PRODUCTS]


def answer(rng: random.Random, product: str) -> tuple[str, dict]:
    """One answer about `product` in a random style. -> text, style labels."""
    style = {"sentiment": rng.choices(("positive", "negative", "mixed"), (0.4, 0.4, 0.2))[0],
             "tone": rng.choices(("polite", "plain", "rude"), (0.35, 0.35, 0.3))[0],
             "length": rng.choice(("concise", "rambling")),
             "ending": rng.choices(("proper", "cut off"), (0.8, 0.2))[0]}
    pool = {"positive": POSITIVE, "negative": NEGATIVE, "mixed": POSITIVE + NEGATIVE}[style["sentiment"]]
    n = rng.randint(1, 2) if style["length"] == "concise" else rng.randint(3, 4)
    body = [s.format(p=product, f=rng.choice(FEATURES)) for s in rng.sample(pool, n)]
    if style["length"] == "rambling":
        for filler in rng.sample(FILLER, rng.randint(2, 4)):
            body.insert(rng.randint(0, len(body)), filler)
    sentences = []
    if OPENERS[style["tone"]] and rng.random() < 0.8:
        sentences.append(rng.choice(OPENERS[style["tone"]]))
    sentences += body
    if CLOSERS[style["tone"]] and rng.random() < 0.5:
        sentences.append(rng.choice(CLOSERS[style["tone"]]))
    text = " ".join(sentences)
    if style["ending"] == "cut off":  # stops mid-sentence: a few words into its last sentence
        words = text.split()
        last = len(" ".join(sentences[:-1]).split())
        text = " ".join(words[: last + rng.randint(1, max(1, len(sentences[-1].split()) - 1))]).rstrip(".,!?")
    return text, style


def make_corpus(requests: list[str], n: int, rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(n):
        request = rng.choice(requests)
        product = next(p for p in sorted(PRODUCTS, key=len, reverse=True) if p in request)
        text, style = answer(rng, product)
        rows.append({"prompt": [{"role": "user", "content": request}], "completion": [{"role": "assistant", "content": text}],
                     "score": score_response(text), **style})
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and models


def train_tokenizer(texts: list[str], vocab_size: int, path: str | None = None, eos: str = "<|end|>"):
    """Byte-level BPE trained on `texts`, as a transformers tokenizer with a chat template; <|end|> ends a turn."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token=eos, unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    if path:
        fast.save_pretrained(path)
    return fast


def encode_dialogues(tokenizer, rows: list[dict]) -> list[list[int]]:
    texts = tokenizer.apply_chat_template([r["prompt"] + r["completion"] for r in rows], tokenize=False)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def pad_batch(seqs: list[list[int]], pad_id: int):
    import torch

    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids, (ids != pad_id).long()


def train(model, loss_of_batch, steps: int, lr: float, label: str, seed: int) -> list[float]:
    """AdamW with warmup and cosine decay; prints progress. -> the loss of every step."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    rng, losses, t0 = random.Random(seed), [], time.perf_counter()
    model.train()
    for step in range(steps):
        loss = loss_of_batch(rng)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 10) == 0 or step + 1 == steps:
            recent = losses[-max(1, steps // 10):]
            print(f"  {label} step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} ({time.perf_counter() - t0:.0f} s)")
    return losses


def build(cfg: Build) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, Qwen2Config

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    t0 = time.perf_counter()

    # Prompts: every request string, a held-out set that pretraining never sees.
    requests = all_requests()
    rng.shuffle(requests)
    test_requests, train_requests = requests[: cfg.eval_prompts], requests[cfg.eval_prompts :]
    os.makedirs(os.path.join(cfg.out, "prompts"), exist_ok=True)
    for split, reqs in (("train", train_requests), ("test", test_requests)):
        with open(os.path.join(cfg.out, "prompts", f"{split}.jsonl"), "w") as f:
            for r in reqs:
                product = next(p for p in sorted(PRODUCTS, key=len, reverse=True) if p in r)
                f.write(json.dumps({"prompt": [{"role": "user", "content": r}], "product": product}) + "\n")
    corpus = make_corpus(train_requests, cfg.dialogues, rng)
    held_out = make_corpus(test_requests, 512, rng)  # measures both fits on prompts the models never saw
    with open(os.path.join(cfg.out, "corpus_sample.jsonl"), "w") as f:
        for row in corpus[:40]:
            f.write(json.dumps(row) + "\n")

    # Tokenizer on the corpus text.
    tokenizer = train_tokenizer([r["prompt"][0]["content"] + " " + r["completion"][0]["content"] for r in corpus],
                                cfg.vocab_size)
    train_ids, held_ids = encode_dialogues(tokenizer, corpus), encode_dialogues(tokenizer, held_out)
    pad = tokenizer.pad_token_id
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    print(f"corpus: {len(corpus)} dialogues, vocabulary {len(tokenizer)}, "
          f"mean length {sum(map(len, train_ids)) / len(train_ids):.0f} tokens")

    # Policy: a small Qwen2 trained on whole dialogues (prompt and answer), one dialogue per row from position 0.
    lm_config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                            pad_token_id=pad, eos_token_id=end, bos_token_id=None)
    policy = AutoModelForCausalLM.from_config(lm_config)
    policy.generation_config.eos_token_id = end
    policy.generation_config.pad_token_id = pad

    def lm_loss(batch_rng, seqs=train_ids):
        ids, mask = pad_batch(batch_rng.sample(seqs, 32), pad)
        return policy(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss

    train(policy, lm_loss, cfg.lm_steps, 3e-3, "policy", cfg.seed)
    policy.eval()
    with torch.no_grad():
        held_lm = sum(lm_loss(random.Random(i), held_ids).item() for i in range(8)) / 8
    policy.save_pretrained(os.path.join(cfg.out, "policy"))
    tokenizer.save_pretrained(os.path.join(cfg.out, "policy"))

    # Reward model: regression onto score_response, from the whole dialogue in the chat template, as online_dpo.py
    # feeds it (the score is read at the last real token).
    rm_config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                            pad_token_id=pad, eos_token_id=end, bos_token_id=None, num_labels=1)
    reward = AutoModelForSequenceClassification.from_config(rm_config)
    targets = torch.tensor([r["score"] for r in corpus])
    held_targets = torch.tensor([r["score"] for r in held_out])

    def rm_loss(batch_rng):
        rows = batch_rng.sample(range(len(train_ids)), 32)
        ids, mask = pad_batch([train_ids[i] for i in rows], pad)
        return torch.nn.functional.mse_loss(reward(input_ids=ids, attention_mask=mask).logits[:, 0], targets[rows])

    train(reward, rm_loss, cfg.rm_steps, 2e-3, "reward", cfg.seed + 1)
    reward.eval()
    with torch.no_grad():
        ids, mask = pad_batch(held_ids, pad)
        pred = reward(input_ids=ids, attention_mask=mask).logits[:, 0]
    corr = torch.corrcoef(torch.stack([pred, held_targets]))[0, 1].item()
    reward.save_pretrained(os.path.join(cfg.out, "reward"))
    tokenizer.save_pretrained(os.path.join(cfg.out, "reward"))

    report = {"seed": cfg.seed, "dialogues": cfg.dialogues, "vocabulary": len(tokenizer),
              "policy_parameters": sum(p.numel() for p in policy.parameters()),
              "reward_parameters": sum(p.numel() for p in reward.parameters()),
              "policy_held_out_loss": round(held_lm, 4), "reward_held_out_correlation": round(corr, 4),
              "reward_held_out_rmse": round((pred - held_targets).pow(2).mean().sqrt().item(), 4),
              "minutes": round((time.perf_counter() - t0) / 60, 1)}
    with open(os.path.join(cfg.out, "build.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    import tyro

    build(tyro.cli(Build, config=(tyro.conf.FlagConversionOff,)))
