"""stages.pipeline.atomic: a folder swap killed at any step leaves the old or the new folder, and the
next swap (or reader's recover) finishes it. The kill is simulated by failing the k-th file-system
step, which is where a SIGKILL can land between two system calls."""

import os
import shutil

import pytest

from stages.pipeline import atomic


class Killed(BaseException):
    pass


def folder(path, text):
    path.mkdir(parents=True)
    (path / "f").write_text(text)
    return path


def steps_failing_at(monkeypatch, k):
    """Make the k-th call to os.replace / shutil.rmtree (in order) raise Killed."""
    calls = {"n": 0}
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def counted(real):
        def call(*a, **kw):
            calls["n"] += 1
            if calls["n"] == k:
                raise Killed
            return real(*a, **kw)
        return call

    monkeypatch.setattr(atomic.os, "replace", counted(real_replace))
    monkeypatch.setattr(atomic.shutil, "rmtree", counted(real_rmtree))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_swap_killed_at_any_step_is_finished_by_the_next_one(tmp_path, monkeypatch, k):
    dest = folder(tmp_path / "checkpoint", "old")
    new = folder(tmp_path / "new", "new")
    steps_failing_at(monkeypatch, k)
    with pytest.raises(Killed):
        atomic.swap_in(new, dest)
    monkeypatch.undo()
    # What a reader sees after recover is complete: the old folder or the new one.
    atomic.recover(dest)
    assert (dest / "f").read_text() in ("old", "new")
    assert not atomic.old_path(dest).exists()
    # And the next writer is not blocked (the bug: 'Directory not empty: checkpoint -> checkpoint.old').
    atomic.swap_in(folder(tmp_path / "newer", "newer"), dest)
    assert (dest / "f").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"] + (["new"] if k <= 2 else [])  # the caller removes its own tmp


def test_swap_into_an_empty_place_and_over_a_symlink(tmp_path):
    dest = tmp_path / "a" / "model"
    atomic.swap_in(folder(tmp_path / "n1", "1"), dest)
    assert (dest / "f").read_text() == "1"
    target = folder(tmp_path / "elsewhere", "linked")
    shutil.rmtree(dest)
    dest.symlink_to(target)
    atomic.swap_in(folder(tmp_path / "n2", "2"), dest)
    assert (dest / "f").read_text() == "2" and not dest.is_symlink()
    assert (target / "f").read_text() == "linked"  # a symlinked old folder is unlinked, not emptied


def test_a_checkpoint_of_two_processes_holds_each_ones_rng_and_one_copy_of_the_rest(tmp_path):
    """Two ranks (threads standing in for processes) save through the barrier protocol: one model,
    one optimizer, one state.json, an RNG file per rank; each rank restores its own RNG."""
    import threading

    import torch

    from stages.training import checkpoint

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    barrier, errors = threading.Barrier(2), []

    def rank(r):
        try:
            checkpoint.save_checkpoint(tmp_path / "ck", model, opt, sched, {"step": 3}, rank=r, world=2,
                                       barrier=barrier.wait)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ck = tmp_path / "ck"
    assert sorted(p.name for p in ck.iterdir()) == ["model.safetensors", "optimizer.safetensors", "rng-1.safetensors",
                                                     "rng.safetensors", "state.json"]
    assert not (tmp_path / "ck.tmp").exists()
    (ck / "rng-1.safetensors").unlink()  # resuming on more processes than saved: rank 0's RNG
    assert checkpoint.load_checkpoint(ck, model, opt, sched, rank=1)["step"] == 3
