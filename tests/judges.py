"""Judges whose preferences the tests control.

- RuleJudge: a transformers causal LM (its own config class, registered with the Auto classes, saved and loaded with
  from_pretrained) that reads the judge prompt and puts its next-token logits on "A" or "B" by a rule: the response
  with more "low" tokens (id < 100, what tests.rewards.low_token_ids rewards) wins, plus a fixed bias towards A (a
  position bias, which judging both orders must cancel). A prompt containing the veto token gets its probability
  mass on a third token: an invalid answer.
- JudgeServer: an OpenAI-compatible /chat/completions server on 127.0.0.1 that answers by the same kind of rule on
  the text, and misbehaves on cue: slow answers, 500s, 400s, malformed JSON, answers that are not A or B.
"""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

MARKERS = ("<|ra|>", "<|rb|>", "<|ans|>")
TEMPLATE = "{prompt}<|ra|>{response_a}<|rb|>{response_b}<|ans|>"  # the --judge_prompt the rule judge reads


class RuleJudgeConfig(PretrainedConfig):
    model_type = "rule-judge"

    def __init__(self, vocab_size=400, marker_ids=(0, 0, 0), answer_ids=(0, 0), veto_id=-1, invalid_id=0, bias=2.0,
                 scale=4.0, **kw):
        super().__init__(**kw)
        self.vocab_size, self.marker_ids, self.answer_ids = vocab_size, list(marker_ids), list(answer_ids)
        self.veto_id, self.invalid_id, self.bias, self.scale = veto_id, invalid_id, bias, scale


class RuleJudge(PreTrainedModel):
    config_class = RuleJudgeConfig
    _no_split_modules = []

    def __init__(self, config):
        super().__init__(config)
        self.unused = torch.nn.Parameter(torch.zeros(1))  # a model needs a parameter to have a device and a dtype
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **kw):
        c = self.config
        logits = torch.full((input_ids.size(0), 1, c.vocab_size), -30.0, device=input_ids.device)
        for i, row in enumerate(input_ids):
            row = row[attention_mask[i].bool()].tolist() if attention_mask is not None else row.tolist()
            ra, rb, ans = (len(row) - 1 - row[::-1].index(m) for m in c.marker_ids)  # the last of each marker
            if c.veto_id in row[:ra]:
                logits[i, 0, c.invalid_id] = 10.0
                continue
            score = sum(t < 100 for t in row[ra + 1 : rb]) - sum(t < 100 for t in row[rb + 1 : ans])
            logits[i, 0, c.answer_ids[0]] = c.scale * score + c.bias
            logits[i, 0, c.answer_ids[1]] = 0.0
        return CausalLMOutput(logits=logits + self.unused)


AutoConfig.register("rule-judge", RuleJudgeConfig, exist_ok=True)
AutoModelForCausalLM.register(RuleJudgeConfig, RuleJudge, exist_ok=True)


def make_rule_judge(path: str, tokenizer_path: str, veto_word: str = "moon", bias: float = 2.0, scale: float = 4.0):
    """The tiny world's tokenizer plus the three markers as special tokens, and a RuleJudge, saved at `path`."""
    from transformers import AutoTokenizer

    import online_dpo

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    tokenizer.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    veto = tokenizer.encode(" " + veto_word, add_special_tokens=False)
    assert len(veto) == 1, veto
    invalid = tokenizer.encode(" the", add_special_tokens=False)[-1]
    config = RuleJudgeConfig(vocab_size=len(tokenizer), marker_ids=tokenizer.convert_tokens_to_ids(list(MARKERS)),
                             answer_ids=online_dpo.judge_answer_ids(tokenizer), veto_id=veto[0], invalid_id=invalid,
                             bias=bias, scale=scale)
    RuleJudge(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


def low_count(tokenizer, text: str) -> int:
    return sum(t < 100 for t in tokenizer.encode(text, add_special_tokens=False))


# ----------------------------------------------------------------------------------------------------------------

def parse_judge_prompt(text: str) -> tuple[str, str, str]:
    """prompt, response A, response B out of online_dpo.JUDGE_PROMPT as filled in."""
    m = re.search(r"Request:\n(.*)\n\nResponse A:\n(.*)\n\nResponse B:\n(.*)\n\nAnswer with", text, re.S)
    return m.group(1), m.group(2), m.group(3)


class JudgeServer:
    """Prefers the response with more "good" in it (the longer one, if as many). The prompt's words script the misbehaviour:
    `slow` - the first attempt sleeps past the client's timeout; `flaky` - the first attempt gets a 500;
    `broken` - every attempt gets a 500; `garbled` - the answer is "Maybe"; `badjson` - the body is not JSON (first
    attempt only); `refused` - 400 (a client error: no retry). `attempts` counts requests per (prompt, A, B)."""

    def __init__(self, slow_s: float = 1.0):
        self.attempts, self.lock, self.slow_s = {}, threading.Lock(), slow_s
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = parse_judge_prompt(body["messages"][0]["content"])
                with server.lock:
                    n = server.attempts[key] = server.attempts.get(key, 0) + 1
                    server.auth = self.headers.get("Authorization")
                prompt, a, b = key
                if "refused" in prompt:
                    return self._send(400, b"{}")
                if "broken" in prompt or ("flaky" in prompt and n == 1):
                    return self._send(500, b"{}")
                if "slow" in prompt and n == 1:
                    time.sleep(server.slow_s)
                if "badjson" in prompt and n == 1:
                    return self._send(200, b"not json")
                better = (a.count("good"), len(a)) > (b.count("good"), len(b))  # equal "good": the longer wins
                answer = "Maybe" if "garbled" in prompt else " A\n" if better else "B"
                self._send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": answer}}]}).encode())

            def _send(self, code, data):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up on a slow answer
                    pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 128  # the default 5 drops connections past it, which the client sees as 1 s stalls

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
