"""OPDTrainer under data parallelism (gloo, CPU): DDP and FSDP2 on 2 ranks take the same steps as one process on
the same global batch, checkpoints written once resume on another world size, sparse masks must agree across
ranks, and a rank that raises under torchrun ends the whole job with its error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from dist_harness import needs_fsdp2, run_ranks

from fastopd.models import Transformer, TransformerConfig
from fastopd.train import OPDConfig, OPDTrainer
from fastopd.train.task import EOS, PAD, AdditionTask

TASK = AdditionTask(digits=2)
PROMPTS = 8  # the global batch of every step


def _models():
    def make(seed, hidden, layers):
        torch.manual_seed(seed)
        cfg = TransformerConfig(vocab_size=TASK.tokenizer.vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                                num_layers=layers, num_heads=2, max_position_embeddings=48)
        return Transformer(cfg)

    return make(0, 32, 2), make(1, 48, 1)


def _hf_student(kind: str, seed: int = 0):
    """A random-weight Hugging Face model (no download), sized for the task's vocabulary."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    v = TASK.tokenizer.vocab_size
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=2, n_positions=64)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.LlamaConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def hf_worker(rank: int, world: int, kind: str, mode: str) -> dict:
    student, teacher = _hf_student(kind), _hf_student(kind, seed=1)  # a Hugging Face teacher, sharded too
    trainer = OPDTrainer(student, teacher, _config(parallel=mode if world > 1 else "none"))
    trainer.train(_source, 2, progress=False)
    out = _state(trainer)
    out["fsdp_groups"] = sum(type(m).__name__.startswith("FSDP") for m in trainer.module.modules())
    out["teacher_groups"] = sum(type(m).__name__.startswith("FSDP") for m in teacher.modules())
    out["teacher_params"] = sorted({type(p).__name__ for p in teacher.parameters()})
    return out


def _config(**kw) -> OPDConfig:
    # top_k=1: the rollouts are the greedy ones whatever the RNG, so runs on different world sizes see the same data
    base = dict(objective="rkl", lr=1e-3, num_samples=2, max_new_tokens=6, top_k=1, eos_token_id=EOS,
                pad_token_id=PAD, seed=0, grad_accum=2, track_density=False)
    return OPDConfig(**{**base, **kw})


def _source(k: int):
    return TASK.train_prompts(k, PROMPTS)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _state(trainer: OPDTrainer) -> dict:
    return {"params": {n: _full(p).detach().clone() for n, p in trainer.student.named_parameters()},
            "history": [{k: m[k] for k in ("loss", "rkl", "tokens", "grad_norm")} for m in trainer.history]}


def train_worker(rank: int, world: int, steps: int, overrides: dict, mode: str = "ddp") -> dict:
    student, teacher = _models()
    trainer = OPDTrainer(student, teacher, _config(parallel=mode if world > 1 else "none", **overrides))
    trainer.train(_source, steps, progress=False)
    out = _state(trainer)
    out["mode"] = trainer.parallel.mode
    out["sharded"] = [type(p).__name__ for p in trainer.student.parameters()]
    out["placements"] = sorted({str(tuple(p.placements)) for p in trainer.student.parameters()
                                if hasattr(p, "placements")})
    out["fsdp_groups"] = sum(type(m).__name__.startswith("FSDP") for m in trainer.module.modules())
    out["teacher_sharded"] = trainer.teacher_sharded
    out["teacher_params"] = sorted({type(p).__name__ for p in teacher.parameters()})
    out["teacher_groups"] = sum(type(m).__name__.startswith("FSDP") for m in teacher.modules())
    return out


def _single(steps: int, **overrides) -> dict:
    student, teacher = _models()
    trainer = OPDTrainer(student, teacher, _config(parallel="none", **overrides))
    trainer.train(_source, steps, progress=False)
    return _state(trainer)


def _assert_same_run(got: dict, want: dict, what: str) -> None:
    for a, b in zip(got["history"], want["history"]):
        assert a["tokens"] == b["tokens"], what
        for key in ("loss", "rkl", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), f"{what}: {key}"
    for name, p in want["params"].items():
        torch.testing.assert_close(got["params"][name], p, rtol=1e-5, atol=2e-6,
                                   msg=lambda m, name=name: f"{what} {name}: {m}")


def test_ddp_two_ranks_equal_one_process_on_the_global_batch():
    ranks = run_ranks(train_worker, 2, 3, {})
    want = _single(3)
    assert [r["mode"] for r in ranks] == ["ddp", "ddp"]
    for rank, got in enumerate(ranks):
        _assert_same_run(got, want, f"rank {rank}")
    assert want["params"]["embed_tokens.weight"].ne(_models()[0].embed_tokens.weight).any()  # it did train


@needs_fsdp2
def test_fsdp2_two_ranks_equal_one_process_and_resume_on_one(tmp_path):
    ckdir = str(tmp_path / "ck")
    ranks = run_ranks(train_worker, 2, 3, {"checkpoint_dir": ckdir, "checkpoint_every": 2}, "fsdp2")
    want = _single(3)
    for rank, got in enumerate(ranks):
        assert got["mode"] == "fsdp2" and set(got["sharded"]) == {"DTensor"}, got["sharded"]
        assert got["placements"] == ["(Shard(dim=0),)"], got["placements"]
        assert got["fsdp_groups"] == 3, got["fsdp_groups"]  # each of the 2 decoder layers, and the root
        # The teacher is sharded too (its 1 decoder layer and its root), and every parameter is sharded again
        # after scoring: each layer is gathered only for its own forward.
        assert got["teacher_sharded"] and got["teacher_groups"] == 2, got
        assert got["teacher_params"] == ["DTensor"], got["teacher_params"]
        _assert_same_run(got, want, f"fsdp2 rank {rank}")
    assert sorted(os.listdir(ckdir)) == ["latest", "step_00000002", "step_00000003"]
    want4 = _single(4)
    resumed = _single(4, checkpoint_dir=ckdir, resume=True)  # full (gathered) state: loads in one process
    _assert_same_run(resumed, want4, "fsdp2 2 ranks -> 1 process")


@needs_fsdp2
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_fsdp2_hugging_face_students_shard_per_layer_and_equal_one_process(kind):
    ranks = run_ranks(hf_worker, 2, kind, "fsdp2")
    want = hf_worker(0, 1, kind, "none")
    for rank, got in enumerate(ranks):
        assert got["fsdp_groups"] == 3, got["fsdp_groups"]
        assert got["teacher_groups"] == 3 and got["teacher_params"] == ["DTensor"], got
        _assert_same_run(got, want, f"{kind} fsdp2 rank {rank}")


def test_checkpoint_from_two_ranks_resumes_on_one_and_on_three(tmp_path):
    ckdir = str(tmp_path / "ck")
    run_ranks(train_worker, 2, 2, {"checkpoint_dir": ckdir, "checkpoint_every": 2})
    saved = sorted(os.listdir(ckdir))
    assert saved == ["latest", "step_00000002"], saved  # written once, by rank 0
    want = _single(4)
    resumed = _single(4, checkpoint_dir=ckdir, resume=True)
    _assert_same_run(resumed, want, "2 ranks -> 1 process")
    ck3 = str(tmp_path / "ck3")
    run_ranks(train_worker, 2, 2, {"checkpoint_dir": ck3, "checkpoint_every": 2})
    ranks = run_ranks(train_worker, 3, 4, {"checkpoint_dir": ck3, "resume": True})
    for rank, got in enumerate(ranks):
        _assert_same_run(got, want, f"2 ranks -> 3 ranks, rank {rank}")


def _masks(student, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=g) < 0.3 for n, p in student.named_parameters() if p.dim() == 2}


def sparse_worker(rank: int, world: int, same: bool, mode: str = "ddp", steps: int = 2,
                  overrides: dict | None = None) -> str | dict:
    student, teacher = _models()
    masks = _masks(student, 7 if same else 7 + rank)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    try:
        trainer = OPDTrainer(student, teacher, _config(parallel=mode if world > 1 else "none", masks=masks,
                                                       **(overrides or {})))
    except ValueError as exc:
        return str(exc)
    trainer.train(_source, steps, progress=False)
    out = _state(trainer)
    unmasked_same = all(torch.equal(out["params"][n][~m], before[n][~m]) for n, m in masks.items())
    return {"unmasked_same": unmasked_same, "digest": trainer.optimizer.masks_digest(),
            "density": [m.get("update_density") for m in trainer.history], **out}


def test_sparse_adamw_under_ddp_keeps_ranks_identical():
    a, b = run_ranks(sparse_worker, 2, True)
    assert a["unmasked_same"] and b["unmasked_same"] and a["digest"] == b["digest"]
    for name, p in a["params"].items():
        assert torch.equal(p, b["params"][name]), name


@needs_fsdp2
def test_sparse_adamw_under_fsdp2_equals_one_process_and_resumes_elsewhere(tmp_path):
    ckdir = str(tmp_path / "ck")
    ranks = run_ranks(sparse_worker, 2, True, "fsdp2", 3, {"checkpoint_dir": ckdir, "checkpoint_every": 2})
    want = sparse_worker(0, 1, True, "none", 3)
    assert want["unmasked_same"]
    for rank, got in enumerate(ranks):
        assert got["unmasked_same"], rank
        _assert_same_run(got, want, f"sparse fsdp2 rank {rank}")
    # the step-2 checkpoint (compact state gathered with global indices) resumes in one process and on 3 ranks
    want4 = sparse_worker(0, 1, True, "none", 4)
    one = sparse_worker(0, 1, True, "none", 4, {"checkpoint_dir": ckdir, "resume": True})
    _assert_same_run(one, want4, "sparse fsdp2 2 ranks -> 1 process")
    for rank, got in enumerate(run_ranks(sparse_worker, 3, True, "fsdp2", 4,
                                         {"checkpoint_dir": ckdir, "resume": True})):
        _assert_same_run(got, want4, f"sparse fsdp2 2 ranks -> 3 ranks, rank {rank}")


def test_sparse_masks_that_differ_across_ranks_raise_on_every_rank():
    msgs = run_ranks(sparse_worker, 2, False)
    for m in msgs:
        assert isinstance(m, str) and "masks differ across ranks" in m and "[1]" in m


CRASH = r'''
import sys, torch
from test_data_parallel_trainer import _models, _config, _source
from fastopd.train import OPDTrainer
student, teacher = _models()
trainer = OPDTrainer(student, teacher, _config(parallel="ddp"))
def source(k):
    if k == 1 and trainer.parallel.rank == 1:
        raise RuntimeError("rank 1 fails at step 1 on purpose")
    return _source(k)
trainer.train(source, 3, progress=False)
print("finished", flush=True)
'''


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 ARGV...` on a free local port, this folder importable, output captured."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", *argv],
                          env=env, capture_output=True, text=True, timeout=180)


def test_a_rank_that_raises_ends_the_torchrun_job(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    proc = _torchrun(str(script))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "rank 1 fails at step 1 on purpose" in out, out[-3000:]
    assert "finished" not in proc.stdout


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp2", marks=needs_fsdp2)])
def test_fastopd_distill_under_torchrun_writes_one_run_folder(tmp_path, mode):
    out = tmp_path / "run"
    proc = _torchrun("-m", "fastopd.cli", "distill", "--steps", "2", "--batch-size", "4", "--num-samples", "2",
                     "--eval-size", "8", "--eval-every", "1", "--horizon", "full:6", "--parallel", mode,
                     "--mask-density", "0.5", "--out", str(out))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert proc.stdout.count(f"2 ranks ({mode})") == 1 and proc.stdout.count("student accuracy") == 1, proc.stdout
    assert "sparse masks (50.0% trainable)" in proc.stdout, proc.stdout  # counted over FSDP2's shard-local masks
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_00000002"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # one line per step, from rank 0 only


def sharded_teacher_worker(rank: int, world: int) -> dict:
    """Scores a 3-layer teacher before and after `shard_frozen`, counting the teacher layers whose weights are
    gathered whenever one of them runs."""
    import fastopd.rollout.adapters as adapters
    from fastopd.distributed.data_parallel import DataParallel, is_dtensor
    from fastopd.rollout import RolloutEngine

    torch.manual_seed(1)
    teacher = Transformer(TransformerConfig(vocab_size=TASK.tokenizer.vocab_size, hidden_size=48, intermediate_size=96,
                                            num_layers=3, num_heads=2, max_position_embeddings=48)).eval()
    student = _models()[0]
    engine = RolloutEngine(student, teacher, horizon=6, num_samples=2, temperature=0, pad_token_id=PAD)
    batch = engine.generate(TASK.train_prompts(0, 3))
    want = engine.score(batch).clone()
    layers = engine.teacher.layer_modules()
    par = DataParallel("fsdp2", rank, world)
    assert par.shard_frozen(teacher, layers)
    gathered, inner = [], adapters.llama_layer

    def counting(layer, *args, **kwargs):
        gathered.append(sum(not is_dtensor(next(m.parameters())) for m in layers))
        return inner(layer, *args, **kwargs)

    adapters.llama_layer = counting
    try:
        got = par.run_frozen(teacher, engine.score, batch)
    finally:
        adapters.llama_layer = inner
    return {"max_equal": float((got - want).abs().max()), "gathered": gathered,
            "after": sorted({type(p).__name__ for p in teacher.parameters()})}


@needs_fsdp2
def test_sharded_teacher_scores_one_gathered_layer_at_a_time():
    for got in run_ranks(sharded_teacher_worker, 2):
        assert got["max_equal"] == 0.0, got  # the same hidden states as the unsharded teacher's
        assert got["gathered"] and max(got["gathered"]) == 1, got["gathered"]  # never two layers at once
        assert got["after"] == ["DTensor"], got["after"]


@needs_fsdp2
def test_hsdp_2x2_equals_one_process_and_checkpoints_resume_on_one(tmp_path):
    """HSDP on 4 ranks: parameters sharded over groups of 2 and replicated across the 2 groups (placements
    (Replicate(), Shard(0))), dense AdamW and sparse masks; the same steps as one process; its checkpoint (full
    state) resumes in one process."""
    ckdir = str(tmp_path / "ck")
    ranks = run_ranks(train_worker, 4, 3, {"hsdp_shard_size": 2, "checkpoint_dir": ckdir, "checkpoint_every": 2},
                      "hsdp")
    want = _single(3)
    for rank, got in enumerate(ranks):
        assert got["mode"] == "hsdp" and set(got["sharded"]) == {"DTensor"}, got["sharded"]
        assert got["placements"] == ["(Replicate(), Shard(dim=0))"], got["placements"]
        assert got["teacher_sharded"] and got["teacher_params"] == ["DTensor"], got
        _assert_same_run(got, want, f"hsdp rank {rank}")
    want4 = _single(4)
    _assert_same_run(_single(4, checkpoint_dir=ckdir, resume=True), want4, "hsdp 4 ranks -> 1 process")
    # Sparse masks, and the update density counted once per shard group (replicas hold the same coordinates).
    sparse = run_ranks(sparse_worker, 4, True, "hsdp", 2, {"hsdp_shard_size": 2, "track_density": True})
    one = sparse_worker(0, 1, True, "none", 2, {"track_density": True})
    assert one["density"][-1] > 0
    for rank, got in enumerate(sparse):
        assert got["unmasked_same"], rank
        _assert_same_run(got, one, f"sparse hsdp rank {rank}")
        assert got["density"] == pytest.approx(one["density"], rel=1e-6), (got["density"], one["density"])


def hsdp_bad_shard_worker(rank: int, world: int) -> str:
    from fastopd.distributed.data_parallel import DataParallel

    try:
        DataParallel.resolve("hsdp", 3)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_hsdp_shard_size_must_divide_the_world():
    for message in run_ranks(hsdp_bad_shard_worker, 2):
        assert "shard group size 3 must divide the world size 2" in message, message


def _privileged(prompts):
    return [[p[0]] + list(p) for p in prompts]  # the teacher reads one more token of context


def self_distill_worker(rank: int, world: int, mode: str) -> dict:
    student, _ = _models()
    trainer = OPDTrainer(student, student, _config(parallel=mode if world > 1 else "none"),
                         teacher_prompt_fn=_privileged)
    trainer.train(_source, 2, progress=False)
    out = _state(trainer)
    out["teacher_sharded"] = trainer.teacher_sharded
    return out


@needs_fsdp2
def test_fsdp2_self_distillation_equals_one_process():
    """The student as its own teacher (privileged context): under FSDP2 it is one module, scored gathered, never
    sharded a second time as a teacher (which raised in the broadcast of its DTensor parameters)."""
    want = self_distill_worker(0, 1, "none")
    for rank, got in enumerate(run_ranks(self_distill_worker, 2, "fsdp2")):
        assert got["teacher_sharded"] is False
        _assert_same_run(got, want, f"fsdp2 self-distillation rank {rank}")


@pytest.mark.parametrize("cuda,backend", [pytest.param(True, "cpu:gloo,cuda:nccl", id="cuda-machine"),
                                          pytest.param(False, "gloo", id="cpu-machine")])
def test_init_from_env_uses_gloo_for_cpu_tensors_also_on_a_cuda_machine(monkeypatch, cuda, backend):
    """`torchrun ... fastopd distill --device cpu` on a GPU machine: NCCL has no CPU collectives, so the process
    group must give CPU tensors gloo."""
    import torch.distributed as dist

    from fastopd.distributed import data_parallel

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # no device to select: set_device is not called
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(backend))
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **kw: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert data_parallel.default_backend() == backend
    assert data_parallel.init_from_env() and calls == [backend]


def test_hsdp_mesh_is_built_on_the_students_device_type_also_on_a_cuda_machine(monkeypatch):
    """The mesh follows the device of the module `wrap` shards (a CPU student here), not whether CUDA exists."""
    import torch.distributed as dist
    import torch.distributed.device_mesh as device_mesh
    import torch.distributed.fsdp as fsdp

    from fastopd.distributed.data_parallel import DataParallel

    meshes = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device_mesh, "init_device_mesh",
                        lambda kind, shape, mesh_dim_names: meshes.append((kind, shape)) or "mesh")
    monkeypatch.setattr(dist, "broadcast", lambda t, src: None)
    monkeypatch.setattr(fsdp, "fully_shard", lambda m, mesh: m)
    monkeypatch.setattr(fsdp, "register_fsdp_forward_method", lambda m, name: None)
    par = DataParallel("hsdp", 0, 4, 2)
    par.wrap(torch.nn.Linear(2, 2))
    assert meshes == [("cpu", (2, 2))] and par.mesh == "mesh"
