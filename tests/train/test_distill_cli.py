"""`fastopd distill`: config precedence and field-named errors; a tiny end-to-end run writes the run folder."""

import json

import pytest

from fastopd.cli import main
from fastopd.train.cli import ASSETS, DistillJob, resolve, summary_table


def _args(argv):
    from fastopd.cli import build_parser

    return build_parser(only="distill").parse_args(["distill", *argv])


def test_precedence_defaults_file_flags(tmp_path):
    cfg = tmp_path / "job.toml"
    cfg.write_text('objective = "jsd"\nlr = 5e-4\nsteps = 7\n[horizon]\nkind = "truncated"\nratio = 0.5\n')
    job, opd = resolve(_args(["--config", str(cfg), "--lr", "1e-3"]))
    assert job.steps == 7 and opd["objective"] == "jsd" and opd["lr"] == 1e-3
    assert opd["horizon"] == {"kind": "truncated", "ratio": 0.5}
    assert resolve(_args([]))[0] == DistillJob()


@pytest.mark.parametrize("text,flags,masks,density", [
    pytest.param("mask_density = 0.5\n", ["--masks", "m.safetensors"], "m.safetensors", None, id="masks-flag"),
    pytest.param('masks = "m.safetensors"\n', ["--mask-density", "0.25"], None, 0.25, id="density-flag"),
    pytest.param("mask_density = 0.5\n", ["--mask-density", "0.25"], None, 0.25, id="same-field-flag"),
])
def test_a_mask_flag_replaces_the_files_masks_or_density(tmp_path, text, flags, masks, density):
    cfg = tmp_path / "job.toml"
    cfg.write_text(text)
    job, opd = resolve(_args(["--config", str(cfg), *flags]))
    assert opd.get("masks") == masks and job.mask_density == density


@pytest.mark.parametrize("text,message", [
    pytest.param('masks = "m.safetensors"\nmask_density = 0.5\n', "sets both masks and mask_density",
                 id="masks-and-density"),
    pytest.param("lrr = 1e-3\n", "lrr: unknown field in config file", id="unknown-key"),
    pytest.param('objective = "kl"\n', "objective: must be one of", id="bad-objective"),
    pytest.param("steps = 0\n", "steps: must be >= 1", id="bad-steps"),
    pytest.param('steps = "ten"\n', "steps: must be an int", id="steps-type"),
    pytest.param("max_new_tokens = 9\n", "max_new_tokens: unknown field", id="task-owned-field"),
    pytest.param("[opd]\nlr = 1\n", "opd: tables are not fields", id="table"),
    pytest.param("betas = 0.9\n", "betas: must hold two numbers", id="betas-scalar"),
    pytest.param('betas = ["a", 0.9]\n', "betas[0]: must be a number, got str 'a'", id="betas-string"),
    pytest.param('loss_impl = "bogus"\n', "loss_impl: must be one of ('auto', ", id="bad-loss-impl"),
    pytest.param("weight_decay = nan\n", "weight_decay: must be a finite number >= 0, got nan", id="nan-decay"),
    pytest.param("lr = inf\n", "lr: must be a positive finite number, got inf", id="inf-lr"),
    pytest.param('teacher = ""\n', "teacher: must be a folder path, got an empty string", id="empty-teacher"),
    pytest.param('checkpoint_dir = ""\n', "checkpoint_dir: must be a folder path or None, got an empty string",
                 id="empty-checkpoint-dir"),
])
def test_config_errors_name_the_field(tmp_path, capsys, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)  # checkpoint_dir = "" wrote its checkpoints into the working directory
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    assert main(["distill", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastopd distill: error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--teacher", "--student", "--out"])
def test_an_empty_path_flag_is_refused_not_read_as_the_default(tmp_path, capsys, monkeypatch, flag):
    """`--teacher "$TEACHER"` with the variable unset must not train against the built-in teacher."""
    monkeypatch.chdir(tmp_path)
    argv = ["distill", "--out", str(tmp_path / "run"), flag, ""]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"fastopd distill: error: {flag[2:]}: must be a folder path, got an empty string" in err
    assert list(tmp_path.iterdir()) == []


def test_summary_table_lists_everything():
    table = summary_table({"student_accuracy_before": 0.1, "student_accuracy_after": 0.75, "teacher_accuracy": 1.0,
                           "rkl_before": 1.2, "rkl_after": 0.3, "wall_s": 12.5, "peak_mem_mb": 300.0})
    for text in ("student accuracy", "10.0%", "75.0%", "teacher accuracy", "100.0%", "1.2000", "0.3000", "12.5 s",
                 "300 MiB"):
        assert text in table


@pytest.mark.skipif(not (ASSETS / "teacher" / "config.json").is_file(), reason="built-in models not present")
def test_tiny_run_writes_the_run_folder_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')  # left by a run killed before its first checkpoint
    argv = ["distill", "--steps", "2", "--batch-size", "2", "--num-samples", "2", "--eval-size", "8",
            "--horizon", "full:6", "--mask-density", "0.5", "--schedule-steps", "3", "--out", str(out)]
    assert main(argv + ["--resume"]) == 0  # nothing to resume: a fresh run, with a notice
    text = capsys.readouterr().out
    assert f"no checkpoint in {out / 'checkpoints'}: starting a fresh run" in text
    assert "student accuracy" in text and "teacher accuracy" in text and "run folder" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["student_accuracy_after"] <= 1
    assert summary["teacher_accuracy"] > 0.9
    for name in ("summary.md", "config.json", "loss.png", "accuracy.png", "checkpoints/latest"):
        assert (out / name).is_file(), name
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert main(argv[:2] + ["3"] + argv[3:] + ["--resume"]) == 0  # continue the same run to step 3
    assert "resuming from" in capsys.readouterr().out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["steps_this_process"] == 1  # the wall time and split: this process's


@pytest.mark.parametrize("argv,message", [
    pytest.param(["--masks", "/nonexistent/m.safetensors"], "masks: /nonexistent/m.safetensors is not a file",
                 id="missing-masks-file"),
    pytest.param(["--device", "gpu"], "device: 'gpu' is not a torch device", id="bad-device"),
    pytest.param(["--resume", "--steps", "2"], "steps: 2 is below the step the run already reached (3",
                 id="resume-below-reached-step"),
    pytest.param(["--steps", "5"], "already holds checkpoints of a run (newest: step_00000003); pass --resume",
                 id="fresh-run-over-checkpoints"),
    pytest.param(["--resume", "--threads", "100000"], "threads: 100000 is more than the", id="threads-over-cpus"),
])
def test_bad_flags_are_reported_before_anything_is_written(tmp_path, capsys, argv, message):
    import torch

    from fastopd.train import checkpoint as ckpt

    out = tmp_path / "run"
    ckpt.save_checkpoint(out / "checkpoints", 3, model_state={"w": torch.zeros(1)}, optimizer_state=None,
                         trainer_state={})  # a run that reached step 3
    assert main(["distill", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastopd distill: error: ") and message in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]


def test_resume_needs_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where a fresh run's default folder would go
    assert main(["distill", "--resume", "--steps", "1", "--eval-size", "4"]) == 2
    assert list(tmp_path.iterdir()) == []
    assert "resume: --resume needs --out DIR" in capsys.readouterr().err


@pytest.mark.skipif(not (ASSETS / "teacher" / "config.json").is_file(), reason="built-in models not present")
def test_config_checkpoint_dir_is_honoured(tmp_path, capsys):
    cfg = tmp_path / "job.toml"
    cfg.write_text(f'checkpoint_dir = "{tmp_path / "elsewhere"}"\n')
    argv = ["distill", "--config", str(cfg), "--steps", "1", "--batch-size", "2", "--num-samples", "1",
            "--eval-size", "4", "--horizon", "full:4", "--schedule-steps", "2", "--out", str(tmp_path / "run")]
    assert main(argv) == 0
    assert (tmp_path / "elsewhere" / "step_00000001").is_dir() and not (tmp_path / "run" / "checkpoints").exists()
    assert f"checkpoints: {tmp_path / 'elsewhere'}" in capsys.readouterr().out
    assert main(argv[:4] + ["2"] + argv[5:] + ["--resume"]) == 0
    assert f"resuming from {tmp_path / 'elsewhere' / 'step_00000001'}" in capsys.readouterr().out


def test_missing_model_folder_is_reported(tmp_path, capsys):
    assert main(["distill", "--teacher", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "teacher:" in capsys.readouterr().err


TINY = ["--steps", "1", "--batch-size", "2", "--num-samples", "1", "--eval-size", "4", "--horizon", "full:4"]
needs_assets = pytest.mark.skipif(not (ASSETS / "teacher" / "config.json").is_file(),
                                  reason="built-in models not present")


def _mask_file(tmp_path, kind):
    import torch
    from safetensors.torch import save_file

    from fastopd.optim import masks as mask_lib

    path = tmp_path / f"{kind}.safetensors"
    if kind == "unknown-names":
        mask_lib.save(str(path), {"nope.weight": torch.tensor([0])}, shapes={"nope.weight": [4]})
    elif kind == "not-a-mask-file":
        save_file({"x": torch.zeros(2)}, str(path))
    else:
        path.write_bytes(b"not a safetensors file")
    return path


def _assert_one_line_error(err, message):
    assert err.startswith("fastopd distill: error: ") and message in err, err
    assert "Traceback" not in err and err.count("\n") == 1, err


@needs_assets
@pytest.mark.parametrize("kind,message", [
    pytest.param("unknown-names", "masks name parameters that are not optimized here: ['nope.weight']",
                 id="unknown-names"),
    pytest.param("not-a-mask-file", "not a fastopd mask file", id="not-a-mask-file"),
    pytest.param("corrupt", "masks: cannot read", id="corrupt"),
])
def test_a_masks_file_the_trainer_rejects_is_a_one_line_error_before_anything_is_written(tmp_path, capsys, kind,
                                                                                        message):
    out = tmp_path / "run"
    assert main(["distill", *TINY, "--masks", str(_mask_file(tmp_path, kind)), "--out", str(out)]) == 2
    _assert_one_line_error(capsys.readouterr().err, message)
    assert not out.exists()


def test_a_config_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["distill", "--config", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    _assert_one_line_error(capsys.readouterr().err, f"config file {str(tmp_path)!r} is a directory")


@needs_assets
def test_an_out_folder_that_cannot_be_created_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["distill", *TINY, "--out", str(tmp_path / "file" / "run")]) == 2
    _assert_one_line_error(capsys.readouterr().err, f"out: cannot write the run folder {tmp_path / 'file' / 'run'}")


@needs_assets
def test_config_json_is_standard_json_with_an_infinite_option(tmp_path):
    """max_grad_norm = inf (no clipping, the norm still logged) was written as a bare `Infinity`, which strict JSON
    readers (jq, JavaScript) refuse; it is recorded as the string TOML spells it, unlike None (null)."""
    (tmp_path / "run.toml").write_text("max_grad_norm = inf\npg_ratio_cap = inf\n")
    out = tmp_path / "run"
    assert main(["distill", *TINY, "--config", str(tmp_path / "run.toml"), "--out", str(out)]) == 0

    def refuse(constant):
        raise AssertionError(f"config.json holds the non-standard constant {constant}")

    recorded = json.loads((out / "config.json").read_text(), parse_constant=refuse)
    assert recorded["max_grad_norm"] == "inf" and recorded["pg_ratio_cap"] == "inf"
    assert recorded["lr"] == pytest.approx(1e-3)


@needs_assets
def test_resuming_with_another_student_architecture_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", *TINY, "--out", str(out)]) == 0
    written = (out / "config.json").read_text()
    capsys.readouterr()
    argv = ["distill", *TINY[:1], "2", *TINY[2:], "--student", str(ASSETS / "teacher"), "--out", str(out), "--resume"]
    assert main(argv) == 2
    _assert_one_line_error(capsys.readouterr().err, "does not match the student: embed_tokens.weight has shape")
    assert (out / "config.json").read_text() == written


@needs_assets
def test_a_runtime_error_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    """A RuntimeError while the trainer is built is also what a bug or a CUDA/NCCL failure raises: the error line
    comes with the traceback, not alone as if the input were bad."""
    import fastopd.train.trainer as trainer_mod

    def broken(*args, **kwargs):
        raise RuntimeError("boom inside the trainer")

    monkeypatch.setattr(trainer_mod, "OPDTrainer", broken)
    assert main(["distill", *TINY, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "fastopd distill: error: RuntimeError: boom inside the trainer" in err


@needs_assets
def test_resume_reports_the_checkpoints_masks_not_the_flags(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["distill", *TINY, "--mask-density", "0.5", "--schedule-steps", "3", "--out", str(out)]) == 0
    assert "sparse masks (50.0% trainable)" in capsys.readouterr().out
    steps = lambda k: ["distill", "--steps", str(k), *TINY[2:], "--schedule-steps", "3", "--out", str(out),  # noqa: E731
                       "--resume"]
    assert main(steps(2) + ["--mask-density", "0.1"]) == 0
    text = capsys.readouterr().out
    assert "sparse masks (50.0% trainable)" in text  # what the optimizer trains, not the flag's 10%
    assert "note: resuming with the checkpoint's sparse masks; the masks given" in text
    assert "note: options differ" not in text  # the masks are reported apart
    assert json.loads((out / "config.json").read_text())["masks_from_checkpoint"] is True
    assert main(steps(3) + ["--objective", "rkl", "--lr", "0.002"]) == 0  # no mask flag: the masked run goes on masked
    text = capsys.readouterr().out
    assert "sparse masks (50.0% trainable)" in text and "(the run was started with masks)" in text
    assert ("note: options differ from the checkpoint's run, and apply from step 2 on: lr 0.001 -> 0.002, "
            "objective 'fkl' -> 'rkl'") in text


@needs_assets
def test_resume_without_the_config_that_moved_the_checkpoints_is_refused_not_started_afresh(tmp_path, capsys):
    """A run whose config file put its checkpoints elsewhere, resumed without that file, looked in <out>/checkpoints,
    found none, and started afresh: dropping the run's metrics.jsonl and eval.jsonl."""
    out, elsewhere = tmp_path / "run", tmp_path / "ckpts"
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'checkpoint_dir = "{elsewhere}"\n')
    assert main(["distill", *TINY, "--schedule-steps", "3", "--config", str(cfg), "--out", str(out)]) == 0
    capsys.readouterr()
    logs = (out / "metrics.jsonl").read_text()
    assert main(["distill", *TINY, "--schedule-steps", "3", "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert (f"fastopd distill: error: resume: no checkpoint in {out / 'checkpoints'}, but the run folder's "
            f"config.json records checkpoint_dir {elsewhere}, which holds them (newest: step_00000001)") in err
    assert (out / "metrics.jsonl").read_text() == logs and not (out / "checkpoints").exists()
    assert main(["distill", "--steps", "2", *TINY[2:], "--schedule-steps", "3", "--config", str(cfg), "--out",
                 str(out), "--resume"]) == 0
    assert "resuming from" in capsys.readouterr().out


@needs_assets
def test_resume_names_job_options_the_checkpoint_does_not_hold(tmp_path, capsys):
    """--batch-size, --eval-size and --teacher are no OPDConfig fields: a resume that changes them is named in the
    note against the run folder's config.json, as --lr is."""
    out = tmp_path / "run"
    assert main(["distill", *TINY, "--schedule-steps", "3", "--out", str(out)]) == 0
    capsys.readouterr()
    argv = ["distill", "--steps", "2", *TINY[2:], "--schedule-steps", "3", "--out", str(out), "--resume"]
    assert main([*argv, "--batch-size", "3", "--eval-size", "5", "--teacher", str(ASSETS / "student")]) == 0
    text = capsys.readouterr().out
    assert ("note: options differ from the checkpoint's run, and apply from step 1 on: batch_size 2 -> 3, "
            "eval_size 4 -> 5, teacher ") in text
    assert main(["distill", "--steps", "3", *TINY[2:], "--batch-size", "3", "--eval-size", "5", "--teacher",
                 str(ASSETS / "student"), "--schedule-steps", "3", "--out", str(out), "--resume"]) == 0
    assert "note: options differ" not in capsys.readouterr().out  # the same as the resumed run's: nothing to say


@needs_assets
@pytest.mark.parametrize("setup,message", [
    pytest.param("grad-accum", "grad_accum: 2 prompts per step cannot be split into grad_accum=5", id="grad-accum"),
    pytest.param("impl-bogus", "FASTOPD_IMPL must be one of", id="impl-bogus"),
    pytest.param("impl-cuda", "FASTOPD_IMPL='cuda' cannot run divergence_chunk here", id="impl-cuda-on-cpu"),
])
def test_settings_the_run_cannot_use_are_one_line_errors_before_anything_is_written(tmp_path, capsys, monkeypatch,
                                                                                   setup, message):
    import torch

    argv = ["distill", *TINY, "--out", str(tmp_path / "run")]
    if setup == "grad-accum":
        (tmp_path / "ga.toml").write_text("grad_accum = 5\n")
        argv += ["--config", str(tmp_path / "ga.toml")]
    else:
        if setup == "impl-cuda" and torch.cuda.is_available():
            pytest.skip("CUDA is available here")
        monkeypatch.setenv("FASTOPD_IMPL", setup.split("-")[1])
    assert main(argv) == 2
    _assert_one_line_error(capsys.readouterr().err, message)
    assert not (tmp_path / "run").exists()


@needs_assets
def test_checkpoint_dir_none_runs_and_a_config_checkpoint_dir_in_use_is_named(tmp_path, capsys):
    import torch

    from fastopd.train import checkpoint as ckpt
    from fastopd.train.cli import DistillJob, distill

    job = DistillJob(steps=1, batch_size=2, eval_size=4, out=str(tmp_path / "r0"))
    assert distill(job, {"checkpoint_dir": None, "num_samples": 1, "horizon": "full:4"}, progress=False) == 0
    assert not (tmp_path / "r0" / "checkpoints").exists()
    used = tmp_path / "ckpts"
    ckpt.save_checkpoint(used, 3, model_state={"w": torch.zeros(1)}, optimizer_state=None, trainer_state={})
    (tmp_path / "c.toml").write_text(f"checkpoint_dir = {str(used)!r}\n")
    capsys.readouterr()
    assert main(["distill", *TINY, "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "r1")]) == 2
    _assert_one_line_error(capsys.readouterr().err, f"checkpoint_dir: {used} already holds checkpoints of a run "
                           "(newest: step_00000003); pass --resume to continue it, or give another checkpoint_dir")
