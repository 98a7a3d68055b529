"""Adapter folders: round trip, PEFT layout, and every validation error naming the file and tensor."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from matlora_core import AdapterError, MatryoshkaModel, load_adapter, read_config, save_adapter
from matlora_core.config import AdapterConfigError

from .conftest import make_adapter_config, randomize_adapter

Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def copy_adapter(source, tmp_path):
    target = tmp_path / "adapter"
    shutil.copytree(source, target)
    return target


def test_round_trip_keeps_tensors_and_config(tiny_base, tmp_path):
    config = make_adapter_config(profile={4: {"answer_loss": 1.5}}, quality_metric="answer_loss", default_rank=4)
    model = MatryoshkaModel(tiny_base, config)
    randomize_adapter(model)
    save_adapter(model, tmp_path / "a")

    reloaded = load_adapter(type(tiny_base)(tiny_base.config), tmp_path / "a")
    for key, tensor in model.adapter_state_dict().items():
        assert torch.equal(reloaded.adapter_state_dict()[key], tensor), key
    assert reloaded.config.trained_ranks == [1, 2, 4, 8, 16]
    assert reloaded.config.profile == {4: {"answer_loss": 1.5}}
    assert reloaded.config.default_rank == 4
    assert reloaded.config.quality(4) == 1.5


def test_saved_files_use_peft_names(tiny_adapter_dir):
    data = json.loads((tiny_adapter_dir / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA"
    assert data["r"] == data["lora_alpha"] == 16
    assert data["matryoshka"]["trained_ranks"] == [1, 2, 4, 8, 16]
    tensors = load_file(tiny_adapter_dir / "adapter_model.safetensors")
    assert tensors[Q_A].shape == (16, 64)
    assert len(tensors) == 2 * 2 * 7


def test_peft_loads_full_rank_adapter(tiny_model_dir, tiny_adapter_dir):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = peft.PeftModel.from_pretrained(base, tiny_adapter_dir)
    stored = load_file(tiny_adapter_dir / "adapter_model.safetensors")[Q_A]
    loaded = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert torch.equal(loaded, stored)


def test_missing_tensor(tiny_base, tiny_adapter_dir, tmp_path):
    folder = copy_adapter(tiny_adapter_dir, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    del tensors[Q_A]
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=f"adapter_model.safetensors: missing tensor {Q_A}"):
        load_adapter(tiny_base, folder)


def test_extra_tensor(tiny_base, tiny_adapter_dir, tmp_path):
    folder = copy_adapter(tiny_adapter_dir, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.model.embed_tokens.lora_A.weight"] = torch.zeros(16, 64)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="unexpected tensor base_model.model.model.embed_tokens.lora_A.weight: "
                                           "it matches no adapted linear layer of the base model"):
        load_adapter(tiny_base, folder)


def test_tensor_of_untargeted_linear_layer(tiny_base, tiny_adapter_dir, tmp_path):
    # lm_head is an nn.Linear of the base model, but target_modules does not list it.
    folder = copy_adapter(tiny_adapter_dir, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(16, 64)
    save_file(tensors, folder / "adapter_model.safetensors")
    message = (r"adapter_model.safetensors: unexpected tensor base_model.model.lm_head.lora_A.weight: module lm_head "
               r"is not in target_modules \[.*\] of .*adapter_config.json; add it there or remove its tensors")
    with pytest.raises(AdapterError, match=message):
        load_adapter(tiny_base, folder)


def test_config_lists_fewer_modules_than_file(tiny_base, tiny_adapter_dir, tmp_path):
    folder = copy_adapter(tiny_adapter_dir, tmp_path)
    edit_config(folder, lambda d: d.update(target_modules=["q_proj"]))
    with pytest.raises(AdapterError) as raised:
        load_adapter(tiny_base, folder)

    message = str(raised.value)
    assert "modules down_proj, gate_proj, k_proj, o_proj, up_proj, v_proj are not in target_modules" in message
    assert 'target_modules ["q_proj"] of ' in message
    assert "adapter_config.json; add them there or remove their tensors" in message
    assert "no adapted linear layer" not in message


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_non_floating_tensor(tiny_base, tiny_adapter_dir, tmp_path, dtype):
    folder = copy_adapter(tiny_adapter_dir, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[Q_A] = torch.zeros(16, 64, dtype=dtype)
    save_file(tensors, folder / "adapter_model.safetensors")
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(AdapterError, match=f"adapter_model.safetensors: tensor {Q_A} has dtype {name}: "
                                           "adapter tensors must be floating point"):
        load_adapter(tiny_base, folder)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_floating_tensor_dtypes_load(tiny_base, tiny_adapter_dir, tmp_path, dtype):
    folder = copy_adapter(tiny_adapter_dir, tmp_path)
    tensors = {key: tensor.to(dtype) for key, tensor in load_file(folder / "adapter_model.safetensors").items()}
    save_file(tensors, folder / "adapter_model.safetensors")
    model = load_adapter(tiny_base, folder)
    assert model.config.r_max == 16


def test_shape_mismatch(tiny_base, tiny_adapter_dir, tmp_path):
    folder = copy_adapter(tiny_adapter_dir, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[Q_A] = torch.zeros(16, 65)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=rf"{Q_A} has shape \[16, 65\], the base model needs \[16, 64\]"):
        load_adapter(tiny_base, folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(tiny_base, tiny_adapter_dir, tmp_path, bad):
    folder = copy_adapter(tiny_adapter_dir, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[Q_A][3, 5] = bad
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=f"{Q_A} contains NaN or inf"):
        load_adapter(tiny_base, folder)


def test_failed_load_leaves_base_untouched(tiny_base, tiny_adapter_dir, tmp_path):
    folder = copy_adapter(tiny_adapter_dir, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[Q_A][0, 0] = float("nan")
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError):
        load_adapter(tiny_base, folder)
    assert type(tiny_base.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def edit_config(folder, change):
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    (lambda d: d["matryoshka"].update(trained_ranks=[1, 2, 32]), "trained rank 32 is outside 1..r_max=16"),
    (lambda d: d["matryoshka"].update(serving_ranks=[0, 4, 20]), "serving rank 20 is outside 0..r_max=16"),
    (lambda d: d["matryoshka"].update(scale_rule="cube"), "scale_rule 'cube' is invalid"),
    (lambda d: d["matryoshka"].update(inference_rule="mean"), "inference_rule 'mean' is invalid"),
    (lambda d: d["matryoshka"].update(default_rank=3), "default_rank 3 is not an offered rank"),
    (lambda d: d["matryoshka"].pop("r_max"), "missing field 'r_max'"),
    (lambda d: d.pop("matryoshka"), "missing the 'matryoshka' section"),
    (lambda d: d.update(r=8), "r=8 differs from matryoshka.r_max=16"),
])
def test_invalid_config_fields(tiny_base, tiny_adapter_dir, tmp_path, change, message):
    folder = copy_adapter(tiny_adapter_dir, tmp_path)
    edit_config(folder, change)
    with pytest.raises(AdapterError, match="adapter_config.json: .*" + message.replace("[", r"\[").replace("]", r"\]")):
        load_adapter(tiny_base, folder)


def test_missing_files(tiny_base, tiny_adapter_dir, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(tiny_base, tmp_path / "nowhere")
    folder = copy_adapter(tiny_adapter_dir, tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors: file not found"):
        load_adapter(tiny_base, folder)


def test_corrupted_weights_file(tiny_base, tiny_adapter_dir, tmp_path):
    folder = copy_adapter(tiny_adapter_dir, tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_adapter(tiny_base, folder)


def test_invalid_json(tiny_adapter_dir, tmp_path):
    folder = copy_adapter(tiny_adapter_dir, tmp_path)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json: invalid JSON"):
        read_config(folder)


def test_config_rejects_bad_r_max():
    with pytest.raises(AdapterConfigError, match="r_max must be an integer >= 1"):
        make_adapter_config(r_max=0, trained_ranks=[1])
