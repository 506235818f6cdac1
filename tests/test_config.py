import pytest
import yaml

from conftest import tiny_raw
from mose_ds.config import ConfigError, apply_overrides, from_dict, load_config


def write(tmp_path, raw):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, tiny_raw(moe={"topk": 2}))
    with pytest.raises(ConfigError, match=r"recipe\.yaml: unknown key 'moe\.topk' \(did you mean 'moe\.top_k'\?\)"):
        load_config(path)


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'optimiser'"):
        load_config(write(tmp_path, {**tiny_raw(), "optimiser": {}}))


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"train\.max_iters: expected int, got 'ten'"):
        from_dict(tiny_raw(train={"max_iters": "ten"}))


def test_top_k_above_num_experts_is_refused():
    with pytest.raises(ConfigError, match=r"moe\.top_k=5 exceeds moe\.num_experts=4"):
        from_dict(tiny_raw(moe={"num_experts": 4, "top_k": 5}))


@pytest.mark.parametrize("section,key,value", [("mose", "width_min", 0.0), ("mose", "width_max", 1.5),
                                               ("mose", "eval_widths", [0.5, 1.2])])
def test_widths_outside_unit_interval_are_refused(section, key, value):
    with pytest.raises(ConfigError, match=r"outside \(0, 1\]"):
        from_dict(tiny_raw(**{section: {key: value}}))


@pytest.mark.parametrize("key", ["capacity_factor", "eval_capacity_factor"])
def test_non_positive_capacity_factor_is_refused(key):
    with pytest.raises(ConfigError, match=rf"moe\.{key}=0.0 must be positive"):
        from_dict(tiny_raw(moe={key: 0.0}))


def test_expert_kernel_is_checked():
    with pytest.raises(ConfigError, match=r"moe\.expert_kernel='fused': expected auto, loop or grouped"):
        from_dict(tiny_raw(moe={"expert_kernel": "fused"}))
    with pytest.raises(ConfigError, match=r"moe\.expert_kernel=grouped needs model\.hidden_size \(36\)"):
        from_dict(tiny_raw(moe={"expert_kernel": "grouped"}, model={"hidden_size": 36, "num_heads": 4}))
    assert from_dict(tiny_raw(moe={"expert_kernel": "grouped"})).moe.expert_kernel == "grouped"


def test_experts_not_divisible_by_expert_parallel_size():
    with pytest.raises(ConfigError, match=r"moe\.num_experts=4 is not divisible by moe\.expert_parallel_size=3"):
        from_dict(tiny_raw(moe={"expert_parallel_size": 3}))


def test_capacity_defaults_follow_k():
    assert (from_dict(tiny_raw(moe={"top_k": 2})).moe.capacity_factor,
            from_dict(tiny_raw(moe={"top_k": 2})).moe.eval_capacity_factor) == (1.25, 2.0)
    k4 = from_dict(tiny_raw(moe={"num_experts": 8, "top_k": 4})).moe
    assert (k4.capacity_factor, k4.eval_capacity_factor) == (1.75, 3.0)


def test_dotted_overrides_are_parsed_as_yaml(tmp_path):
    cfg = load_config(write(tmp_path, tiny_raw()), ["train.max_iters=77", "mose.eval_widths=[0.5, 1.0]",
                                                     "engine.precision=bf16", "engine.zero_stage=1"])
    assert cfg.train.max_iters == 77 and cfg.mose.eval_widths == [0.5, 1.0] and cfg.engine.precision == "bf16"
    with pytest.raises(ConfigError, match="engine.zero_stage=0 with engine.precision=bf16"):
        load_config(write(tmp_path, tiny_raw()), ["engine.precision=bf16"])


def test_override_with_unknown_section_is_refused():
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        apply_overrides({}, ["trian.max_iters=3"])


def test_width_grid_is_the_paper_grid():
    grid = from_dict(tiny_raw()).mose.grid
    assert len(grid) == 16 and grid[0] == 0.25 and grid[-1] == 1.0
    assert all(abs(b - a - 0.05) < 1e-9 for a, b in zip(grid, grid[1:]))


def test_empty_eval_widths_and_negative_seed_are_refused():
    with pytest.raises(ConfigError, match=r"mose\.eval_widths is empty"):
        from_dict(tiny_raw(mose={"eval_widths": []}))
    with pytest.raises(ConfigError, match=r"train\.seed=-1 must be >= 0"):
        from_dict(tiny_raw(train={"seed": -1}))


def test_override_into_a_scalar_is_refused():
    with pytest.raises(ConfigError, match=r"'name' is not a mapping"):
        apply_overrides(tiny_raw(), ["model.name.x=1"])


def test_architecture_ignores_name_and_init_scale():
    a = from_dict(tiny_raw()).architecture()
    b = from_dict(tiny_raw(model={"name": "renamed", "init_std": 0.01})).architecture()
    assert a == b and a != from_dict(tiny_raw(model={"num_layers": 4})).architecture()


def test_engine_extra_cannot_set_run_owned_keys():
    with pytest.raises(ConfigError, match=r"engine\.extra\.train_batch_size"):
        from_dict(tiny_raw(engine={"extra": {"train_batch_size": 8}}))


def test_every_shipped_recipe_loads(monkeypatch):
    """From the project root, as documented; the 16B recipe names the user's HF directory, so
    the real DeepSeek-V2-Lite config.json stands in for it."""
    import glob
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lite = os.path.join(root, "..", "shared", "data", "deepseek", "deepseek_v2_lite_config.json")
    monkeypatch.chdir(root)
    recipes = glob.glob(os.path.join(root, "ds_configs", "*.yaml"))
    assert len(recipes) >= 10
    for path in recipes:
        cfg = load_config(path, [f"model.hf_config={lite}"] if "deepseek_v2_lite" in path else [])
        if "deepseek" in path:
            assert cfg.model.family == "deepseek_v2" and cfg.moe.drop_tokens is False
    lite_cfg = load_config(os.path.join(root, "ds_configs", "deepseek_v2_lite_cpt.yaml"), [f"model.hf_config={lite}"])
    assert (lite_cfg.engine.zero_stage, lite_cfg.engine.precision, lite_cfg.moe.expert_parallel_size,
            lite_cfg.mose.enabled, lite_cfg.moe.num_experts) == (2, "bf16", 8, True, 64)
    assert lite_cfg.checkpoint.init_from and lite_cfg.optim.lr < 6e-4


def test_lr_schedule_warms_up_then_decays_linearly_to_min_lr():
    from mose_ds.config import OptimConfig
    from mose_ds.engine import lr_at
    o = OptimConfig()                                   # the paper's: 6e-4 -> 6e-5, 200 warmup
    assert lr_at(0, o, 10_000) == pytest.approx(6e-4 / 201)
    assert lr_at(199, o, 10_000) == pytest.approx(6e-4 * 200 / 201)
    assert lr_at(200, o, 10_000) == pytest.approx(6e-4)
    assert lr_at(5_100, o, 10_000) == pytest.approx((6e-4 + 6e-5) / 2)
    assert lr_at(10_000, o, 10_000) == pytest.approx(6e-5) == lr_at(12_000, o, 10_000)


def test_engine_device_and_gradient_dtype_are_checked():
    with pytest.raises(ConfigError, match=r"engine\.device='gpu': expected 'auto', 'cpu' or 'cuda'"):
        from_dict(tiny_raw(engine={"device": "gpu"}))
    with pytest.raises(ConfigError, match=r"engine\.grad_comm_dtype=bf16 with engine\.precision=fp32"):
        from_dict(tiny_raw(engine={"grad_comm_dtype": "bf16"}))


PAPER_BATCHES = {   # Table 3: micro-batch x accumulation x 4 GPUs
    "gpt2_small_e8a2": (12, 6), "gpt2_small_e8a4": (8, 9), "gpt2_small_e16a4": (8, 9),
    "gpt2_small_e64a8": (6, 8), "gpt2_small_e128a8": (6, 8), "gpt2_standard_e8a2": (6, 12),
    "gpt2_standard_e8a4": (6, 12), "gpt2_medium_e8a2": (2, 12), "gpt2_large_e8a2": (4, 6),
}


def test_recipes_state_the_paper_global_batch_and_derive_accumulation_from_the_world():
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, (micro, accum) in PAPER_BATCHES.items():
        train = load_config(os.path.join(root, "ds_configs", f"{name}.yaml")).train
        assert train.global_batch_size == micro * accum * 4 and train.grad_accum_steps is None, name
        assert (train.geometry(4).micro, train.geometry(4).accum) == (micro, accum), name
    small = load_config(os.path.join(root, "ds_configs", "gpt2_small_e8a2.yaml")).train
    assert [small.geometry(n).accum for n in (1, 2, 4, 8, 24)] == [24, 12, 6, 3, 1]
    assert str(small.geometry(8)) == "micro-batch 12 x accumulation 3 x data-parallel 8 = global batch 288"


def test_a_global_batch_the_job_cannot_make_is_an_error_naming_the_numbers():
    train = from_dict(tiny_raw(train={"micro_batch_size": 12, "grad_accum_steps": None,
                                      "global_batch_size": 288})).train
    with pytest.raises(ConfigError, match=r"global_batch_size=288 is not a multiple of train.micro_batch_size=12 x "
                                          r"32 data-parallel rank\(s\) = 384; micro-batch sizes that divide it on 32 "
                                          r"rank\(s\): 1, 3, 9$"):
        train.geometry(32)
    with pytest.raises(ConfigError, match=r"no micro-batch size does on 5 ranks"):
        train.geometry(5)
    both = from_dict(tiny_raw(train={"micro_batch_size": 4, "grad_accum_steps": 6, "global_batch_size": 96})).train
    assert both.geometry(4).accum == 6
    with pytest.raises(ConfigError, match=r"global_batch_size=96 but train.micro_batch_size=4 x "
                                          r"train.grad_accum_steps=6 x 8 data-parallel rank\(s\) = 192"):
        both.geometry(8)
    legacy = from_dict(tiny_raw(train={"micro_batch_size": 4, "grad_accum_steps": None})).train
    assert legacy.geometry(3).global_batch == 12           # neither given: one micro-batch per rank
    with pytest.raises(ConfigError, match=r"train.global_batch_size=0 must be positive"):
        from_dict(tiny_raw(train={"global_batch_size": 0}))
