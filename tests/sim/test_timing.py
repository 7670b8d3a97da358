"""The step-time model, its calibration against the measured end-to-end figures, and the
hardware data it reads."""

from __future__ import annotations

import pytest

from kflume.sim.calibration import MEASURED, calibration_table
from kflume.sim.config import SimConfig
from kflume.sim.hardware import GPU_NAMES, calibration, gpu, hardware_data, price_table
from kflume.sim.models import MODELS, model
from kflume.sim.runner import attention_capacity, replica_capacity, tensor_parallel
from kflume.sim.timing import StepModel


def test_every_measured_configuration_is_predicted_within_7_percent():
    rows = calibration_table()
    assert len(rows) == len(MEASURED) == 10
    assert {(r.measured.batch, r.measured.context) for r in rows} == {
        (8, 32768), (32, 32768), (8, 131072)}
    for r in rows:
        assert abs(r.error) < 0.07, (r.measured, r.predicted_ms)


def test_model_shapes():
    m = model("llama-3.1-8b")
    assert m.params == pytest.approx(8.03e9, rel=1e-3)
    assert m.kv_bytes_per_token == 128 * 1024
    assert model("llama-3.1-70b").params == pytest.approx(70.55e9, rel=1e-3)
    with pytest.raises(ValueError, match="unknown model"):
        model("gpt-5")


def test_gpu_profiles_scale_the_spec_by_the_measured_efficiency():
    h200, l40s = gpu("h200"), gpu("l40s")
    assert h200.kflume_read_bps == pytest.approx(4.45e12)
    eff = h200.kflume_read_bps / h200.bandwidth_bps
    assert l40s.kflume_read_bps == pytest.approx(l40s.bandwidth_bps * eff)
    assert gpu("h100").kflume_read_bps == pytest.approx(3.01e12)  # measured on an H100
    assert gpu("h200", "eager").weight_read_bps < h200.weight_read_bps
    for name in GPU_NAMES:
        assert "http" in hardware_data()["gpus"][name]["source"]
    with pytest.raises(ValueError, match="unknown GPU"):
        gpu("v100")


def test_prices():
    p = price_table()
    assert (p["h100"], p["h200"], p["l40s"], p["a100"]) == (2.69, 3.59, 0.79, 1.39)
    assert price_table("secure")["h200"] == 4.59
    assert price_table(overrides={"H200": 2.0})["h200"] == 2.0
    with pytest.raises(ValueError, match="give one with --price"):
        price_table().__getitem__("tpu")
    with pytest.raises(ValueError, match="tier"):
        price_table("spot")


def step(name="llama-3.1-8b", g="h200", tp=1):
    return StepModel(model(name), gpu(g), tp, calibration())


def test_dense_time_is_a_roofline():
    s = step()
    assert s.dense_s(1) == s.dense_s(64)  # decode: streaming the weights
    assert s.dense_s(8192) > 2 * s.dense_s(2048) * 0.99 > s.dense_s(1)  # prefill: FLOPs


def test_step_times_grow_with_kv_and_fall_with_attention_bandwidth():
    s = step()
    assert s.colocated_s(8, 2e5) < s.colocated_s(8, 4e5)
    slow = s.kflume_s(8, 4e5, 4.45e12, 1e15)
    assert s.kflume_s(8, 4e5, 4 * 4.45e12, 1e15) < slow
    assert s.kflume_s(8, 4e5, 4.45e12, 1e15, chunk=512, chunk_ctx=1e5) > slow
    assert s.colocated_kv_limit(8, s.colocated_s(8, 3e5)) == pytest.approx(3e5)


def test_capacities_and_tensor_parallelism():
    cfg = SimConfig()
    m8, m70 = model("llama-3.1-8b"), model("llama-3.1-70b")
    assert tensor_parallel(m8, gpu("h200")) == 1
    assert tensor_parallel(m70, gpu("h200")) == 2 and tensor_parallel(m70, gpu("h100")) == 4
    node = attention_capacity(m8, gpu("h200"), cfg)
    replica = replica_capacity(m8, gpu("h200"), 1, cfg)
    assert node - replica == pytest.approx(m8.weight_bytes / m8.kv_bytes_per_token, abs=1)
    assert set(MODELS) >= {"llama-3.1-8b", "llama-3.1-70b"}


def test_weight_node_rule():
    from kflume.sim.weights import WeightNodeRule

    rule = WeightNodeRule(target_batch=100, prefill_utilization=0.5)
    assert rule.change(live=0, requests=1, prefill_load=0.0, since_change_s=0) == 1
    assert rule.change(live=1, requests=250, prefill_load=0.0, since_change_s=0) == 2
    assert rule.change(live=1, requests=10, prefill_load=1.2, since_change_s=0) == 2
    assert rule.change(live=3, requests=10, prefill_load=0.0, since_change_s=10) == 0  # cooldown
    assert rule.change(live=3, requests=10, prefill_load=0.0, since_change_s=100) == -1
    assert rule.change(live=2, requests=80, prefill_load=0.0, since_change_s=100) == 0  # 0.8 > 0.75
    with pytest.raises(ValueError, match="target_batch"):
        WeightNodeRule(target_batch=0, prefill_utilization=0.5)


def test_break_even_ttl_grows_with_model_size_and_cheaper_memory():
    from kflume.sim.retention import break_even_ttl_s

    p = price_table()
    m8, m70 = model("llama-3.1-8b"), model("llama-3.1-70b")
    cfg = SimConfig()
    def ttl(m, attn, tp=1):
        return break_even_ttl_s(StepModel(m, gpu("h200"), tp, calibration()), gpu(attn),
                                attention_capacity(m, gpu(attn), cfg), p, 100_000)
    assert 30 < ttl(m8, "h200") < 300  # a minute or two for an 8B model's 100K tokens
    assert ttl(m70, "h200", 2) > 2 * ttl(m8, "h200")
    assert ttl(m8, "l40s") > ttl(m8, "h200")
