"""A real Ray cluster of several nodes on this one machine, every node bound to loopback (the fixture is in
conftest.py; the handle and helpers are here so tests can import them).

`ray.cluster_utils.Cluster`: a head node with no CPUs (drivers join it: Ray prefers the head among nodes that
share an IP, so killing a worker node never kills a driver) and worker nodes of 1 CPU each, each with a custom
resource naming it. Every node has its own raylet, object store and workers, so a node can be killed alone
(`remove_node`: all its processes). Loopback as plumbing/ray_session.py does it: node IP 127.0.0.1 and Ray's
single-machine switch off, for the nodes started here and for the commands the tests start (they join with
`--address`). All nodes share this machine's filesystem: the "shared filesystem" a real cluster needs.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import psutil
import pytest
from plumbing.ray_session import LOOPBACK, LOOPBACK_ENV

WORKER_NODES = 3


@dataclass
class LoopbackCluster:
    cluster: object  # ray.cluster_utils.Cluster
    env: dict[str, str]  # the environment for a command that joins it
    added: int = 0
    workers: list = field(default_factory=list)

    @property
    def address(self) -> str:
        return self.cluster.address

    def add_worker(self):
        node = self.cluster.add_node(num_cpus=1, node_ip_address=LOOPBACK, include_dashboard=False,
                                     resources={f"chorus_worker_{self.added}": 1})
        self.added += 1
        self.workers.append(node)
        return node

    def kill(self, node) -> None:
        """The node dies: every process of it (raylet, object store, workers) killed at once, no goodbye."""
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)

    def node_of(self, node_id: str):
        return next(n for n in [self.cluster.head_node, *self.workers] if n.node_id == node_id)

    def workers_named(self, fragment: str) -> dict[str, list[int]]:
        """{node id: pids} of the Ray workers whose process title contains `fragment` (`ray::TeacherEngine`,
        `ray::ServeReplica`, ...): a worker is a child of its node's raylet, so this is where it runs."""
        from ray._private import ray_constants

        found: dict[str, list[int]] = {}
        for node in [self.cluster.head_node, *self.workers]:
            raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
            try:
                children = psutil.Process(raylet).children(recursive=False)
            except psutil.NoSuchProcess:
                continue
            for child in children:
                try:
                    if fragment in " ".join(child.cmdline()):
                        found.setdefault(node.node_id, []).append(child.pid)
                except psutil.Error:
                    continue
        return found

    def wait_for_workers(self, fragment: str, nodes: int, timeout_s: float, alive=lambda: True) -> dict[str, list[int]]:
        """Poll until `fragment` workers run on at least `nodes` distinct nodes; the last sighting otherwise."""
        deadline, seen = time.time() + timeout_s, {}
        while time.time() < deadline and alive():
            seen = self.workers_named(fragment)
            if len(seen) >= nodes:
                return seen
            time.sleep(0.2)
        return seen


def distinct_nodes(placement: dict[str, list[int]], expected: int) -> bool:
    """True when the workers sit on `expected` nodes, one worker per node."""
    return len(placement) == expected and all(len(pids) == 1 for pids in placement.values())


# Here, not in a tests/cluster/conftest.py: a second module named `conftest` would replace tests/conftest.py in
# sys.modules, and the suites that import constants from it would break when the whole tree is collected.
@pytest.fixture(scope="module")
def ray_cluster():
    """A head (0 CPUs) and WORKER_NODES worker nodes of 1 CPU on 127.0.0.1; stopped after the module."""
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    before = {k: os.environ.get(k) for k in LOOPBACK_ENV}
    for key, value in LOOPBACK_ENV.items():  # the nodes' processes inherit it (None: unset, e.g. RAY_ADDRESS)
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    single_machine = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "node_ip_address": LOOPBACK, "include_dashboard": False, "resources": {"chorus_head": 1},
        # a dead node is declared dead within ~10 s instead of ~30 s. Not faster: on a loaded 2-core box a live
        # raylet busy beside two vLLM engines starting up missed three 1 s checks and was declared dead.
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 2000,
                           "health_check_failure_threshold": 5}})
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
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
