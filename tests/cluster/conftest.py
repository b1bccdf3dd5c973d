"""The `ray_cluster` fixture: a real Ray cluster of several nodes on this machine (see loopback_cluster.py)."""
from __future__ import annotations

import os

import pytest

from loopback_cluster import WORKER_NODES, LoopbackCluster
from train.ray_session import LOOPBACK, LOOPBACK_ENV


@pytest.fixture(scope="module")
def ray_cluster():
    """A head (0 CPUs) and WORKER_NODES worker nodes of 1 CPU on 127.0.0.1; stopped after the module."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    before = {k: os.environ.get(k) for k in LOOPBACK_ENV}
    os.environ.update(LOOPBACK_ENV)  # the nodes' processes inherit it
    single_machine = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": LOOPBACK, "include_dashboard": False, "resources": {"chorus_head": 1},
        # a dead node is declared dead within ~3 s instead of ~30 s
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                           "health_check_failure_threshold": 3}})
    env = {**os.environ, **LOOPBACK_ENV, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    handle = LoopbackCluster(cluster, env)
    try:
        for _ in range(WORKER_NODES):
            handle.add_worker()
        cluster.wait_for_nodes()
        yield handle
    finally:
        cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = single_machine
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
