import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline.app import Config
from pipeline.config import (
    commented_defaults,
    dump_yaml,
    fingerprint,
    load_config,
)
from pipeline.errors import UserError
from tests.conftest import REPO


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_demo_config_loads_with_its_values():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.crawl.image_size is None  # the teacher's input side
    assert cfg.data.url_list == str(Path.cwd() / "demo_data" / "web_urls.parquet")  # relative paths: to the cwd
    assert cfg.demo.pool_size >= 10_000


# What a scenario may set beyond paths: facts of its domain, each documented in its config and the README
DOMAIN_FACTS = {
    "demo.yaml": set(),
    "textile.yaml": {"data.serve_port",  # a second loopback server beside the digits'
                     "synthesize.flip", "distill.augment_hflip",  # fabric has no up or left
                     "synthesize.bn_weight",  # MobileNetV3's many BatchNorm layers drown the class term
                     "distill.student_kwargs"},  # a strided stem for 96-px tiles
}


def recipe_differences(cfg, defaults, prefix="") -> set[str]:
    """Keys whose values differ from the defaults, paths left out, and the teacher (the user's model: its spec
    file fills the section once built) and the bench's and demo's own sections."""
    found = set()
    for f in dataclasses.fields(defaults):
        if prefix == "" and f.name in ("teacher", "bench", "demo"):
            continue
        mine, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if dataclasses.is_dataclass(default):
            found |= recipe_differences(mine, default, f"{f.name}.")
        elif mine != default and not f.metadata.get("path"):
            found.add(prefix + f.name)
    return found


@pytest.mark.parametrize("name", sorted(DOMAIN_FACTS))
def test_demo_configs_are_the_defaults_but_paths_and_domain_facts(name):
    """`webdistill defaults` is the recipe both scenarios run: a user who sets only paths gets it."""
    differences = recipe_differences(load_config(REPO / "configs" / name), load_config(None))
    assert differences == DOMAIN_FACTS[name]


def test_typo_names_key_file_and_closest_valid_key(tmp_path):
    path = write(tmp_path, "crawl:\n  procesess_count: 4\n")
    with pytest.raises(UserError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "'crawl.procesess_count'" in msg
    assert "did you mean 'processes_count'" in msg


def test_typo_in_section_name(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'crwal'; did you mean 'crawl'"):
        load_config(write(tmp_path, "crwal:\n  timeout: 3\n"))


def test_wrong_type_and_bad_choice_are_errors(tmp_path):
    with pytest.raises(UserError, match=r"crawl.timeout must be int, got 'soon'"):
        load_config(write(tmp_path, "crawl:\n  timeout: soon\n"))
    with pytest.raises(UserError, match=r"crawl.resize_mode = 'boarder' is not one of .*did you mean 'border'"):
        load_config(write(tmp_path, "crawl:\n  resize_mode: boarder\n"))


def test_defaults_fill_what_the_file_leaves_out(tmp_path):
    cfg = load_config(write(tmp_path, "crawl:\n  timeout: 3\n"))
    assert cfg.crawl.timeout == 3
    assert cfg.crawl.thread_count == Config().crawl.thread_count


def test_overrides_and_fingerprints():
    a = load_config(None, ["crawl.timeout=3"])
    b = load_config(None, ["crawl.timeout=4"])
    assert a.crawl.timeout == 3
    assert fingerprint(a, ["crawl"]) != fingerprint(b, ["crawl"])
    assert fingerprint(a, ["data"]) == fingerprint(b, ["data"])
    with pytest.raises(UserError, match="unknown key 'crawl.timeuot'"):
        load_config(None, ["crawl.timeuot=3"])


def test_commented_defaults_is_the_loadable_default_config(tmp_path):
    text = commented_defaults()
    assert "# seconds a download may take, wall clock" in text
    assert "(must be > 0)" in text  # each range is documented
    assert load_config(write(tmp_path, text)) == load_config(None)
    assert yaml.safe_load(text)["crawl"]["processes_count"] == Config().crawl.processes_count


def test_a_dumped_config_reloads_with_the_same_fingerprints(tmp_path):
    """A run directory's config.yaml must not look changed to the runner (e.g. an int default in a
    float field would reload as a float and make every stage stale)."""
    cfg = load_config(REPO / "configs" / "demo.yaml")
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    sections = [f.name for f in dataclasses.fields(Config)]
    assert fingerprint(load_config(path), sections) == fingerprint(cfg, sections)


def test_exponent_floats_without_a_dot_are_floats():
    # PyYAML reads YAML 1.1, where 1e-6 is a string; in a float field it means the number
    cfg = load_config(None, ["synthesize.lr=1e-6", "synthesize.tv_weight=2.5E-5"])
    assert cfg.synthesize.lr == 1e-6 and cfg.synthesize.tv_weight == 2.5e-5
    with pytest.raises(UserError, match="synthesize.lr must be float, got '1e-'"):
        load_config(None, ["synthesize.lr=1e-"])
