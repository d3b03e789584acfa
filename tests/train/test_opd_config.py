"""OPDConfig validation (errors name the field), horizon specs and TOML loading."""

import pytest

from fastopd.train.config import ConfigError, OPDConfig, load_toml, parse_horizon_spec


@pytest.mark.parametrize("kwargs,field", [
    pytest.param({"objective": "kl"}, "objective", id="objective"),
    pytest.param({"beta": 1.5}, "beta", id="beta"),
    pytest.param({"temperature": 0.0}, "temperature", id="temperature"),
    pytest.param({"lr": -1e-3}, "lr", id="lr"),
    pytest.param({"lr": "fast"}, "lr", id="lr-type"),
    pytest.param({"num_samples": 0}, "num_samples", id="num_samples"),
    pytest.param({"num_samples": 2.5}, "num_samples", id="num_samples-type"),
    pytest.param({"betas": (0.9, 1.0)}, "betas[1]", id="betas"),
    pytest.param({"top_p": 0.0}, "top_p", id="top_p"),
    pytest.param({"max_grad_norm": 0.0}, "max_grad_norm", id="max_grad_norm"),
    pytest.param({"pg_ratio_cap": 0.5}, "pg_ratio_cap", id="pg_ratio_cap"),
    pytest.param({"resume": True}, "resume", id="resume-without-dir"),
    pytest.param({"checkpoint_dir": ""}, "checkpoint_dir", id="checkpoint-dir-empty"),
    pytest.param({"horizon": "progressive:8,4"}, "horizon", id="horizon-string"),
    pytest.param({"horizon": {"kind": "truncated", "ratio": 1.5}}, "horizon.ratio", id="horizon-ratio"),
    pytest.param({"horizon": {"kind": "progressive", "start": 4, "step": 2}}, "horizon.every", id="horizon-missing"),
    pytest.param({"horizon": {"kind": "full", "ratio": 0.5}}, "horizon.ratio", id="horizon-extra-key"),
    pytest.param({"horizon": 0}, "horizon", id="horizon-zero"),
    pytest.param({"masks": 3}, "masks", id="masks-type"),
    pytest.param({"parallel": "zero3"}, "parallel", id="parallel"),
    pytest.param({"hsdp_shard_size": 0}, "hsdp_shard_size", id="hsdp-shard-size"),
    pytest.param({"betas": 0.9}, "betas", id="betas-scalar"),
    pytest.param({"betas": ("a", 0.9)}, "betas[0]", id="betas-string"),
    pytest.param({"betas": (0.9, False)}, "betas[1]", id="betas-bool"),
    pytest.param({"betas": (0.9, float("nan"))}, "betas[1]", id="betas-nan"),
    pytest.param({"lr": float("inf")}, "lr", id="lr-inf"),
    pytest.param({"lr": float("nan")}, "lr", id="lr-nan"),
    pytest.param({"eps": float("inf")}, "eps", id="eps-inf"),
    pytest.param({"weight_decay": float("nan")}, "weight_decay", id="weight_decay-nan"),
    pytest.param({"weight_decay": float("inf")}, "weight_decay", id="weight_decay-inf"),
    pytest.param({"loss_impl": "bogus"}, "loss_impl", id="loss_impl"),
])
def test_bad_values_name_the_field(kwargs, field):
    with pytest.raises(ConfigError) as info:
        OPDConfig(**kwargs)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


def test_defaults_and_coercion():
    cfg = OPDConfig(lr=1, betas=[0.8, 0.9])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.betas == (0.8, 0.9)
    assert cfg.to_dict()["betas"] == [0.8, 0.9]
    assert cfg.horizon_spec() == {"kind": "full", "max_new_tokens": 64}


@pytest.mark.parametrize("spec,expected", [
    pytest.param(None, {"kind": "full", "max_new_tokens": 30}, id="none"),
    pytest.param(12, {"kind": "full", "max_new_tokens": 12}, id="int"),
    pytest.param("full:20", {"kind": "full", "max_new_tokens": 20}, id="full-H"),
    pytest.param("truncated:0.5", {"kind": "truncated", "ratio": 0.5, "max_new_tokens": 30}, id="truncated"),
    pytest.param("progressive:8,4,10", {"kind": "progressive", "start": 8, "step": 4, "every": 10,
                                        "max_new_tokens": 30}, id="progressive"),
    pytest.param({"kind": "progressive", "start": 8, "step": 0, "every": 1},
                 {"kind": "progressive", "start": 8, "step": 0, "every": 1, "max_new_tokens": 30}, id="table"),
])
def test_horizon_specs(spec, expected):
    assert parse_horizon_spec(spec, 30) == expected


def test_horizon_callable_is_kept():
    cfg = OPDConfig(horizon=lambda k: 4 + k)
    assert cfg.horizon_spec() is None
    assert cfg.to_dict()["horizon"].startswith("<function")


def test_from_dict_unknown_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"^lrr: unknown field in OPDConfig \(did you mean 'lr'\?\)"):
        OPDConfig.from_dict({"lrr": 1e-3})


def test_load_toml(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('objective = "pg"\nlr = 3e-4\n[horizon]\nkind = "progressive"\nstart = 8\nstep = 4\nevery = 10\n')
    cfg = OPDConfig.from_dict(load_toml(path))
    assert cfg.objective == "pg" and cfg.lr == 3e-4 and cfg.horizon_spec()["every"] == 10
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = = 3\n")
    with pytest.raises(ConfigError, match="bad.toml: invalid TOML"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
