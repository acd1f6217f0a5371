"""bench/quality_protocol.py's own paths on a tiny model: re-writing a recorded selection (and refusing
one that is not the recorded model), SLEB at fewer blocks from a longer run, the merge rule of a
configuration, a healed row's budget, and what its command line measures."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import SLM, save_tiny_checkpoint, save_tiny_tokenizer, write_word_corpus

from slm_fast.baselines import LACO_RULE
from slm_fast.prune import PruneOptions, prune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import quality_protocol as protocol


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny model, its best-first prune (2 blocks) and the protocol's record of that row."""
    root = tmp_path_factory.mktemp("protocol")
    model = save_tiny_checkpoint(root / "model", "llama", num_layers=6)
    save_tiny_tokenizer(model)
    corpus = write_word_corpus(root / "calib.txt", documents=12, words=200)
    options = PruneOptions(**SLM, remove=2, calib=str(corpus), n_samples=4, seq_len=32, progress=False)
    prune(model, root / "pruned", options)
    recorded = protocol.prune(model, root / "pruned", 2, [])  # reads slm_report.json, prunes nothing
    nll = {corpus: protocol.window_nlls(root / "pruned", corpus, 4) for corpus in protocol.VALIDATION}
    return model, root, recorded, nll


def test_recorded_selection_rewrites_the_same_model(pruned, tmp_path):
    model, root, recorded, nll = pruned
    info = protocol.write_recorded_selection(model, recorded, recorded["rule"], tmp_path / "again", nll)
    assert info["recorded"] and info["windows"] == recorded["windows"] and info["dropped"] == recorded["dropped"]
    assert info["timings"]["search"] == recorded["timings"]["search"]
    original = load_file(root / "pruned" / "model.safetensors")
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert original.keys() == again.keys() and all((original[k] == again[k]).all() for k in original)


def test_recorded_selection_refuses_another_model(pruned, tmp_path):
    model, _, recorded, nll = pruned
    other = recorded | {"windows": [], "dropped": [0, 1]}  # a different selection of the same size
    with pytest.raises(SystemExit, match="differ from the recorded"):
        protocol.write_recorded_selection(model, other, recorded["rule"], tmp_path / "other", nll)


def test_recorded_selection_allows_another_machines_rounding(pruned, tmp_path):
    """NLLs recorded on another CPU (a few float32 ulps off, as Qwen2.5's 4/last-n came back) are the
    recorded model; a gap beyond RECOMPUTED is not."""
    model, _, recorded, nll = pruned
    elsewhere = {corpus: [x + 3e-6 for x in values] for corpus, values in nll.items()}
    info = protocol.write_recorded_selection(model, recorded, recorded["rule"], tmp_path / "here", elsewhere)
    assert info["recorded"]
    assert protocol.check_recorded(tmp_path / "here", elsewhere) == pytest.approx(3e-6, abs=protocol.SAME_COMPUTATION)
    beyond = {corpus: [x + 2 * protocol.RECOMPUTED for x in values] for corpus, values in nll.items()}
    with pytest.raises(SystemExit, match="differ from the recorded"):
        protocol.check_recorded(tmp_path / "here", beyond)


def test_config_rule_is_what_prune_applies():
    assert protocol.config_rule([]) == PruneOptions().rule
    assert protocol.config_rule(protocol.CONFIGS["laco"]) == LACO_RULE
    assert protocol.config_rule(protocol.CONFIGS["paper preset"]) == "keep_high_norms_low"
    assert protocol.config_rule(["--rule", "mean"]) == "mean"


def test_healed_row_records_its_budget(pruned, tmp_path):
    _, root, _, _ = pruned
    corpus = write_word_corpus(tmp_path / "heal.txt", documents=8, words=100)
    budget = {"steps": 3, "batch_size": 2, "cutoff": 16, "corpus": str(corpus)}
    info = protocol.heal_model(root / "pruned", tmp_path / "healed", "partial", budget)
    assert info["mode"] == "partial" and info["steps"] == 3 and info["tokens"] == 3 * 2 * 16
    report = json.loads((tmp_path / "healed" / "heal_report.json").read_text())
    assert report["mode"] == "partial" and len(report["losses"]) == 3
    assert protocol._heal_mode("sleb+lora") == "lora" and protocol._heal_mode("sleb+comp") is None


def test_sleb_prefix_is_the_shorter_run(pruned, tmp_path):
    """SLEB to 2 blocks derived from a run to 3 writes the model `prune --method sleb --remove 2`
    writes, and compensating it gives `--compensate linear`'s weights."""
    model, root, _, _ = pruned
    options = json.loads((root / "pruned" / "slm_report.json").read_text())["options"] | {"method": "sleb"}
    prune(model, tmp_path / "three", PruneOptions(**options | {"remove": 3}))
    longer = protocol.prune(model, tmp_path / "three", 3, [])
    assert protocol.longer_sleb({"3/sleb": {"prune": longer}}, 2) is longer
    assert protocol.longer_sleb({"3/sleb": {"prune": longer}}, 3) is None
    info = protocol.sleb_prefix(model, longer, 2, tmp_path / "derived")
    assert info["timings"]["search"] == longer["sleb"]["step_seconds"][1] < longer["timings"]["search"]
    assert protocol._pruned(tmp_path / "derived")
    for flags, name in (([], "plain"), (["--compensate", "linear"], "comp")):
        compensate = {"compensate": "linear"} if flags else {}
        prune(model, tmp_path / name, PruneOptions(**options | {"remove": 2} | compensate))
        if flags:
            protocol.compensate_selection(model, tmp_path / "derived", tmp_path / "derived_comp", flags)
        want = load_file(tmp_path / name / "model.safetensors")
        got = load_file(tmp_path / ("derived_comp" if flags else "derived") / "model.safetensors")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name


def test_a_compensated_row_is_restored_from_its_record(pruned, tmp_path):
    """A +comp row whose models are gone comes back from the recorded selection with the same fit."""
    model, root, recorded, nll = pruned
    flags = protocol.CONFIGS["slm+comp"]
    work = tmp_path / "work"
    protocol.compensate_selection(model, root / "pruned", tmp_path / "fitted", flags)
    fitted_nll = {corpus: protocol.window_nlls(tmp_path / "fitted", corpus, 4) for corpus in protocol.VALIDATION}
    results = {"2/slm": {"prune": recorded, "nll": nll}, "2/slm+comp": {"prune": {}, "nll": fitted_nll}}
    out = protocol.restore_model(model, work, results, "2/slm+comp")
    assert out == work / "2-slm+comp" and (work / "2-slm" / protocol.SELECTION_FILE).is_file()
    want, got = load_file(tmp_path / "fitted" / "model.safetensors"), load_file(out / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert protocol.restore_model(model, work, results, "2/slm+comp") == out  # there: reused
    wrong = {"2/slm": results["2/slm"], "2/slm+comp": {"prune": {}, "nll": nll}}
    with pytest.raises(SystemExit, match="differ from the recorded"):
        protocol.restore_model(model, tmp_path / "other", wrong, "2/slm+comp")


def test_a_healed_row_is_restored_by_healing_again(pruned, tmp_path):
    """A healed row whose models are gone is healed again on its recorded budget (seeded: the same
    weights) from its restored base; a record of another run is refused."""
    model, root, recorded, nll = pruned
    corpus = write_word_corpus(tmp_path / "heal.txt", documents=8, words=100)
    budget = {"steps": 3, "batch_size": 2, "cutoff": 16, "corpus": str(corpus), "lr": 3e-4}
    heal = protocol.heal_model(root / "pruned", tmp_path / "healed", "lora", budget)
    assert heal["lr"] == 3e-4
    healed_nll = {corpus: protocol.window_nlls(tmp_path / "healed", corpus, 4) for corpus in protocol.VALIDATION}
    results = {"2/slm": {"prune": recorded, "nll": nll}, "2/slm+lora": {"heal": heal, "nll": healed_nll}}
    out = protocol.restore_model(model, tmp_path / "work", results, "2/slm+lora")
    want, got = load_file(tmp_path / "healed" / "model.safetensors"), load_file(out / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert "restored" not in results["2/slm+lora"]  # bit for bit: nothing to record
    other = {"2/slm": results["2/slm"], "2/slm+lora": {"heal": heal | {"lr": 1e-5}, "nll": healed_nll}}
    with pytest.raises(SystemExit, match="differ from the recorded"):
        protocol.restore_model(model, tmp_path / "other", other, "2/slm+lora")
    # A re-heal on another machine: within RETRAINED, accepted and recorded as such
    shifted = {corpus: [x + 5e-6 for x in values] for corpus, values in healed_nll.items()}
    elsewhere = {"2/slm": results["2/slm"], "2/slm+lora": {"heal": heal, "nll": shifted, "zero_shot": {"piqa": {}}}}
    protocol.restore_model(model, tmp_path / "elsewhere", elsewhere, "2/slm+lora")
    restored = elsewhere["2/slm+lora"]["restored"]
    assert restored["nll_gap"] == pytest.approx(5e-6, abs=1e-6) and restored["tasks_scored_before"] == ["piqa"]
    assert restored["weights_digest"] == protocol.weights_digest(out)


def test_a_row_with_the_weights_of_a_scored_row_is_its_twin(pruned, tmp_path):
    """Rows whose selections write the same weights are twins (their digests are kept); another
    selection is not; a row without all seven tasks scored is no candidate."""
    from slm_fast.export import export_merged_checkpoint

    model, _, recorded, nll = pruned
    scores = {t: {"score": 0.5, "stderr": 0.02, "documents": 10, "seconds": 3.0} for t in protocol.ZERO_SHOT_TASKS}
    other = recorded | {"windows": [], "dropped": [0, 1]}
    export_merged_checkpoint(model, tmp_path / "drop01", [], dropped=[0, 1], progress=False)
    other_nll = {corpus: protocol.window_nlls(tmp_path / "drop01", corpus, 4) for corpus in protocol.VALIDATION}
    results = {
        "2/slm": {"prune": recorded, "nll": nll, "zero_shot": scores},
        "2/gromov": {"prune": recorded, "nll": nll},  # the same selection: the same weights
        "2/last-n": {"prune": other, "nll": other_nll},
    }
    work = tmp_path / "work"
    assert protocol.scored_twin(model, work, results, "2/gromov") == "2/slm"
    assert protocol.scored_twin(model, work, results, "2/last-n") is None
    digests = {key: row["weights_digest"] for key, row in results.items()}
    assert digests["2/slm"] == digests["2/gromov"] != digests["2/last-n"]
    assert protocol.weights_digest(tmp_path / "drop01") == digests["2/last-n"]  # whatever wrote it
    results["2/gromov"] |= {"zero_shot": scores, "zero_shot_of": "2/slm"}
    results = {"2/gromov": results["2/gromov"], **results, "2/sleb": {"prune": recorded, "nll": nll}}  # copy first
    assert protocol.scored_twin(model, work, results, "2/sleb") == "2/slm"  # the row evaluated, not a copy
    assert protocol.scored_twin(model, work, results, "2/slm") is None  # not its own copy's twin
    del results["2/slm"]["zero_shot"]["boolq"]
    assert protocol.scored_twin(model, work, results, "2/gromov") is None


def test_zero_shot_alone_measures_no_new_row():
    only_scores = protocol.parse_args(["--model", "m", "--zero-shot", "6/slm+comp"])
    assert only_scores.configs == [] and only_scores.zero_shot == ["6/slm+comp"]
    assert protocol.parse_args(["--model", "m"]).configs == list(protocol.CONFIGS)
    both = protocol.parse_args(["--model", "m", "--configs", "sleb", "--zero-shot", "dense"])
    assert both.configs == ["sleb"]
    with pytest.raises(SystemExit, match="heal-corpus boolq"):
        protocol.parse_args(["--model", "m", "--heal-corpus", "boolq"])


def test_zero_shot_records_each_task_once(tmp_path, monkeypatch):
    """One `evaluate` per task on the device asked for; a task already recorded is not run again."""
    from eval_models import save_text_model

    pytest.importorskip("lm_eval")
    from slm_fast.evaluation.local_tasks import LOCAL_TASKS

    texts = [f"{name} question {i}: which answer is right?" for name in LOCAL_TASKS for i in range(20)]
    model = save_text_model(tmp_path / "model", texts, num_layers=2)
    monkeypatch.setattr(protocol, "ZERO_SHOT_TASKS", ("arc_easy", "winogrande"))
    monkeypatch.setattr(protocol, "ZERO_SHOT_WHOLE", ())
    monkeypatch.setattr(protocol, "ZERO_SHOT_DOCS", 2)
    recorded = {"winogrande": {"score": 0.5, "note": "kept"}}
    saves = []
    protocol.zero_shot(model, recorded, lambda: saves.append(sorted(recorded)), "cpu")
    assert recorded["winogrande"] == {"score": 0.5, "note": "kept"} and saves == [["arc_easy", "winogrande"]]
    arc = recorded["arc_easy"]
    assert arc["task"] == "arc_easy" and arc["documents"] == 2 and arc["device"] == "cpu" and arc["seconds"] > 0
    assert arc["shared_prefixes"]


def test_zero_shot_table_averages_and_marks_devices():
    """Both averages with se = sqrt(sum se^2) / n; rows by blocks removed; a device other than the CPU
    named beside the seconds, and `rows` where a task was scored row by row; no average for a row with a
    task missing."""
    tasks = protocol.ZERO_SHOT_TASKS

    def scored(boolq_score, device="cpu", shared=True):
        record = {"score": 0.4, "stderr": 0.02, "documents": 500, "seconds": 10.0, "device": device}
        record |= {"shared_prefixes": True} if shared else {}  # older records have no such field
        return {t: record | ({"score": boolq_score} if t == "boolq" else {}) for t in tasks}

    results = {
        "6/slm": {"zero_shot": scored(1.0, "cuda")},
        "dense": {"zero_shot": scored(0.4, shared=False)},
        "4/slm": {"zero_shot": {"boolq": scored(0.4)["boolq"]}},
        "4/gromov": {"nll": {}},
        "6/sleb": {"zero_shot": scored(1.0, "cuda"), "zero_shot_of": "6/slm"},
    }
    lines = protocol._zero_shot_table(results)
    cells = [line.strip("| ").split(" | ") for line in lines if line.startswith("| ") and "±" in line]
    rows = {row[0]: row for row in cells}
    assert list(rows) == ["dense", "4/slm", "6/slm", "6/sleb"]
    assert rows["6/sleb"][-1] == "= 6/slm" and rows["6/sleb"][1:-1] == rows["6/slm"][1:-1]
    se = f"{100 * math.sqrt(len(tasks) * 0.02**2) / len(tasks):.1f}"
    se_six = f"{100 * math.sqrt((len(tasks) - 1) * 0.02**2) / (len(tasks) - 1):.1f}"
    assert rows["dense"][-3:] == [f"40.0 ± {se}", f"40.0 ± {se_six}", f"{10 * len(tasks)} rows"]
    mean = 100 * (0.4 * (len(tasks) - 1) + 1.0) / len(tasks)
    assert rows["6/slm"][-3:] == [f"{mean:.1f} ± {se}", f"40.0 ± {se_six}", f"{10 * len(tasks)} cuda"]
    assert rows["4/slm"][-3:] == ["", "", "10"]
