"""The local LLM judge's mechanics for online_dpo.py (--judge_model_path): its questions and its forward.

Each pair is asked in both orders, (A, B) then swapped, so that online_dpo.judge_decisions() can cancel a bias
towards one position. A question's answer is read off one forward, not sampled: P(A) and P(B) as the first token
of the answer, so that q = P(A) / (P(A) + P(B)) and the mass P(A) + P(B) (low: the judge answers neither).
"""

import torch

# --judge_prompt's default: the judge's question about each pair.
JUDGE_PROMPT = ("Which of the two responses below answers the request better: more helpful, accurate and harmless?\n\n"
                "Request:\n{prompt}\n\nResponse A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
                "Answer with one letter, A or B.")


def as_text(x):
    """Text as the judge reads it: a conversation (a list of {role, content} messages) becomes
    `role: content` lines."""
    if isinstance(x, list):
        return "\n".join(f"{m['role']}: {m['content']}" for m in x)
    return x


def judge_texts(template, prompts, first, second):
    """Every pair as (A, B), then swapped: 2N questions."""
    fill = [dict(prompt=as_text(p), response_a=as_text(a), response_b=as_text(b))
            for p, a, b in zip(prompts, first, second)]
    swapped = [f | dict(response_a=f["response_b"], response_b=f["response_a"]) for f in fill]
    return [template.format(**f) for f in fill + swapped]


def judge_answer_ids(tokenizer):
    """The ids of A and B as an answer's first token (" A" after Answer: with no chat template)."""
    lead = "" if tokenizer.chat_template is not None else " "
    return [tokenizer.encode(lead + letter, add_special_tokens=False)[-1] for letter in "AB"]


@torch.no_grad()
def judge_locally(model, tokenizer, texts, answer_ids, batch_size):
    """One forward per question: q = P(A) / (P(A) + P(B)) and mass = P(A) + P(B), (M,) each."""
    chat = tokenizer.chat_template is not None
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                               add_generation_prompt=True) for t in texts]
    else:
        texts = [t + "\nAnswer:" for t in texts]
    p = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=not chat).to(next(model.parameters()).device)
        position_ids = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding
        logits = model(**batch, position_ids=position_ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
        p.append(logits.softmax(-1)[:, answer_ids])  # (b, 2)
    p = torch.cat(p)
    return p[:, 0] / p.sum(1).clamp(min=1e-30), p.sum(1)
