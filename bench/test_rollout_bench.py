"""Rollout benchmark: fastopd's RolloutEngine beside Hugging Face generate, in one process and one run.

CPU (always): a random-weight Llama (4 layers, hidden 256, intermediate 688, 4 heads, vocab 8192), batch 8,
prompt 32, 128 new tokens, greedy, no EOS (every provider generates exactly 128 tokens per row):
- fastopd:     RolloutEngine(temperature=0); fastopd-sampled: the same at temperature 1 (the OPD setting)
- fastopd-torch-mm: fastopd greedy with FASTOPD_IMPL=torch, i.e. torch.mm/MKL in place of fastopd's CPU decode
               kernel (only where that kernel is usable: it shows what the kernel contributes on this CPU)
- hf-dynamic:  model.generate(do_sample=False, cache_implementation="dynamic")
- hf-static:   model.generate(do_sample=False, cache_implementation="static")
The providers run interleaved round by round (one round = each provider once) so that load from other processes
on a shared machine falls on all of them alike; tokens/s = 8 * 128 / median seconds. Before timing, fastopd's
greedy tokens are checked equal to HF's.
Also: time and KV-cache bytes vs horizon H in {10, 25, 50, 100}% of 512 (sampled, no EOS), and the prefill
saved by prefix sharing at num_samples=4 (8 prompts of 128 tokens, horizon 1, and teacher scoring of 32 tokens).

CUDA (only when a GPU is visible; skipped otherwise): a 0.5B-scale Qwen2-shaped config in bf16, batch 8, prompt
128, 256 new tokens: fastopd with its decode step captured in a CUDA graph, HF dynamic, fastopd eager (interleaved
rounds), then HF static alone (transformers compiles its decode step on CUDA, and that cold compile is slow). The
results are written after every round and every HF static run, so a run stopped at its deadline keeps them.

    flock /tmp/fastopd_bench.lock python -m pytest bench/test_rollout_bench.py -q -p no:cacheprovider

writes bench/results/rollout_<device>.json and .md ($OUT if set; the last test of this file writes every device's,
the CUDA test its own as it goes). FASTOPD_BENCH_ROUNDS (default 5) sets the rounds, FASTOPD_BENCH_THREADS
(default 1) torch's CPU threads for every provider, FASTOPD_COMMIT the commit the results name.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import platform
import statistics
import time

import pytest
import torch
import transformers

import fastopd
from fastopd import _dispatch
from fastopd.bench import _percentile, cpu_name
from fastopd.models.decode_linear import cpu_isa
from fastopd.rollout import Horizon, RolloutEngine

ROUNDS = int(os.environ.get("FASTOPD_BENCH_ROUNDS", "5"))
THREADS = int(os.environ.get("FASTOPD_BENCH_THREADS", "1"))
HERE = os.path.dirname(os.path.abspath(__file__))
COMMAND = "flock /tmp/fastopd_bench.lock python -m pytest bench/test_rollout_bench.py -q -p no:cacheprovider"
RESULTS: dict[str, dict] = {}  # device -> section -> data

transformers.logging.set_verbosity_error()


def _stats(times: list[float]) -> dict[str, float]:
    """Median and 20th/80th percentiles (linearly interpolated, as fastopd bench) of `times`."""
    return dict(median_s=statistics.median(times), p20_s=_percentile(times, 0.2), p80_s=_percentile(times, 0.8),
                rounds=len(times))


def _llama_cpu() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def cpu_model():
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield _llama_cpu()
    torch.set_num_threads(previous)


def _hf_generate(model, ids, new_tokens, cache, sync=lambda: None):
    def run():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, cache_implementation=cache)
        sync()
        return out
    return run


def _with_env(env: dict[str, str], fn):
    """``fn()`` with the environment variables ``env`` set, restored afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _interleaved(benchmark, providers: dict, rounds: int, cpu_times: dict | None = None,
                 on_round=None) -> dict[str, list[float]]:
    """Wall-clock seconds per provider over interleaved rounds; with ``cpu_times``, also this process's CPU
    seconds (on a shared machine the CPU time is what load from other processes disturbs least);
    ``on_round(times)`` after every round."""
    times: dict[str, list[float]] = {name: [] for name in providers}

    def one_round():
        for name, fn in providers.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(time.process_time() - c0)
        if on_round is not None:
            on_round(times)

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=0, iterations=1)
    return times


def _throughput_section(times, tokens_per_call, hf_names, info, cpu_times=None) -> dict:
    """Per-provider statistics of the providers measured so far (those with no time yet are left out), and the
    ratios to the best of the HF providers among them."""
    section = {"providers": {}, **info}
    for name, ts in times.items():
        if not ts:
            continue
        st = _stats(ts)
        section["providers"][name] = dict(st, tokens_per_s=tokens_per_call / st["median_s"])
        if cpu_times:
            section["providers"][name]["cpu_median_s"] = statistics.median(cpu_times[name])
    hf = [n for n in hf_names if n in section["providers"]]
    if hf:
        best_hf = max(section["providers"][n]["tokens_per_s"] for n in hf)
        for p in section["providers"].values():
            p["x_best_hf"] = p["tokens_per_s"] / best_hf
        if cpu_times:
            best_hf_cpu = min(section["providers"][n]["cpu_median_s"] for n in hf)
            for p in section["providers"].values():
                p["x_best_hf_cpu_time"] = best_hf_cpu / p["cpu_median_s"]
    return section


def _record_throughput(device: str, times, tokens_per_call, hf_names, info, out_dir: str | None = None) -> dict:
    """Stores the throughput section of what was measured so far and writes this device's files at once: called
    after every measured configuration on the GPU, so that a run killed at its deadline keeps it."""
    section = _throughput_section(times, tokens_per_call, hf_names, info)
    RESULTS.setdefault(device, {})["throughput"] = section
    _save(device, out_dir)
    return section


def test_cpu_rollout_vs_hf_generate(benchmark, cpu_model):
    batch, prompt, new = 8, 32, 128
    ids = torch.randint(3, 8192, (batch, prompt), generator=torch.Generator().manual_seed(1))
    greedy = RolloutEngine(cpu_model, horizon=Horizon.full(new), temperature=0, pad_token_id=0)
    sampled = RolloutEngine(cpu_model, horizon=Horizon.full(new), temperature=1.0, pad_token_id=0)
    providers = {
        "fastopd": lambda: greedy.generate(ids),
        "fastopd-sampled": lambda: sampled.generate(ids),
        "hf-dynamic": _hf_generate(cpu_model, ids, new, "dynamic"),
        "hf-static": _hf_generate(cpu_model, ids, new, "static"),
    }
    if _dispatch.available("decode_linear", "cpu", "cpu") is None:
        # fastopd's decode step with torch.mm/MKL in place of its own CPU decode kernel (FASTOPD_IMPL=torch, on a
        # copy of the model: the layout is chosen when the decode weights are packed).
        mm_engine = RolloutEngine(copy.deepcopy(cpu_model), horizon=Horizon.full(new), temperature=0, pad_token_id=0)
        providers["fastopd-torch-mm"] = lambda: _with_env(dict(FASTOPD_IMPL="torch"), lambda: mm_engine.generate(ids))
    ours = providers["fastopd"]()  # warm-up, and the check that the comparison is like for like
    for name in [n for n in providers if n != "fastopd"]:
        out = providers[name]()
        if name.startswith("hf"):
            out = out[:, prompt:]
        elif name == "fastopd-torch-mm":
            out = out.completion_ids
        else:
            continue
        assert torch.equal(out, ours.completion_ids), f"{name} tokens differ from fastopd's"
    cpu_times: dict[str, list[float]] = {}
    times = _interleaved(benchmark, providers, ROUNDS, cpu_times)
    section = _throughput_section(times, batch * new, ("hf-dynamic", "hf-static"), dict(
        model="LlamaForCausalLM random weights: 4 layers, hidden 256, intermediate 688, 4 heads, vocab 8192, fp32",
        batch=batch, prompt=prompt, new_tokens=new, kv_cache_bytes=greedy.kv_cache_bytes), cpu_times)
    RESULTS.setdefault("cpu", {})["throughput"] = section
    benchmark.extra_info.update({k: v["tokens_per_s"] for k, v in section["providers"].items()})


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 1.0], ids=lambda r: f"H{int(r * 100)}pct-of-512")
def test_cpu_horizon_sweep(benchmark, cpu_model, ratio):
    batch, prompt = 8, 32
    ids = torch.randint(3, 8192, (batch, prompt), generator=torch.Generator().manual_seed(2))
    engine = RolloutEngine(cpu_model, horizon=Horizon.truncated(ratio, 512), temperature=1.0, pad_token_id=0)
    engine.generate(ids)
    times: list[float] = []

    def run():
        t0 = time.perf_counter()
        engine.generate(ids)
        times.append(time.perf_counter() - t0)

    benchmark.pedantic(run, rounds=max(2, ROUNDS // 2), warmup_rounds=0, iterations=1)
    h = engine.last_stats["horizon"]
    row = dict(_stats(times), ratio=ratio, horizon=h, tokens_per_s=batch * h / statistics.median(times),
               kv_cache_bytes=engine.kv_cache_bytes, kv_cache_columns=prompt + h)
    RESULTS.setdefault("cpu", {}).setdefault("horizon_sweep", []).append(row)
    benchmark.extra_info.update(row)


def test_cpu_prefix_sharing(benchmark, cpu_model):
    prompts, prompt, samples = 8, 128, 4
    ids = torch.randint(3, 8192, (prompts, prompt), generator=torch.Generator().manual_seed(3))
    engines = {
        "shared": RolloutEngine(cpu_model, teacher=cpu_model, horizon=1, num_samples=samples, temperature=1.0),
        "separate": RolloutEngine(cpu_model, teacher=cpu_model, horizon=1, num_samples=samples, temperature=1.0,
                                  share_prefix=False),
    }
    scored = RolloutEngine(cpu_model, horizon=32, num_samples=samples, temperature=1.0).generate(ids)
    providers = {}
    for name, engine in engines.items():
        providers[f"prefill-{name}"] = lambda e=engine: e.generate(ids)
        providers[f"score-{name}"] = lambda e=engine: e.score(scored)
    for fn in providers.values():
        fn()
    torch.testing.assert_close(engines["shared"].score(scored), engines["separate"].score(scored), rtol=1e-4,
                               atol=1e-4)
    times = _interleaved(benchmark, providers, ROUNDS)
    section = {"prompts": prompts, "prompt": prompt, "num_samples": samples, "score_horizon": 32,
               "prefill_tokens": {n: e.last_stats["prefill_tokens"] for n, e in engines.items()},
               "providers": {n: _stats(ts) for n, ts in times.items()}}
    for kind in ("prefill", "score"):
        section[f"{kind}_speedup"] = (section["providers"][f"{kind}-separate"]["median_s"]
                                      / section["providers"][f"{kind}-shared"]["median_s"])
    RESULTS.setdefault("cpu", {})["prefix_sharing"] = section
    benchmark.extra_info.update({k: v for k, v in section.items() if k.endswith("speedup")})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU rollout benchmark needs a CUDA device")
def test_cuda_rollout_vs_hf_generate(benchmark):
    """0.5B-scale Qwen2-shaped model (24 layers, hidden 896, 14 heads / 2 KV heads, intermediate 4864, vocab
    151936, tied), bf16, batch 8, prompt 128, 256 new tokens, greedy. Writes its results after every round."""
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                                   tie_word_embeddings=True)
    with torch.device("cuda"):  # random init on the GPU: seconds, where 0.5B parameters on the CPU take longer
        model = transformers.Qwen2ForCausalLM(cfg)
    model = model.to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    batch, prompt, new = 8, 128, 256
    ids = torch.randint(3, cfg.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(1)).cuda()
    sync = torch.cuda.synchronize
    eager = RolloutEngine(model, horizon=new, temperature=0, pad_token_id=0)
    graphed = RolloutEngine(model, horizon=new, temperature=0, pad_token_id=0, cuda_graphs=True)

    def ours(engine):
        def run():
            out = engine.generate(ids)
            sync()
            return out
        return run

    # The headline pair first, then fastopd eager; HF static last and alone (below).
    providers = {"fastopd-cudagraph": ours(graphed), "hf-dynamic": _hf_generate(model, ids, new, "dynamic", sync),
                 "fastopd": ours(eager)}
    hf_names = ("hf-dynamic", "hf-static")
    cold_s, outs = {}, {}
    for name, fn in providers.items():  # warm-up: graph capture, cuBLAS handles; the first call's seconds kept
        t0 = time.perf_counter()
        outs[name] = fn()
        cold_s[name] = time.perf_counter() - t0
    hf_tokens = outs["hf-dynamic"][:, prompt:]
    # bf16 greedy decoding may part ways where two logits nearly tie: recorded, not asserted
    match = {n: float((outs[n].completion_ids == hf_tokens).float().mean()) for n in ("fastopd-cudagraph", "fastopd")}
    del outs
    info = dict(model="Qwen2ForCausalLM random weights, 0.5B-scale config, bf16", batch=batch, prompt=prompt,
                new_tokens=new, kv_cache_bytes=graphed.kv_cache_bytes, gpu=torch.cuda.get_device_name(),
                cold_s=cold_s, greedy_token_match_vs_hf_dynamic=match,
                order="fastopd-cudagraph, hf-dynamic, fastopd interleaved by round; then hf-static alone",
                note="fastopd-cudagraph captures its decode step once per generate call (two eager warm-up steps "
                     "and the capture), inside every timed call; cold_s is each provider's first call")
    record = lambda times: _record_throughput("cuda", times, batch * new, hf_names, info)  # noqa: E731
    times = _interleaved(benchmark, providers, ROUNDS, on_round=record)

    static = _hf_generate(model, ids, new, "static", sync)
    t0 = time.perf_counter()
    out = static()  # compiles the decode step: the slow cold call
    cold_s["hf-static"] = time.perf_counter() - t0
    match["hf-static"] = float((out[:, prompt:] == hf_tokens).float().mean())
    times["hf-static"] = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        static()
        times["hf-static"].append(time.perf_counter() - t0)
        section = record(times)
    benchmark.extra_info.update({k: v["tokens_per_s"] for k, v in section["providers"].items()})


def _decode_kernel() -> str:
    """What multiplies fastopd's CPU decode weights here: its own kernel (and which register tile), or torch.mm."""
    why = _dispatch.available("decode_linear", "cpu", "cpu")
    return f"fastopd decode_linear_ ({cpu_isa()} tile)" if why is None else f"torch.mm ({why})"


def _machine(device: str) -> dict:
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                cpu=cpu_name(), cpu_cores=os.cpu_count(), torch=torch.__version__,
                transformers=transformers.__version__, fastopd=fastopd.__version__, python=platform.python_version(),
                torch_threads=THREADS, load_average_at_end=os.getloadavg()[0], rounds=ROUNDS,
                decode_kernel=_decode_kernel(),
                commit=os.environ.get("FASTOPD_COMMIT") or "unknown",
                command="bash bench/gpu_suite.sh" if device == "cuda" else COMMAND)
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _markdown(device: str, data: dict, machine: dict) -> str:
    lines = [f"# Rollouts: fastopd RolloutEngine vs Hugging Face generate ({device})", "",
             f"{machine['cpu']}, {machine['cpu_cores']} cores, torch {machine['torch']} ({machine['torch_threads']} "
             f"thread(s)), transformers {machine['transformers']}, {machine['date']}, load average at the end "
             f"{machine['load_average_at_end']:.1f} (shared machine), commit {machine.get('commit', 'unknown')}. "
             f"CPU decode weights: {machine.get('decode_kernel', 'unknown')}. Command: `{machine['command']}`", ""]
    tp = data.get("throughput")
    if tp:
        order = tp.get("order", "providers interleaved by round")
        lines += [f"## Throughput: {tp['model']}; batch {tp['batch']}, prompt {tp['prompt']}, {tp['new_tokens']} new "
                  f"tokens; {order}; up to {machine['rounds']} rounds", "",
                  "| provider | tokens/s | median s | p20-p80 s | runs | x best HF | CPU s (median) | x best HF, CPU "
                  "time |", "|---|---|---|---|---|---|---|---|"]
        for name, p in tp["providers"].items():
            cpu = (f"{p['cpu_median_s']:.3f} | {p['x_best_hf_cpu_time']:.2f}x" if "cpu_median_s" in p else "- | -")
            x_hf = f"{p['x_best_hf']:.2f}x" if "x_best_hf" in p else "-"
            lines.append(f"| {name} | {p['tokens_per_s']:.0f} | {p['median_s']:.3f} | {p['p20_s']:.3f}-"
                         f"{p['p80_s']:.3f} | {p['rounds']} | {x_hf} | {cpu} |")
        if tp.get("cold_s"):
            cold = ", ".join(f"{n} {sec:.1f}" for n, sec in tp["cold_s"].items())
            match = ", ".join(f"{n} {m:.1%}" for n, m in tp.get("greedy_token_match_vs_hf_dynamic", {}).items())
            lines += ["", f"First call in s (warm-up: CUDA graph capture; HF static's compile): {cold}. Greedy tokens "
                          f"equal to hf-dynamic's: {match}."]
        if tp.get("note"):
            lines += ["", f"Note: {tp['note']}."]
        lines.append("")
    sweep = data.get("horizon_sweep")
    if sweep:
        lines += ["## Horizon sweep (batch 8, prompt 32, sampled, no EOS; H = ratio x 512)", "",
                  "| H | ratio | median s | tokens/s | KV cache MiB | cache columns |", "|---|---|---|---|---|---|"]
        for r in sorted(sweep, key=lambda r: r["horizon"]):
            lines.append(f"| {r['horizon']} | {r['ratio']:.0%} | {r['median_s']:.3f} | {r['tokens_per_s']:.0f} | "
                         f"{r['kv_cache_bytes'] / 2**20:.2f} | {r['kv_cache_columns']} |")
        lines.append("")
    ps = data.get("prefix_sharing")
    if ps:
        lines += [f"## Prefix sharing ({ps['prompts']} prompts x {ps['prompt']} tokens, num_samples="
                  f"{ps['num_samples']}; generate with horizon 1 = prefill + one step; teacher scoring of "
                  f"{ps['score_horizon']} completion tokens)", "",
                  f"Prefill tokens computed: shared {ps['prefill_tokens']['shared']}, separate "
                  f"{ps['prefill_tokens']['separate']}. Speedup from sharing: prefill {ps['prefill_speedup']:.2f}x, "
                  f"scoring {ps['score_speedup']:.2f}x.", "", "| pass | median s | p20-p80 s |", "|---|---|---|"]
        for name, p in ps["providers"].items():
            lines.append(f"| {name} | {p['median_s']:.4f} | {p['p20_s']:.4f}-{p['p80_s']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def _save(device: str, out_dir: str | None = None) -> None:
    """Writes rollout_<device>.json and .md of RESULTS[device] to `out_dir` ($OUT, else bench/results), each
    through a temporary file and a rename, so that a run killed mid-write leaves the previous version."""
    out_dir = out_dir or os.environ.get("OUT") or os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    machine = _machine(device)
    data = RESULTS[device]
    for suffix, text in ((".json", json.dumps({"machine": machine, **data}, indent=2)),
                         (".md", _markdown(device, data, machine) + "\n")):
        tmp = os.path.join(out_dir, f".rollout_{device}{suffix}.tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, f"rollout_{device}{suffix}"))


def test_write_results():
    """Writes bench/results/rollout_<device>.json and .md for the sections measured in this run."""
    if not RESULTS:
        pytest.skip("no rollout benchmark ran in this session")
    for device in RESULTS:
        _save(device)
