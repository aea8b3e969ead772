"""A tiny model folder in the platform's format (docs/model-format.md), for the serving tests.

It is a real GPT-2 in Hugging Face format built with the training layer's own code: the
tokenizer of ``train/tokenizer.py`` (its byte-level BPE, special tokens and chat template --
the one the platform serves), ``train.model.build_model`` and ``save_model_folder``. It is
trained for a few hundred steps on a handful of conversations so that greedy decoding
reproduces them: a greeting, a tool call, an answer from the tool's result (the real
calculator's, exactly as the agent graphs send it back), a plain-text continuation and a
"version" line that tells two registered versions apart. Assertions on its output are
therefore real: the server must render the chat template, decode and parse tool calls exactly
for the tests to pass.

Training samples are token ids exactly as the server builds them: a chat is the template
applied to it (special tokens split the text, so a prompt is a prefix of its conversation's
ids), the tool call also follows the prompt the server builds for ``tool_choice`` naming the
tool (the forced prefix encoded on its own), and the plain text is the prompt encoded on its
own followed by the continuation.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from train.tools import calculator

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
#: The tool message answering TOOL_CALL: the real calculator's result as the agent graphs'
#: ToolNode sends it (the JSON of the returned dict), ``{"result": 84}``.
TOOL_RESULT = json.dumps(calculator(**TOOL_CALL["arguments"]), ensure_ascii=False)
TOOL_ANSWER = "12 * 7 = 84."
VERSION_QUESTION = [{"role": "user", "content": "Which version are you?"}]
COMPLETION_PROMPT = "The quick brown fox"
COMPLETION_TEXT = " jumps over the lazy dog and runs into the forest."

#: Bumped whenever the model changes, so a cached folder of an older build is not reused.
BUILD = "r2"


def version_reply(version: str) -> str:
    return f"I am version {version}."


def conversations(version: str) -> list[list[dict]]:
    """The chats the tiny model is trained on (each with and without tools declared)."""
    call = {"id": "call_0", "type": "function",
            "function": {"name": TOOL_CALL["name"], "arguments": TOOL_CALL["arguments"]}}
    return [
        GREETING + [{"role": "assistant", "content": GREETING_REPLY}],
        TOOL_QUESTION + [{"role": "assistant", "content": "", "tool_calls": [call]}],
        TOOL_QUESTION + [{"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "content": TOOL_RESULT},
                         {"role": "assistant", "content": TOOL_ANSWER}],
        VERSION_QUESTION + [{"role": "assistant", "content": version_reply(version)}],
    ]


def _samples(tok, version: str) -> list[list[int]]:
    """Token ids of every training sample (see the module's docstring)."""
    from serve.protocol import NamedToolChoice
    from serve.tools import forced_prefix
    from train.tokenizer import END, format_tool_call

    def template(messages, tools=None, prompt=False) -> list[int]:
        return list(tok.apply_chat_template(messages, tools=tools, tokenize=True,
                                            add_generation_prompt=prompt, return_dict=False))

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    end = tok.convert_tokens_to_ids(END)
    samples = []
    for chat in conversations(version):
        samples += [template(chat), template(chat, TOOLS)]
    # tool_choice naming the calculator: the prompt ends with the forced prefix, encoded alone.
    named = NamedToolChoice.model_validate({"type": "function",
                                            "function": {"name": TOOL_CALL["name"]}})
    prefix = forced_prefix(named, TOOLS)
    call = format_tool_call(TOOL_CALL["name"], TOOL_CALL["arguments"])
    assert call.startswith(prefix), (call, prefix)
    samples.append(template(TOOL_QUESTION, TOOLS, prompt=True) + encode(prefix)
                   + encode(call[len(prefix):]) + [end])
    samples.append(encode(COMPLETION_PROMPT) + encode(COMPLETION_TEXT) + [end])
    return samples


def make_tiny_model(path: str | Path, *, version: str = "1", steps: int = 300, seed: int = 0,
                    n_layer: int = 2, n_embd: int = 64, n_head: int = 2,
                    n_positions: int = 256) -> Path:
    """Write a trained tiny GPT-2 folder to ``path`` and return it. Seconds on one core.

    ``version`` changes what the model answers to :data:`VERSION_QUESTION`, so two folders
    made with different versions are told apart by their output."""
    import torch

    from train.config import ModelSize
    from train.model import build_model, save_model_folder
    from train.tokenizer import PAD, render_text, train_tokenizer

    path = Path(path)
    chats = conversations(version)
    corpus = [render_text(c, tools) for c in chats for tools in (None, TOOLS)]
    corpus.append(COMPLETION_PROMPT + COMPLETION_TEXT)
    tok = train_tokenizer(corpus * 2, vocab_size=400)  # twice: BPE merges need 2 occurrences
    size = ModelSize(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions)
    model = build_model(size, tok, seed=seed)
    batch = _samples(tok, version)
    pad_id = tok.convert_tokens_to_ids(PAD)
    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad_id)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    save_model_folder(model, tok, path)
    (path / "rayplane-test-model.json").write_text(json.dumps(
        {"version": version, "steps": steps, "build": BUILD,
         "final_loss": float(loss.detach())}))
    return path


def cached_tiny_model(version: str = "1", cache_dir: str | Path | None = None) -> Path:
    """:func:`make_tiny_model` once per machine, version and build (training is seeded, so the
    cached folder is the one a fresh build would give); safe with concurrent test processes."""
    root = Path(cache_dir or os.environ.get("RAYPLANE_TEST_MODEL_CACHE",
                                            Path(tempfile.gettempdir()) / "rayplane-test-models"))
    dest = root / f"tiny-gpt2-v{version}-{BUILD}"
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


def serve_config_yaml(*, name: str, source: str, pool: str, route_prefix: str,
                      api_key_file: str | Path, min_replicas: int = 1, max_replicas: int = 1,
                      max_num_seqs: int = 16, ingress_mode: str = "router") -> str:
    """A serve config for the tiny model (the tests write it to a file)."""
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
