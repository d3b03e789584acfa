"""Atomic checkpoints: round trip (tied weights included), RNG states, crash safety, pruning."""

import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from fastopd.train import checkpoint as ckpt


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 11, bias=False))
    m[1].weight = m[0].weight  # tied
    return m


def test_round_trip_with_tied_weights_and_optimizer(tmp_path):
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.tensor([1, 2])).sum().backward()
    opt.step()
    path = ckpt.save_checkpoint(tmp_path, 7, model_state=m.state_dict(), optimizer_state=opt.state_dict(),
                                trainer_state={"rng": ckpt.rng_state(), "history": [{"loss": 1.5}]})
    assert path.name == "step_00000007" and ckpt.latest_checkpoint(tmp_path) == path
    data = ckpt.load_checkpoint(path)
    for name, t in m.state_dict().items():
        assert torch.equal(data["model"][name], t)
    assert data["trainer"]["step"] == 7 and data["trainer"]["history"] == [{"loss": 1.5}]
    opt2 = torch.optim.AdamW(_model().parameters(), lr=1e-2)
    opt2.load_state_dict(data["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_rng_state_restores_every_generator():
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    state = ckpt.rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand(2)
    ckpt.set_rng_state(state)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_cuda_rng_states_of_gpus_this_process_does_not_see_are_skipped(monkeypatch):
    """A checkpoint written where two GPUs were visible resumed where one is (CUDA_VISIBLE_DEVICES, another node):
    torch's set_rng_state_all with CUDA initialized indexes `default_generators` per saved state and raised an
    IndexError. Simulated on the CPU through torch's own code path: CUDA marked initialized, one "GPU" generator."""
    gpu0 = torch.Generator()
    monkeypatch.setattr(torch.cuda, "_initialized", True)
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: False)
    monkeypatch.setattr(torch.cuda, "default_generators", (gpu0,))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    saved = [torch.Generator().manual_seed(s).get_state() for s in (3, 4)]
    ckpt.set_rng_state({**ckpt.rng_state(), "cuda": saved})
    assert torch.equal(gpu0.get_state(), saved[0])


def test_crash_mid_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    m = _model()
    good = ckpt.save_checkpoint(tmp_path, 1, model_state=m.state_dict(), optimizer_state=None, trainer_state={})
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if str(f).endswith(ckpt.TRAINER_FILE):
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, 2, model_state=m.state_dict(), optimizer_state={"x": 1}, trainer_state={})
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temporary folder removed
    # A temp folder left by a killed process (no cleanup possible) is ignored too.
    (tmp_path / ".step_00000003.tmp-dead").mkdir()
    (tmp_path / "latest").unlink()
    assert ckpt.latest_checkpoint(tmp_path) == good


def test_keep_prunes_old_and_resave_replaces(tmp_path):
    m = _model()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model_state=m.state_dict(), optimizer_state=None,
                             trainer_state={"tag": step}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]
    ckpt.save_checkpoint(tmp_path, 3, model_state=m.state_dict(), optimizer_state=None, trainer_state={"tag": 33})
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["trainer"]["tag"] == 33
    with pytest.raises(FileNotFoundError):
        ckpt.load_checkpoint(tmp_path / "step_00000009")


def test_crash_while_resaving_a_step_keeps_its_previous_version(tmp_path, monkeypatch):
    """Re-saving a step moves the old folder aside before the new one takes its place; a crash between the two
    renames must not lose the step: latest_checkpoint moves the old version back."""
    import os

    m = _model()
    ckpt.save_checkpoint(tmp_path, 2, model_state=m.state_dict(), optimizer_state=None, trainer_state={"tag": 2})
    real_rename = os.rename
    calls = []

    def dying_rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the old version is aside, the new one not yet in place
            raise KeyboardInterrupt
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", dying_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 2, model_state=m.state_dict(), optimizer_state=None, trainer_state={"tag": 22})
    monkeypatch.setattr(os, "rename", real_rename)
    assert not (tmp_path / "step_00000002").exists()
    found = ckpt.latest_checkpoint(tmp_path)
    assert found == tmp_path / "step_00000002" and ckpt.load_checkpoint(found)["trainer"]["tag"] == 2


@pytest.mark.skipif(not hasattr(os, "umask") or os.name != "posix", reason="POSIX permissions")
@pytest.mark.parametrize("umask,mode", [pytest.param(0o022, 0o755, id="umask-022"),
                                        pytest.param(0o027, 0o750, id="umask-027")])
def test_checkpoint_folder_has_the_umasks_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = ckpt.save_checkpoint(tmp_path, 1, model_state=_model().state_dict(), optimizer_state=None,
                                    trainer_state={})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode  # as any new folder (mkdtemp's would be 0o700)
    for name in (ckpt.MODEL_FILE, ckpt.TRAINER_FILE):  # safetensors alone would write its file 0o600
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o666 & ~umask, name


def _three_steps(tmp_path, keep=None):
    m = _model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    m(torch.tensor([1, 2])).sum().backward()
    opt.step()
    return [ckpt.save_checkpoint(tmp_path, k, model_state=m.state_dict(), optimizer_state=opt.state_dict(),
                                 trainer_state={"history": []}, keep=keep) for k in (1, 2, 3)]


@pytest.mark.parametrize("damage", ["truncated-model", "truncated-trainer", "missing-optimizer",
                                    "missing-trainer", "grown-optimizer"])
@pytest.mark.parametrize("pointer", [pytest.param(True, id="latest-pointer"),
                                     pytest.param(False, id="no-pointer")])
def test_a_damaged_newest_checkpoint_is_passed_over_for_the_previous_one(tmp_path, damage, pointer):
    """A folder whose files were damaged after it was written is no complete checkpoint: latest_checkpoint warns
    and returns the newest complete one, and loading the damaged one raises naming it. Without the `latest`
    pointer (a folder copied without it, or of an older fastopd) the damaged one was passed over silently."""
    paths = _three_steps(tmp_path)
    if not pointer:
        (tmp_path / ckpt.LATEST).unlink()
    newest = paths[-1]
    what, name = damage.split("-", 1)
    f = newest / {"model": ckpt.MODEL_FILE, "trainer": ckpt.TRAINER_FILE, "optimizer": ckpt.OPTIMIZER_FILE}[name]
    if what == "truncated":
        os.truncate(f, f.stat().st_size // 2)
    elif what == "missing":
        f.unlink()
    else:
        with open(f, "ab") as out:
            out.write(b"\0" * 8)
    assert ckpt.checkpoint_problem(newest) is not None and ckpt.checkpoint_problem(paths[1]) is None
    with pytest.warns(RuntimeWarning, match=r"step_00000003 is not complete .* using .*step_00000002"):
        assert ckpt.latest_checkpoint(tmp_path) == paths[1]
    with pytest.raises((ValueError, FileNotFoundError), match="step_00000003"):
        ckpt.load_checkpoint(newest)
    assert ckpt.load_checkpoint(paths[1])["trainer"]["step"] == 2


def test_incomplete_folders_are_neither_listed_nor_pruned(tmp_path):
    junk = tmp_path / "step_00000099"
    junk.mkdir()
    paths = _three_steps(tmp_path, keep=2)
    assert ckpt.list_checkpoints(tmp_path) == paths[1:]  # step 1 pruned; the junk folder neither listed nor deleted
    assert junk.is_dir()
    (tmp_path / ckpt.LATEST).unlink()
    with pytest.warns(RuntimeWarning, match=r"step_00000099 is not complete \(it has no model"):
        assert ckpt.latest_checkpoint(tmp_path) == paths[-1]


def test_a_fresh_run_in_a_reused_folder_prunes_only_below_its_step(tmp_path):
    """Checkpoints of an earlier run at higher steps are left alone; the new run keeps its own newest ones."""
    m = _model()
    old = [ckpt.save_checkpoint(tmp_path, k, model_state=m.state_dict(), optimizer_state=None, trainer_state={})
           for k in (35, 40)]
    new = [ckpt.save_checkpoint(tmp_path, k, model_state=m.state_dict(), optimizer_state=None, trainer_state={},
                                keep=2) for k in (5, 10, 15)]
    assert ckpt.list_checkpoints(tmp_path) == new[1:] + old
    assert ckpt.latest_checkpoint(tmp_path) == new[-1]


def test_a_checkpoint_from_before_manifests_still_loads_and_a_garbled_manifest_does_not(tmp_path):
    paths = _three_steps(tmp_path)
    (paths[0] / ckpt.MANIFEST_FILE).unlink()  # as written by earlier versions
    assert ckpt.checkpoint_problem(paths[0]) is None and ckpt.load_checkpoint(paths[0])["trainer"]["step"] == 1
    (paths[1] / ckpt.MANIFEST_FILE).write_text("{not json")
    assert "manifest" in ckpt.checkpoint_problem(paths[1])
    assert ckpt.list_checkpoints(tmp_path) == [paths[0], paths[2]]


def test_a_crash_while_pruning_leaves_nothing_that_passes_for_a_checkpoint(tmp_path, monkeypatch):
    """Pruning renames a folder out of sight before removing its files: a crash half-way (here: the manifest and
    optimizer state gone, the rest not) leaves no step folder that would load without its optimizer state, and
    the next save sweeps what is left."""
    real_rmtree = ckpt.shutil.rmtree

    def dies_half_way(path, ignore_errors=False):
        for name in (ckpt.MANIFEST_FILE, ckpt.OPTIMIZER_FILE):
            (Path(path) / name).unlink(missing_ok=True)
        raise KeyboardInterrupt

    paths = _three_steps(tmp_path)
    monkeypatch.setattr(ckpt.shutil, "rmtree", dies_half_way)
    m = _model()
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, 4, model_state=m.state_dict(), optimizer_state={"state": {}},
                             trainer_state={}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [p.name for p in paths[1:]] + ["step_00000004"]
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    ckpt.save_checkpoint(tmp_path, 5, model_state=m.state_dict(), optimizer_state=None, trainer_state={}, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004", "step_00000005"]
