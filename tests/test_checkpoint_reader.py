"""Checkpoint reader: layout, block-wise reads, and clear errors for every kind of broken folder."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny_checkpoint

from slm_fast.checkpoint.arch import architecture_for, supported_model_types
from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.errors import ArchitectureError, CheckpointError


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("sharded"), "qwen2", num_layers=5, shard="120KB")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("single"), "llama", num_layers=4)


def all_tensors(folder):
    tensors = {}
    for path in folder.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("which", ["sharded", "single"])
def test_layout_and_block_reads_match_the_files(which, request):
    folder = request.getfixturevalue(which)
    reader = CheckpointReader(folder)
    expected = all_tensors(folder)
    assert reader.num_blocks == reader.config["num_hidden_layers"]
    assert set(reader.locations) == set(expected)
    for block in range(reader.num_blocks):
        tensors = reader.read_block(block)
        assert set(tensors) == set(reader.block_tensor_names(block))
        for name, tensor in tensors.items():
            assert torch.equal(tensor, expected[f"model.layers.{block}.{name}"])
    assert "model.embed_tokens.weight" in reader.other_names
    assert "model.norm.weight" in reader.other_names
    assert ("lm_head.weight" in reader.other_names) == (which == "sharded")  # llama is tied here
    assert reader.total_nbytes == sum(t.numel() * t.element_size() for t in expected.values())
    assert reader.dtype == torch.float32


def test_qwen2_biases_are_block_tensors(sharded):
    names = CheckpointReader(sharded).block_tensor_names(0)
    assert "self_attn.q_proj.bias" in names and "input_layernorm.weight" in names


def test_partial_block_read(single):
    reader = CheckpointReader(single)
    part = reader.read_block(2, ["mlp.up_proj.weight"])
    assert list(part) == ["mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="block 2 has no tensor"):
        reader.read_block(2, ["mlp.nope.weight"])
    with pytest.raises(CheckpointError, match=r"block 4 out of range 0\.\.3"):
        reader.read_block(4)


def copy_of(folder, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(folder, target)
    return target


def test_missing_shard(sharded, tmp_path):
    folder = copy_of(sharded, tmp_path)
    victim = sorted(folder.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard file is missing.*index"):
        CheckpointReader(folder)


def test_index_names_absent_tensor(sharded, tmp_path):
    folder = copy_of(sharded, tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.0.ghost.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"'model.layers.0.ghost.weight' is mapped to {shard}, which lacks it"):
        CheckpointReader(folder)


def test_truncated_shard(single, tmp_path):
    folder = copy_of(single, tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated safetensors file"):
        CheckpointReader(folder)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda d: d[:5], "truncated safetensors file"),
        (lambda d: (10**12).to_bytes(8, "little") + d[8:], "corrupt safetensors header"),
        (lambda d: d[:8] + b"!" + d[9:], r"corrupt safetensors header \(not JSON"),
    ],
)
def test_corrupt_header(single, tmp_path, mangle, message):
    folder = copy_of(single, tmp_path)
    path = folder / "model.safetensors"
    path.write_bytes(mangle(path.read_bytes()))
    with pytest.raises(CheckpointError, match=f"model.safetensors: {message}"):
        CheckpointReader(folder)


def test_config_disagrees_with_weights(single, tmp_path):
    folder = copy_of(single, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 6
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=6 but the weights hold 4 blocks"):
        CheckpointReader(folder)


def test_unknown_architecture(single, tmp_path):
    folder = copy_of(single, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ArchitectureError, match="unsupported model_type 'gpt2'.*supported: .*llama.*qwen3"):
        CheckpointReader(folder)


def test_missing_config_and_weights(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: no such checkpoint folder, and not a Hub id"):
        CheckpointReader(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="config.json: file is missing"):
        CheckpointReader(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 1}')
    with pytest.raises(CheckpointError, match="neither model.safetensors.index.json nor model.safetensors"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes", "fp8"])
def test_quantized_checkpoints_are_refused(single, tmp_path, method):
    folder = copy_of(single, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=rf"quantized \(quantization_config, quant_method '{method}'\)"):
        CheckpointReader(folder)


def test_float8_tensors_are_refused(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "fp8", "llama", num_layers=2)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' is float8_e4m3fn"):
        CheckpointReader(folder)


def test_pickle_only_checkpoints_are_refused_with_how_to_convert(single, tmp_path):
    folder = copy_of(single, tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match=r"PyTorch pickles.*save_pretrained\('CONVERTED'\)"):
        CheckpointReader(folder)


def test_architecture_table():
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"} <= set(supported_model_types())
    assert architecture_for({"model_type": "qwen2"}).block_thresholds == ("max_window_layers",)
    arch = architecture_for({"model_type": "llama"})
    assert arch.is_projection("self_attn.o_proj.weight") and not arch.is_projection("input_layernorm.weight")
    assert not arch.is_projection("self_attn.q_proj.bias")
