"""The stages on a real Ray cluster of several nodes (tests/cluster/loopback_cluster.py: a 0-CPU head and three 1-CPU
worker nodes, all on 127.0.0.1), driven by the real commands joining it with --address:

- `train members --separate` runs its K member tasks on K different nodes;
- `synthdata generate --replicas 2` runs its replicas on two nodes and, when one of those nodes is killed
  mid-job, restarts that replica on the third node and ends with the exact budget, every shard once, no
  duplicate sequence and every shard holding exactly its planned sequences;
- `serve up --replicas 2 --max-replicas-per-node 1` puts the replicas on two nodes and keeps answering when
  one of them is killed (Serve starts a new replica on the third node);
- `synthdata generate --endpoint URL` through that endpoint: the offline job's sequences (every column
  identical but the float log-probabilities), and an exactly-once resume after kill -9.
Where the workers run is read from the processes: a Ray worker is a child of its node's raylet.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest

from loopback_cluster import distinct_nodes, ray_cluster  # noqa: F401 - ray_cluster is the cluster fixture
from synthdata.batching import sequence_draws
from synthdata.job import plan_shards
from synthdata.shards import content_hash, duplicate_sequences
from plumbing.artifacts import sha256_file

pytestmark = pytest.mark.slow
PY = sys.executable
SHARD_TOKENS, TOKENS = 1_500, 12_000  # 8 shards: a node kill lands mid-job


def test_distinct_nodes_flags_a_shared_node():
    """Negative control of the placement check: two workers on one node, or too few nodes, fail it."""
    assert distinct_nodes({"a": [1], "b": [2]}, 2)
    assert not distinct_nodes({"a": [1, 2]}, 2)
    assert not distinct_nodes({"a": [1], "b": [2]}, 3)


def test_train_members_separate_places_members_on_distinct_nodes(ray_cluster, tiny_dataset, tmp_path):
    out = tmp_path / "members"
    cmd = [PY, "-m", "train", "members", "--separate", "--address", ray_cluster.address, "--k", "3",
           "--data-dir", str(tiny_dataset), "--preset", "cpu-xxs", "--tokens", "20000", "--epochs", "1",
           "--batch-size", "8", "--context", "64", "--checkpoint-every", "1000", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[str, set[int]] = {}
    while proc.poll() is None:  # a task's worker is titled ray::_run_one while it trains
        for node, pids in ray_cluster.workers_named("ray::_run_one").items():
            seen.setdefault(node, set()).update(pids)
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    results = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert sorted(r["seed"] for r in results) == [0, 1, 2]
    assert all((Path(r["model_dir"]) / "model.safetensors").exists() for r in results)  # on the shared path
    worker_ids = {n.node_id for n in ray_cluster.workers}
    assert len(seen) == 3 and set(seen) <= worker_ids, f"member tasks ran on {len(seen)} node(s): {seen}"


@pytest.fixture(scope="module")
def offline_job_with_node_kill(ray_cluster, packed_teacher, tmp_path_factory) -> dict:
    """`synthdata generate --replicas 2` on the cluster; once both replicas run (on two nodes) and a shard is
    recorded, the node of one replica is killed. A fresh worker node is added back afterwards."""
    out = tmp_path_factory.mktemp("cluster-synth") / "job"
    cmd = [PY, "-m", "synthdata", "generate", "--teacher", str(packed_teacher), "--tokens", str(TOKENS),
           "--shard-tokens", str(SHARD_TOKENS), "--out", str(out), "--replicas", "2", "--address",
           ray_cluster.address, "--no-progress", "--inflight", "4"]  # shallow: shards finish one by one
    log_path = out.parent / "job.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=log, text=True)
        placement = ray_cluster.wait_for_workers("ray::TeacherEngine", 2, 600, alive=lambda: proc.poll() is None)
        manifest, deadline, shards_at_kill = out / "manifest.json", time.time() + 600, 0
        while proc.poll() is None and time.time() < deadline:
            if manifest.exists() and (shards_at_kill := len(json.loads(manifest.read_text())["shards"])):
                break
            time.sleep(0.1)
        assert proc.poll() is None, f"the job ended before the kill:\n{log_path.read_text()[-3000:]}"
        victim = min(placement)
        ray_cluster.kill(ray_cluster.node_of(victim))
        stdout, _ = proc.communicate(timeout=900)
    ray_cluster.add_worker()
    return {"out": out, "returncode": proc.returncode, "log": log_path.read_text(), "placement": placement,
            "victim": victim, "shards_at_kill": shards_at_kill,
            "summary": json.loads(stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None,
            "after": ray_cluster.workers_named("ray::TeacherEngine")}


def test_synth_job_spreads_replicas_and_survives_a_node_kill(offline_job_with_node_kill):
    job = offline_job_with_node_kill
    assert job["returncode"] == 0, job["log"][-3000:]
    assert distinct_nodes(job["placement"], 2), f"replicas were not on two nodes: {job['placement']}"
    n_shards = -(-TOKENS // SHARD_TOKENS)
    assert 1 <= job["shards_at_kill"] < n_shards, "the node was not killed mid-job"
    assert "was lost while making" in job["log"], "no replica was lost: the kill did not hit the job"
    out = job["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    # exact budget, every shard once, files = manifest
    assert job["summary"]["complete"] and job["summary"]["tokens"] == TOKENS
    assert [s["index"] for s in manifest["shards"]] == list(range(n_shards))
    assert sorted(p.name for p in out.glob("shard-*.parquet")) == [s["file"] for s in manifest["shards"]]
    assert not list(out.glob("*.tmp"))
    # no duplicate sequence, by content hash; the check sees one (a shard listed twice)
    assert job["summary"]["duplicates"] == 0 == duplicate_sequences(out, manifest)
    assert duplicate_sequences(out, {"shards": manifest["shards"] + manifest["shards"][:1]}) == manifest["shards"][0]["rows"]
    # every shard holds exactly its planned sequences 0..rows-1 (the one remade after the kill included)
    for plan, entry in zip(plan_shards(TOKENS, SHARD_TOKENS, seed=0), manifest["shards"]):
        table = pq.read_table(out / entry["file"]).to_pylist()
        assert sha256_file(out / entry["file"]) == entry["sha256"]
        assert [r["sequence_seed"] for r in table] == [s for s, _ in sequence_draws(plan.seed, 0, len(table), 1)]
        assert sum(r["length"] for r in table) == plan.quota == entry["tokens"]
        assert all(r["content_sha256"] == content_hash(np.asarray(r["tokens"])) for r in table)


@pytest.fixture(scope="module")
def endpoint_on_cluster(ray_cluster, packed_teacher, loopback_port):
    """`serve up --replicas 2 --max-replicas-per-node 1` joined to the cluster; SIGTERM at the end."""
    url = f"http://127.0.0.1:{loopback_port}"
    cmd = [PY, "-m", "serve", "up", "--model", str(packed_teacher), "--replicas", "2", "--max-replicas-per-node",
           "1", "--address", ray_cluster.address, "--port", str(loopback_port)]
    proc = subprocess.Popen(cmd, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        yield {"url": url, "proc": proc, "model": packed_teacher.name}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


def complete(url: str, model: str, seed: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=60,
                      json={"model": model, "prompt": "The", "max_tokens": 8, "seed": seed, "temperature": 1.0})


def test_serve_replicas_on_distinct_nodes_survive_a_node_kill(ray_cluster, endpoint_on_cluster):
    url, model = endpoint_on_cluster["url"], endpoint_on_cluster["model"]
    replicas = ray_cluster.wait_for_workers("ray::ServeReplica", 2, 120)
    assert distinct_nodes(replicas, 2), f"replicas were not on two nodes: {replicas}"
    assert complete(url, model, 0).status_code == 200
    results, stop = [], threading.Event()

    def load():  # one client asking all along
        i = 0
        while not stop.is_set():
            i += 1
            try:
                results.append((time.time(), complete(url, model, i).status_code))
            except httpx.HTTPError as e:
                results.append((time.time(), type(e).__name__))

    client = threading.Thread(target=load)
    client.start()
    try:
        time.sleep(2)
        victim = min(replicas)
        killed_at = time.time()
        ray_cluster.kill(ray_cluster.node_of(victim))
        # Serve replaces the lost replica on the free node; meanwhile the survivor answers
        after = {}
        deadline = time.time() + 300
        while time.time() < deadline:
            after = ray_cluster.workers_named("ray::ServeReplica")
            if len(after) == 2 and victim not in after and httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
            time.sleep(1)
        time.sleep(5)
    finally:
        stop.set()
        client.join(timeout=120)
        ray_cluster.add_worker()
    assert distinct_nodes(after, 2) and victim not in after, f"no replacement replica on a live node: {after}"
    during = [r for t, r in results if t > killed_at]
    ok = sum(r == 200 for r in during)
    failed = [r for r in during if r != 200]
    # a request in flight on the lost replica may fail; the endpoint keeps answering through the kill
    assert ok >= 10 and len(failed) <= 4, f"{ok} answered, failures after the kill: {failed}"
    assert all(r == 200 for _, r in results[-5:]), results[-5:]


def test_synth_through_the_endpoint_matches_offline_and_resumes(ray_cluster, endpoint_on_cluster, packed_teacher,
                                                                  offline_job_with_node_kill, tmp_path):
    """The same job through the live endpoint: first run killed (-9) after its first shard, then re-run. Shards
    0..2 (the same plan as the offline job's first three) must hold the offline job's sequences: every column
    identical but the float log-probabilities, which agree to rounding."""
    tokens = 3 * SHARD_TOKENS
    out = tmp_path / "via-endpoint"
    cmd = [PY, "-m", "synthdata", "generate", "--teacher", str(packed_teacher), "--tokens", str(tokens),
           "--shard-tokens", str(SHARD_TOKENS), "--out", str(out), "--endpoint", endpoint_on_cluster["url"],
           "--replicas", "1", "--no-progress", "--inflight", "4"]  # a shallow queue: shards finish one by one, so
    # the kill lands mid-job (with the whole job in flight all 3 shards finished together: killed_with was 3)
    first = subprocess.Popen(cmd, env=ray_cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    manifest, deadline = out / "manifest.json", time.time() + 300
    while time.time() < deadline and first.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.05)
    assert first.poll() is None, f"the first run ended before the kill: {first.stderr.read()[-2000:]}"
    first.kill()
    first.wait()
    killed_with = len(json.loads(manifest.read_text())["shards"])
    again = subprocess.run(cmd, env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert 1 <= killed_with < 3 and summary["generated_this_run"] == tokens - killed_with * SHARD_TOKENS
    assert summary["complete"] and summary["tokens"] == tokens and summary["duplicates"] == 0
    entries = json.loads(manifest.read_text())["shards"]
    assert [s["index"] for s in entries] == [0, 1, 2] and {s["source"] for s in entries} == {"endpoint"}
    offline = offline_job_with_node_kill["out"]
    for entry in entries:
        mine, theirs = pq.read_table(out / entry["file"]), pq.read_table(offline / entry["file"])
        assert mine.column("sequence_seed").to_pylist() == theirs.column("sequence_seed").to_pylist()
        same = sum(a == b for a, b in zip(mine.column("tokens").to_pylist(), theirs.column("tokens").to_pylist()))
        assert same == theirs.num_rows, f"{entry['file']}: {same} of {theirs.num_rows} sequences identical"
        # Every column but the float log-probabilities is identical. Those are summed from logits computed in
        # batches of another composition (the endpoint's concurrent requests vs the offline engine's), so they
        # agree to rounding, not bit for bit.
        exact = [name for name in theirs.column_names if name != "sample_logprob"]
        assert mine.select(exact).equals(theirs.select(exact)), entry["file"]
        np.testing.assert_allclose(mine.column("sample_logprob").to_numpy(), theirs.column("sample_logprob").to_numpy(),
                                   rtol=1e-4, atol=1e-3)


def test_bench_loss_with_address_runs_on_a_worker_node(ray_cluster, tiny_members, tiny_dataset):
    """`bench loss --address`: the evaluation runs as one task on a worker node and gives the local figure."""
    from serve.evaluation import validation_loss

    cmd = [PY, "-m", "bench", "loss", "--model", str(tiny_members[0]), "--data-dir", str(tiny_dataset),
           "--address", ray_cluster.address]
    proc = subprocess.Popen(cmd, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen: dict[str, list[int]] = {}
    while proc.poll() is None:
        seen = ray_cluster.workers_named("ray::call_as_task") or seen
        time.sleep(0.1)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    assert len(seen) == 1 and set(seen) <= {n.node_id for n in ray_cluster.workers}, seen
    remote, local = json.loads(stdout.strip().splitlines()[-1]), validation_loss([str(tiny_members[0])], str(tiny_dataset))
    assert remote["loss"] == pytest.approx(local["loss"], rel=1e-6), (remote, local)
