"""TrainConfig validation, --help text, and the torchrun environment parser."""

import dataclasses

import pytest

from fastserve.errors import ConfigError
from fastserve.train import TrainConfig
from fastserve.train.config import field_help
from fastserve.train.distributed import DistributedEnv


def make(**kw):
    return TrainConfig(data_dir="d", out_dir="o", **kw)


def test_defaults_are_valid():
    cfg = make()
    assert cfg.validate() is cfg


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("batch_size", 0, "batch_size must be a positive integer"),
        ("grad_accum", -1, "grad_accum"),
        ("max_steps", 1.5, "max_steps"),
        ("block_size", 1, "block_size must be at least 2"),
        ("lr", 0.0, "lr must be a positive number"),
        ("min_lr", 1.0, "min_lr must be between 0 and lr"),
        ("warmup_steps", -5, "warmup_steps"),
        ("beta2", 1.0, "beta2 must be in [0, 1)"),
        ("grad_clip", -1.0, "grad_clip"),
        ("dtype", "float16", "dtype must be one of float32, bfloat16"),
        ("keep_last", 0, "keep_last must be at least 1"),
        ("max_time_s", 0, "max_time_s must be positive"),
        ("device", "tpu", "device must be cpu, cuda or cuda:N"),
        ("data_dir", "", "data_dir is required"),
    ],
)
def test_bad_values_raise_one_sentence(field, value, fragment):
    cfg = dataclasses.replace(make(), **{field: value})
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace(")", r"\)")) as e:
        cfg.validate()
    message = str(e.value)
    assert message.endswith(".") and "\n" not in message


def test_block_size_checked_against_context():
    cfg = make(block_size=512)
    cfg.check_block_size(512)
    with pytest.raises(ConfigError, match="larger than the model's context length"):
        cfg.check_block_size(256)


def test_from_dict_round_trip_and_unknown_key():
    cfg = make(lr=5e-4, model_overrides={"num_hidden_layers": 3})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown training option"):
        TrainConfig.from_dict({**cfg.to_dict(), "learning_rate": 1.0})


def test_every_field_has_help_text():
    helps = field_help()
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    assert list(helps) == names
    assert all(len(text) > 10 for text in helps.values())
    assert "seconds" in helps["max_time_s"]


def test_distributed_env_from_torchrun_variables():
    assert DistributedEnv.from_env({}) == DistributedEnv(0, 1, 0)
    env = DistributedEnv.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.enabled, env.is_main) == (
        3,
        4,
        1,
        True,
        False,
    )
    assert env.device_for("cuda") == "cuda:1" and env.device_for("cpu") == "cpu"
    with pytest.raises(ConfigError, match="bad torchrun environment"):
        DistributedEnv.from_env({"RANK": "x", "WORLD_SIZE": "2"})
