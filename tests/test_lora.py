

def test_bad_lora_config_is_one_line_error(base, tmp_path):
    from magitrain.config import ConfigError

    with pytest.raises(ConfigError, match="names no adaptable module"):
        lora_cfg(base, str(tmp_path), "model.lora.targets=[linear_qkvv]")
    with pytest.raises(ConfigError, match="needs ckpt.init_from"):
        lora_cfg(base, str(tmp_path), "ckpt.init_from=")
    with pytest.raises(ConfigError, match="needs train.dtype=bf16"):
        lora_cfg(base, str(tmp_path), "model.lora.base_dtype=bf16")
    from magitrain.release import main

    assert main(["export", "--lora", base, str(tmp_path / "out")]) == 2  # not a LoRA run: error, exit 2
