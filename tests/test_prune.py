"""`slm-fast prune` end to end on a tiny random model: the report, the written checkpoint, targets."""

import json

import pytest
import torch
from tiny_models import SLM, SLM_FLAGS, save_tiny_checkpoint, save_tiny_tokenizer, write_word_corpus
from transformers import AutoModelForCausalLM

from slm_fast.checkpoint.reader import CheckpointReader
from slm_fast.cli import main
from slm_fast.errors import InputError
from slm_fast.prune import PruneOptions, prune


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    folder = save_tiny_checkpoint(root / "src", "llama", num_layers=10, shard="150KB")
    save_tiny_tokenizer(folder)
    write_word_corpus(root / "calib.txt")
    return folder


def options(source, **overrides):
    base = dict(calib=str(source.parent / "calib.txt"), n_samples=4, seq_len=32, progress=False)
    return PruneOptions(**(SLM | base | overrides))


def test_prune_by_threshold_writes_checkpoint_and_report(source, tmp_path):
    report = prune(source, tmp_path / "out", options(source, threshold=0.5, rule="mean"))
    out = tmp_path / "out"
    audit = json.loads((out / "slm_report.json").read_text())
    assert audit["windows"] == audit["search"]["windows"] == [list(w) for w in report.windows]
    assert report.blocks_after == 10 - audit["search"]["blocks_removed"] == CheckpointReader(out).num_blocks
    assert len(audit["calibration"]["token_ids"]) == 4 and len(audit["calibration"]["token_ids"][0]) == 32
    assert all({"lo", "hi", "similarity", "passed"} <= set(c) for c in audit["search"]["candidates"])
    assert audit["peak_rss_bytes"] > 0 and set(audit["timings_s"]) == {"setup", "calibrate", "search", "write"}
    passed = [c for c in audit["search"]["candidates"] if c["passed"]]
    assert all(c["similarity"] > 0.5 for c in passed)
    assert report.similarity is not None and report.similarity > 0.5
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == report.blocks_after
    assert "tokenizer.json" in {p.name for p in out.iterdir()}


def test_sliding_prune_to_a_block_count_is_exact_or_explained(source, tmp_path):
    report = prune(source, tmp_path / "out", options(source, remove=3, search="sliding"))
    audit = json.loads((tmp_path / "out" / "slm_report.json").read_text())
    search = audit["threshold_search"]
    assert search["target_blocks"] == 3 and len(search["tried"]) >= 2
    if search["exact"]:
        assert report.blocks_before - report.blocks_after == 3
    else:
        assert "jumps from" in search["reason"]


def test_best_first_prune_removes_exactly_the_target(source, tmp_path):
    report = prune(source, tmp_path / "out", options(source, remove=3))
    audit = json.loads((tmp_path / "out" / "slm_report.json").read_text())
    assert report.blocks_before - report.blocks_after == 3 == audit["search"]["blocks_removed"]
    taken = [c for c in audit["search"]["candidates"] if c["passed"]]
    assert len(taken) == 3 and taken[-1]["similarity"] == pytest.approx(report.similarity)


def test_same_calibration_gives_the_same_decisions(source, tmp_path):
    a = prune(source, tmp_path / "a", options(source, threshold=0.4, search="sliding"))
    b = prune(source, tmp_path / "b", options(source, threshold=0.4, search="sliding", speculate=3))
    assert a.windows == b.windows
    ids_a = json.loads((tmp_path / "a" / "slm_report.json").read_text())["calibration"]["token_ids"]
    ids_b = json.loads((tmp_path / "b" / "slm_report.json").read_text())["calibration"]["token_ids"]
    assert ids_a == ids_b


def test_cli_prune_summary_and_errors(source, tmp_path, capsys):
    calib = str(source.parent / "calib.txt")
    args = [
        "prune",
        str(source),
        str(tmp_path / "out"),
        *SLM_FLAGS,
        "--calib",
        calib,
        "--samples",
        "3",
        "--seq-len",
        "16",
    ]
    assert main([*args, "--threshold", "0.6", "--no-progress"]) == 0
    summary = capsys.readouterr().out
    assert "slm: pruned 10 ->" in summary and "parameters" in summary and "similarity" in summary
    assert main([*args, "--threshold", "0.6", "--no-progress"]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--ratio", "1.5", "--overwrite", "--no-progress"]) == 2
    assert "--ratio must be in [0, 1)" in capsys.readouterr().err
    assert main(["prune", str(source), str(source / "x"), "--remove", "1", "--no-progress"]) == 2
    assert "inside the source" in capsys.readouterr().err


def test_reference_preset_fixes_its_settings(source, tmp_path):
    opts = PruneOptions(calib=str(source.parent / "calib.txt"), threshold=0.5, preset="reference", progress=False)
    prune(source, tmp_path / "out", opts)
    audit = json.loads((tmp_path / "out" / "slm_report.json").read_text())
    assert audit["options"]["criterion"] == "cosine" and audit["options"]["rule"] == "keep_high_norms_low"
    assert (audit["calibration"]["n_samples"], audit["calibration"]["seq_len"]) == (10, 128)
    assert audit["calibration"]["sampling"].startswith("reference")
    assert torch.tensor(audit["calibration"]["token_ids"]).shape == (10, 128)


def test_packed_calibration_is_recorded(source, tmp_path):
    prune(source, tmp_path / "out", options(source, remove=1))
    calibration = json.loads((tmp_path / "out" / "slm_report.json").read_text())["calibration"]
    assert calibration["sampling"].startswith("packed")
    words = [w for p in (source.parent / "calib.txt").read_text().split("\n\n") for w in p.split()]
    ids = torch.tensor(calibration["token_ids"])
    assert ids.shape == (4, 32) and set(ids.flatten().tolist()) <= {int(w[1:]) for w in words}


# --- refusals before any work ---------------------------------------------------------------------


@pytest.fixture
def no_calibration(monkeypatch):
    """Fail the test if a refusal lets the pipeline reach calibration."""

    def forbidden(*args, **kwargs):
        raise AssertionError("calibration ran before the refusal")

    monkeypatch.setattr("slm_fast.prune.calibration_ids", forbidden)


def test_preset_reference_refuses_the_options_it_would_override(source, tmp_path, capsys, no_calibration):
    args = ["prune", str(source), str(tmp_path / "out"), "--threshold", "0.5", "--preset", "reference"]
    assert main([*args, "--rule", "mean", "--samples", "4", "--search", "sliding", "--criterion", "cosine"]) == 2
    err = capsys.readouterr().err
    assert "it would override --rule mean, --samples 4: drop them" in err and "Traceback" not in err
    with pytest.raises(InputError, match=r"override --criterion cka-rbf, --samples 4, --seq-len 32"):
        prune(source, tmp_path / "out", options(source, threshold=0.5, preset="reference", criterion="cka-rbf"))
    # Values equal to the preset's are not overridden: accepted.
    PruneOptions(threshold=0.5, preset="reference", criterion="cosine", explicit=frozenset({"criterion"})).validated()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--method", "slm", "--remove", "20"],
            "--remove 20: slm can remove at most 8 of the 10 blocks with --protect-top 1 and ",
        ),
        (["--remove", "7", "--protect-bottom", "2"], "at most 6 of the 10 blocks"),
        (["--ratio", "0.95"], "--ratio 0.95 (10 blocks): slm can remove at most 8"),
        (["--method", "sleb", "--remove", "9"], "--remove 9: sleb can remove at most 8 of the 10 blocks"),
        (["--remove", "8", "--preset", "reference"], "at most 7 of the 10 blocks (the reference never merges"),
        (["--remove", "10", "--method", "shortgpt"], "shortgpt can remove at most 9 of the 10 blocks"),
    ],
)
def test_unmeetable_targets_are_refused_before_calibration(source, tmp_path, capsys, no_calibration, extra, message):
    assert main(["prune", str(source), str(tmp_path / "out"), "--no-progress", *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(source, tmp_path, capsys, no_calibration):
    for device in ("cuda", "cuda:1"):
        assert main(["prune", str(source), str(tmp_path / "out"), "--remove", "1", "--device", device]) == 2
        assert f"--device '{device}': this torch" in capsys.readouterr().err
    assert main(["prune", str(source), str(tmp_path / "out"), "--remove", "1", "--device", "gpu0"]) == 2
    assert "is not a device" in capsys.readouterr().err
    for command in (["evaluate", str(source), "--ppl", "austen:emma"], ["heatmap", str(source), "--out", "h.png"]):
        assert main([*command, "--device", "cuda"]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err


def test_short_disk_is_refused_before_calibration(source, tmp_path, capsys, no_calibration, monkeypatch):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10_000))
    assert main(["prune", str(source), str(tmp_path / "out"), "--remove", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not enough disk space" in err and "GB free" in err


def test_default_calibration_needs_no_installed_assets(source, tmp_path, monkeypatch):
    monkeypatch.setenv("SLM_FAST_ASSETS", str(tmp_path / "no_assets"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    report = prune(source, tmp_path / "out", PruneOptions(remove=2, n_samples=2, seq_len=16, progress=False))
    assert report.blocks_before - report.blocks_after == 2
    calibration = json.loads((tmp_path / "out" / "slm_report.json").read_text())["calibration"]
    assert calibration["corpus"] == "austen:emma" and len(calibration["token_ids"]) == 2


@pytest.mark.parametrize("refusal", ["quantized", "bin-only", "missing-dataset"])
def test_refusals_reach_the_user_without_a_traceback(source, tmp_path, capsys, refusal):
    import shutil

    folder = tmp_path / "src"
    shutil.copytree(source, folder)
    commands = [["prune", str(folder), str(tmp_path / "out"), "--remove", "1"]]
    if refusal == "quantized":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "awq"}}))
    elif refusal == "bin-only":
        for shard in folder.glob("model*.safetensors*"):
            shard.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"")
    else:
        commands[0] += ["--calib", "someorg/not-cached"]
    if refusal != "missing-dataset":
        commands.append(["merge", str(folder), str(tmp_path / "merged"), "--windows", "1-2"])
    expected = {"quantized": "quant_method 'awq'", "bin-only": "Convert them", "missing-dataset": "someorg/not-cached"}
    for command in commands:
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "error:" in err and expected[refusal] in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()
