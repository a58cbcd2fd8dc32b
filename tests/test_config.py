"""Config schema: parsing, unknown keys, type and range checks, command-line overrides."""

from __future__ import annotations

import pytest
import yaml

from contextnorm.config import (
    ConfigError,
    ExperimentConfig,
    MethodConfig,
    TrainConfig,
    apply_overrides,
    config_to_dict,
    dump_config,
    load_config,
    parse_config,
    shipped_configs,
)


def test_defaults_parse_from_an_empty_mapping() -> None:
    assert parse_config({}) == ExperimentConfig()


@pytest.mark.parametrize("name", shipped_configs())
def test_every_shipped_config_parses(name: str) -> None:
    config = load_config(name)
    assert config.name
    assert config.methods


def test_demo_is_shipped_with_the_main_job_settings() -> None:
    config = load_config("demo")
    assert config.data.name == "digits"
    assert config.contexts.kind == "domain"
    assert [method.name for method in config.methods] == [
        "bn",
        "cn",
        "cnx",
        "cne",
        "acn",
        "mixnorm",
        "modenorm",
    ]
    assert len(config.train.seeds) >= 3


def test_unknown_top_level_key_names_the_key_and_the_valid_ones() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown config key 'trian'.*valid keys: name, output_dir"
    ):
        parse_config({"trian": {}})


def test_unknown_nested_key_names_its_path_and_section() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"train": {"epoch": 3}})
    message = str(caught.value)
    assert "'train.epoch'" in message
    assert "in 'train'" in message
    assert "epochs" in message


def test_unknown_key_inside_a_method_mapping_is_reported_with_its_index() -> None:
    with pytest.raises(ConfigError, match=r"methods\[1\]\.option"):
        parse_config({"methods": ["bn", {"name": "cn", "option": {}}]})


def test_methods_accept_names_and_mappings() -> None:
    config = parse_config(
        {"methods": ["bn", {"name": "cn", "label": "cn-flat", "options": {"prior_scaling": False}}]}
    )
    assert config.methods == [
        MethodConfig("bn"),
        MethodConfig("cn", "cn-flat", {"prior_scaling": False}),
    ]
    assert [method.display_name for method in config.methods] == ["bn", "cn-flat"]


def test_repeated_method_rows_need_distinct_labels() -> None:
    with pytest.raises(ConfigError, match="more than once"):
        parse_config({"methods": ["cn", "cn"]})
    parse_config({"methods": ["cn", {"name": "cn", "label": "cn-2"}]})


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"train": {"epochs": "ten"}}, "train.epochs must be an integer"),
        ({"train": {"epochs": True}}, "train.epochs must be an integer"),
        ({"train": {"epochs": 0}}, "train.epochs must be a positive integer"),
        ({"train": {"lr": 0}}, "train.lr must be positive"),
        ({"train": {"gradient_clip": 0}}, "train.gradient_clip must be positive or null"),
        ({"train": {"optimizer": "lamb"}}, "train.optimizer must be one of adamw, adam, sgd"),
        (
            {"train": {"schedule": "step"}},
            "train.schedule must be one of constant, multistep, cosine",
        ),
        ({"train": {"seeds": [1, 1]}}, "train.seeds must not repeat"),
        ({"train": {"seeds": 3}}, "train.seeds must be a list"),
        ({"data": {"val_fraction": 1.0}}, r"data.val_fraction must be in \[0, 1\)"),
        ({"data": {"augment": "flip"}}, "data.augment must be one of"),
        (
            {"contexts": {"num_contexts": 0}},
            "contexts.num_contexts must be a positive integer or null",
        ),
        ({"model": {"options": []}}, "model.options must be a mapping"),
        ({"methods": []}, "methods must list at least one method"),
    ],
)
def test_bad_values_name_the_key_and_the_rule(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_config(raw)


def test_integers_are_accepted_where_numbers_are_expected() -> None:
    config = parse_config({"train": {"lr": 1, "weight_decay": 0}})
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)


def test_overrides_are_read_as_yaml_and_create_missing_levels() -> None:
    raw = apply_overrides(
        {"train": {"epochs": 5}},
        [
            "train.epochs=2",
            "methods=[bn, cn]",
            "model.options.widths=[4, 8]",
            "data.root=null",
            "contexts.kind=kmeans",
            "train.lr=0.05",
        ],
    )
    config = parse_config(raw)
    assert config.train.epochs == 2
    assert [method.name for method in config.methods] == ["bn", "cn"]
    assert config.model.options == {"widths": [4, 8]}
    assert config.data.root is None
    assert config.contexts.kind == "kmeans"
    assert config.train.lr == pytest.approx(0.05)


def test_overrides_do_not_modify_the_input_mapping() -> None:
    raw = {"train": {"epochs": 5}}
    apply_overrides(raw, ["train.epochs=1"])
    assert raw == {"train": {"epochs": 5}}


def test_an_unknown_override_key_fails_like_an_unknown_file_key() -> None:
    with pytest.raises(ConfigError, match=r"'train.epoch'.*epochs"):
        load_config("demo", ["train.epoch=1"])


@pytest.mark.parametrize("override", ["train.epochs", "=3", "train..epochs=3"])
def test_malformed_overrides_explain_the_form(override: str) -> None:
    with pytest.raises(ConfigError, match=r"key\.sub=value"):
        apply_overrides({}, [override])


def test_an_override_cannot_descend_into_a_plain_value() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs holds a value"):
        apply_overrides({"train": {"epochs": 3}}, ["train.epochs.x=1"])


def test_load_config_reads_files_and_applies_overrides(tmp_path) -> None:
    path = tmp_path / "experiment.yaml"
    path.write_text("name: mine\ntrain:\n  epochs: 4\nmethods: [bn]\n", encoding="utf-8")
    config = load_config(path, ["train.batch_size=16"])
    assert (config.name, config.train.epochs, config.train.batch_size) == ("mine", 4, 16)
    assert config.results_dir.as_posix() == "runs/mine"


def test_a_missing_config_lists_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match=r"shipped configs: .*demo"):
        load_config("no-such-config")


def test_config_round_trips_through_yaml() -> None:
    config = load_config("demo", ["methods=[bn, {name: cn, label: x, options: {momentum: 0.2}}]"])
    assert parse_config(yaml.safe_load(dump_config(config))) == config
    assert parse_config(config_to_dict(config)) == config


def test_numbers_in_scientific_notation_are_read_in_files_and_overrides(tmp_path) -> None:
    path = tmp_path / "experiment.yaml"
    path.write_text(
        "train: {lr: 1e-3, weight_decay: 5E-4, epochs: 1e1}\n"
        "data: {train_samples: 2.5e3}\n"
        "methods: [{name: cn, options: {eps: 1e-5}}]\n",
        encoding="utf-8",
    )
    config = load_config(path, ["train.momentum=9e-1", "contexts.num_contexts=4e0"])
    assert (config.train.lr, config.train.weight_decay, config.train.momentum) == (1e-3, 5e-4, 0.9)
    assert config.train.epochs == 10 and isinstance(config.train.epochs, int)
    assert config.data.train_samples == 2500 and config.contexts.num_contexts == 4
    assert config.methods[0].options == {"eps": 1e-5}
    # A fraction where a whole number is needed is still refused, naming the key.
    with pytest.raises(ConfigError, match=r"train.epochs must be an integer; got 2.5"):
        load_config(path, ["train.epochs=2.5e0"])
    # Words that merely contain an 'e' stay words.
    assert load_config(path, ["name=1e3x"]).name == "1e3x"


def test_report_baseline_must_be_one_of_the_methods() -> None:
    assert parse_config({"methods": ["bn", "cn"]}).baseline == "bn"
    assert parse_config({"methods": ["bn", "cn"], "report": {"baseline": "cn"}}).baseline == "cn"
    with pytest.raises(ConfigError, match=r"report.baseline must be the label of one of"):
        parse_config({"methods": ["bn", "cn"], "report": {"baseline": "ln"}})


def test_results_describe_gradient_clipping_only_when_it_is_on() -> None:
    assert TrainConfig().clipping == ""
    assert TrainConfig(gradient_clip=5.0).clipping == ", gradient norm clipped at 5"
