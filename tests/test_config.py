"""The typed configuration: defaults are the embedded default, profiles hold differences, errors name the key."""
import pytest
import yaml

from safemed_lib import config


def test_defaults_are_the_tiny_profile_and_every_profile_loads():
    tiny = config.load("tiny")
    assert tiny.model_dump() == config.Config(profile="tiny").model_dump()
    for name in ("smoke", "tiny", "paper"):
        cfg = config.load(name)
        assert cfg.profile == name and cfg.threads >= 1
        assert cfg.bench_dir.name == name and cfg.models_dir.name == name  # data/bench/<profile>, data/models/<profile>


def test_a_block_given_in_part_keeps_its_other_defaults(tmp_path):
    prof = tmp_path / "p.yaml"
    prof.write_text(yaml.safe_dump({"sft": {"nothink": {"steps": 7}}, "safemed": {"grpo": {"think": {"lr": 0.5}}}}))
    cfg = config.load(prof)
    assert cfg.profile == "p"
    assert cfg.sft.nothink.steps == 7
    assert cfg.sft.nothink.weight_decay == config.Config().sft.nothink.weight_decay  # the block's own default kept
    assert cfg.sft.nothink.binding == config.Config().sft.nothink.binding
    assert cfg.safemed.grpo.think.lr == 0.5 and cfg.safemed.grpo.think.max_completion_length == 80


def test_overrides_dict_or_strings_with_yaml_values():
    cfg = config.load("smoke", {"attack.eps": 4, "sft.nothink.binding": None})
    assert cfg.attack.eps == 4 and cfg.sft.nothink.binding is None
    cfg = config.load("smoke", ["attack.linf_eps=[1, 2]", "model.path=null", "sft.think.binding=true"])
    assert cfg.attack.linf_eps == [1, 2] and cfg.model.path is None
    assert cfg.sft.think.binding == config.Binding()  # true: the binding terms' defaults


@pytest.mark.parametrize("override, match", [
    ({"attack.epss": 4}, r"unknown configuration key 'attack\.epss' \(did you mean 'attack\.eps'"),
    ({"sft.think.steps": "abc"}, r"sft\.think\.steps: Input should be a valid integer"),
    ({"sft.think.steps": 0}, r"sft\.think\.steps: Input should be greater than or equal to 1"),
    ({"data.image_size": 100}, r"data\.image_size: Input should be a multiple of 28"),
    ({"safemed.train_attack.fraction": 1.5}, r"fraction: Input should be less than or equal to 1"),
    ({"attack.eps.x": 1}, r"unknown configuration key"),
])
def test_bad_overrides_are_errors_naming_the_key(override, match):
    with pytest.raises(config.ConfigError, match=match):
        config.load("tiny", override)


def test_bad_profile_files_name_the_file_and_the_key(tmp_path):
    with pytest.raises(config.ConfigError, match=r"no file .* \(known profiles: .*smoke"):
        config.load("nonexistent-profile")
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  think:\n    stepz: 3\n")
    with pytest.raises(config.ConfigError, match=r"profile .*bad\.yaml: unknown configuration key 'sft\.think\.stepz'"):
        config.load(bad)
    bad.write_text("- a list\n")
    with pytest.raises(config.ConfigError, match="expected a mapping"):
        config.load(bad)
    with pytest.raises(config.ConfigError, match="key=value"):
        config.parse_overrides(["novalue"])


def test_assignment_is_validated_and_yaml_round_trips(tmp_path):
    cfg = config.load("smoke")
    with pytest.raises(Exception, match="greater than or equal to 1"):
        cfg.sft.think.steps = 0
    dumped = tmp_path / "dump.yaml"
    dumped.write_text(cfg.to_yaml())
    assert config.load(dumped).model_dump() == cfg.model_dump()  # the dump names its profile


def test_every_key_of_the_profiles_is_known():
    """The profiles hold only keys the classes define (a typo would be an error at load; this lists them)."""
    keys = set(config.keys(config.Config))
    for name in ("smoke", "paper"):
        tree = yaml.safe_load((config.CONFIGS / f"{name}.yaml").read_text())

        def walk(node, prefix=""):
            for k, v in node.items():
                path = prefix + k
                assert path in keys, f"{name}.yaml: {path}"
                if isinstance(v, dict) and path not in ("sft.think.binding", "sft.nothink.binding"):
                    walk(v, path + ".")
        walk(tree)
