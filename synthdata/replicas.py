"""Where a generation job's samples come from (synthdata/job.py): `replicas` slots, each either a group of vLLM
engines on Ray (`EngineReplicas`: one engine per model directory, Ray actors holding `TeacherEngine`) or a client of
a live Chorus endpoint (`EndpointReplicas`). The driver loop (synthdata/batching.py) sees one interface:
`call(slot, member, bos, sample, score, abort)` sends one round of work and returns a handle, `wait` / `result`
collect handles, `release(slot)` stops a slot, `replace(slot, still_needed)` gives a lost slot a new replica (at
most `max_restarts` per job).

Ray actors rather than Ray Data or the Ray Serve deployment: a shard must be one unit (made in full or not at all,
by one writer), and actor calls with explicit seeds give that with the least machinery; a Serve endpoint would add
HTTP and batching we do not need for offline work.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from serve.draft import speculative_config
from synthdata.endpoint import EndpointClient, EndpointSampler
from synthdata.engine import SamplingSettings, TeacherEngine, engine_env
from synthdata.shards import JobError

if TYPE_CHECKING:
    from synthdata.job import GenerateConfig

BUDGET_S = 0.5  # an engine steps this long per call before reporting what finished (requests stay queued)


class EngineReplicas:
    """The job's replicas on Ray: `replicas` groups of engines (one per model directory), and a new group for a
    slot whose group died (its node lost, an engine killed) or hung: at most `cfg.max_restarts` per job.

    `call(slot, member, ...)` sends one `TeacherEngine.advance` to an engine (requests to add and to abort; the
    engine steps for `BUDGET_S` and returns what finished); `wait` / `result` are Ray's."""

    def __init__(self, model_dirs: list[Path], replicas: int, settings: SamplingSettings, cfg: GenerateConfig,
                 cores: list[str | None]):
        """`cores`: each engine's CPU list (slot by slot, member by member; None: the engine's own choice)."""
        import ray

        self.model_dirs, self.settings, self.cfg, self.cores = model_dirs, settings, cfg, cores
        self.members = len(model_dirs)
        self.local = cfg.address is None
        self.actor = ray.remote(num_cpus=1)(TeacherEngine)
        self.speculative = (speculative_config(cfg.draft, cfg.num_speculative_tokens) if cfg.draft is not None
                            else None)
        self.restarts, self.lock = 0, threading.Lock()
        self.groups = [self._launch(r) for r in range(replicas)]
        ray.get([e.__ray_ready__.remote() for g in self.groups for e in g])  # engines up before the clock starts

    def _launch(self, slot: int) -> list:
        # On a cluster, one replica per node where there is room (SPREAD): a lost node takes one replica.
        placement = {} if self.local else {"scheduling_strategy": "SPREAD"}
        group = []
        for m, d in enumerate(self.model_dirs):
            env = engine_env(self.cfg.kv_cache_gib, self.cores[slot * len(self.model_dirs) + m])
            group.append(self.actor.options(runtime_env={"env_vars": env}, **placement)
                         .remote(str(d), self.settings.max_len, self.cfg.seed, self.cfg.topk, self.speculative))
        return group

    def call(self, slot: int, member: int, bos: int, sample: list, score: list, abort: list):
        return self.groups[slot][member].advance.remote(bos, self.settings, sample, score, abort, self.cfg.topk,
                                                         BUDGET_S)

    @staticmethod
    def wait(handles: list, timeout: float) -> list:
        import ray

        return ray.wait(handles, num_returns=1, timeout=timeout)[0] if handles else []

    @staticmethod
    def result(handle) -> list:
        import ray

        return ray.get(handle)

    def release(self, slot: int) -> None:
        """Stop a slot's engines (its work is done, it died or hung): frees its node for a replacement."""
        import ray

        for engine in self.groups[slot]:
            try:
                ray.kill(engine)
            except Exception:  # already gone with its node
                pass

    def replace(self, slot: int, still_needed) -> bool:
        """Start a new group for `slot` on a live node; False when `still_needed()` turns false meanwhile."""
        import ray

        with self.lock:
            if self.restarts >= self.cfg.max_restarts:
                raise JobError(f"replica {slot} was lost and {self.restarts} replicas were already restarted in this "
                               f"job (max_restarts): giving up; re-run the same command to finish the job")
            self.restarts += 1
        self.release(slot)
        self.groups[slot] = group = self._launch(slot)
        refs = [e.__ray_ready__.remote() for e in group]
        deadline = time.monotonic() + self.cfg.restart_timeout_s
        while True:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=2.0)
            if len(ready) == len(refs):
                ray.get(ready)  # an engine that failed to start raises here
                return True
            if not still_needed():
                self.release(slot)
                return False
            if time.monotonic() > deadline:
                self.release(slot)
                raise JobError(f"replica {slot} could not be restarted within {self.cfg.restart_timeout_s:.0f} s: "
                               f"no live node has room for it ({len(group)} engine(s) of 1 CPU)")


class EndpointReplicas:
    """`replicas` slots on one live endpoint, each with its own requests in flight (EndpointClient); a failed request
    loses its slot's shards, which go back to the queue whole; retried after a pause (at most `cfg.max_restarts`
    times per job)."""

    members = 1

    def __init__(self, sampler: EndpointSampler, replicas: int, settings: SamplingSettings, cfg: GenerateConfig):
        self.endpoint, self.settings, self.cfg = sampler, settings, cfg
        self.restarts, self.lock = 0, threading.Lock()
        self.clients = [EndpointClient(sampler, settings) for _ in range(replicas)]

    def call(self, slot: int, member: int, bos: int, sample: list, score: list, abort: list):
        return self.clients[slot].advance(bos, sample, abort, BUDGET_S)

    @staticmethod
    def wait(handles: list, timeout: float) -> list:
        from concurrent.futures import FIRST_COMPLETED
        from concurrent.futures import wait as wait_futures

        return list(wait_futures(handles, timeout=timeout, return_when=FIRST_COMPLETED).done) if handles else []

    @staticmethod
    def result(handle) -> list:
        return handle.result()

    def release(self, slot: int) -> None:
        self.clients[slot].close()

    def replace(self, slot: int, still_needed) -> bool:
        with self.lock:
            if self.restarts >= self.cfg.max_restarts:
                raise JobError(f"the endpoint {self.cfg.endpoint} failed {self.restarts + 1} times in this job: "
                               "giving up; re-run the same command to finish the job")
            self.restarts += 1
        self.clients[slot].close()
        time.sleep(5.0)  # let Serve replace a lost replica
        self.clients[slot] = EndpointClient(self.endpoint, self.settings)
        return True


def replica_lost_errors() -> tuple[type[BaseException], ...]:
    """What a lost replica raises: its actor or node died (Ray), or the endpoint failed a request."""
    from synthdata.endpoint import EndpointError

    try:
        from ray import exceptions as rx
    except ImportError:  # an endpoint job on a machine without Ray
        return (EndpointError,)
    return (rx.RayActorError, rx.NodeDiedError, rx.WorkerCrashedError, rx.ObjectLostError, EndpointError)

