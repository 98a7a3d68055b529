"""PEFT export and import: PEFT's own forward against ours, round trips, and every unsupported config."""

import errno
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from matlora_core import AdapterError, MatryoshkaModel, load_adapter, read_config, save_adapter
from matlora_core.cli import main
from matlora_core.peft_io import export_peft, import_peft

from .conftest import make_adapter_config, randomize_adapter

peft = pytest.importorskip("peft")

TOLERANCE = dict(atol=1e-5, rtol=1e-4)
Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(3, 300, (2, 14), generator=torch.Generator().manual_seed(7))


def base_model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@torch.no_grad()
def peft_logits(model_dir, adapter_dir, input_ids):
    model = peft.PeftModel.from_pretrained(base_model(model_dir), adapter_dir).eval()
    return model(input_ids=input_ids).logits


@torch.no_grad()
def our_logits(model_dir, adapter_dir, input_ids, rank, rule=None):
    model = load_adapter(base_model(model_dir), adapter_dir).eval()
    with model.at_rank(rank, rule):
        return model(input_ids=input_ids).logits


@torch.no_grad()
def base_logits(model_dir, input_ids):
    return base_model(model_dir)(input_ids=input_ids).logits


def save_matryoshka(model_dir, folder, **overrides):
    model = MatryoshkaModel(base_model(model_dir), make_adapter_config(**overrides))
    randomize_adapter(model)
    save_adapter(model, folder)
    return folder


def save_peft(model_dir, folder, **lora_options):
    """Save a PEFT LoRA adapter with random A and B (init_lora_weights=False) on the tiny model."""
    options = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    options.update(lora_options)
    torch.manual_seed(3)
    model = peft.get_peft_model(base_model(model_dir), peft.LoraConfig(**options))
    model.save_pretrained(folder)
    return folder


def read_json(path):
    return json.loads(path.read_text())


def edit_json(path, change):
    data = read_json(path)
    change(data)
    path.write_text(json.dumps(data))


# --- export --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["paper", "partial_sum"])
@pytest.mark.parametrize("rank", [1, 4, 5, 16])
def test_export_matches_rank_forward(tiny_model_dir, tiny_adapter_dir, input_ids, tmp_path, rule, rank):
    export_peft(tiny_adapter_dir, rank, tmp_path / "peft", inference_rule=rule)

    expected = our_logits(tiny_model_dir, tiny_adapter_dir, input_ids, rank, rule)
    torch.testing.assert_close(peft_logits(tiny_model_dir, tmp_path / "peft", input_ids), expected, **TOLERANCE)
    assert not torch.allclose(expected, base_logits(tiny_model_dir, input_ids), atol=1e-4)


@pytest.mark.parametrize("rule, rank, r, lora_alpha, use_rslora", [
    ("paper", 4, 4, 1, True),           # sqrt rule: scaling 1 / sqrt(4) through rsLoRA
    ("paper", 5, 5, 1, True),
    ("partial_sum", 1, 1, 1, True),     # only rank 1 contributes, so p is the constant s(1)
    ("partial_sum", 4, 4, 4, False),    # p is not constant: folded into lora_A, scaling 1
    ("partial_sum", 5, 4, 4, False),    # partial_sum at 5 uses the trained ranks up to 4 only
])
def test_export_config_fields(tiny_adapter_dir, tmp_path, rule, rank, r, lora_alpha, use_rslora):
    export_peft(tiny_adapter_dir, rank, tmp_path / "peft", inference_rule=rule)

    config = read_json(tmp_path / "peft" / "adapter_config.json")
    assert "matryoshka" not in config
    assert config["peft_type"] == "LORA"
    assert config["r"] == r
    assert config["lora_alpha"] == lora_alpha
    assert config["use_rslora"] is use_rslora
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert tensors[Q_A].shape == (r, 64)
    assert len(tensors) == 2 * 2 * 7


@pytest.mark.parametrize("scale_rule, lora_alpha", [("none", 6), ("rank", 1)])
def test_export_scale_rules(tiny_model_dir, input_ids, tmp_path, scale_rule, lora_alpha):
    adapter = save_matryoshka(tiny_model_dir, tmp_path / "adapter", scale_rule=scale_rule)
    export_peft(adapter, 6, tmp_path / "peft")

    config = read_json(tmp_path / "peft" / "adapter_config.json")
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (6, lora_alpha, False)
    expected = our_logits(tiny_model_dir, adapter, input_ids, 6)
    torch.testing.assert_close(peft_logits(tiny_model_dir, tmp_path / "peft", input_ids), expected, **TOLERANCE)


def test_export_uses_adapter_rule_by_default(tiny_model_dir, input_ids, tmp_path):
    adapter = save_matryoshka(tiny_model_dir, tmp_path / "adapter", inference_rule="partial_sum")
    export_peft(adapter, 8, tmp_path / "peft")

    expected = our_logits(tiny_model_dir, adapter, input_ids, 8, "partial_sum")
    torch.testing.assert_close(peft_logits(tiny_model_dir, tmp_path / "peft", input_ids), expected, **TOLERANCE)


def test_export_rank_zero(tiny_adapter_dir, tmp_path):
    with pytest.raises(ValueError, match="rank 0 is the base model alone: there is nothing to export"):
        export_peft(tiny_adapter_dir, 0, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()


def test_export_rank_above_r_max(tiny_adapter_dir, tmp_path):
    with pytest.raises(ValueError, match="invalid rank 17: the adapter has r_max=16"):
        export_peft(tiny_adapter_dir, 17, tmp_path / "peft")


def test_export_rank_below_trained_ranks(tiny_model_dir, tmp_path):
    adapter = save_matryoshka(tiny_model_dir, tmp_path / "adapter", trained_ranks=[4, 8, 16])
    with pytest.raises(ValueError, match="rank 2 under partial_sum serves the base model alone"):
        export_peft(adapter, 2, tmp_path / "peft", inference_rule="partial_sum")


def test_export_keeps_existing_output(tiny_adapter_dir, tmp_path):
    export_peft(tiny_adapter_dir, 4, tmp_path / "peft")
    with pytest.raises(ValueError, match="already contains adapter_config.json"):
        export_peft(tiny_adapter_dir, 8, tmp_path / "peft")
    export_peft(tiny_adapter_dir, 8, tmp_path / "peft", overwrite=True)
    assert read_json(tmp_path / "peft" / "adapter_config.json")["r"] == 8


def test_export_rejects_input_as_output(tiny_adapter_dir):
    with pytest.raises(ValueError, match="is the input folder"):
        export_peft(tiny_adapter_dir, 4, tiny_adapter_dir, overwrite=True)


def test_export_bfloat16(tiny_adapter_dir, tmp_path):
    export_peft(tiny_adapter_dir, 4, tmp_path / "peft", dtype=torch.bfloat16)
    assert load_file(tmp_path / "peft" / "adapter_model.safetensors")[Q_A].dtype == torch.bfloat16


# --- import --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora_alpha, use_rslora, scale_rule, folded", [
    (8, False, "none", 1.0),        # alpha / r = 1
    (1, False, "rank", 1.0),        # 1 / r
    (1, True, "sqrt", 1.0),         # 1 / sqrt(r)
    (16, False, "none", 2.0),       # no rule gives 2: folded into lora_A
    (3, True, "none", 3 / 8 ** 0.5),
])
def test_import_matches_peft(tiny_model_dir, input_ids, tmp_path, lora_alpha, use_rslora, scale_rule, folded):
    source = save_peft(tiny_model_dir, tmp_path / "peft", lora_alpha=lora_alpha, use_rslora=use_rslora)
    config = import_peft(source, tmp_path / "imported")

    assert config.scale_rule == scale_rule
    assert config.training["folded_scaling"] == pytest.approx(folded)
    assert config.trained_ranks == [8]
    assert config.offered_ranks == [0, 8]
    assert config.target_modules == ["down_proj", "q_proj", "v_proj"]
    reread = read_config(tmp_path / "imported")
    assert reread.r_max == 8
    assert reread.adapter_kind == "lora"

    expected = peft_logits(tiny_model_dir, source, input_ids)
    torch.testing.assert_close(our_logits(tiny_model_dir, tmp_path / "imported", input_ids, 8), expected, **TOLERANCE)
    assert not torch.allclose(expected, base_logits(tiny_model_dir, input_ids), atol=1e-4)


@pytest.mark.parametrize("rule", ["paper", "partial_sum"])
def test_round_trip_export_import(tiny_model_dir, tiny_adapter_dir, input_ids, tmp_path, rule):
    export_peft(tiny_adapter_dir, 4, tmp_path / "peft", inference_rule=rule)
    config = import_peft(tmp_path / "peft", tmp_path / "imported")

    assert config.r_max == 4
    assert config.training["folded_scaling"] == 1.0
    expected = our_logits(tiny_model_dir, tiny_adapter_dir, input_ids, 4, rule)
    torch.testing.assert_close(our_logits(tiny_model_dir, tmp_path / "imported", input_ids, 4), expected,
                               **TOLERANCE)


def test_round_trip_paper_keeps_tensors(tiny_adapter_dir, tmp_path):
    export_peft(tiny_adapter_dir, 8, tmp_path / "peft", inference_rule="paper")
    config = import_peft(tmp_path / "peft", tmp_path / "imported")

    assert config.scale_rule == "sqrt"
    original = load_file(tiny_adapter_dir / "adapter_model.safetensors")
    imported = load_file(tmp_path / "imported" / "adapter_model.safetensors")
    for key, tensor in imported.items():
        prefix = original[key][:8] if key.endswith("lora_A.weight") else original[key][:, :8]
        assert torch.equal(tensor, prefix), key


# --- unsupported PEFT adapters -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory, tiny_model_dir):
    return save_peft(tiny_model_dir, tmp_path_factory.mktemp("plain-peft"))


def copy_peft(peft_dir, tmp_path):
    target = tmp_path / "peft"
    shutil.copytree(peft_dir, target)
    return target


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(use_dora=True), "use_dora=True is not supported, because DoRA"),
    (lambda d: d.update(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\] is not supported"),
    (lambda d: d.update(layers_to_transform=[0]), r"layers_to_transform=\[0\] is not supported"),
    (lambda d: d.update(rank_pattern={"q_proj": 4}), "rank_pattern=.* is not supported"),
    (lambda d: d.update(alpha_pattern={"q_proj": 4}), "alpha_pattern=.* is not supported"),
    (lambda d: d.update(exclude_modules=["layers.1.self_attn.q_proj"]), "exclude_modules=.* is not supported"),
    (lambda d: d.update(fan_in_fan_out=True), "fan_in_fan_out=True is not supported"),
    (lambda d: d.update(lora_bias=True), "lora_bias=True is not supported"),
    (lambda d: d.update(some_future_option=3), "some_future_option=3 is not supported"),
    (lambda d: d.update(bias="all"), "bias='all' is not supported: the only allowed value is 'none'"),
    (lambda d: d.update(peft_type="IA3"), "peft_type 'IA3' is not supported: only LORA"),
    (lambda d: d.update(init_lora_weights="pissa"), "init_lora_weights='pissa' is not supported"),
    (lambda d: d.update(target_modules=".*proj"), r"target_modules='\.\*proj' is not supported"),
    (lambda d: d.update(r=0), "r=0 is invalid"),
    (lambda d: d.update(lora_alpha="8"), "lora_alpha='8' is invalid"),
    (lambda d: d.update(matryoshka={}), "this is already a Matryoshka adapter"),
])
def test_import_rejects_config(peft_dir, tmp_path, change, message):
    folder = copy_peft(peft_dir, tmp_path)
    edit_json(folder / "adapter_config.json", change)
    with pytest.raises(AdapterError, match="adapter_config.json: " + message):
        import_peft(folder, tmp_path / "imported")
    assert not (tmp_path / "imported").exists()


def test_import_rank_mismatch(peft_dir, tmp_path):
    folder = copy_peft(peft_dir, tmp_path)
    edit_json(folder / "adapter_config.json", lambda d: d.update(r=4))
    message = r"model.layers.0.mlp.down_proj has lora_A \[8, 96\] and lora_B \[64, 8\], but the config gives rank 4"
    with pytest.raises(AdapterError, match=message):
        import_peft(folder, tmp_path / "imported")


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop(Q_A), f"missing tensor {Q_A}"),
    (lambda t: t.update({"base_model.model.lm_head.lora_embedding_A": torch.zeros(8, 5)}),
     "tensor base_model.model.lm_head.lora_embedding_A is not supported"),
    (lambda t: t.update({Q_A: torch.zeros(8, 64, 1, 1)}),
     rf"tensor {Q_A} has shape \[8, 64, 1, 1\]: only the 2-D factors"),
    (lambda t: t.update({Q_A: torch.full((8, 64), float("nan"))}), f"tensor {Q_A} contains NaN or inf"),
    (lambda t: t.update({Q_A: torch.zeros(8, 64, dtype=torch.int32)}),
     f"tensor {Q_A} has dtype int32: LoRA factors must be floating point"),
])
def test_import_rejects_tensors(peft_dir, tmp_path, change, message):
    folder = copy_peft(peft_dir, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="adapter_model.safetensors: " + message):
        import_peft(folder, tmp_path / "imported")


def test_import_rejects_embedding_target(tiny_model_dir, tmp_path):
    source = save_peft(tiny_model_dir, tmp_path / "peft", target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(AdapterError, match="embed_tokens.* is not supported: only .* nn.Linear layers"):
        import_peft(source, tmp_path / "imported")


def test_import_missing_files(peft_dir, tmp_path):
    with pytest.raises(AdapterError, match="does not exist or is not a folder"):
        import_peft(tmp_path / "nowhere", tmp_path / "imported")

    folder = copy_peft(peft_dir, tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(AdapterError, match="adapter_model.safetensors: file not found; adapter_model.bin is not read"):
        import_peft(folder, tmp_path / "imported")

    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json: file not found"):
        import_peft(folder, tmp_path / "imported")


# --- command line --------------------------------------------------------------------------------------


def test_cli_export_and_import(tiny_model_dir, tiny_adapter_dir, tmp_path, capsys):
    assert main(["export", "--adapter", str(tiny_adapter_dir), "--rank", "4", "--rule", "partial_sum",
                 "--output", str(tmp_path / "peft")]) == 0
    assert main(["import", "--peft", str(tmp_path / "peft"), "--output", str(tmp_path / "imported"),
                 "--model", str(tiny_model_dir)]) == 0
    output = capsys.readouterr().out
    assert "PEFT adapter written to" in output
    assert f"checked: the adapter loads on {tiny_model_dir}" in output
    assert read_config(tmp_path / "imported").trained_ranks == [4]


def test_cli_export_rank_zero(tiny_adapter_dir, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        code = main(["export", "--adapter", str(tiny_adapter_dir), "--rank", "0", "--output", str(tmp_path / "p")])
    assert code == 2
    assert "rank 0 is the base model alone" in caplog.text


def test_cli_import_wrong_model(peft_dir, tiny_model_dir, tmp_path, caplog):
    folder = copy_peft(peft_dir, tmp_path)
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors[Q_A] = torch.zeros(8, 65)   # a base model with 65 input features would fit this factor
    save_file(tensors, folder / "adapter_model.safetensors")
    with caplog.at_level(logging.ERROR):
        code = main(["import", "--peft", str(folder), "--output", str(tmp_path / "imported"),
                     "--model", str(tiny_model_dir)])
    assert code == 2
    assert "was written but does not load on" in caplog.text
    assert r"has shape [8, 65], the base model needs [8, 64]" in caplog.text


def test_cli_export_to_existing_file(tiny_adapter_dir, tmp_path, caplog):
    target = tmp_path / "peft.txt"
    target.write_text("not a folder")
    with caplog.at_level(logging.ERROR):
        code = main(["export", "--adapter", str(tiny_adapter_dir), "--rank", "4", "--output", str(target)])
    assert code == 2
    assert f"--output {target} is an existing file: give a folder path" in caplog.text
    assert target.read_text() == "not a folder"


def test_cli_import_below_existing_file(peft_dir, tmp_path, caplog):
    blocker = tmp_path / "adapters"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.ERROR):
        code = main(["import", "--peft", str(peft_dir), "--output", str(blocker / "imported")])
    assert code == 2
    assert f"--output {blocker / 'imported'} is inside {blocker}, which is a file: give a folder path" in caplog.text


def test_cli_import_keeps_existing_output(peft_dir, tmp_path, caplog):
    assert main(["import", "--peft", str(peft_dir), "--output", str(tmp_path / "imported")]) == 0
    with caplog.at_level(logging.ERROR):
        code = main(["import", "--peft", str(peft_dir), "--output", str(tmp_path / "imported")])
    assert code == 2
    assert "already contains adapter_config.json: choose another folder or pass --overwrite" in caplog.text
    assert main(["import", "--peft", str(peft_dir), "--output", str(tmp_path / "imported"), "--overwrite"]) == 0


def test_cli_os_error_is_a_message(tiny_adapter_dir, tmp_path, caplog, monkeypatch):
    # An OSError that no check catches first, here a folder without write permission, becomes a one-line message.
    target = tmp_path / "peft"

    def write_denied(output_dir, *args):
        raise PermissionError(errno.EACCES, "Permission denied", str(output_dir))

    monkeypatch.setattr("matlora_core.peft_io.write_plain_adapter", write_denied)
    with caplog.at_level(logging.ERROR):
        code = main(["export", "--adapter", str(tiny_adapter_dir), "--rank", "4", "--output", str(target)])
    assert code == 2
    assert f"{target}: Permission denied" in caplog.text
