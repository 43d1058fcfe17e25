"""--torch_compile: the policy's decode step compiled (CompiledDecoder) against the eager sampler and generate().

Compiling costs 10-30 s per graph on the CPU, so these tests compile few: one decoder per module here, and one run per
training test. The compiled graph does the same float32 arithmetic in another order (fused kernels), so its logits
agree with eager's to about 1e-6, not bit for bit; see test_sampled_tokens_equal_eager_where_the_logits_agree."""

import copy
import json
import os

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM

import online_dpo
from dpo_kernels import CompiledDecoder, compile_problem
from online_dpo import EAGER, TINY_WORLD, Sampling, encode_prompts, main, sample
from tests.test_sampler import _generate
from tests.test_train import _args


@pytest.fixture(scope="module")
def world():
    """The tiny world's trained policy: it answers in sentences and ends them, so rows stop at different steps."""
    tokenizer = AutoTokenizer.from_pretrained(f"{TINY_WORLD}/policy")
    policy = AutoModelForCausalLM.from_pretrained(f"{TINY_WORLD}/policy").eval()
    with open(f"{TINY_WORLD}/prompts/test.jsonl") as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    return tokenizer, policy, prompts


@pytest.fixture(scope="module")
def compiled(world):
    """One compiled decoder for the module's tests, with the settings it has on CUDA (widths rounded up to 32, the
    end checked every 8 tokens); its graph compiles on the first call."""
    return CompiledDecoder(EAGER, world[1], max_width=128, device=torch.device("cpu"), width_step=32, check_every=8)


def _stops(tokenizer):
    return [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]


def test_greedy_equals_eager_and_generate_and_compiles_once(world, compiled):
    """Left-padded prompts, two stop tokens (rows end at different steps, and the compiled decoder looks for the end
    only every 8 tokens), K = 2 samples from one prefill: the same tokens and masks as eager and as generate(). Then
    other prompt lengths and row counts run on the same graph: nothing recompiles."""
    tokenizer, policy, prompts = world
    PROMPTS = prompts[:4]
    ids, mask = encode_prompts(tokenizer, PROMPTS, 64)
    pad, stops = tokenizer.pad_token_id, _stops(tokenizer)
    graphs = counters["stats"]["unique_graphs"]
    ours, ours_mask = sample(policy, ids, mask, Sampling(24, stops, pad, do_sample=False), 2, decoder=compiled)
    eager, eager_mask = sample(policy, ids, mask, Sampling(24, stops, pad, do_sample=False), 2)
    theirs = _generate(policy, ids, mask, 24, eos=stops, pad=pad)
    assert torch.equal(ours, eager) and torch.equal(ours_mask, eager_mask)
    assert torch.equal(ours[: len(PROMPTS)], theirs.masked_fill(eager_mask[: len(PROMPTS), : theirs.size(1)] == 0, pad))
    assert torch.equal(ours[: len(PROMPTS)], ours[len(PROMPTS):])  # greedy: both samples of a prompt agree
    lengths = ours_mask.sum(1)
    assert lengths.min() < lengths.max() < 24, "rows must stop at different steps for this test to mean anything"
    assert counters["stats"]["unique_graphs"] > graphs and compiled.graphs >= 1

    after_first = counters["stats"]["unique_graphs"]
    for more, K in ((prompts[4:7], 1), (prompts[8:16], 2), (prompts[20:25], 1)):
        ids, mask = encode_prompts(tokenizer, more, 64)
        ours, _ = sample(policy, ids, mask, Sampling(12, stops, pad, do_sample=False), K, decoder=compiled)
        eager, _ = sample(policy, ids, mask, Sampling(12, stops, pad, do_sample=False), K)
        assert torch.equal(ours, eager)
    assert counters["stats"]["unique_graphs"] == after_first, "a new prompt length or row count recompiled"


def test_greedy_with_repetition_penalty_and_suppressed_tokens(world, compiled):
    """Equal-length prompts, as generate() counts padding as seen."""
    tokenizer, policy, _ = world
    ids = torch.randint(10, len(tokenizer), (3, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    pad = tokenizer.pad_token_id
    kw = dict(do_sample=False, repetition_penalty=1.8, suppress_tokens=[5, 6, 7])
    ours, _ = sample(policy, ids, mask, Sampling(24, [pad], pad, **kw), decoder=compiled)
    eager, _ = sample(policy, ids, mask, Sampling(24, [pad], pad, **kw))
    theirs = _generate(policy, ids, mask, 24, eos=[], pad=pad, repetition_penalty=1.8, suppress_tokens=[5, 6, 7])
    assert torch.equal(ours, eager) and torch.equal(ours, theirs)


def test_sampled_tokens_equal_eager_where_the_logits_agree(world, compiled, monkeypatch):
    """Sampling with the same generator: the sampler's code after the logits (penalty, filters, softmax, multinomial)
    is the same eager code in both, so the tokens can differ only where the logits do. "Agree" here: every decode
    step's logits within 1e-4 of eager's (checked below, step by step, on the tokens both drew). A draw then changes
    only if its uniform number falls within about 1e-4 of a boundary of the cumulative distribution, so the chance
    that the 16 x 20 draws here differ is below 1 in 30; with this seed they are equal."""
    seen = {"compiled": [], "eager": []}

    def recording(name, call):
        def step(self, *a):
            seen[name].append(call(self, *a))
            return seen[name][-1]
        return step

    monkeypatch.setattr(CompiledDecoder, "__call__", recording("compiled", CompiledDecoder.__call__))
    monkeypatch.setattr(online_dpo.Decoder, "__call__", recording("eager", online_dpo.Decoder.__call__))
    tokenizer, policy, prompts = world
    PROMPTS = prompts[:8]
    ids, mask = encode_prompts(tokenizer, PROMPTS, 64)
    pad, stops = tokenizer.pad_token_id, _stops(tokenizer)
    how = Sampling(20, stops, pad, temperature=0.8, top_k=50, top_p=0.95, min_p=0.01, repetition_penalty=1.2)
    ours, ours_mask = sample(policy, ids, mask, how, 2, generator=torch.Generator().manual_seed(1), decoder=compiled)
    eager, eager_mask = sample(policy, ids, mask, how, 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ours, eager) and torch.equal(ours_mask, eager_mask)
    assert len(set(map(tuple, ours.tolist()))) > len(PROMPTS), "sampling must give different completions"
    steps = min(len(seen["compiled"]), len(seen["eager"]))
    assert steps >= 10
    for a, b in zip(seen["compiled"][:steps], seen["eager"][:steps]):
        assert (a - b).abs().max() < 1e-4


def test_models_that_cannot_be_compiled_say_why(policy):
    assert compile_problem(policy) is None
    config = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=8)
    assert "sliding-window" in compile_problem(MistralForCausalLM(config))
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(policy.config), attn_implementation="eager")
    assert compile_problem(eager) is None
    eager.config._attn_implementation = "flash_attention_2"  # its own copy of the config: the fixture's stays
    assert "flash_attention_2" in compile_problem(eager)


def _metrics(path):
    with open(os.path.join(path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("lora", [False, True])
def test_a_run_compiles_the_decode_step_once(tiny, tmp_path, lora, capsys):
    """Training rollouts (8 rows) and the policy's evaluation rollouts (6 rows, other prompt lengths) share one graph:
    compile/graphs stays where the first step left it. With LoRA the reference (adapters off) decodes eagerly."""
    out = tmp_path / "out"
    args = _args(tiny, tmp_path, output_dir=str(out), torch_compile=True, max_steps=4, eval_steps=2, eval_prompts=6,
                 dataset_test_split="train", use_peft=lora, lora_r=4)
    main(args)
    logs = [m for m in _metrics(out) if "compile/graphs" in m]
    assert len(logs) >= 4 and logs[0]["compile/graphs"] >= 1
    assert {m["compile/graphs"] for m in logs} == {logs[0]["compile/graphs"]}, "a later step recompiled"
    assert logs[0]["time/compile"] > 0
    assert all(m["completions/mean_length"] > 0 for m in _metrics(out) if "loss" in m)
    assert "decoding eagerly" not in capsys.readouterr().out


def test_a_step_that_does_not_compile_decodes_eagerly_with_one_line(tiny, tmp_path, capsys, monkeypatch):
    def broken(fn, **kw):
        def fails(*a, **k):
            raise RuntimeError("no C++ compiler\nsecond line")
        return fails

    monkeypatch.setattr(torch, "compile", broken)
    main(_args(tiny, tmp_path, output_dir=str(tmp_path / "out"), torch_compile=True, max_steps=2))
    printed = capsys.readouterr().out
    assert printed.count("torch_compile: decoding eagerly, the decode step did not compile (RuntimeError: no C++ "
                         "compiler)") == 1
    assert len(_metrics(tmp_path / "out")) == 2
    assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ  # the CPU's switch is for the compiled step alone


def test_a_model_that_cannot_be_compiled_says_so(tiny, tmp_path, capsys, monkeypatch):
    from transformers import Qwen2ForCausalLM

    monkeypatch.setattr(Qwen2ForCausalLM, "_can_compile_fullgraph", False)
    graphs = counters["stats"]["unique_graphs"]
    main(_args(tiny, tmp_path, output_dir=str(tmp_path / "out"), torch_compile=True, max_steps=1))
    assert "torch_compile: decoding eagerly, transformers' Qwen2ForCausalLM does not support torch.compile" in \
        capsys.readouterr().out
    assert counters["stats"]["unique_graphs"] == graphs
