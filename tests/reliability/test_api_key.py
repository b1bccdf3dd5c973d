"""The endpoint's API key stays out of `ps`, and an endpoint beyond loopback without a key is refused.

`serve up` takes the key from a file (--api-key-file) or $CHORUS_API_KEY; --api-key still works and warns.
These run the real command line up to the point where it would start Ray (the checks come first); the slow
SIGTERM test in test_signals.py serves with the key from the environment and scans `ps` for it.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve.app import EnsembleConfig, HttpSettings, ServeError
from serve.cli import API_KEY_ENV, api_key_from, build_parser
from serve.pack import PackError

REPO = Path(__file__).resolve().parents[2]


def serve_up(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV} | (env or {})
    return subprocess.run([sys.executable, "-m", "serve", "up", "--model", "/nonexistent/model", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)


def test_serve_up_on_a_wide_host_without_a_key_exits_2_before_anything_starts():
    result = serve_up("--host", "0.0.0.0")
    assert result.returncode == 2, result.stderr
    assert "host 0.0.0.0" in result.stderr and "--allow-unauthenticated" in result.stderr, result.stderr
    assert "Ray" not in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "example.org"])
def test_a_host_beyond_loopback_needs_a_key_or_the_explicit_flag(host):
    with pytest.raises(ServeError, match=f"host {host} .*--allow-unauthenticated"):
        EnsembleConfig(model_dir="/nonexistent/model", http=HttpSettings(host=host)).check()
    # With a key, or the flag, the host passes and the next check (the model directory) speaks.
    for http in (HttpSettings(host=host, api_key="k"), HttpSettings(host=host, allow_unauthenticated=True)):
        config = EnsembleConfig(model_dir="/nonexistent/model", http=http)
        with pytest.raises(PackError, match="/nonexistent/model"):
            config.check()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_hosts_need_no_key(host):
    with pytest.raises(PackError, match="/nonexistent/model"):
        EnsembleConfig(model_dir="/nonexistent/model", http=HttpSettings(host=host)).check()


def parse(*argv: str):
    return build_parser().parse_args(["up", "--model", "m", *argv])


def test_key_sources_and_their_order(tmp_path, monkeypatch):
    keyfile = tmp_path / "key"
    keyfile.write_text("from-file\n")
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert api_key_from(parse()) is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert api_key_from(parse()) == "from-env"
    assert api_key_from(parse("--api-key-file", str(keyfile))) == "from-file"
    assert api_key_from(parse("--api-key", "from-flag")) == "from-flag"


@pytest.mark.parametrize("content, problem", [(None, "cannot read"), ("", "nothing"), ("two words", "whitespace")])
def test_a_bad_key_file_is_named(tmp_path, content, problem):
    keyfile = tmp_path / "key"
    if content is not None:
        keyfile.write_text(content)
    with pytest.raises(ServeError, match=f"--api-key-file {keyfile}.*{problem}"):
        api_key_from(parse("--api-key-file", str(keyfile)))


def test_two_keys_are_refused(tmp_path):
    with pytest.raises(ServeError, match="not both"):
        api_key_from(parse("--api-key-file", str(tmp_path / "k"), "--api-key", "x"))
