"""Tiny local models, tokenizers and prompt files for the tests (no Hub access).

    python tests/assets.py DIR    # writes DIR/{policy,reward,tokenizer2_reward} and DIR/prompts{,_chat}.jsonl

Everything is random-init and seeded: the models speak no language, but they are real transformers models
(Qwen2, Llama) loaded with from_pretrained, and the tokenizers are BPE models trained here on local text.
"""

import json
import os
import random
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from tiny_world import train_tokenizer  # noqa: E402

WORDS = ("the a cat dog bird sun moon tree river stone house road light dark small big old new red blue green "
         "runs sits sings falls grows shines sleeps looks finds keeps near under over with and but so very").split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(n)]


def make_tokenizer(path: str, vocab_size: int = 400, seed: int = 0):
    """A byte-level BPE tokenizer trained on the local corpus, with a chat template; EOS is <eos>, so that <|end|>
    is a stop token only through the generation config (as in chat models)."""
    return train_tokenizer(corpus(seed=seed), vocab_size, path, eos="<eos>")


def tiny_config(arch: str, tokenizer, hidden: int = 64, layers: int = 2, **kw):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    return cls(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, **kw)


def make_causal_lm(path: str, tokenizer, arch: str = "qwen2", seed: int = 0, **kw):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer, **kw))
    # End-of-turn is a stop token too, as in chat models' generation configs.
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def make_reward_model(path: str, tokenizer, arch: str = "llama", seed: int = 1, **kw):
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(arch, tokenizer, num_labels=1, **kw))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def write_prompts(path: str, n: int = 32, chat: bool = False, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8)))
        prompt = [{"role": "user", "content": text}] if chat else text
        rows.append({"prompt": prompt, "topic": rng.choice(["sky", "land", "water"]), "id": i})
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return rows


def build(root: str) -> None:
    os.makedirs(root, exist_ok=True)
    tokenizer = make_tokenizer(os.path.join(root, "tokenizer"))
    make_causal_lm(os.path.join(root, "policy"), tokenizer, "qwen2")
    make_reward_model(os.path.join(root, "reward"), tokenizer, "llama")
    other = make_tokenizer(os.path.join(root, "tokenizer2"), vocab_size=320, seed=1)  # a different vocabulary
    make_reward_model(os.path.join(root, "tokenizer2_reward"), other, "qwen2")
    write_prompts(os.path.join(root, "prompts.jsonl"), chat=False)
    write_prompts(os.path.join(root, "prompts_chat.jsonl"), chat=True)


if __name__ == "__main__":
    build(sys.argv[1] if len(sys.argv) > 1 else "tiny_assets")
    print(f"wrote tiny models, tokenizers and prompts to {sys.argv[1] if len(sys.argv) > 1 else 'tiny_assets'}")
