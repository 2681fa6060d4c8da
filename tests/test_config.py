"""Device configs: shipped ones load; malformed ones fail naming the field."""

import pytest

from latprof.devices import list_configs, load_config
from latprof.errors import ConfigError
from tests.conftest import write_config


def test_shipped_configs_load():
    names = list_configs()
    assert "local" in names
    for name in names:
        cfg = load_config(name)
        assert cfg.name == name


@pytest.mark.parametrize("override, message", [
    ({"threads": "two"}, "field 'threads' must be int"),
    ({"transport": "carrier-pigeon"}, "unknown transport 'carrier-pigeon'"),
    ({"engine": "tensorrt"}, "field 'engine'"),
    ({"measure": {"repeats": 0}}, "measure.repeats"),
    ({"measure": {"repeets": 3}}, "unknown field 'measure.repeets'"),
    ({"colour": "blue"}, "unknown field 'colour'"),
    ({"tuning": {"cache": "lukewarm"}}, "field 'tuning.cache' is 'lukewarm'"),
])
def test_bad_fields_are_named(tmp_path, override, message):
    path = write_config(tmp_path / "bad.yaml", **override)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(str(path))


def test_target_needs_a_kind(tmp_path):
    path = write_config(tmp_path / "t.yaml")
    path.write_text(path.read_text().replace("kind: llvm", "arch: llvm"))
    with pytest.raises(ConfigError, match=r"target\.kind"):
        load_config(str(path))


def test_missing_and_unparsable(tmp_path):
    with pytest.raises(ConfigError, match="unknown device 'nope'"):
        load_config("nope")
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\n  transport: [local\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(str(bad))
