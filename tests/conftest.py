"""Shared fixtures: a tiny random Llama and its byte-level tokenizer, built in the test session (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from matlora_core import MatryoshkaConfig, MatryoshkaModel, save_adapter

CORPUS = [
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\nAnswer: 3 + 4 = 7\n#### 7",
    "Question: A train travels 60 miles in 2 hours. What is its speed?\nAnswer: 60 / 2 = 30\n#### 30",
    "The quick brown fox jumps over the lazy dog. 0123456789 + - * / = # ?",
    "Matryoshka adapters serve every nested rank from one set of factors.",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|eos|>", pad_token="<|pad|>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return fast


def build_tiny_llama(vocab_size: int, eos_token_id: int, pad_token_id: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, bos_token_id=eos_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.fixture(scope="session", autouse=True)
def single_thread():
    """Run torch on one thread: on matrices this small, waking a second thread costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A folder with a tiny random Llama and tokenizer that ``load_base_model`` reads like any model folder."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    model = build_tiny_llama(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def tiny_base(tiny_model_dir):
    """A fresh float32 copy of the tiny model (each test may wrap it)."""
    return LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def randomize_adapter(model: MatryoshkaModel, seed: int = 1, scale: float = 0.05) -> None:
    """Give B non-zero values: a fresh adapter has B = 0 and would equal the base model at every rank."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.matryoshka_layers.values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=generator) * scale * 4)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * scale)


def make_adapter_config(**overrides) -> MatryoshkaConfig:
    fields = dict(r_max=16, trained_ranks=[1, 2, 4, 8, 16], scale_rule="sqrt", inference_rule="paper",
                  base_model="tiny-llama")
    fields.update(overrides)
    return MatryoshkaConfig(**fields)


@pytest.fixture()
def tiny_matryoshka(tiny_base) -> MatryoshkaModel:
    model = MatryoshkaModel(tiny_base, make_adapter_config())
    randomize_adapter(model)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A saved random adapter (r_max 16, S = 1..16 by powers of two) for the tiny model."""
    folder = tmp_path_factory.mktemp("tiny-adapter")
    base = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = MatryoshkaModel(base, make_adapter_config(
        profile={0: {"answer_loss": 3.0}, 4: {"answer_loss": 2.5}, 16: {"answer_loss": 2.0}},
        quality_metric="answer_loss"))
    randomize_adapter(model)
    save_adapter(model, folder)
    return folder


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
