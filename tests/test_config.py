import pytest

from lotus.config import Config, config_from_dict, config_to_dict, load_config
from lotus.errors import ConfigError


def test_defaults_and_roundtrip():
    cfg = config_from_dict({})
    assert isinstance(cfg, Config)
    again = config_from_dict(config_to_dict(cfg))
    assert config_to_dict(again) == config_to_dict(cfg)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"train": {"epochs": "ten"}}, "train.epochs: expected int >= 1, got 'ten'"),
        ({"train": {"epochs": 0}}, "train.epochs: expected int >= 1, got 0"),
        ({"train": {"epochz": 3}}, "train.epochz: unknown key"),
        ({"bogus": {}}, "bogus: unknown key"),
        ({"optim": {"lr": -1}}, "optim.lr: expected float > 0.0"),
        ({"optim": {"name": "adamx"}}, "optim.name: expected one of timm's optimizers"),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction: expected float > 0.0 and < 1.0, got 1.0"),
        ({"train": {"deterministic": "yes"}}, "train.deterministic: expected bool, got 'yes'"),
        ({"optim": {"betas": [0.9]}}, "optim.betas: expected two floats"),
        ({"model": "vit"}, "model: expected a mapping, got 'vit'"),
        ({"data": {"augment": {"rotate": 400}}}, "data.augment.rotate: expected float >= 0.0 and <= 180.0"),
    ],
)
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as e:
        config_from_dict(data)
    assert message in str(e.value)


def test_int_accepted_for_float_and_bool_not_int():
    cfg = config_from_dict({"optim": {"lr": 1}})
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    with pytest.raises(ConfigError, match="train.epochs: expected int"):
        config_from_dict({"train": {"epochs": True}})


def test_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 3\n")
    cfg = load_config(p, ["optim.lr=1e-3", "train.epochs=5", "model.kwargs.qkv_bias=false", "data.augment.hflip=true"])
    assert cfg.optim.lr == 1e-3 and cfg.train.epochs == 5
    assert cfg.model.kwargs == {"qkv_bias": False} and cfg.data.augment.hflip is True
    assert cfg.name == "c"
    with pytest.raises(ConfigError, match="--set train: expected KEY=VALUE"):
        load_config(p, ["train"])
    with pytest.raises(ConfigError, match="train.epochs: expected int >= 1, got 'x'"):
        load_config(p, ["train.epochs=x"])
    with pytest.raises(ConfigError, match="train.epochs is not a section"):
        load_config(p, ["train.epochs.x=1"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(lst)


def test_shipped_configs_validate():
    import glob

    paths = sorted(glob.glob("configs/*.yaml"))
    assert "configs/digits.yaml" in paths
    for p in paths:
        load_config(p)


def test_base_inheritance(tmp_path):
    (tmp_path / "a.yaml").write_text("train:\n  epochs: 7\n  seed: 3\noptim:\n  lr: 0.01\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  epochs: 9\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.train.epochs == 9 and cfg.train.seed == 3 and cfg.optim.lr == 0.01 and cfg.name == "b"
    (tmp_path / "c.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "d.yaml")


def test_non_finite_floats_rejected():
    with pytest.raises(ConfigError, match="optim.lr: expected a finite float"):
        config_from_dict({"optim": {"lr": float("nan")}})


def test_limit_train_is_exact():
    from lotus.data import build_datasets

    for k in (413, 414, 1000):
        assert len(build_datasets(config_from_dict({"data": {"limit_train": k}}).data, 8).train) == k
