"""The model folder of docs/model-format.md: what train/ writes is what serve/ and vLLM load."""

from __future__ import annotations

import json

import pytest

from train.config import ModelSize
from train.data import generate
from train.model import MODEL_FILES, build_model, load_model_folder, save_model_folder
from train.tokenizer import END, PAD, render_text, train_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    data = generate(2, {"train": 300, "val": 1, "heldout": 1})
    tok = train_tokenizer([render_text(e.messages, e.tools) for e in data["train"]], 400)
    model = build_model(ModelSize(n_layer=1, n_head=2, n_embd=16, n_positions=64), tok)
    out = tmp_path_factory.mktemp("model")
    save_model_folder(model, tok, out)
    return out, tok


def test_folder_holds_the_contract_files(folder):
    out, tok = folder
    assert sorted(p.name for p in out.iterdir()) == sorted(MODEL_FILES)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["vocab_size"] >= len(tok) and config["vocab_size"] % 64 == 0
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids(END)
    assert gen["pad_token_id"] == tok.convert_tokens_to_ids(PAD)


def test_auto_classes_load_it_and_generation_stops_at_end(folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _ = folder
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    assert model.generation_config.eos_token_id == tok.eos_token_id
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                     add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)
    with torch.no_grad():
        ids = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert ids.shape[1] <= prompt["input_ids"].shape[1] + 5
    again, tok2 = load_model_folder(out)
    assert not again.training and tok2.eos_token == END
