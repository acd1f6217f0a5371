"""Large-run machinery on a tiny model: resume after SIGKILL, stale staging folders, the dry run and
the cost model's counts against the real run's."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tiny_models import SLM, SLM_FLAGS, save_tiny_checkpoint, save_tiny_tokenizer, write_word_corpus

from slm_fast.cli import main
from slm_fast.errors import InputError
from slm_fast.prune import PruneOptions, prune

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    folder = save_tiny_checkpoint(root / "src", "llama", num_layers=10, shard="150KB")
    save_tiny_tokenizer(folder)
    write_word_corpus(root / "calib.txt")
    return folder


def options(source, **overrides):
    base = dict(calib=str(source.parent / "calib.txt"), n_samples=4, seq_len=32, progress=False, remove=4)
    return PruneOptions(**(SLM | base | overrides))


def cli_args(source, out, *extra):
    calib = str(source.parent / "calib.txt")
    return ["prune", str(source), str(out), *SLM_FLAGS, "--calib", calib, "--samples", "4", "--seq-len", "32", *extra]


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


KILLABLE = textwrap.dedent(
    """
    import sys, time
    from slm_fast import slm
    score_plans = slm.CandidateScorer.score_plans
    calls = []
    def announced(self, plans):
        scores = score_plans(self, plans)
        calls.append(len(plans))
        print("scored", flush=True)
        if len(calls) == 2:
            time.sleep(60)  # killed here, after the second step's candidates are journaled
        return scores
    slm.CandidateScorer.score_plans = announced
    from slm_fast.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_a_run_killed_mid_search_resumes_to_the_uninterrupted_result(source, tmp_path):
    before = digest(source)
    whole = prune(source, tmp_path / "whole" / "out", options(source, micro_batch=2))
    whole_report = json.loads((tmp_path / "whole" / "out" / "slm_report.json").read_text())

    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    args = cli_args(source, run_dir / "out", "--remove", "4", "--micro-batch", "2", "--no-progress")
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", KILLABLE, *args], stdout=subprocess.PIPE, cwd=ROOT, env=env)
    for _ in range(2):  # two steps scored (the second still running: no progress recorded for it)
        assert process.stdout.readline().strip() == b"scored", "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    work = run_dir / ".out.work"
    assert (work / "scores.jsonl").exists() and json.loads((work / "progress.json").read_text())["step"] == 1
    assert not (run_dir / "out").exists()

    with pytest.raises(InputError, match="--resume to continue"):
        prune(source, run_dir / "out", options(source, micro_batch=2))
    with pytest.raises(InputError, match="other options"):
        prune(source, run_dir / "out", options(source, micro_batch=2, rule="mean", resume=True))
    resumed = prune(source, run_dir / "out", options(source, micro_batch=2, resume=True))
    report = json.loads((run_dir / "out" / "slm_report.json").read_text())
    assert resumed.windows == whole.windows and report["resumed"]
    assert report["search"]["candidates"] == whole_report["search"]["candidates"]  # scores bit for bit
    first_two = sum(1 for c in whole_report["search"]["candidates"] if c["note"].split(",")[0] in ("step 1", "step 2"))
    assert report["forward_passes"] <= whole_report["forward_passes"] - first_two + 1  # nothing scored twice
    assert sorted(p.name for p in run_dir.iterdir()) == ["out"]  # the work folder is gone
    assert digest(source) == before


def test_a_stale_staging_folder_is_named_and_removed_with_overwrite(source, tmp_path, capsys):
    before = digest(source)
    dead = subprocess.run(["true"]).args and subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half written")
    args = cli_args(source, tmp_path / "out", "--remove", "1", "--no-progress")
    assert main(args) == 2
    error = capsys.readouterr().err
    assert str(stale) in error and f"process {dead.pid}, which died" in error and "--overwrite" in error
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert digest(source) == before


def test_dry_run_prints_the_cost_and_writes_nothing(source, tmp_path, capsys):
    args = cli_args(source, tmp_path / "out", "--memory-budget", "1MB", "--micro-batch", "1")
    assert main([*args, "--remove", "1", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for figure in ("block loads", "bytes read", "forward FLOPs", "peak hidden states per tier", "estimated time"):
        assert figure in printed
    assert "compensation" not in printed
    assert main([*args, "--remove", "2", "--compensate", "linear", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "compensation (on the assumed selection): 1 spans fitted" in printed  # one window of 3 blocks
    assert "estimated time with compensation" in printed
    assert not list(tmp_path.iterdir())
    assert main([*args, "--remove", "2", "--method", "sleb", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "search sweeps 2 after the calibration sweep, plans scored 15" in printed  # 8 + 7 candidates
    assert f"head (the criterion's logits): {15 * (1 + 4 * 31):,} tokens" in printed  # ppl: 4 x 31 targets + probe
    assert main([*args, "--remove", "2", "--method", "shortgpt", "--dry-run"]) == 0
    assert "search sweeps 1 after the calibration sweep, plans scored 1" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())
    assert main([*args, "--ratio", "0.2", "--search", "sliding", "--dry-run"]) == 2
    assert "--dry-run models a run to a block count" in capsys.readouterr().err


@pytest.mark.parametrize("remove, budget", [(1, "1MB"), (3, "300KB"), (3, "10GB")])
def test_the_cost_model_counts_what_the_run_does(source, tmp_path, remove, budget):
    """Replayed on the sweeps the run made, the model's block loads, bytes, forwards and spills equal the
    counted ones, whatever the tiers (1MB: blocks partly resident, states partly on disk; 300KB: nothing
    resident). One step depends on no assumption, so the a-priori prediction is exact too."""
    from slm_fast.checkpoint.writer import parse_size

    budget = parse_size(budget)
    prune(
        source,
        tmp_path / "out",
        options(source, remove=remove, memory_budget=budget, micro_batch=1, compensate="linear"),
    )
    report = json.loads((tmp_path / "out" / "slm_report.json").read_text())
    cost = report["cost"]
    counts = ("block_loads", "bytes_read", "token_forwards", "forward_flops", "state_bytes_written", "state_bytes_read")
    assert {k: cost["replayed_over_measured"][k] for k in counts} == dict.fromkeys(counts, 1.0)
    assert cost["replayed"]["peak_state_bytes"] == cost["measured"]["peak_state_bytes"]
    if remove == 1:
        assert {k: cost["predicted_over_measured"][k] for k in counts} == dict.fromkeys(counts, 1.0)
    assert cost["measured"]["seconds"] > 0 and cost["predicted"]["seconds"] > 0
    # The compensation sweep after the search, on the blocks the search left resident (or none)
    compensation, counts = cost["compensation"], ("block_loads", "bytes_read", "token_forwards")
    assert {k: compensation["replayed_over_measured"][k] for k in counts} == dict.fromkeys(counts, 1.0)
    assert compensation["replayed"]["carriers"] == len(report["compensation"]["spans"]) > 0
    assert compensation["replayed"]["sums_flops"] == compensation["replayed"]["carriers"] * 4 * 64**2 * 4 * 32
    assert "compensation" in cost["predicted"] and compensation["measured"]["seconds"] > 0


@pytest.mark.parametrize("method, criterion, remove", [("sleb", "cosine", 1), ("sleb", "cosine", 3), ("slm", "kl", 1)])
def test_the_cost_model_counts_the_head_work_of_the_logit_criteria(source, tmp_path, method, criterion, remove):
    """SLEB (ppl) and --criterion kl pass every scored plan's tokens through the head: the model counts
    them as the run does, and predicts SLEB's loop exactly for one step (none depends on an assumption)
    and its head tokens at any count (each step scores every remaining candidate, whichever it drops)."""
    run = options(source, method=method, criterion=criterion, remove=remove, memory_budget=2**20, micro_batch=1)
    prune(source, tmp_path / "out", run)
    cost = json.loads((tmp_path / "out" / "slm_report.json").read_text())["cost"]
    counts = ("block_loads", "bytes_read", "token_forwards", "head_tokens", "head_flops", "state_bytes_written")
    assert {k: cost["replayed_over_measured"][k] for k in counts} == dict.fromkeys(counts, 1.0)
    per_plan = 1 + 2 * 4 * 32 if criterion == "kl" and method == "slm" else 1 + 4 * 31
    assert cost["measured"]["head_tokens"] == cost["replayed"]["plans_scored"] * per_plan > 0
    exact = counts if remove == 1 else ("head_tokens", "head_flops")
    assert {k: cost["predicted_over_measured"][k] for k in exact} == dict.fromkeys(exact, 1.0)
    assert cost["predicted"]["seconds_by_part"]["head"] > 0


@pytest.mark.parametrize("method", ["last-n", "shortgpt", "gromov"])
def test_the_cost_model_counts_a_one_pass_baseline(source, tmp_path, method):
    """ShortGPT, Gromov and last-n select from the calibration states and score their one model: the
    replay counts what the run does; the prediction assumes last-n's blocks, so it is exact for last-n."""
    prune(source, tmp_path / "out", options(source, method=method, remove=3, memory_budget=2**20, micro_batch=1))
    cost = json.loads((tmp_path / "out" / "slm_report.json").read_text())["cost"]
    counts = ("block_loads", "bytes_read", "token_forwards", "state_bytes_written", "state_bytes_read")
    assert {k: cost["replayed_over_measured"][k] for k in counts} == dict.fromkeys(counts, 1.0)
    assert cost["replayed"]["sweeps"] == cost["replayed"]["plans_scored"] == 1
    if method == "last-n":
        assert {k: cost["predicted_over_measured"][k] for k in counts} == dict.fromkeys(counts, 1.0)


def test_compute_dtype_and_the_default_budget_are_reported(source, tmp_path):
    prune(source, tmp_path / "out", options(source, remove=1, dtype="bfloat16"))
    report = json.loads((tmp_path / "out" / "slm_report.json").read_text())
    assert report["compute_dtype"] == "bfloat16" and report["options"]["dtype"] == "bfloat16"
    assert "RAM available" in report["memory"]["budget_source"] and report["memory"]["budget_bytes"] > 0
