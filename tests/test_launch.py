"""Joining a torchrun launch: commands that do not run distributed refuse before any work."""

from __future__ import annotations

import pytest

from slm_fast import cli
from slm_fast.parallel.launch import Launch, from_environment, peer_lost


def test_a_plain_process_is_rank_zero_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert from_environment() == Launch(0, 1, 0)
    assert not Launch().distributed and Launch().is_main


def test_torchrun_environment_is_read(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert from_environment() == Launch(3, 4, 1)


@pytest.mark.parametrize("command", [["heal", "SRC", "OUT"], ["merge", "SRC", "OUT", "--windows", "1-2"]])
def test_commands_without_a_distributed_path_refuse_a_multi_process_launch(monkeypatch, capsys, command):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(command) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"[rank 1] slm-fast {command[0]}: error: {command[0]} does not run on several processes")


def test_a_lost_peer_names_the_rank_and_the_way_back():
    message = str(peer_lost(Launch(1, 2, 1), RuntimeError("Connection closed by peer [127.0.0.1]:123\ndetail")))
    assert "rank 1 of 2 lost contact" in message and "Connection closed by peer" in message
    assert "--resume" in message and "detail" not in message
