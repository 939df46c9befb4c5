import pytest

from slmforge.config import ConfigError, FinetuneConfig, describe_options, load_config


def test_defaults_are_valid_and_cpu_sized():
    cfg = load_config()
    assert cfg.model.source == "smollm2-135m-instruct"
    assert cfg.model.load_in_4bit and cfg.model.quant_type == "nf4" and cfg.model.double_quant
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32 and cfg.lora.target_modules == "all-linear"
    assert cfg.lora.modules_to_save == []


def test_overrides_parse_yaml_scalars_and_lists():
    cfg = load_config(overrides=["train.epochs=1.5", "lora.target_modules=[q_proj, v_proj]",
                                 "publish.hub_repo=me/my-adapter", "data.train_limit=null"])
    assert cfg.train.epochs == 1.5
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.publish.hub_repo == "me/my-adapter"


@pytest.mark.parametrize("override, field", [
    ("train.learning_rate=-1", "train.learning_rate"),
    ("train.batch_size=0", "train.batch_size"),
    ("lora.r=zero", "lora.r"),
    ("train.epoch=3", "train.epoch"),  # typo: unknown setting
    ("storage.url=ftp://host/x", "storage.url"),
    ("publish.hub_repo=not a repo", "publish.hub_repo"),
    ("data.overlong=cut", "data.overlong"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert field in str(e.value)


def test_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  max_steps: 7\nmodel:\n  source: smollm2-135m-instruct\n")
    assert load_config(p, ["train.seed=3"]).train.max_steps == 7
    p.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_setting_is_described_for_help():
    rows = describe_options()
    keys = {k for k, _, _ in rows}
    assert {"data.source", "train.learning_rate", "publish.hub_repo", "storage.url"} <= keys
    assert len(keys) == sum(len(s.model_fields) for s in (FinetuneConfig.model_fields[f].annotation
                                                          for f in FinetuneConfig.model_fields))


def test_a_gguf_config_is_read_once_and_each_caller_gets_its_own_copy():
    """The GGUF file's config is parsed once per process (the command line and the flow's validation
    both ask); a caller that changes its copy must not change what the next caller gets."""
    from slmforge import modeling as M

    src = M.resolve_source("smollm2-135m-instruct")
    M._gguf_config.cache_clear()
    first = M.load_config(src)
    first.num_hidden_layers = 1
    second = M.load_config(src)
    assert second.num_hidden_layers == 30
    assert M._gguf_config.cache_info().hits == 1 and M._gguf_config.cache_info().misses == 1
