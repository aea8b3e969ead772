"""The model: GPT-2 architecture from ``transformers``, saved in Hugging Face format.

The folder ``save_model_folder`` writes is the contract of docs/model-format.md: config.json
(GPT2Config), model.safetensors, generation_config.json (EOS = ``<|end|>``) and the
tokenizer files with the chat template, which the CPU server and vLLM both load.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from train.tokenizer import END, PAD, save_tokenizer

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

    from train.config import ModelSize

#: Files a model folder holds (docs/model-format.md).
MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json")


def padded_vocab(n: int, multiple: int = 64) -> int:
    """Embedding rows rounded up (faster matmuls); ids past the tokenizer are never produced
    by it and are never the target of a loss."""
    return -(-n // multiple) * multiple


def build_model(size: ModelSize, tokenizer, seed: int = 0) -> GPT2LMHeadModel:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    end_id = tokenizer.convert_tokens_to_ids(END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    config = GPT2Config(
        vocab_size=padded_vocab(len(tokenizer)), n_positions=size.n_positions,
        n_embd=size.n_embd, n_layer=size.n_layer, n_head=size.n_head,
        resid_pdrop=size.dropout, embd_pdrop=size.dropout, attn_pdrop=size.dropout,
        bos_token_id=end_id, eos_token_id=end_id, pad_token_id=pad_id,
        architectures=["GPT2LMHeadModel"])
    torch.manual_seed(seed)
    return with_loss(GPT2LMHeadModel(config))


def with_loss(model):
    """transformers derives the loss from the class name and warns that GPT2LMHeadModel's is
    unknown before using the causal-LM loss anyway: name it."""
    model.loss_type = "ForCausalLM"
    return model


def save_model_folder(model, tokenizer, folder: str | Path) -> Path:
    """Write the model folder of docs/model-format.md (safetensors weights, fp32)."""
    from transformers import GenerationConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    model.save_pretrained(folder, safe_serialization=True)
    end_id = tokenizer.convert_tokens_to_ids(END)
    pad_id = tokenizer.convert_tokens_to_ids(PAD)
    GenerationConfig(eos_token_id=end_id, pad_token_id=pad_id, bos_token_id=end_id,
                     do_sample=False, max_new_tokens=64).save_pretrained(folder)
    save_tokenizer(tokenizer, folder)
    return folder


def load_model_folder(folder: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a model folder (or a checkpoint that holds one)."""
    from transformers import GPT2LMHeadModel

    from train.tokenizer import load_tokenizer

    model = with_loss(GPT2LMHeadModel.from_pretrained(str(folder))).to(device)
    model.eval()
    return model, load_tokenizer(folder)
