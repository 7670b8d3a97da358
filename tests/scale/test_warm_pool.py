"""WarmPool: nodes started ahead, handed out at once, replaced in the background; other
configs started cold; failed starts replaced after a pause; idle nodes stopped on close."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import pytest

from kflume import Cluster
from kflume.config import NodeConfig
from kflume.providers import CallbackProvider, WarmPool

from .workload import HKV, HQ, LAYERS, D, Workload


def test_hands_out_ready_nodes_and_replaces_them():
    with Cluster.in_process(1, layers=LAYERS, kv_heads=HKV, head_dim=D, q_heads=HQ,
                            capacity_tokens=256) as cl:
        inner = cl.provider
        pool = WarmPool(inner, 2)
        assert pool.idle == [] and pool.config is None  # learns its config from warm()
        pool.warm(cl.geometry)
        assert pool.ready_count() == 2 and len(inner.nodes) == 3
        cl.provider = pool
        name = cl.add_node(wait=False)
        assert pool.stats.ready == 1 and len(pool.idle) == 2  # a replacement is on its way
        w = Workload(cl)
        w.admit("a", 20)
        w.step()  # the node joins at this boundary
        assert name in cl.router.nodes()
        big = cl.add_node(512, wait=False)  # another config: started cold, pool untouched
        assert pool.stats.cold == 1 and len(pool.idle) == 2
        w.step()
        assert big in cl.router.nodes() and cl.router.free_tokens(big) == 512
    assert pool.idle == [] and inner.nodes == {}  # Cluster.close() closed the pool


def test_failed_pool_nodes_are_replaced_after_a_pause(caplog):
    class Broken:
        address = None

        def ready(self):
            raise RuntimeError("no GPU left")

        def stop(self):
            self.stopped = True

        kill = stop

    started = []
    provider = CallbackProvider(lambda name, config, env: started.append(Broken()) or started[-1])
    config = NodeConfig(layers=1, kv_heads=1, head_dim=16, capacity_tokens=64)
    pool = WarmPool(provider, 1, config, retry_s=0.3)
    assert len(started) == 1
    with caplog.at_level(logging.ERROR, logger="kflume"):
        pool.fill()
    assert "no GPU left" in caplog.text and started[0].stopped
    assert pool.stats.failed == 1 and pool.idle == []
    pool.fill()
    assert len(started) == 1  # not before retry_s
    time.sleep(0.35)
    pool.fill()
    assert len(started) == 2
    # a start whose pool node failed too starts one cold (and the pool waits retry_s)
    h = pool.start("n", config)
    assert h is started[2] and pool.stats.failed == 2 and pool.stats.cold == 1
    assert pool.idle == [] and len(started) == 3
    pool.close()
    assert pool.start("m", config) is started[3] and pool.stats.cold == 2  # closed: cold


def test_rejects_an_empty_pool():
    with pytest.raises(ValueError, match="at least one"):
        WarmPool(CallbackProvider(lambda *a: "127.0.0.1:1"), 0)


def test_start_of_another_env_is_cold():
    got = []
    provider = CallbackProvider(lambda name, config, env: got.append(env) or "10.0.0.1:7000")
    config = NodeConfig(layers=1, kv_heads=1, head_dim=16, capacity_tokens=64)
    pool = WarmPool(provider, 1, config, env={"CUDA_VISIBLE_DEVICES": "1"})
    assert pool.start("n", config, {"CUDA_VISIBLE_DEVICES": "1"}).address == "10.0.0.1:7000"
    assert pool.stats.ready == 1
    pool.start("m", config, {"CUDA_VISIBLE_DEVICES": "2"})
    pool.start("o", replace(config, capacity_tokens=128), {"CUDA_VISIBLE_DEVICES": "1"})
    assert pool.stats.cold == 2 and got[-2:] == [{"CUDA_VISIBLE_DEVICES": "2"},
                                                 {"CUDA_VISIBLE_DEVICES": "1"}]


def test_without_a_ready_node_hands_out_the_first_started():
    class Starting:
        address = None

        def ready(self):
            return False

        def stop(self):
            pass

        kill = stop

    handles = []
    provider = CallbackProvider(lambda n, c, e: handles.append(Starting()) or handles[-1])
    config = NodeConfig(layers=1, kv_heads=1, head_dim=16, capacity_tokens=64)
    pool = WarmPool(provider, 2, config)
    assert pool.start("n", config) is handles[0] and pool.stats.starting == 1
    assert pool.idle == handles[1:] and len(handles) == 3
