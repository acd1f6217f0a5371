"""The work folder of a prune run: what a killed run needs to continue without redoing its work.

- `run.json`: the options that decide the result, and a digest of the calibration's reference outputs
  (scores are only reusable when they come from the same arithmetic);
- `calibration.safetensors`: the calibration token ids;
- `scores.jsonl`: every scored candidate with its score, appended and flushed as each is computed;
- `progress.json`: the committed windows and the search step reached;
- `states/`: hidden states spilled to disk by the tiered store (recomputed on resume).

A resumed run recomputes the calibration pass (one read of the model), checks the reference digest,
then replays the search: every candidate already scored is taken from the journal, so the search
continues where it stopped and ends exactly as an uninterrupted run. The folder is removed when the
run completes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from slm_fast.errors import InputError

RUN_FILE, IDS_FILE, SCORES_FILE, PROGRESS_FILE = "run.json", "calibration.safetensors", "scores.jsonl", "progress.json"


def reference_digest(reference: Tensor) -> str:
    """SHA-256 of the reference outputs' bytes."""
    return hashlib.sha256(memoryview(reference.detach().cpu().contiguous().view(torch.uint8).numpy())).hexdigest()


class RunJournal:
    def __init__(self, folder: Path, fingerprint: dict, *, resume: bool, overwrite: bool):
        """Open the work folder: a new one, or (with `resume`) the one a killed run left. A folder left
        by an earlier run is an error unless `resume` (continue it) or `overwrite` (start over)."""
        self.folder = Path(folder)
        self.fingerprint = json.loads(json.dumps(fingerprint))
        exists = (self.folder / RUN_FILE).exists()
        if resume and not exists:
            raise InputError(f"--resume: {self.folder} holds no run to resume (pass --work-dir if it was elsewhere)")
        if exists and not resume:
            if not overwrite:
                raise InputError(
                    f"{self.folder} holds the progress of an earlier run of this output: pass --resume to continue "
                    "it, or --overwrite to start over"
                )
            shutil.rmtree(self.folder)
        elif self.folder.exists() and not exists and any(self.folder.iterdir()):
            if not overwrite:
                raise InputError(f"work folder {self.folder} exists and is not a prune work folder; choose another")
            shutil.rmtree(self.folder)
        self.resumed = resume
        if resume:
            saved = json.loads((self.folder / RUN_FILE).read_text())
            differ = sorted(
                k
                for k in set(saved["options"]) | set(self.fingerprint)
                if saved["options"].get(k) != self.fingerprint.get(k)
            )
            if differ:
                detail = ", ".join(
                    f"{k}: {saved['options'].get(k)!r} then, {self.fingerprint.get(k)!r} now" for k in differ
                )
                raise InputError(f"--resume: {self.folder} was made with other options ({detail})")
            self._run = saved
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._run = {"options": self.fingerprint, "reference_sha256": None}
            self._write_json(RUN_FILE, self._run)
        shutil.rmtree(self.states_dir, ignore_errors=True)  # spilled states of a dead process
        self._scores_file = None

    @property
    def states_dir(self) -> Path:
        return self.folder / "states"

    def calibration_ids(self) -> Tensor | None:
        path = self.folder / IDS_FILE
        return load_file(path)["input_ids"] if self.resumed and path.exists() else None

    def save_calibration_ids(self, input_ids: Tensor) -> None:
        partial = self.folder / f"{IDS_FILE}.partial"
        save_file({"input_ids": input_ids.contiguous()}, partial)
        partial.replace(self.folder / IDS_FILE)

    def check_reference(self, reference: Tensor) -> None:
        """Record the digest of the reference outputs, or compare it with the recorded one."""
        self.check_reference_digest(reference_digest(reference))

    def check_reference_digest(self, digest: str) -> None:
        """`check_reference` given the digest (a distributed run computes it on the rank holding the
        reference outputs)."""
        recorded = self._run.get("reference_sha256")
        if recorded is None:
            self._run["reference_sha256"] = digest
            self._write_json(RUN_FILE, self._run)
        elif recorded != digest:
            raise InputError(
                f"--resume: the calibration outputs differ from those of the run in {self.folder} (another device, "
                "dtype or library version computes them differently), so its scores cannot be reused; "
                "pass --overwrite to start over"
            )

    def scores(self) -> tuple[dict, dict]:
        """(window scores, plan scores) recorded so far, keyed as CandidateScorer keys them."""
        windows, plans = {}, {}
        path = self.folder / SCORES_FILE
        if not self.resumed or not path.exists():
            return windows, plans
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # the line being written when the run was killed
                continue
            if entry["kind"] == "plan":
                plans[tuple(tuple(w) for w in entry["key"])] = entry["score"]
            else:
                above, window = entry["key"]
                windows[(tuple(tuple(w) for w in above), tuple(window))] = entry["score"]
        return windows, plans

    def record(self, kind: str, key: tuple, score: float) -> None:
        if self._scores_file is None:
            self._scores_file = open(self.folder / SCORES_FILE, "a")  # noqa: SIM115 (open for the run)
        self._scores_file.write(json.dumps({"kind": kind, "key": key, "score": score}) + "\n")
        self._scores_file.flush()
        os.fsync(self._scores_file.fileno())

    def record_progress(self, step: int, windows: list, similarity: float | None) -> None:
        self._write_json(PROGRESS_FILE, {"step": step, "windows": [list(w) for w in windows], "similarity": similarity})

    def progress(self) -> dict | None:
        path = self.folder / PROGRESS_FILE
        return json.loads(path.read_text()) if self.resumed and path.exists() else None

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def close(self) -> None:
        if self._scores_file is not None:
            self._scores_file.close()
            self._scores_file = None

    def _write_json(self, name: str, data: dict) -> None:
        partial = self.folder / f"{name}.partial"
        partial.write_text(json.dumps(data, indent=1) + "\n")
        partial.replace(self.folder / name)
