"""`kflume sim`: every trace format, JSON keyed by system, plots, help."""

from __future__ import annotations

import json

import pytest

from kflume.cli import main as kflume_main
from kflume.sim.cli import DEFAULT_TRACE, main, parser

from .conftest import SAMPLE_FORMATS, SAMPLES, SHARED_FORMATS, shared

KEYS = {"dollars_per_mtok", "tpot_p99_ms", "tpot_p50_ms", "ttft_p50_s", "ttft_p99_s",
        "slo_attainment", "gpu_hours", "preemptions", "queue_delay_mean_s"}


def run_json(tmp_path, *args) -> dict:
    out = tmp_path / "out.json"
    assert main([*args, "--json", str(out), "--quiet"]) == 0
    return json.loads(out.read_text())


def test_default_trace_is_bundled():
    assert DEFAULT_TRACE.exists() and DEFAULT_TRACE.parent == SAMPLES


@pytest.mark.parametrize("name", sorted(SAMPLE_FORMATS))
def test_every_bundled_format(tmp_path, name):
    res = run_json(tmp_path, "--trace", str(SAMPLES / name), "--max-sessions", "6",
                   "--systems", "instance,kflume")
    assert set(res) == {"instance", "kflume"}
    for r in res.values():
        assert KEYS <= set(r) and r["output_tokens"] > 0


@pytest.mark.parametrize("name", sorted(SHARED_FORMATS))
def test_every_shared_trace(tmp_path, name):
    path = shared(name)
    limit = ["--max-sessions", "4"] if "kv_cache" in name or "round" in name or \
        name.endswith(".json") else ["--until-s", "60"]
    res = run_json(tmp_path, "--trace", str(path), *limit)
    assert set(res) == {"colocated", "instance", "kflume", "kflume-l40s"}


def test_json_and_plots_through_the_kflume_command(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="plots need the sim extra")
    out = tmp_path / "r.json"
    rc = kflume_main(["sim", "--trace", str(SAMPLES / "tracelab_round_trace.jsonl"),
                      "--json", str(out), "--plot", str(tmp_path / "plots"),
                      "--systems", "colocated,instance,kflume,kflume-a6000",
                      "--price", "h200=3.0", "--slo-tpot-ms", "40"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert list(res) == ["colocated", "instance", "kflume", "kflume-a6000"]
    assert res["kflume"]["config"]["prices"]["h200"] == 3.0
    assert res["kflume"]["slo_tpot_ms"] == 40
    for png in ("tpot_over_time.png", "gpus_over_time.png", "cost.png"):
        assert (tmp_path / "plots" / png).stat().st_size > 10_000
    table = capsys.readouterr().out
    assert "$/Mtok" in table and "kflume-a6000" in table


def test_help_shows_every_default():
    text = parser().format_help()
    for flag in ("--trace", "--json", "--plot", "--systems", "--gpu", "--attention-gpu",
                 "--price", "--price-tier", "--slo-tpot-ms", "--session-rate", "--request-rate"):
        assert flag in text
    assert text.count("(default:") >= 25


def test_plots_without_matplotlib_name_the_extra(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = main(["--trace", str(SAMPLES / "tracelab_round_trace.jsonl"), "--plot", str(tmp_path),
               "--systems", "instance", "--quiet"])
    assert rc == 2 and "pip install 'kflume[sim]'" in capsys.readouterr().err


def test_bad_input_is_reported(tmp_path, capsys):
    assert main(["--trace", str(tmp_path / "none.csv"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--systems", "kflume-tpu", "--quiet"]) == 2
    assert "unknown system" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--price", "h200"])
