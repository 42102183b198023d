import json

import pytest

from omni import config as config_lib
from omni.config import Config, ConfigError


def test_defaults_validate_and_every_field_is_documented():
    config_lib.validate(Config())
    for key in config_lib.all_keys():
        node, f = config_lib._resolve(Config(), key)
        assert f.metadata.get("doc"), f"{key} has no doc"


def test_overrides_are_typed():
    cfg = config_lib.apply_overrides(Config(), ["train.steps=7", "train.lr=1e-4", "model.remat=full",
                                                "train.async_checkpoint=false", "mesh.data=2"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.remat == "full"
    assert cfg.train.async_checkpoint is False
    assert cfg.mesh.data == 2
    # An int is accepted where a float is expected, and stored as float.
    assert isinstance(config_lib.apply_overrides(Config(), ["train.lr=1"]).train.lr, float)


def test_unknown_key_names_the_key_and_suggests():
    with pytest.raises(ConfigError) as e:
        config_lib.apply_overrides(Config(), ["train.stepz=3"])
    assert "'train.stepz'" in str(e.value) and "train.steps" in str(e.value)
    with pytest.raises(ConfigError, match="unknown config key 'modle.d'"):
        config_lib.apply_overrides(Config(), ["modle.d=3"])


def test_bad_values_name_key_and_allowed_values():
    with pytest.raises(ConfigError) as e:
        config_lib.apply_overrides(Config(), ["model.remat=sometimes"])
    assert "'model.remat'" in str(e.value) and "'dots'" in str(e.value) and "'full'" in str(e.value)
    with pytest.raises(ConfigError, match="'train.steps'.*integer"):
        config_lib.apply_overrides(Config(), ["train.steps=many"])
    with pytest.raises(ConfigError, match="'train.steps'.*integer"):
        config_lib.apply_overrides(Config(), ["train.steps=2.5"])
    with pytest.raises(ConfigError, match="key=value"):
        config_lib.apply_overrides(Config(), ["train.steps"])
    with pytest.raises(ConfigError, match="section"):
        config_lib.apply_overrides(Config(), ["train=3"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="kv_heads"):
        config_lib.apply_overrides(Config(), ["model.heads=4", "model.kv_heads=3"])
    with pytest.raises(ConfigError, match="grad_accum"):
        config_lib.apply_overrides(Config(), ["train.batch_size=10", "train.grad_accum=4"])
    with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
        config_lib.apply_overrides(Config(), ["mesh.rules=[['embed', 'model']]"])


def test_optimizer_and_checkpoint_numbers_that_train_nonsense_are_refused_naming_the_key():
    """train.lr=-1 trained (loss 6.7 -> 9.9); keep_checkpoints=0 would keep no good checkpoint."""
    refused = {"train.lr=-1": "'train.lr' must be a positive number, got -1.0",
               "train.lr=0": "'train.lr' must be a positive number",
               "train.b2=1.5": "'train.b2' must be between 0 and 1, got 1.5",
               "train.min_lr_ratio=-0.1": "'train.min_lr_ratio' must be between 0 and 1",
               "train.eps=0": "'train.eps' must be positive",
               "train.warmup_steps=-1": "'train.warmup_steps' must be >= 0, got -1",
               "train.clip_norm=-1": "'train.clip_norm' must be >= 0",
               "train.checkpoint_every=-5": "'train.checkpoint_every' must be >= 0",
               "train.keep_checkpoints=0": "'train.keep_checkpoints' must be at least 1"}
    for override, message in refused.items():
        with pytest.raises(ConfigError) as e:
            config_lib.apply_overrides(Config(), [override])
        assert message in str(e.value), (override, str(e.value))
    for lr in (float("nan"), float("inf")):  # a Python config file can compute one
        cfg = Config()
        cfg.train.lr = lr
        with pytest.raises(ConfigError, match="'train.lr' must be a positive number"):
            config_lib.validate(cfg)


def test_a_warmup_longer_than_the_run_is_allowed_and_said_in_one_note():
    assert config_lib.notes(Config()) == []
    cfg = config_lib.apply_overrides(Config(), ["train.steps=20", "train.warmup_steps=80", "train.lr=0.001"])
    assert config_lib.notes(cfg) == ["'train.warmup_steps' (80) is more than 'train.steps' (20): the learning rate "
                                     "rises to 25% of train.lr=0.001 and never decays; lower train.warmup_steps "
                                     "for a full schedule"]


def test_config_files_and_json_round_trip(tmp_path):
    cfg = config_lib.load_config("configs/demo.py")
    assert cfg.name == "demo"
    path = tmp_path / "config.json"
    config_lib.save_config(cfg, path)
    again = config_lib.load_config(path)
    assert config_lib.to_dict(again) == config_lib.to_dict(cfg)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": {"nope": 1}}))
    with pytest.raises(ConfigError, match="train.nope"):
        config_lib.load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        config_lib.load_config(tmp_path / "missing.py")


def test_config_files_open_with_their_command():
    from pathlib import Path

    for path in Path("configs").rglob("*.py"):
        opening = path.read_text().split('"""')[1]
        assert f"--config {path}" in opening and opening.lstrip().splitlines()[2].strip().startswith("omni "), path


def test_demo_fields_have_their_own_section_and_old_names_still_read():
    saved = config_lib.to_dict(Config())
    saved["data"].update(image_size=64, train_examples=10, eval_examples=5, corpus_seed=3)  # a config.json of before
    saved["train"]["demo_eval_examples"] = 7
    for section in ("demo",):
        del saved[section]
    cfg = config_lib.from_dict(saved, source="old config.json")
    assert (cfg.demo.image_size, cfg.demo.train_examples, cfg.demo.eval_examples, cfg.demo.seed,
            cfg.demo.scored_examples) == (64, 10, 5, 3, 7)
    with pytest.raises(ConfigError, match="'data.image_size'. It moved to 'demo.image_size'"):
        config_lib.apply_overrides(Config(), ["data.image_size=64"])


def test_compile_cache_is_a_machine_key_not_part_of_what_a_run_computes():
    from omni import config as config_lib

    before = config_lib.to_dict(config_lib.Config())
    after = config_lib.to_dict(config_lib.apply_overrides(config_lib.Config(), ["compile_cache=off", "train.steps=7"]))
    assert config_lib.changed_keys(before, after) == ["train.steps"]
    del before["compile_cache"]  # a config saved before the key existed
    assert config_lib.changed_keys(before, config_lib.to_dict(config_lib.Config())) == []
