"""A tiny model folder in the platform's format (docs/model-format.md), for the serving tests.

It is a real GPT-2 in Hugging Face format built with the training layer's own code: the
tokenizer of ``train/tokenizer.py`` (its byte-level BPE, special tokens and chat template --
the one the platform serves), ``train.model.build_model`` and ``save_model_folder``. It is
trained for a few hundred steps on a handful of conversations so that greedy decoding
reproduces them: a greeting, a tool call, an answer from the tool's result (the real
calculator's, exactly as the agent graphs send it back), a plain-text continuation and a
"version" line that tells two registered versions apart. It also asks the live platform tool
``pool_units`` how many units of the a100-mig pool are free and answers from each result the
local test platform can give (2 units, 0 to 2 of them used, or usage not reported yet), so an
agent's answer follows the cluster's state. It answers the calculator question inside the
prompt CrewAI builds for the platform's crew too (agents/frameworks/crew.py), so the CrewAI
example runs on it. The tool calls are learnt under the tool lists
clients declare: the tests' own, the agents' ``tools`` graph's (``train.tools.AGENT_TOOLS``)
and none. Assertions on its output are therefore real: the server must render the chat
template, decode and parse tool calls exactly for the tests to pass.

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

from agents.frameworks.crew import crew_messages
from train.data import pool_units_answer
from train.tools import AGENT_TOOLS, POOL_UNITS_TOOL, calculator, pool_units_result

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
POOL_QUESTION = [{"role": "user",
                  "content": "How many free GPU units does the a100-mig pool have?"}]
POOL_CALL = {"name": "pool_units", "arguments": {"pool": "a100-mig"}}
#: The local test platform's a100-mig pool: one node standing for 2 units.
POOL_TOTAL, POOL_NODES = 2, 1


def pool_result(used: int | None) -> dict:
    """What ``agents.platform.pool_units("a100-mig")`` returns on the test platform with
    ``used`` units held (None: usage not reported yet)."""
    return pool_units_result("a100-mig", total=POOL_TOTAL, used=used, nodes=POOL_NODES)


def pool_answer(result: dict) -> str:
    """The tiny model's answer to :data:`POOL_QUESTION` given the tool's ``result``."""
    return pool_units_answer("a100-mig", result)


VERSION_QUESTION = [{"role": "user", "content": "Which version are you?"}]
COMPLETION_PROMPT = "The quick brown fox"
COMPLETION_TEXT = " jumps over the lazy dog and runs into the forest."

#: Bumped whenever the model changes, so a cached folder of an older build is not reused.
BUILD = "r4"


def version_reply(version: str) -> str:
    return f"I am version {version}."


#: The tool lists a chat is trained under: none, the tests' own, the agents' tools graph's
#: (the platform tools first) and pool_units alone.
TOOLSETS = [None, TOOLS, AGENT_TOOLS, [POOL_UNITS_TOOL]]


def _exchange(question: list[dict], call: dict, result: str, answer: str) -> list[dict]:
    message = {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_0", "type": "function",
         "function": {"name": call["name"], "arguments": call["arguments"]}}]}
    return question + [message, {"role": "tool", "content": result},
                       {"role": "assistant", "content": answer}]


def conversations(version: str) -> list[tuple[list[dict], list]]:
    """The chats the tiny model is trained on, each with the tool lists it is declared with."""
    calc = _exchange(TOOL_QUESTION, TOOL_CALL, TOOL_RESULT, TOOL_ANSWER)
    chats = [
        (GREETING + [{"role": "assistant", "content": GREETING_REPLY}], TOOLSETS[:2]),
        (calc[:2], TOOLSETS[:3]), (calc, TOOLSETS[:3]),
        (VERSION_QUESTION + [{"role": "assistant", "content": version_reply(version)}],
         TOOLSETS[:2]),
    ]
    for used in (0, 1, 2, None):
        result = pool_result(used)
        chats.append((_exchange(POOL_QUESTION, POOL_CALL, json.dumps(result, ensure_ascii=False),
                                pool_answer(result)), TOOLSETS))
    # The crew's own prompt (role, goal and task around the question), with its two tools.
    crew = _exchange(crew_messages(TOOL_QUESTION[0]["content"]), TOOL_CALL, TOOL_RESULT,
                     TOOL_ANSWER)
    chats += [(crew[:3], [TOOLS]), (crew, [TOOLS])]
    return chats


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
    for chat, toolsets in conversations(version):
        samples += [template(chat, tools) for tools in toolsets]
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
                    n_positions: int = 512) -> Path:
    """Write a trained tiny GPT-2 folder to ``path`` and return it. A minute or two of one core.

    ``version`` changes what the model answers to :data:`VERSION_QUESTION`, so two folders
    made with different versions are told apart by their output."""
    import torch

    from train.config import ModelSize
    from train.model import build_model, save_model_folder
    from train.tokenizer import PAD, render_text, train_tokenizer

    path = Path(path)
    chats = conversations(version)
    corpus = [render_text(c, tools) for c, toolsets in chats for tools in toolsets]
    corpus.append(COMPLETION_PROMPT + COMPLETION_TEXT)
    tok = train_tokenizer(corpus * 2, vocab_size=400)  # twice: BPE merges need 2 occurrences
    size = ModelSize(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions)
    model = build_model(size, tok, seed=seed)
    pad_id = tok.convert_tokens_to_ids(PAD)
    # Two padded batches, the crew's long prompts apart from the short chats: one batch
    # padded to the longest sample would cost two and a half times as much a step.
    samples = sorted(_samples(tok, version), key=len)
    cut = next((i for i, row in enumerate(samples) if len(row) > 2 * len(samples[0]) + 64),
               len(samples))
    batches = []
    for group in (samples[:cut], samples[cut:]):
        if not group:
            continue
        width = max(map(len, group))
        ids = torch.full((len(group), width), pad_id)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for i, row in enumerate(group):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = 1
        batches.append((ids, mask, ids.masked_fill(mask == 0, -100)))
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = sum(model(input_ids=ids, attention_mask=mask, labels=labels).loss
                   for ids, mask, labels in batches)
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
