"""The checks of online_dpo.py's inputs, before any model loads: flags, files, data, models, reward functions and
the judge. Each refusal is one UsageError whose message names the flag, file, row or function and says what to do.

check_inputs() is what main() calls first: it runs them all, in order, and returns what they loaded (prompts,
tokenizers, reward functions). Once the models are loaded, check_packing() and logprobs_impl() choose, by trial
forwards, how the step computes log-probs. The trials run the step's own code (online_dpo's prompt_token_ids,
score_completions, completion_logprobs, gathered), passed in as the module `step`: this package never imports
online_dpo, which is run as a script.
"""

import collections
import difflib
import importlib
import json
import math
import os
import runpy
import sys
import tempfile
import types

import datasets
import huggingface_hub
import torch
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoTokenizer

from dpo_support import checkpoint, http_judge
from dpo_support.faults import USER_FAULTS, UsageError, why
from dpo_support.ranks import is_main, say

OFFLINE_HINT = "no network or Hub? `python online_dpo.py --preset tiny` trains the embedded world offline"

# What check_inputs() loaded: the checkpoint to resume from (None: start afresh), the reward functions, the train
# and held-out prompts, the policy's tokenizer, each reward model's, a local judge's (None without one).
Inputs = collections.namedtuple(
    "Inputs", "resume reward_funcs dataset test_set tokenizer reward_tokenizers judge_tokenizer")


def check_inputs(args, world, step):
    """Every check that needs no model, in order; an earlier run's output_dir needs resume or overwrite. `step`: the
    online_dpo module (prompt_token_ids, score_completions, JUDGE_PROMPT)."""
    check_output_dir(args)
    resume = checkpoint.resume_point(args, world)  # the checkpoint to continue from, or None
    policy_path = resume or args.model_name_or_path
    reward_funcs = [load_reward_func(spec) for spec in args.reward_funcs]
    dataset, test_set = load_prompts(args)
    tokenizer, config = load_tokenizer(policy_path, args, "--model_name_or_path")
    check_loading(args, config)
    reward_tokenizers = [load_tokenizer(path, args, "--reward_model_path")[0] for path in args.reward_model_path]
    check_prompts(args, dataset, test_set, tokenizer, reward_tokenizers, reward_funcs, step)
    if args.judge_api_base:
        question = (args.judge_prompt or step.JUDGE_PROMPT).format(prompt="2 + 2?", response_a="4", response_b="5")
        http_judge.check(args, question)
    judge_tokenizer = None
    if args.judge_model_path:
        judge_tokenizer = load_tokenizer(args.judge_model_path, args, "--judge_model_path")[0]
    return Inputs(resume=resume, reward_funcs=reward_funcs, dataset=dataset, test_set=test_set, tokenizer=tokenizer,
                  reward_tokenizers=reward_tokenizers, judge_tokenizer=judge_tokenizer)


# ---- Flags

GENERATION_KEYS = "temperature top_k top_p min_p repetition_penalty do_sample suppress_tokens eos_token_id".split()
# What each numeric flag allows (NaN and inf: never).
RULES = {flag: (ok, what) for flags, ok, what in [
    ("max_new_tokens per_device_train_batch_size gradient_accumulation_steps save_total_limit lora_r "
     "judge_api_concurrency ref_model_sync_steps generation_batch_size", lambda v: v >= 1, ">= 1"),
    ("beta logging_steps lora_alpha judge_api_timeout", lambda v: v > 0, "> 0"),
    ("temperature repetition_penalty", lambda v: v >= 1e-4, ">= 1e-4 (logits divided by less can overflow)"),
    ("top_k missing_eos_penalty learning_rate warmup_steps weight_decay max_grad_norm save_steps "
     "eval_steps eval_prompts tie_threshold judge_api_retries rpo_alpha", lambda v: v >= 0, ">= 0"),
    ("reward_weights num_train_epochs", lambda v: True, "finite"),
    ("num_samples", lambda v: v >= 2, ">= 2 (a pair needs two completions)"),
    ("top_p", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("min_p", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("ref_model_mixup_alpha", lambda v: 0 < v <= 1, "in (0, 1] (0: a sync that never moves the reference)"),
    ("lora_dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("judge_undecided label_smoothing", lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    ("seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)")] for flag in flags.split()}


def bad_number(flag, value):
    """What is wrong with a numeric flag's value (or with one of its values), or None."""
    ok, what = RULES[flag]
    if value is None:
        return None
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and ok(v)):
            return f"{flag} must be {what}, got {value!r}"
    return None


def number_problems(values, prefix):
    """For raise_first(): (True, message) for each value (flag: value) that breaks its rule."""
    messages = [bad_number(flag, value) for flag, value in values.items()]
    return [(True, prefix + message) for message in messages if message]


def raise_first(problems, prefix=""):
    """A UsageError with the first message whose `bad` is true."""
    for bad, message in problems:
        if bad:
            raise UsageError(prefix + message)


def json_dict(text, flag):
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise UsageError(f"--{flag} must be a JSON object such as '{{\"key\": 1}}', got {text!r}")
    return value


PATH_FLAGS = "model_name_or_path ref_model_path judge_model_path dataset_name output_dir resume_from_checkpoint".split()


def check_args(args):
    """Check the flags on their own; fill in the default reward model (the spec's quick start's)."""
    judge = bool(args.judge_model_path or args.judge_api_base)
    if args.reward_model_path is None:
        args.reward_model_path = () if args.reward_funcs or judge else ("trl-lib/Qwen2-0.5B-Reward",)
    for flag in PATH_FLAGS:  # no shell expands the ~ of `--output_dir=~/x`
        value = getattr(args, flag)
        if isinstance(value, str):
            setattr(args, flag, os.path.expanduser(value))
    args.reward_model_path = tuple(os.path.expanduser(path) for path in args.reward_model_path)
    n_rewards = len(args.reward_model_path) + len(args.reward_funcs)
    args.init_kwargs  # parsed once here, refused if not a JSON object
    generation = args.generation
    unknown = sorted(set(generation) - set(GENERATION_KEYS))
    bad_template = False
    try:  # the default template is online_dpo.JUDGE_PROMPT
        if args.judge_prompt is not None:
            filled = args.judge_prompt.format(prompt="\0p", response_a="\0a", response_b="\0b")
            bad_template = not all(f"\0{k}" in filled for k in "pab")
    except (KeyError, IndexError, ValueError):
        bad_template = True
    raise_first([
        (args.loss_type not in ("sigmoid", "ipo", "hinge", "robust"),
         f"--loss_type must be sigmoid, ipo, hinge or robust, got {args.loss_type!r}"),
        (args.label_smoothing and args.loss_type in ("ipo", "hinge"), f"--label_smoothing with --loss_type "
         f"{args.loss_type}: only sigmoid (cDPO) and robust weigh a flipped label; drop one"),
        (args.sync_ref_model and args.use_peft, "--sync_ref_model with --use_peft: the reference, the policy with "
         "its adapters off, has no weights of its own to move; drop one"),
        (not args.beta, "--beta needs one or more values"),
        (args.max_new_tokens >= args.max_length,
         f"--max_new_tokens ({args.max_new_tokens}) must be smaller than --max_length ({args.max_length})"),
        (n_rewards == 0 and not judge, "no reward: give --reward_model_path and/or --reward_funcs, or a judge"),
        (judge and n_rewards > 0, "a judge and rewards both given: drop one"),
        (args.judge_model_path and args.judge_api_base, "--judge_model_path and --judge_api_base: give one judge"),
        (args.judge_api_base is not None and not args.judge_api_model, "--judge_api_base needs --judge_api_model"),
        (args.judge_api_base is not None and not args.judge_api_base.startswith(("http://", "https://")),
         f"--judge_api_base {args.judge_api_base!r} must start with http:// or https://, e.g. http://localhost:8000/v1"),
        (judge and args.num_samples != 2, "a judge compares two completions: --num_samples must be 2 with it"),
        (judge and args.missing_eos_penalty is not None, "--missing_eos_penalty lowers reward scores: drop it"),
        (args.reward_weights is not None and len(args.reward_weights) != n_rewards, f"--reward_weights has "
         f"{len(args.reward_weights or ())} values but there are {n_rewards} rewards (models, then functions)"),
        (args.max_steps <= 0 and args.num_train_epochs <= 0, "set --max_steps > 0 or --num_train_epochs > 0"),
        ((args.generation_batch_size or 0) % max(args.per_device_train_batch_size, 1) != 0,
         f"--generation_batch_size {args.generation_batch_size} must be a multiple of --per_device_train_batch_size "
         f"{args.per_device_train_batch_size} (prompts, as it counts them)"),
        (args.resume_from_checkpoint is not None and args.overwrite_output_dir,
         "--resume_from_checkpoint and --overwrite_output_dir: give one"),
        (os.path.isfile(args.output_dir), f"--output_dir {args.output_dir!r} is a file; give a directory"),
        (args.use_peft and args.ref_model_path, "--ref_model_path with --use_peft: the reference is the policy, "
         "adapters off; drop one"),
        *number_problems({flag: getattr(args, flag) for flag in RULES}, "--"),
        (unknown, f"--generation_kwargs: unsupported keys {unknown}; supported: {', '.join(GENERATION_KEYS)}"),
        (None in generation.values(), "--generation_kwargs: a null value; leave the key out for its default"),
        *number_problems({k: v for k, v in generation.items() if k in RULES}, "--generation_kwargs "),
        (type(generation.get("top_k", 0)) is not int, "--generation_kwargs top_k must be an integer"),
        (generation.get("do_sample", True) is not True, "--generation_kwargs do_sample must be true, got "
         f"{generation.get('do_sample')!r}: greedy decoding makes both samples the same"),
        (bad_template, "--judge_prompt must contain {prompt}, {response_a} and {response_b}, and no other braces "
         "(literal ones: {{ and }})"),
    ])
    if args.push_to_hub and huggingface_hub.get_token() is None:
        raise UsageError("--push_to_hub needs a Hub token: run `hf auth login` or set HF_TOKEN")
    defaults = type(args)()
    lora = [f"--{k}" for k in ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules")
            if getattr(args, k) != getattr(defaults, k)]
    if lora and not args.use_peft:
        say(f"note: {', '.join(lora)} ignored without --use_peft")
    tr_dpo = [f"--{k}" for k in ("ref_model_mixup_alpha", "ref_model_sync_steps") if getattr(args, k) != getattr(defaults, k)]
    if tr_dpo and not args.sync_ref_model:
        say(f"note: {', '.join(tr_dpo)} ignored without --sync_ref_model")


# ---- Files

def check_output_dir(args):
    """output_dir: writable, not a root, not in use, holding no input (it would be overwritten)."""
    out = os.path.realpath(args.output_dir)
    if os.path.dirname(out) == out:  # the model and its .tmp would land in a root
        raise UsageError(f"--output_dir {args.output_dir!r} is a root directory; give a directory inside one")
    if os.path.islink(args.output_dir) and not os.path.exists(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir!r} is a dangling symlink; remove it or give another")
    paths = [(k, getattr(args, k)) for k in PATH_FLAGS[:4]]  # the inputs
    for flag, path in paths + [("reward_model_path", p) for p in args.reward_model_path]:
        real = os.path.realpath(path) if path and os.path.exists(path) else None
        if real == out or real and args.overwrite_output_dir and real.startswith(out + os.sep):
            raise UsageError(f"--{flag} {path!r} is in --output_dir, which this run would overwrite: give another")
    try:  # on every rank: each node may have a disk of its own
        os.makedirs(args.output_dir, exist_ok=True)
        tempfile.TemporaryFile(dir=args.output_dir).close()
    except OSError as e:
        raise UsageError(f"--output_dir {args.output_dir!r} is not writable ({e.strerror}); give another") from None
    holder = checkpoint.lock_output_dir(args.output_dir) if is_main() else None
    if holder:
        raise UsageError(f"--output_dir {args.output_dir!r} is in use by {holder}: wait for it to end, or give another")


# ---- Reward functions and data

def load_reward_func(spec):
    """A reward function from `module:function` (importable from here) or `file.py:function`."""
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise UsageError(f"--reward_funcs {spec!r}: expected `module:function` or `file.py:function`")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if module_name.endswith(".py"):
            names = runpy.run_path(module_name)
        else:
            names = vars(importlib.import_module(module_name))
    except USER_FAULTS as e:
        raise UsageError(f"--reward_funcs {spec!r}: cannot import {module_name!r} ({why(e)})") from None
    func = names.get(func_name)
    if not callable(func):
        raise UsageError(f"--reward_funcs {spec!r}: {module_name!r} has no function {func_name!r}")
    return func


DATA_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")


def load_prompts(args):
    """The train and held-out (or None) splits from a file, save_to_disk or the Hub, checked."""
    name = args.dataset_name
    train_split = args.dataset_train_split
    test_split = args.dataset_test_split
    column = args.dataset_prompt_column
    ext = os.path.splitext(name)[1].lower()
    file = os.path.isfile(name)
    local = os.path.isdir(name)
    saved = local and not {"dataset_dict.json", "state.json"}.isdisjoint(os.listdir(name))
    if not os.path.exists(name) and (name.startswith((".", "/")) or ext in DATA_EXTENSIONS):  # not a Hub id
        raise UsageError(f"--dataset_name {name!r}: no such file or directory")
    if file and ext not in DATA_EXTENSIONS:
        raise UsageError(f"--dataset_name {name!r}: a data file must be .json, .jsonl, .parquet or .csv")
    if file and os.path.getsize(name) == 0:  # datasets would raise a bare StopIteration
        raise UsageError(f"--dataset_name {name!r} is an empty file")
    if local and not os.listdir(name):
        raise UsageError(f"--dataset_name {name!r} is an empty directory")
    if (file or saved) and args.dataset_config:
        say(f"note: --dataset_config {args.dataset_config!r} ignored: {name!r} is local")
    try:
        if file:
            builder = {".jsonl": "json"}.get(ext, ext[1:])
            splits = {train_split: datasets.load_dataset(builder, data_files=name, split="train")}
        elif saved:
            splits = datasets.load_from_disk(name)
            if not isinstance(splits, datasets.DatasetDict):
                splits = {train_split: splits}
        else:
            splits = datasets.load_dataset(name, args.dataset_config)
    except Exception as e:  # malformed, no rows, no Hub: the root cause says
        while e.__cause__ or e.__context__:
            e = e.__cause__ or e.__context__
        cache = os.path.abspath(datasets.config.HF_DATASETS_CACHE)
        if isinstance(e, OSError) and os.path.abspath(str(e.filename)).startswith(cache):
            problem = f"the datasets cache {cache!r} is not usable ({why(e)}); set HF_HOME to a writable directory"
        elif file:
            problem = f"could not read it ({why(e)}); is it a valid {ext[1:]} file?"
        elif saved:
            problem = f"could not read this saved dataset ({why(e)}); check that it holds prompts"
        elif local:
            problem = f"could not read the data files in this directory ({why(e)})"
        else:
            problem = f"could not load it ({why(e)}); " + OFFLINE_HINT
        raise UsageError(f"--dataset_name {name!r}: {problem}") from None
    if train_split not in splits:
        raise UsageError(f"--dataset_train_split {train_split!r} is not a split of {name!r}; splits: {list(splits)}")
    train = splits[train_split]
    test = splits.get(test_split) if test_split != train_split else None
    for split, ds in ((train_split, train), (test_split, test)):
        if ds is None:
            continue
        if column not in ds.column_names:
            close = difflib.get_close_matches(column, ds.column_names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UsageError(f"--dataset_prompt_column {column!r} is not a column of {name!r}; columns: "
                             f"{ds.column_names}{hint}")
        check_prompt_rows(ds.select_columns(column)[:][column] if len(ds) else [], name, split)  # one column: cheap
    if len(train) == 0:
        raise UsageError(f"--dataset_name {name!r}: the {train_split!r} split is empty")
    return train, test


ROLES = ("system", "developer", "user", "assistant", "tool")


def check_prompt_rows(prompts, name, split):
    """All prompts non-empty text, or all conversations of known roles; the first that is not is named. A note
    counts the conversations that end with the assistant's message (a prefill, continued as TRL does)."""
    kinds = set()
    prefills = 0
    for i, prompt in enumerate(prompts):
        chat = isinstance(prompt, list)
        kinds.add(chat)
        problem = None
        if len(kinds) > 1:
            problem = "conversations and text mixed"
        elif chat:
            problem = message_problem(prompt)
            if problem:
                problem = f"{problem} in {prompt!r:.80}"
            prefills += problem is None and prompt[-1]["role"] == "assistant"
        elif not (isinstance(prompt, str) and prompt.strip()):
            problem = f"the prompt is {prompt!r:.80}"
        if problem:
            raise UsageError(f"--dataset_name {name!r}, split {split!r}, row {i}: {problem}; prompts are all "
                             f"non-empty text, or all lists of {{role, content}} messages (roles: {', '.join(ROLES)})")
    if prefills:
        say(f"note: {prefills} prompts of the {split!r} split end with an assistant message: the completion continues "
            "it (TRL's continue_final_message)")


def message_problem(prompt):
    """What is wrong with a conversation (a list of {role, content} messages), naming the message, or None."""
    if not prompt:
        return "the conversation is empty"
    for j, m in enumerate(prompt):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            return f"message {j} is {m!r:.80}, not {{role, content}} text"
        if m["role"] not in ROLES:
            return f"message {j} has the unknown role {m['role']!r}"
        if not m["content"].strip():
            return f"message {j} ({m['role']}) is empty"
    return None


def is_conversational(prompt):
    """A non-empty list of {role, content} messages of known roles, each with some text."""
    return isinstance(prompt, list) and message_problem(prompt) is None


# ---- torchrun's variables

TORCHRUN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def check_torchrun():
    """torchrun's variables: whole numbers, all or none, ranks in order."""
    env = {k: os.environ[k] for k in TORCHRUN if k in os.environ}
    for k, v in env.items():
        if k != "MASTER_ADDR" and not v.isdigit():
            raise UsageError(f"{k}={v!r} is not a whole number: unset it, or use torchrun")
    world = int(env.get("WORLD_SIZE", "1"))
    rank = int(env.get("RANK", "0"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if world == 1 and rank == 0 and local_rank == 0:  # one process, torchrun's or not
        return
    missing = [k for k in TORCHRUN if k not in env and k != "LOCAL_WORLD_SIZE"]
    if missing:
        given = ", ".join(f"{k}={v}" for k, v in env.items())
        raise UsageError(f"{given} set but {', '.join(missing)} not: unset them, or use torchrun")
    if not (world >= 1 and rank < world and local_rank <= rank):
        raise UsageError(f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={world}: not 0 <= LOCAL_RANK <= RANK < "
                         "WORLD_SIZE; unset them, or use torchrun")


# ---- Models and tokenizers

def unreachable(what, path, error):
    return UsageError(f"could not load {what} {path!r} ({error}). Give a Hub id you can reach or a local directory; "
                      f"{OFFLINE_HINT}")


def load_tokenizer(path, args, flag):
    """The model's tokenizer and config; a missing pad token, or one past the embedding, becomes EOS."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        what = "is empty" if not os.listdir(path) else "has no config.json"
        raise UsageError(f"could not load model {path!r}: the directory {what}, so it is no saved model "
                         "(save_pretrained writes config.json, the weights and the tokenizer)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: no tokenizer files
        raise unreachable("the tokenizer of", path, e) from None
    if not tokenizer("Hello world.", add_special_tokens=False)["input_ids"]:  # a directory without its files
        raise UsageError(f"could not load the tokenizer of {path!r}: it has no vocabulary; save it with the model")
    config = model_config(path, args, flag)
    vocab = getattr(config, "vocab_size", None) or math.inf
    if tokenizer.vocab_size > vocab:  # another model's tokenizer
        raise UsageError(f"{flag} {path!r}: its tokenizer has {tokenizer.vocab_size} tokens, its model {vocab} "
                         "embeddings; save the model's own tokenizer with it")
    # Tokens added past the embeddings would index outside them; a pad token there falls back to EOS (below).
    beyond = []
    if len(tokenizer) > vocab:
        beyond = [i for i in range(vocab, len(tokenizer)) if i != tokenizer.pad_token_id]
    if beyond:
        names = ", ".join(tokenizer.convert_ids_to_tokens(beyond[:3]))
        raise UsageError(f"{flag} {path!r}: its tokenizer has {len(tokenizer)} tokens with those added, its model "
                         f"{vocab} embeddings ({names} ... have none); resize the model's embeddings and save both")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id >= vocab:
        if tokenizer.eos_token_id is None or tokenizer.eos_token_id >= vocab:
            raise UsageError(f"the tokenizer of {path!r} has no pad or EOS token in the model's {vocab} embeddings")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, config


def model_config(path, args, flag):
    """The model's config, checked for its role (in another it would run a random head)."""
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as e:  # ValueError: no model config
        raise unreachable("model", path, e) from None
    kinds = config.architectures or []
    reward = flag == "--reward_model_path"
    heads = [k.endswith("ForSequenceClassification") for k in kinds]
    wrong_kind = not any(heads) if reward else all(heads)
    if kinds and wrong_kind:
        raise UsageError(f"{flag} {path!r} is a {kinds[0]}, not a {'reward model' if reward else 'causal LM'}")
    if reward and config.num_labels != 1:
        raise UsageError(f"--reward_model_path {path!r} has a head with {config.num_labels} outputs, not 1")
    return config


LOADING_KEYS = set("attn_implementation dtype torch_dtype revision low_cpu_mem_usage use_safetensors variant cache_dir "
                   "subfolder local_files_only token".split())  # from_pretrained's own arguments
SHAPE_KEYS = ("model_type vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads "
              "num_key_value_heads head_dim tie_word_embeddings").split()  # what fixes the weights' shapes
ATTENTION = "eager, sdpa, flash_attention_2, flash_attention_3"  # flex_attention fails in a decode step


def check_loading(args, config):
    """With the policy's config: --generation_kwargs' token ids, --model_init_kwargs, the reference."""
    vocab = getattr(config, "vocab_size", None) or math.inf
    for key, value in args.generation.items():
        if key not in ("suppress_tokens", "eos_token_id"):
            continue
        if isinstance(value, list):
            ids = value
        elif key == "eos_token_id":  # one id, or a list of them
            ids = [value]
        else:  # suppress_tokens takes a list only
            ids = [None]
        if not all(type(i) is int and 0 <= i < vocab for i in ids):
            raise UsageError(f"--generation_kwargs {key} must be token ids in [0, {vocab}), got {value!r}")
        if key == "eos_token_id" and not ids:
            raise UsageError("--generation_kwargs eos_token_id []: sampling would never stop; give one id or more")
    kwargs = args.init_kwargs
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype", "float32"))
    problems = [(k not in LOADING_KEYS and not hasattr(config, k), f"{k!r} is neither a from_pretrained argument "
                 "nor a config field") for k in kwargs]
    problems += [
        (kwargs.get("attn_implementation", "sdpa") not in ATTENTION.split(", "),
         f"attn_implementation must be one of {ATTENTION}"),
        (dtype not in ("float32", "float64"), f"dtype must be float32 or float64, got {dtype!r} (see --bf16)")]
    raise_first(problems, prefix="--model_init_kwargs: ")
    check_sizes(args, config)
    if not args.ref_model_path:
        return
    ref_config = model_config(args.ref_model_path, args, "--ref_model_path")
    ref_vocab = getattr(ref_config, "vocab_size", None)
    if (ref_vocab or math.inf) < vocab:  # it scores the policy's tokens
        raise UsageError(f"--ref_model_path {args.ref_model_path!r} has {ref_vocab} token embeddings, fewer than "
                         f"the policy's {vocab}")
    differ = [k for k in SHAPE_KEYS if getattr(ref_config, k, None) != getattr(config, k, None)]
    if args.sync_ref_model and differ:  # mixed weight by weight
        raise UsageError(f"--sync_ref_model mixes the policy into --ref_model_path, whose {differ[0]} differs from "
                         "the policy's; give a reference of the policy's shape")


def check_sizes(args, config):
    """What the flags ask of the model and the memory, known before it loads: --max_length within its positions,
    and the KV cache of a decode within the device's memory (an absurd --num_samples fails here, not in an
    allocation traceback)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions and args.max_length > positions:
        raise UsageError(f"--max_length {args.max_length} is beyond the model's {positions} positions "
                         f"(max_position_embeddings of {args.model_name_or_path!r}): lower it")
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not (layers and heads and getattr(config, "hidden_size", None)):
        return
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    prompts = args.generation_batch_size or args.per_device_train_batch_size * args.gradient_accumulation_steps
    rows = args.num_samples * prompts  # decoded together
    cache = 2 * layers * rows * args.max_length * kv_heads * head_dim * 2  # keys and values, 2 bytes each at least
    if torch.cuda.is_available() and not args.use_cpu:
        memory = torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
        where = "this GPU's"
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        where = "this machine's"
    if cache > memory:
        raise UsageError(f"--num_samples {args.num_samples} x {prompts} prompts (--generation_batch_size, or "
                         "--per_device_train_batch_size x --gradient_accumulation_steps) rows of --max_length "
                         f"{args.max_length} tokens need a {cache / 2**30:,.0f} GiB KV cache to sample, more than "
                         f"{where} {memory / 2**30:,.0f} GiB: lower one of them")


# ---- Prompts against the tokenizers, and a trial of each reward function

def check_prompts(args, dataset, test_set, tokenizer, reward_tokenizers, reward_funcs, step, n=512):
    """On the first n prompts: chat templates, lengths, and a trial call of each reward function (two
    prompts, one held out), so that a broken one fails before the models load. `step`: online_dpo's
    prompt_token_ids and score_completions, which tokenize prompts and call reward functions as a step does."""
    columns = dataset[:n]
    prompts = columns.pop(args.dataset_prompt_column)
    chat = is_conversational(prompts[0])
    for path, reward_tokenizer in zip(args.reward_model_path, reward_tokenizers):
        if chat and reward_tokenizer.chat_template is None:
            raise UsageError(f"the prompts are conversations: reward model {path!r} has no chat template")
    try:
        lengths = [len(ids) for ids in step.prompt_token_ids(tokenizer, prompts)]
    except UsageError as e:
        raise UsageError(f"--dataset_name {args.dataset_name!r} with the tokenizer of {args.model_name_or_path!r}: "
                         f"{e}") from None
    limit = args.max_length - args.max_new_tokens
    if min(lengths) > limit:
        raise UsageError(f"all {len(lengths)} prompts checked are longer than --max_length - --max_new_tokens = "
                         f"{limit} tokens: raise --max_length")
    cut = sum(n > limit for n in lengths)
    if cut:
        say(f"note: {cut} of the first {len(lengths)} prompts are longer than --max_length - --max_new_tokens = "
            f"{limit} tokens and lose their start")
    trials = [(prompts[:2], {k: v[:2] for k, v in columns.items()}, "2 dataset prompts")]
    if test_set is not None and len(test_set) and args.eval_prompts:
        held = test_set[:1]
        trials.append((held.pop(args.dataset_prompt_column), held, f"a {args.dataset_test_split!r} prompt"))
    texts = ["A placeholder answer."] * 2
    completions = texts
    if chat:
        completions = [[{"role": "assistant", "content": t}] for t in texts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    before = types.SimpleNamespace(global_step=0, epoch=0.0, max_steps=args.max_steps)  # TRL's TrainerState
    for func in reward_funcs:
        for trial, trial_columns, what in trials:
            rows = len(trial)
            columns = trial_columns | {"trainer_state": before}
            step.score_completions(trial, completions[:rows], ids[:rows], columns, [], [func], torch.ones(1),
                                   when=f" on a trial call ({what}, placeholder completions)")


# ---- The models, on trial forwards: which paths of the step they can take


def logprobs_impl(step, *models):
    """fused if every model's log-probs may come from its last hidden states and output embedding
    (step.completion_logprobs), else naive, from its logits, with a line that says why."""
    for model in models:
        reason = fused_problem(step, model)
        if reason:
            say(f"log-probs from the logits, not fused: {reason}")
            return "naive"
    return "fused"


@torch.no_grad()
def fused_problem(step, model, tolerance=1e-2):
    """Why the model's logits are not its last hidden states times its output embedding, or None. A
    trial forward on one row, whatever the config calls the change: Granite's logits_scaling,
    Falcon-H1's lm_head_multiplier, Cohere's logit_scale. A softcap (Gemma 2) or a bias is known
    from the model, as the trial's small logits would hide a cap."""
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    if head.bias is not None:
        return "the output layer has a bias"
    if getattr(inner.config, "final_logit_softcapping", None) is not None:
        return "the model caps its logits (final_logit_softcapping)"
    device = next(model.parameters()).device
    ids = (torch.arange(16, device=device) % inner.config.vocab_size)[None]  # (1, 16)
    was_training = model.training
    with step.gathered(model.eval()):  # eval: no dropout; gathered: FSDP2 reshards afterwards
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
        weight = head.weight
        if isinstance(weight, DTensor):
            weight = weight.full_tensor()
        fused = out.hidden_states[-1].float() @ weight.float().T  # (1, 16, V)
    model.train(was_training)
    logits = out.logits.float()
    error = float((fused - logits).abs().max() / logits.abs().max().clamp(min=1e-30))
    if error > tolerance:  # bf16 weights: about 0.004
        return f"they differ from the model's own by {error:.2g} relative (its logits are scaled)"
    return None


def check_packing(args, step, *models):
    """Whether training can pack each pair into a row (step.training_rows()); if not, says why."""
    if not args.prefix_sharing:
        return False
    for model in models:
        reason = packing_problem(args, step, model)
        if reason:
            say(f"prefix sharing off in training: {reason}")
            return False
    return True


def packing_problem(args, step, model):
    """Why the model cannot take packed rows (a 4D mask; eager or sdpa, no short sliding window), or
    None."""
    config = model.config
    if config._attn_implementation not in ("eager", "sdpa"):
        return f"attn_implementation {config._attn_implementation} takes no 4D attention mask"
    if (getattr(config, "sliding_window", None) or math.inf) < 2 * args.max_length:
        return f"its sliding window ({config.sliding_window} tokens) may be shorter than a row"
    # The trial, 5 sequences of 3 tokens: a rejected completion (5th) gets the same log-probs after
    # either chosen one (2nd, 3rd), which it may not see, and others after another prompt (1st or
    # 2nd), which it sees.
    ids = (torch.arange(15, device=next(model.parameters()).device) % config.vocab_size).view(5, 3)
    one = torch.ones_like(ids)
    was_training = model.training
    try:  # eval mode: no dropout; gathered: FSDP2 reshards afterwards
        rejected = []
        with torch.no_grad(), step.gathered(model.eval()):
            for prompt, chosen in ((0, 2), (0, 3), (1, 2)):
                logps = step.completion_logprobs(model, ids[[prompt]], one[:1], ids[[chosen, 4]], one[:2],
                                                 packed=True)
                rejected.append(logps[1, 1:])  # its first token is predicted by the prompt alone
        applied = torch.equal(rejected[0], rejected[1]) and not torch.equal(rejected[0], rejected[2])
        reason = None if applied else "the model does not apply a 4D mask"
    except Exception as e:
        reason = f"the model refuses a 4D attention mask ({why(e)})"
    model.train(was_training)
    return reason
