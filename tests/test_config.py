import pytest

from mmbalance.config import overrides_to_dict, resolve_config
from mmbalance.errors import ConfigError


def test_dotted_overrides_and_aliases():
    cfg = resolve_config("synthetic", "ogm_ge", None, ["method.alpha=0.5", "optim.lr=1e-3", "epochs=7", "seed=3",
                                                       "data.unique=[0.05,0.04]", "train.progress=off"])
    assert cfg.method_options.alpha == 0.5
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.train.epochs == 7 and cfg.train.seed == 3
    assert cfg.data_options.unique == [0.05, 0.04]
    assert cfg.train.progress == "off"


def test_explicit_zero_is_not_ignored():
    cfg = resolve_config("synthetic", "ogm_ge", None, ["method.alpha=0"])
    assert cfg.method_options.alpha == 0.0


@pytest.mark.parametrize("item,match", [
    ("method.alpah=0.5", "unknown key 'method.alpah'. Did you mean 'alpha'"),
    ("optim.lrr=0.1", "Did you mean 'lr'"),
    ("otpim.lr=0.1", "unknown config section 'otpim'. Did you mean 'optim'"),
    ("epochs=abc", "expected an integer"),
    ("optim.name=sgdd", "unknown optimiser 'sgdd'. Did you mean 'sgd'"),
    ("model.fusion=concatt", "Did you mean 'concat'"),
    ("data.shared=2", "fractions summing to <= 1"),
    ("alpha=0.5", "'alpha' is not a config key"),
    ("novalue", "not of the form key=value"),
])
def test_bad_overrides_fail_with_suggestions(item, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config("synthetic", "ogm_ge", None, [item])


def test_all_errors_reported_together():
    with pytest.raises(ConfigError) as exc:
        resolve_config("synthetic", "ogm_ge", None, ["method.alpah=1", "optim.lrr=1"])
    assert "alpah" in str(exc.value) and "lrr" in str(exc.value)


def test_unknown_method_and_dataset():
    with pytest.raises(ConfigError, match="Did you mean 'ogm_ge'"):
        resolve_config("synthetic", "ogm-ge")
    with pytest.raises(ConfigError, match="Did you mean 'synthetic'"):
        resolve_config("synthetc", "joint")


def test_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method:\n  name: ogm\n  alpha: 0.3\noptim:\n  name: adam\n  lr: 0.001\nepochs: 4\n")
    cfg = resolve_config(None, None, str(p), ["method.alpha=0.6"])
    assert cfg.method.name == "ogm" and cfg.method_options.alpha == 0.6  # CLI beats YAML
    assert cfg.optim.name == "adam" and cfg.train.epochs == 4
    p.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        resolve_config(None, None, str(p))


def test_round_trip_of_resolved_tree():
    from mmbalance.config import config_from_dict
    cfg = resolve_config("synthetic", "multiloss", None, ["method.unimodal_weight=0.25"])
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


def test_overrides_to_dict_nesting():
    assert overrides_to_dict(["a.b.c=1"]) == {"a": {"b": {"c": "1"}}}


def test_mapping_overrides_are_plain_values_in_saved_config():
    import yaml
    cfg = resolve_config("synthetic", "joint", None, ["model.encoders.x1=mlp", "method.name=joint"])
    text = yaml.safe_dump(cfg.to_dict())
    assert yaml.safe_load(text)["model"]["encoders"] == {"x1": "mlp"}
    assert type(cfg.model.encoders["x1"]) is str
