"""The Matryoshka layer and wrapped model against plain LoRA math, single and mixed-rank."""

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

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


def packed_pair(bias: bool, r_max: int = 8):
    """Two identical layers; the second is packed for inference."""
    torch.manual_seed(0)
    layers = []
    for _ in range(2):
        context = RankContext()
        torch.manual_seed(0)
        layer = MatryoshkaLinear(nn.Linear(12, 20, bias=bias), r_max=r_max, rank_context=context)
        nn.init.normal_(layer.lora_B, std=0.1)
        layers.append(layer)
    assert layers[1].pack_for_inference()
    return layers


def shared_diagonal(rank: int, r_max: int = 8) -> RankDiagonal:
    values = torch.linspace(2.0, 1.0, r_max)[:rank]
    return RankDiagonal(values=values, width=rank, key=("test", rank))


def run(layer: MatryoshkaLinear, diagonal: RankDiagonal, x: torch.Tensor, mode: str = "inference_mode"):
    with layer.rank_context.use(diagonal), GRAD_MODES[mode]():
        return layer(x)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("per_row", [False, True])
def test_packed_layer_equals_plain_layer(bias, per_row):
    plain, packed = packed_pair(bias)
    x = torch.randn(4, 3, 12)
    if per_row:
        rows = torch.zeros(4, 8)
        for row, rank in enumerate([0, 2, 5, 8]):
            rows[row, :rank] = torch.linspace(2.0, 1.0, 8)[:rank]
        diagonal = RankDiagonal.from_rows(rows)
    else:
        diagonal = shared_diagonal(5)
    torch.testing.assert_close(run(packed, diagonal, x), run(plain, diagonal, x), atol=1e-5, rtol=1e-5)
    zero = RankDiagonal(values=torch.zeros(0), width=0, key=("test", 0))
    assert torch.equal(run(packed, zero, x), run(plain, zero, x))


def test_packing_keeps_the_parameters_trainable():
    plain, packed = packed_pair(bias=False)
    assert torch.equal(packed.base_layer.weight, plain.base_layer.weight)
    assert torch.equal(packed.lora_A, plain.lora_A)
    x = torch.randn(2, 3, 12)
    run(packed, shared_diagonal(4), x, mode="training").sum().backward()
    run(plain, shared_diagonal(4), x, mode="training").sum().backward()
    torch.testing.assert_close(packed.lora_A.grad, plain.lora_A.grad)
    torch.testing.assert_close(packed.lora_B.grad, plain.lora_B.grad)


def test_packed_layer_sees_new_adapter_weights():
    plain, packed = packed_pair(bias=False)
    x = torch.randn(2, 3, 12)
    run(packed, shared_diagonal(4), x)                   # fills the B·diag(p) cache
    new_a, new_b = torch.randn(8, 12), torch.randn(20, 8)
    with torch.no_grad():
        for layer in (plain, packed):
            layer.lora_A.copy_(new_a)
            layer.lora_B.copy_(new_b)
    torch.testing.assert_close(run(packed, shared_diagonal(4), x), run(plain, shared_diagonal(4), x))


def test_moving_a_packed_layer_packs_it_again():
    plain, packed = packed_pair(bias=True)
    packed.to(torch.float64)
    plain.to(torch.float64)
    assert packed.is_packed()
    assert packed._packed.rows[0].dtype == torch.float64
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    diagonal = RankDiagonal(values=torch.ones(3, dtype=torch.float64), width=3, key=("test", 3))
    torch.testing.assert_close(run(packed, diagonal, x), run(plain, diagonal, x))


def test_packing_skipped_when_dtypes_differ():
    layer = MatryoshkaLinear(nn.Linear(12, 20).to(torch.bfloat16), r_max=4, rank_context=RankContext())
    assert not layer.pack_for_inference()
    assert not layer.is_packed()


def test_replaced_parameter_unpacks_layer():
    plain, packed = packed_pair(bias=False)
    new_b = torch.randn(20, 8)
    packed.lora_B = nn.Parameter(new_b.clone())
    plain.lora_B = nn.Parameter(new_b.clone())
    assert not packed.is_packed()
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(run(packed, shared_diagonal(4), x), run(plain, shared_diagonal(4), x))


def test_scaled_b_cache_stays_within_its_budget():
    _, packed = packed_pair(bias=False)
    x = torch.randn(1, 1, 12)
    for rank in range(1, 9):
        for rule in ("a", "b", "c"):
            diagonal = RankDiagonal(values=torch.full((rank,), 0.5), width=rank, key=(rule, rank))
            run(packed, diagonal, x)
    cached_columns = sum(block.shape[0] for block in packed._packed.scaled_b_t.values())
    assert 0 < cached_columns <= 2 * packed.r_max


def test_uniform_row_ranks_share_one_diagonal(tiny_matryoshka):
    with tiny_matryoshka.with_row_ranks([4, 4, 4]):
        assert tiny_matryoshka.rank_context.current().key == (tiny_matryoshka.config.inference_rule, 4)
    with tiny_matryoshka.with_row_ranks([4, 2]):
        assert tiny_matryoshka.rank_context.current().key is None


@pytest.mark.parametrize("ranks", [[4, 4, 4], [0, 16, 2, 4]])
def test_packed_model_equals_plain_model(tiny_model_dir, ranks):
    models = []
    for _ in range(2):
        base = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        model = MatryoshkaModel(base, make_adapter_config())
        randomize_adapter(model)
        models.append(model)
    plain, packed = models
    assert packed.pack_for_inference() == len(packed.matryoshka_layers)
    input_ids = torch.randint(0, 100, (len(ranks), 6))
    logits = []
    for model in (plain, packed):
        with torch.inference_mode(), model.with_row_ranks(ranks):
            logits.append(model(input_ids=input_ids).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


def test_packed_model_saves_its_adapter(tiny_matryoshka, tmp_path):
    from safetensors.torch import load_file

    from matlora_core.adapter import save_adapter

    tiny_matryoshka.pack_for_inference()
    folder = save_adapter(tiny_matryoshka, tmp_path / "adapter")
    saved = load_file(next(folder.glob("*.safetensors")))
    expected = tiny_matryoshka.adapter_state_dict()
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name
