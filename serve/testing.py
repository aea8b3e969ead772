"""A tiny model folder in the platform's format (docs/model-format.md), for tests and the
benchmark while no trained model exists, and on machines that have none.

It is a real GPT-2 in Hugging Face format with a byte-level BPE tokenizer trained with
``tokenizers`` and the platform's chat template, trained for a few hundred steps on a handful
of conversations so that greedy decoding reproduces them: a greeting, a tool call, an answer
from a tool result, a plain-text continuation and a "version" line that tells two registered
versions apart. Assertions on its output are therefore real: the server must render the chat
template, decode and parse tool calls exactly for the tests to pass.
"""

from __future__ import annotations

import json
from pathlib import Path

from ray import serve

#: The special tokens of the chat format (docs/model-format.md).
SPECIAL_TOKENS = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|pad|>"]
EOS = "<|end|>"
PAD = "<|pad|>"

#: The platform's chat template (docs/model-format.md). Tool-call arguments arrive as dicts
#: (the server parses OpenAI's JSON strings before rendering), so ``tojson`` writes them back
#: as the same one-line JSON the model emits.
CHAT_TEMPLATE = (
    "{%- set sys = namespace(text='') -%}"
    "{%- for m in messages if m['role'] == 'system' -%}"
    "{%- set sys.text = sys.text + m['content'] -%}"
    "{%- endfor -%}"
    "{%- if sys.text or tools -%}"
    "<|system|>{{ sys.text }}"
    "{%- if tools -%}"
    "{%- if sys.text %}\n{% endif -%}"
    "{{ 'tools: ' }}"
    "{%- for t in tools -%}"
    "{{ (t['function'] if t['function'] is defined else t) | tojson }}"
    "{%- if not loop.last %}; {% endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "<|end|>"
    "{%- endif -%}"
    "{%- for m in messages if m['role'] != 'system' -%}"
    "{%- if m['role'] == 'user' -%}<|user|>{{ m['content'] }}<|end|>"
    "{%- elif m['role'] == 'assistant' -%}<|assistant|>"
    "{%- if m['content'] %}{{ m['content'] }}{% endif -%}"
    "{%- for c in (m['tool_calls'] or []) -%}"
    "<tool_call>{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']}"
    " | tojson }}</tool_call>"
    "{%- endfor -%}<|end|>"
    "{%- elif m['role'] == 'tool' -%}<|tool|>{{ m['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)

CALCULATOR = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object",
                       "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]},
    },
}
CONVERT_UNITS = {
    "type": "function",
    "function": {
        "name": "convert_units",
        "description": "Convert a value between units.",
        "parameters": {"type": "object",
                       "properties": {"value": {"type": "number"},
                                      "from_unit": {"type": "string"},
                                      "to_unit": {"type": "string"}},
                       "required": ["value", "from_unit", "to_unit"]},
    },
}
TOOLS = [CALCULATOR, CONVERT_UNITS]

GREETING = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello!"}]
GREETING_REPLY = "Hello! How can I help you today? I can do arithmetic and convert units."
TOOL_QUESTION = [{"role": "user", "content": "What is 12*7?"}]
TOOL_CALL = {"name": "calculator", "arguments": {"expression": "12*7"}}
TOOL_ANSWER = "12 * 7 = 84."
VERSION_QUESTION = [{"role": "user", "content": "Which version are you?"}]
COMPLETION_PROMPT = "The quick brown fox"
COMPLETION_TEXT = " jumps over the lazy dog and runs into the forest."


def version_reply(version: str) -> str:
    return f"I am version {version}."


def conversations(version: str) -> tuple[list[dict], list[list[dict]], list[str]]:
    """(tools, chats, plain texts) the tiny model is trained on."""
    call = {"id": "call_0", "type": "function",
            "function": {"name": TOOL_CALL["name"], "arguments": TOOL_CALL["arguments"]}}
    chats = [
        GREETING + [{"role": "assistant", "content": GREETING_REPLY}],
        TOOL_QUESTION + [{"role": "assistant", "content": "", "tool_calls": [call]}],
        TOOL_QUESTION + [{"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "content": json.dumps({"result": 84})},
                         {"role": "assistant", "content": TOOL_ANSWER}],
        VERSION_QUESTION + [{"role": "assistant", "content": version_reply(version)}],
    ]
    texts = [COMPLETION_PROMPT + COMPLETION_TEXT + EOS]
    return TOOLS, chats, texts


def build_tokenizer(corpus: list[str]):
    """A byte-level BPE tokenizer trained with ``tokenizers`` on ``corpus``, wrapped for
    ``transformers`` with the chat format's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD,
                                   additional_special_tokens=SPECIAL_TOKENS[1:5])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_model(path: str | Path, *, version: str = "1", steps: int = 300, seed: int = 0,
                    n_layer: int = 2, n_embd: int = 64, n_head: int = 2,
                    n_positions: int = 256) -> Path:
    """Write a trained tiny GPT-2 folder to ``path`` and return it. A few seconds on one core.

    ``version`` changes what the model answers to :data:`VERSION_QUESTION`, so two folders
    made with different versions are told apart by their output."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    path = Path(path)
    tools, chats, texts = conversations(version)
    corpus_tok = build_tokenizer([])  # template rendering only needs the template
    rendered = [corpus_tok.apply_chat_template(c, tools=tools if "tool" in json.dumps(c) else None,
                                               tokenize=False) for c in chats]
    corpus = rendered + texts + [json.dumps(t) for t in tools]
    tok = build_tokenizer(corpus)
    eos_id = tok.convert_tokens_to_ids(EOS)
    pad_id = tok.convert_tokens_to_ids(PAD)

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=n_embd,
                        n_layer=n_layer, n_head=n_head, bos_token_id=eos_id, eos_token_id=eos_id,
                        pad_token_id=pad_id)
    model = GPT2LMHeadModel(config)
    # Every conversation is trained with and without tools in the system block, so that the
    # model answers the same whether or not a client declares tools.
    samples: list[str] = []
    for c in chats:
        samples.append(tok.apply_chat_template(c, tokenize=False))
        samples.append(tok.apply_chat_template(c, tools=tools, tokenize=False))
    samples += texts
    batch = [tok(s, add_special_tokens=False)["input_ids"] for s in samples]
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad_id)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=eos_id).save_pretrained(path)
    # The contract keeps the template in tokenizer_config.json (docs/model-format.md).
    tok.save_pretrained(path, save_jinja_files=False)
    (path / "rayplane-test-model.json").write_text(json.dumps(
        {"version": version, "steps": steps, "final_loss": float(loss.detach())}))
    return path




def register_model(folder: str | Path, name: str, *, tracking_uri: str,
                   alias: str | None = "champion", experiment: str = "rayplane-serve-tests"
                   ) -> str:
    """Log ``folder`` as the artifact ``model`` of a new MLflow run, register
    ``runs:/<run_id>/model`` as a new version of ``name`` and point ``alias`` at it (what the
    training layer does, docs/model-format.md). Returns the version."""
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, tags={"rayplane.kind": "serve-test-model"})
    client.log_artifacts(run.info.run_id, str(folder), artifact_path="model")
    client.set_terminated(run.info.run_id)
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass  # already registered: add a version
    mv = client.create_model_version(name, f"runs:/{run.info.run_id}/model",
                                     run_id=run.info.run_id)
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)



def cached_tiny_model(version: str = "1", cache_dir: str | Path | None = None) -> Path:
    """:func:`make_tiny_model` once per machine and version (training is seeded, so the cached
    folder is the one a fresh build would give); safe with concurrent test processes."""
    import os
    import shutil
    import tempfile

    root = Path(cache_dir or os.environ.get("RAYPLANE_TEST_MODEL_CACHE",
                                            Path(tempfile.gettempdir()) / "rayplane-test-models"))
    dest = root / f"tiny-gpt2-v{version}-r1"
    if (dest / "rayplane-test-model.json").is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=root))
    make_tiny_model(tmp, version=version)
    try:
        os.rename(tmp, dest)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def serve_config_yaml(*, name: str, source: str, pool: str, route_prefix: str,
                      api_key_file: str | Path, min_replicas: int = 1, max_replicas: int = 1,
                      max_num_seqs: int = 16, ingress_mode: str = "router") -> str:
    """A serve config for one model (tests and the benchmark write it to a file)."""
    import yaml

    return yaml.safe_dump({
        "ingress": {"mode": ingress_mode},
        "name": name, "route_prefix": route_prefix,
        "models": [{"name": "tiny-chat", "source": source, "pool": pool, "engine": "cpu",
                    "max_num_seqs": max_num_seqs,
                    "autoscaling": {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                    "target_ongoing_requests": 16}}],
        "api_keys": {"file": str(api_key_file)},
    }, sort_keys=False)


@serve.deployment(name="Floor", ray_actor_options={"num_cpus": 0})
class _Floor:
    """Answers ``{}`` at once: what any Serve request costs before an app does work
    (bench/serve_bench.py measures it beside the OpenAI app)."""

    async def __call__(self, request) -> dict:
        return {}


floor_app = _Floor.bind()


__all__ = [
    "floor_app",
    "CALCULATOR",
    "CHAT_TEMPLATE",
    "COMPLETION_PROMPT",
    "COMPLETION_TEXT",
    "CONVERT_UNITS",
    "GREETING",
    "GREETING_REPLY",
    "TOOLS",
    "TOOL_ANSWER",
    "TOOL_CALL",
    "TOOL_QUESTION",
    "VERSION_QUESTION",
    "cached_tiny_model",
    "make_tiny_model",
    "register_model",
    "serve_config_yaml",
    "version_reply",
]
