"""`slm-fast heal` on a tiny model: the loss goes down, the merged checkpoint is the model with its
adapters applied, partial training touches only the head and the last blocks, runs resume exactly."""

import json
import types

import pytest
import torch
from tiny_models import save_tiny_checkpoint, save_tiny_tokenizer
from transformers import AutoModelForCausalLM

from slm_fast.checkpoint import staging
from slm_fast.cli import main
from slm_fast.errors import CheckpointError, InputError
from slm_fast.healing import HealOptions, heal, train

TRAIN_STEP = train.train_step
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
    ),
]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("heal")
    folder = save_tiny_checkpoint(root / "m", "llama", num_layers=4)
    save_tiny_tokenizer(folder)
    # A learnable corpus: a fixed 12-word phrase repeated, so the next token is predictable.
    phrase = " ".join(f"w{i}" for i in (5, 17, 3, 99, 42, 8, 61, 23, 77, 11, 30, 64))
    (root / "text.txt").write_text("\n\n".join(" ".join([phrase] * 10) for _ in range(20)) + "\n")
    return folder


def options(source, **overrides):
    base = dict(corpus=str(source.parent / "text.txt"), steps=12, batch_size=2, cutoff=32, lr=1e-2, progress=False)
    return HealOptions(**(base | overrides))


def logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["lora", "partial"])
def test_loss_goes_down_and_output_is_complete(source, tmp_path, mode, device):
    report = heal(source, tmp_path / "out", options(source, mode=mode, device=device))
    assert sum(report.losses[-3:]) / 3 < 0.8 * sum(report.losses[:3]) / 3
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors", "heal_report.json", "loss_curve.png", "tokenizer.json"} <= files
    assert ("adapter" in files) == (mode == "lora")
    record = json.loads((tmp_path / "out" / "heal_report.json").read_text())
    assert record["losses"] == report.losses and record["mode"] == mode
    assert not (tmp_path / ".out.heal-work").exists()


@pytest.mark.parametrize("device", DEVICES)
def test_merged_checkpoint_equals_the_model_with_adapters(source, tmp_path, device):
    """Trained on `device`, written and compared on the CPU."""
    from peft import PeftModel

    heal(source, tmp_path / "out", options(source, device=device))
    base = AutoModelForCausalLM.from_pretrained(source)
    with_adapters = PeftModel.from_pretrained(base, tmp_path / "out" / "adapter")
    healed = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(healed) is type(base)  # a plain checkpoint of the same architecture
    original = logits(AutoModelForCausalLM.from_pretrained(source))
    assert (logits(with_adapters) - original).abs().max() > 1e-2  # the adapters changed the model
    # W + s B A folded in float32 vs applied as x W^T + s x A^T B^T: rounding of a 64-wide model only.
    torch.testing.assert_close(logits(healed), logits(with_adapters), rtol=0, atol=1e-4)


def test_partial_trains_only_head_and_last_blocks(source, tmp_path):
    heal(source, tmp_path / "out", options(source, mode="partial", partial_blocks=1))
    before = AutoModelForCausalLM.from_pretrained(source).state_dict()
    after = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    # tied embeddings: lm_head is the embedding matrix
    assert changed and all(n.startswith(("model.layers.3.", "lm_head", "model.embed_tokens")) for n in changed)
    assert any(n.startswith("model.layers.3.") for n in changed)


def interrupted_at_call(n):
    """`train_step` that stops the run with KeyboardInterrupt at its n-th call."""
    calls = 0

    def interrupted(*args):
        nonlocal calls
        calls += 1
        if calls == n:
            raise KeyboardInterrupt
        return TRAIN_STEP(*args)

    return interrupted


def test_interrupted_run_resumes_to_the_same_result(source, tmp_path, monkeypatch):
    heal(source, tmp_path / "straight", options(source, save_every=4))
    monkeypatch.setattr(train, "train_step", interrupted_at_call(7))
    with pytest.raises(KeyboardInterrupt):
        heal(source, tmp_path / "resumed", options(source, save_every=4))
    assert (tmp_path / ".resumed.heal-work" / "state.pt").is_file()
    assert not (tmp_path / "resumed").exists()
    monkeypatch.setattr(train, "train_step", TRAIN_STEP)
    report = heal(source, tmp_path / "resumed", options(source, save_every=4))
    assert report.resumed_from == 4
    straight = AutoModelForCausalLM.from_pretrained(tmp_path / "straight").state_dict()
    resumed = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed").state_dict()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0)
    # A work folder left by a run with other options is refused, not silently mixed in.
    monkeypatch.setattr(train, "train_step", interrupted_at_call(7))
    with pytest.raises(KeyboardInterrupt):
        heal(source, tmp_path / "again", options(source, save_every=4))
    monkeypatch.setattr(train, "train_step", TRAIN_STEP)
    with pytest.raises(InputError, match="other options"):
        heal(source, tmp_path / "again", options(source, save_every=4, lr=2e-2))


def test_cli_heal_and_errors(source, tmp_path, capsys):
    corpus = str(source.parent / "text.txt")
    args = ["heal", str(source), str(tmp_path / "out"), "--partial", "--corpus", corpus, "--steps", "2"]
    assert main([*args, "--cutoff", "32", "--batch-size", "1", "--no-progress"]) == 0
    assert "healed (partial" in capsys.readouterr().out
    assert main(["heal", str(source), str(tmp_path / "bad"), "--corpus", corpus, "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["heal", str(source), str(tmp_path / "bad"), "--corpus", corpus, "--device", "mps"]) == 2
    assert "--device 'mps': only cpu and cuda devices are supported" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def folder_bytes(folder):
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def recorded_space_needs(monkeypatch):
    """The lists of needs `heal` checks (one per peak: training, writing the output), as it checks them."""
    needs = []
    check = train.ensure_free_space_for
    monkeypatch.setattr(train, "ensure_free_space_for", lambda wanted: needs.append(wanted) or check(wanted))
    return needs


@pytest.mark.parametrize("mode", ["lora", "partial"])
def test_disk_space_estimate_covers_what_is_written(source, tmp_path, monkeypatch, mode):
    """The pre-flight check's figures against the sizes of the state and the checkpoint on disk."""
    needs = recorded_space_needs(monkeypatch)
    monkeypatch.setattr(train, "train_step", interrupted_at_call(7))
    with pytest.raises(KeyboardInterrupt):
        heal(source, tmp_path / "out", options(source, mode=mode, save_every=4))
    state = (tmp_path / ".out.heal-work" / "state.pt").stat().st_size
    [training], [checkpoint_need, kept_state] = needs
    assert training.what.startswith("the resumable state") and checkpoint_need.what == "the healed checkpoint"
    assert state <= training.nbytes / 2 <= 1.5 * state  # two saves ahead: the new beside the old
    assert state <= kept_state.nbytes <= 1.5 * state  # the last state stays until the output is complete
    monkeypatch.setattr(train, "train_step", TRAIN_STEP)
    heal(source, tmp_path / "out", options(source, mode=mode, save_every=4))
    [training], [checkpoint_need, kept_state] = needs[2:]
    assert state <= training.nbytes <= 1.5 * state  # resumed at step 4: one save ahead, one on disk
    assert kept_state.nbytes == 0  # the state on disk is already counted as used
    written = folder_bytes(tmp_path / "out")
    assert written <= checkpoint_need.nbytes <= 1.5 * written


def test_not_enough_disk_space_fails_before_training(source, tmp_path, monkeypatch):
    """Each peak is checked on its own: the room that covers the larger one is enough."""
    needs = recorded_space_needs(monkeypatch)
    monkeypatch.setattr(train, "train_step", interrupted_at_call(1))
    with pytest.raises(KeyboardInterrupt):
        heal(source, tmp_path / "out", options(source, save_every=4))
    training, writing = (sum(need.nbytes for need in at_once) for at_once in needs)
    assert 0 < training < writing  # LoRA: the checkpoint outweighs a second state copy

    def free_space(free):
        monkeypatch.setattr(staging.shutil, "disk_usage", lambda path: types.SimpleNamespace(total=free, free=free))

    monkeypatch.setattr(train, "train_step", lambda *args: pytest.fail("trained despite the full disk"))
    work = r"the resumable state in .*\.out\.heal-work"
    for free, message in [(training - 1, f"{work} needs"), (writing - 1, f"the healed checkpoint and {work} need")]:
        free_space(free)
        with pytest.raises(CheckpointError, match=rf"not enough disk space in .*: {message} .* GB free"):
            heal(source, tmp_path / "out", options(source, save_every=4))
    assert list(tmp_path.iterdir()) == []
    free_space(writing)
    monkeypatch.setattr(train, "train_step", TRAIN_STEP)
    heal(source, tmp_path / "out", options(source, save_every=4))
    assert (tmp_path / "out" / "model.safetensors").is_file()
