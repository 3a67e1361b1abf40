"""The pre-flight check (python -m adaptopt.config_check): one test per mistake, each error names the fix."""
import json

import pytest

from adaptopt.config_check import (ConfigError, RecipeSettings, check_accelerate_config, check_ds_config,
                                   check_launch_env, load_json, main)
from conftest import REPO

RECIPE = RecipeSettings(per_device_train_batch_size=8, gradient_accumulation_steps=2, max_grad_norm=1.0, world_size=4)


def config(name="zero2.json", **changes) -> dict:
    c = json.loads((REPO / "ds_configs" / name).read_text())
    c.update(changes)
    return c


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "ds_configs").glob("*.json")))
def test_shipped_configs_pass(name):
    check_ds_config(config(name), RECIPE)


def test_invalid_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "train_batch_size": "auto",\n  "zero_optimization": {"stage": 2},\n}\n')
    with pytest.raises(ConfigError, match=r"invalid JSON at line 4, column 1"):
        load_json(path)


def test_misspelt_top_level_key_gets_a_suggestion():
    c = config()
    c["gradient_cliping"] = c.pop("gradient_clipping")
    with pytest.raises(ConfigError, match=r"unknown key 'gradient_cliping'; did you mean 'gradient_clipping'"):
        check_ds_config(c, RECIPE)


def test_misspelt_zero_key_gets_a_suggestion():
    c = config()
    c["zero_optimization"]["overlap_com"] = True
    with pytest.raises(ConfigError, match=r"in 'zero_optimization': 'overlap_com'; did you mean 'overlap_comm'"):
        check_ds_config(c, RECIPE)


def test_batch_arithmetic_that_cannot_hold():
    c = config(train_batch_size=48)  # 8 x 2 x 4 = 64
    with pytest.raises(ConfigError, match=r"train_batch_size 48 != micro batch 8 x accumulation 2 x world size 4 = 64"):
        check_ds_config(c, RECIPE)


def test_fp16_and_bf16_both_on():
    c = config()
    c["fp16"]["enabled"] = True
    c["bf16"]["enabled"] = True
    with pytest.raises(ConfigError, match=r"fp16 and bf16 are both enabled"):
        check_ds_config(c, RECIPE)


def test_optimizer_offload_without_the_client_optimizer_flag():
    c = config("zero2_offload.json")
    del c["zero_force_ds_cpu_optimizer"]
    with pytest.raises(ConfigError, match=r'"zero_force_ds_cpu_optimizer": false'):
        check_ds_config(c, RECIPE)


def test_parameter_offload_needs_stage_3():
    c = config()
    c["zero_optimization"]["offload_param"] = {"device": "cpu"}
    with pytest.raises(ConfigError, match=r"offload_param needs stage 3"):
        check_ds_config(c, RECIPE)


def test_unknown_stage():
    c = config()
    c["zero_optimization"]["stage"] = 4
    with pytest.raises(ConfigError, match=r"stage is 4; use 0, 1, 2 or 3"):
        check_ds_config(c, RECIPE)


@pytest.mark.parametrize("key,value,flag", [
    ("gradient_clipping", 0.5, "--max_grad_norm 1.0"),
    ("gradient_accumulation_steps", 4, "--gradient_accumulation_steps 2"),
    ("train_micro_batch_size_per_gpu", 16, "--per_device_train_batch_size 8"),
])
def test_a_recipe_owned_value_written_differently_in_the_json(key, value, flag):
    with pytest.raises(ConfigError, match=rf"{key} is {value} in the JSON but the recipe has {flag}; set \"{key}\": \"auto\""):
        check_ds_config(config(**{key: value}), RECIPE)


def test_a_recipe_owned_value_written_the_same_is_fine():
    check_ds_config(config(gradient_clipping=1.0, gradient_accumulation_steps=2), RECIPE)


def test_an_optimizer_section_conflicts_with_the_recipes_optimizer():
    with pytest.raises(ConfigError, match=r'remove the "optimizer" section'):
        check_ds_config(config(optimizer={"type": "AdamW", "params": {"lr": 1e-4}}), RECIPE)


def test_every_problem_is_reported_at_once():
    c = config(train_batch_size=3, gradient_clipping=0.1)
    c["fp16"]["enabled"] = c["bf16"]["enabled"] = True
    with pytest.raises(ConfigError) as err:
        check_ds_config(c, RECIPE)
    assert str(err.value).count("\n  - ") == 3


def test_accelerate_config_several_machines_need_the_standard_launcher(tmp_path):
    path = tmp_path / "multi.yaml"
    text = (REPO / "launch" / "deepspeed_multi_node.yaml").read_text()
    path.write_text(text.replace("deepspeed_multinode_launcher: standard", "deepspeed_multinode_launcher: pdsh"))
    with pytest.raises(ConfigError, match=r"deepspeed_multinode_launcher: standard"):
        check_accelerate_config(path)


def test_accelerate_config_mixed_precision_next_to_a_ds_file(tmp_path):
    path = tmp_path / "mp.yaml"
    path.write_text((REPO / "launch" / "deepspeed_single_node.yaml").read_text() + "mixed_precision: fp16\n")
    with pytest.raises(ConfigError, match=r"mixed_precision: fp16 next to a DeepSpeed config file"):
        check_accelerate_config(path)


def test_accelerate_config_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("distributed_type: DEEPSPEED\ndeepspeed_config: [unclosed\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+, column \d+"):
        check_accelerate_config(path)


def test_command_line_exit_codes(capsys, tmp_path):
    shipped = [str(REPO / "ds_configs" / "zero3_offload.json")]
    assert main(["--ds_config", *shipped, "--accelerate_config", str(REPO / "launch" / "deepspeed_multi_node.yaml")]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(config(train_batch_size=7)))
    assert main(["--ds_config", str(bad), "--num_processes", "2", "--per_device_train_batch_size", "4"]) == 2
    assert "train_batch_size 7 != micro batch 4 x accumulation 1 x world size 2 = 8" in capsys.readouterr().err


@pytest.mark.parametrize("supported", [True, False])
def test_fp16_the_accelerator_lacks_stops_at_start_up(monkeypatch, supported):
    """DeepSpeed's CPU accelerator offers fp16 only with oneDNN's fp16 kernels (absent on many CPUs, e.g. AMD
    EPYC); DeepSpeed itself says so only after the model is loaded, in a traceback. The recipe's start-up check
    (check_launch_env) says it first, in one line, for the shipped configs' "auto" under --mixed_precision fp16.
    The accelerator's answer is set here, so that both cases run on any machine."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: supported)
    monkeypatch.setattr(type(get_accelerator()), "is_bf16_supported", lambda self: True)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(REPO / "ds_configs" / "zero2.json"))
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    recipe = RecipeSettings(8, 1, 1.0, 1)
    if supported:
        check_launch_env(recipe)
        return
    with pytest.raises(ConfigError) as err:
        check_launch_env(recipe)
    assert "does not support fp16" in str(err.value) and "--mixed_precision bf16 (supported here) or no" in str(err.value)
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # "auto" then means bf16, which this machine has
    check_launch_env(recipe)
