import json
import logging

import pytest

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.rundir import RunDir
from pipeline.runner import format_status, run_stages, stage_states
from tests.fake_stages import SPECS


def cfg_for(tmp_path, *overrides):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", *overrides])


def calls(tmp_path):
    path = tmp_path / "run" / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


def statuses(cfg):
    return {n: s.status for n, s in stage_states(cfg, RunDir(cfg.run_dir), SPECS).items()}


def test_first_run_writes_records_and_resolved_config(tmp_path):
    cfg = cfg_for(tmp_path)
    run_stages(cfg, SPECS)
    assert calls(tmp_path) == ["first resumed=False", "second resumed=False"]
    record = json.loads((tmp_path / "run" / "second" / "_SUCCESS.json").read_text())
    assert record["counts"] == {"items": 3}
    assert record["upstream"]["first"] == RunDir(cfg.run_dir).record("first")["run_id"]
    assert {"python", "webdistill", "img2dataset"} <= set(record["versions"])
    assert load_config(tmp_path / "run" / "config.yaml") == cfg
    assert statuses(cfg) == {"first": "done", "second": "done", "third": "not built"}


def test_done_stages_are_skipped_with_a_message(tmp_path, caplog):
    cfg = cfg_for(tmp_path)
    run_stages(cfg, SPECS)
    with caplog.at_level(logging.INFO, logger="webdistill"):
        run_stages(cfg, SPECS)
    assert len(calls(tmp_path)) == 2
    assert "first: up to date, skipped" in caplog.text
    assert "not built yet: third" in caplog.text


def test_force_reruns_the_stage_and_makes_later_stages_stale(tmp_path):
    cfg = cfg_for(tmp_path)
    run_stages(cfg, SPECS)
    run_stages(cfg, SPECS, only=["first"], force=True)
    assert calls(tmp_path)[-1] == "first resumed=False"
    states = stage_states(cfg, RunDir(cfg.run_dir), SPECS)
    assert (states["first"].status, states["second"].status) == ("done", "stale")
    assert states["second"].why == "upstream first was re-run"
    run_stages(cfg, SPECS)  # only the stale stage runs
    assert calls(tmp_path)[-2:] == ["first resumed=False", "second resumed=False"]
    assert statuses(cfg)["second"] == "done"


def test_config_change_makes_a_stage_and_its_followers_stale(tmp_path):
    run_stages(cfg_for(tmp_path), SPECS)
    changed = cfg_for(tmp_path, "crawl.timeout=3")
    states = stage_states(changed, RunDir(changed.run_dir), SPECS)
    assert states["first"].why == "config or input files changed (crawl)"
    assert states["second"].why == "upstream first is stale"
    run_stages(changed, SPECS)
    assert len(calls(tmp_path)) == 4
    assert (tmp_path / "run" / "first" / "out.txt").read_text() == "3"
    # a section only the second stage reads leaves the first one done
    assert statuses(cfg_for(tmp_path, "crawl.timeout=3", "data.url_col=link")) == {
        "first": "done", "second": "stale", "third": "not built"}


def test_a_new_version_of_an_input_file_makes_the_stage_stale(tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text("http://a/1.jpg\n")
    cfg = cfg_for(tmp_path, f"data.url_list={urls}")
    run_stages(cfg, SPECS)
    assert statuses(cfg)["second"] == "done"
    urls.write_text("http://a/1.jpg\nhttp://a/2.jpg\n")  # same path, new content
    states = stage_states(cfg, RunDir(cfg.run_dir), SPECS)
    assert (states["first"].status, states["second"].status) == ("done", "stale")
    assert states["second"].why == "config or input files changed (data)"


def test_interrupted_stage_is_not_complete_and_resumes_only_with_same_inputs(tmp_path):
    killed = cfg_for(tmp_path, "crawl.retries=99")
    with pytest.raises(KeyboardInterrupt):
        run_stages(killed, SPECS)
    states = stage_states(killed, RunDir(killed.run_dir), SPECS)
    assert states["first"].status == "missing"
    assert "interrupted" in states["first"].why
    with pytest.raises(KeyboardInterrupt):  # same inputs: the partial work is kept
        run_stages(killed, SPECS)
    assert calls(tmp_path)[-1] == "first resumed=True"
    run_stages(cfg_for(tmp_path), SPECS)  # other config: start clean
    assert calls(tmp_path)[-2:] == ["first resumed=False", "second resumed=False"]


def test_a_stage_whose_upstream_is_not_done_refuses_to_run(tmp_path):
    with pytest.raises(UserError, match="stage second needs first to be done first"):
        run_stages(cfg_for(tmp_path), SPECS, only=["second"])
    with pytest.raises(UserError, match="unknown stage 'frist'"):
        run_stages(cfg_for(tmp_path), SPECS, only=["frist"])


def test_status_output(tmp_path):
    cfg = cfg_for(tmp_path)
    text = format_status(cfg, RunDir(cfg.run_dir), SPECS)
    assert "first      missing    not run yet" in text
    run_stages(cfg, SPECS)
    run_stages(cfg, SPECS, only=["first"], force=True)
    lines = format_status(cfg, RunDir(cfg.run_dir), SPECS).splitlines()
    assert lines[1].split()[:4] == ["first", "done", "items", "3"]
    assert lines[2].startswith("  second     stale      upstream first was re-run; last run: items 3")
    assert lines[3].split()[:3] == ["third", "not", "built"]


def test_a_new_meaning_of_a_preset_name_makes_distill_stale(monkeypatch):
    from stages import STAGES
    from stages.distill import methods

    distill = next(s for s in STAGES if s.name == "distill")
    cfg = load_config(None, ["distill.preset=webdistill"])
    before = distill.fingerprint(cfg)
    assert distill.fingerprint(load_config(None, ["distill.preset=webdistill"])) == before
    monkeypatch.setitem(methods.PRESETS, "webdistill", {"temperature": 2.0})  # same config, new recipe
    assert distill.fingerprint(cfg) != before


def test_a_stage_without_its_declared_outputs_is_not_recorded_done(tmp_path, monkeypatch):
    from manifests import artifacts

    cfg = cfg_for(tmp_path)
    lacking = artifacts.Artifact("first", "summary.json", "json", "first's summary")
    monkeypatch.setattr(artifacts, "ARTIFACTS", artifacts.ARTIFACTS + [lacking])
    with pytest.raises(UserError, match="stage first finished without valid outputs.*summary.json.*not found"):
        run_stages(cfg, SPECS)
    assert RunDir(cfg.run_dir).record("first") is None
    assert statuses(cfg)["first"] == "missing"
    written = artifacts.Artifact("first", "out.txt", "file", "first's output")
    monkeypatch.setattr(artifacts, "ARTIFACTS", artifacts.ARTIFACTS[:-1] + [written])
    run_stages(cfg, SPECS)
    assert statuses(cfg)["first"] == "done"
