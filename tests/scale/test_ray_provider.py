"""RayProvider: attention nodes as Ray actors on a local Ray instance (CPU), each running a
`kflume node` process and reporting its address; a cluster decodes over them exactly,
and a removed or closed node's actor goes away. Without Ray, the error names the extra."""

from __future__ import annotations

import secrets
import subprocess
import sys

import pytest


def test_without_ray_the_error_names_the_extra():
    code = ("import sys; sys.modules['ray'] = None\n"
            "from kflume.providers import RayProvider\n"
            "try:\n    RayProvider('token')\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert "pip install 'kflume[ray]'" in out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nodes_as_ray_actors():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ucxx", reason="the nodes talk over UCX (the ucx extra)")
    from kflume import Cluster
    from kflume.comm.ucx import UcxTransport
    from kflume.config import NodeConfig
    from kflume.providers import RayProvider

    from .workload import HKV, HQ, LAYERS, D, Workload

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        token = secrets.token_hex(8)
        provider = RayProvider(token, num_gpus=0, num_cpus=0, env={"OMP_NUM_THREADS": "1"},
                               timeout=120)
        geometry = NodeConfig(layers=LAYERS, kv_heads=HKV, head_dim=D, capacity_tokens=256,
                              page_size=16, q_heads=HQ, dtype="float32")
        with Cluster(UcxTransport(token=token), geometry, provider=provider,
                     range_tokens=32) as cl:
            a = cl.add_node(wait=False)
            b = cl.add_node()  # both actors start at once; this waits for the second
            w = Workload(cl)
            w.run(60.0, until=lambda: a in cl.router.nodes())
            actors = {n: cl.processes[n].actor for n in (a, b)}
            host = cl.processes[a].address.rpartition(":")[0]
            assert host == ray.util.get_node_ip_address()
            for rid in range(3):
                w.admit(rid, 40)
            w.run(2.0)
            assert all(cl.router.node_load(n) > 0 for n in (a, b))
            cl.remove_node(a)  # its KV migrates to b at the next boundary, then it stops
            w.run(1.0)
            assert cl.router.nodes() == (b,)
            with pytest.raises(ray.exceptions.RayActorError):
                ray.get(actors[a].address.remote(), timeout=30)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actors[b].address.remote(), timeout=30)
    finally:
        ray.shutdown()
