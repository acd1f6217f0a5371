"""`slm-fast heatmap`: block-streamed CKA of block outputs against the n x n oracle on HF hidden states."""

import json

import torch
from cka_oracle import cka_matrix as oracle_cka
from tiny_models import save_tiny_checkpoint, save_tiny_tokenizer, write_word_corpus
from transformers import AutoModelForCausalLM

from slm_fast.cli import main
from slm_fast.heatmap import block_output_cka

IDS = torch.randint(0, 128, (3, 20), generator=torch.Generator().manual_seed(5))


def block_outputs(folder):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    outputs = []
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs.append(out)) for layer in model.model.layers]
    with torch.no_grad():
        model(IDS)
    for hook in hooks:
        hook.remove()
    return [o.flatten(0, -2) for o in outputs]


def test_block_output_cka_matches_the_oracle(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "m", "qwen2", num_layers=5)
    heatmap = block_output_cka(folder, IDS, kernel="linear", progress=False)
    expected = oracle_cka(block_outputs(folder), "linear", None, False)
    torch.testing.assert_close(heatmap.matrix, expected, rtol=1e-6, atol=1e-6)
    assert heatmap.tokens == 60 and heatmap.matrix.shape == (5, 5)


def test_cli_writes_image_and_json(tmp_path, capsys):
    folder = save_tiny_checkpoint(tmp_path / "m", "llama", num_layers=4)
    save_tiny_tokenizer(folder)
    calib = write_word_corpus(tmp_path / "calib.txt")
    args = ["heatmap", str(folder), "--out", str(tmp_path / "heat.png"), "--kernel", "rbf", "--calib", str(calib)]
    assert main([*args, "--samples", "3", "--seq-len", "16", "--no-progress"]) == 0
    assert (tmp_path / "heat.png").read_bytes()[:4] == b"\x89PNG"
    record = json.loads((tmp_path / "heat.json").read_text())
    assert record["kernel"] == "rbf" and record["tokens"] == 48 and len(record["cka"]) == 4
    assert all(abs(record["cka"][i][i] - 1) < 1e-9 for i in range(4))
    assert "4 blocks" in capsys.readouterr().out
