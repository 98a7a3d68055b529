"""The Matryoshka layer and wrapped model against plain LoRA math, single and mixed-rank."""

import pytest
import torch
from torch import nn

from matlora_core import MatryoshkaConfig, MatryoshkaModel
from matlora_core.layer import MatryoshkaLinear, RankContext, RankDiagonal
from matlora_core.ranks import rank_scale

from .conftest import build_tiny_llama, make_adapter_config, randomize_adapter

TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def plain_lora(x, weight, lora_a, lora_b, rank, scale):
    """y = W0·x + s(r)·B[:, :r]·A[:r]·x, computed naively in float64."""
    x, weight = x.double(), weight.double()
    a, b = lora_a[:rank].double(), lora_b[:, :rank].double()
    return x @ weight.T + scale * (x @ a.T) @ b.T


GRAD_MODES = {"training": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("mode", list(GRAD_MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 3, 8, 16])
def test_layer_rank_equals_plain_lora(dtype, rank, mode):
    torch.manual_seed(rank)
    context = RankContext()
    layer = MatryoshkaLinear(nn.Linear(24, 40, bias=False), r_max=16, rank_context=context)
    nn.init.normal_(layer.lora_B, std=0.1)
    layer.to(dtype)
    x = torch.randn(3, 5, 24, dtype=dtype)
    scale = rank_scale(rank, "sqrt")
    diagonal = torch.zeros(16, dtype=dtype)
    diagonal[:rank] = scale

    with context.use(RankDiagonal.from_rows(diagonal)), GRAD_MODES[mode]():
        output = layer(x)

    expected = plain_lora(x, layer.base_layer.weight, layer.lora_A, layer.lora_B, rank, scale)
    torch.testing.assert_close(output.double(), expected, **TOLERANCES[dtype])


def test_layer_computes_only_needed_columns():
    context = RankContext()
    layer = MatryoshkaLinear(nn.Linear(8, 8, bias=False), r_max=8, rank_context=context)
    with torch.no_grad():
        layer.lora_A[4:] = float("nan")  # columns past the widest rank must never be read
    diagonal = torch.tensor([[1.0, 1, 0, 0, 0, 0, 0, 0], [1.0, 1, 1, 1, 0, 0, 0, 0]])
    with context.use(RankDiagonal.from_rows(diagonal)):
        output = layer(torch.randn(2, 3, 8))
    assert torch.isfinite(output).all()


def test_layer_without_rank_raises():
    layer = MatryoshkaLinear(nn.Linear(4, 4), r_max=2, rank_context=RankContext())
    with pytest.raises(RuntimeError, match="no rank is set"):
        layer(torch.randn(1, 4))


@pytest.mark.parametrize("rule", ["paper", "partial_sum"])
def test_model_rank_matches_reference_layers(tiny_base, rule):
    model = MatryoshkaModel(tiny_base, make_adapter_config(inference_rule=rule))
    randomize_adapter(model)
    input_ids = torch.randint(0, 100, (2, 7))
    for rank in (1, 4, 16):
        with model.at_rank(rank):
            logits = model(input_ids=input_ids).logits
        with model.with_diagonal(model.serving_diagonal(rank, rule)):
            reference = model(input_ids=input_ids).logits
        torch.testing.assert_close(logits, reference)


def test_rank_zero_equals_base_exactly(tiny_model_dir, tiny_base):
    reference = build_tiny_llama(tiny_base.config.vocab_size, 0, 1)
    reference.load_state_dict(tiny_base.state_dict())
    model = MatryoshkaModel(tiny_base, make_adapter_config())
    randomize_adapter(model)
    input_ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        with model.at_rank(0):
            logits = model(input_ids=input_ids).logits
        base_logits = reference(input_ids=input_ids).logits
    assert torch.equal(logits, base_logits)


def test_ranks_differ_from_each_other(tiny_matryoshka):
    input_ids = torch.randint(0, 100, (1, 6))
    outputs = {}
    with torch.no_grad():
        for rank in (0, 4, 16):
            with tiny_matryoshka.at_rank(rank):
                outputs[rank] = tiny_matryoshka(input_ids=input_ids).logits
    assert not torch.allclose(outputs[0], outputs[4])
    assert not torch.allclose(outputs[4], outputs[16])


@pytest.mark.parametrize("rule", ["paper", "partial_sum"])
def test_mixed_rank_rows_equal_single_runs(tiny_base, rule):
    model = MatryoshkaModel(tiny_base, make_adapter_config(inference_rule=rule))
    randomize_adapter(model)
    ranks = [0, 16, 2, 4, 0, 8]
    input_ids = torch.randint(0, 100, (len(ranks), 5))
    with torch.no_grad(), model.with_row_ranks(ranks):
        mixed = model(input_ids=input_ids).logits
    for row, rank in enumerate(ranks):
        with torch.no_grad(), model.at_rank(rank):
            single = model(input_ids=input_ids[row:row + 1]).logits
        torch.testing.assert_close(mixed[row:row + 1], single, atol=1e-5, rtol=1e-5)


def test_training_diagonal_matches_sum_of_sub_adapters(tiny_base):
    config = make_adapter_config(scale_rule="rank")
    model = MatryoshkaModel(tiny_base, config)
    randomize_adapter(model)
    layer = next(iter(model.matryoshka_layers.values()))
    x = torch.randn(2, 3, layer.in_features)
    with model.training_mode_diagonal():
        output = layer(x)
    expected = x.double() @ layer.base_layer.weight.double().T
    for rank in config.trained_ranks:
        expected = expected + plain_lora(x, torch.zeros_like(layer.base_layer.weight), layer.lora_A, layer.lora_B,
                                         rank, 1 / rank)
    torch.testing.assert_close(output.double(), expected, atol=1e-5, rtol=1e-5)


def test_base_is_frozen_and_adapter_trainable(tiny_base):
    model = MatryoshkaModel(tiny_base, make_adapter_config())
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    assert len(model.matryoshka_layers) == 2 * 7


def test_unknown_target_module_names_the_choices(tiny_base):
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no layer.*q_proj"):
        MatryoshkaModel(tiny_base, MatryoshkaConfig(r_max=4, trained_ranks=[4], target_modules=["qkv_proj"]))


def test_rank_above_r_max_rejected(tiny_matryoshka):
    with pytest.raises(ValueError, match="rank 17 is outside 0..r_max=16"):
        with tiny_matryoshka.at_rank(17):
            pass
