"""Security defaults: loopback bind, a warning for an open bind without a key, keys compared in constant time,
body and prompt limits, model names that never reach the filesystem, safe YAML, and no pickle anywhere."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from slimswarm.errors import SlimswarmError

SRC = Path(__file__).resolve().parents[1] / "src" / "slimswarm"
KEY = "sk-secret"


@pytest.fixture(scope="module")
def app(stories):
    from slimswarm.engine.engine import Engine
    from slimswarm.engine.server import create_app

    eng = Engine(stories.model, stories.tokenizer, max_batch=1, max_len=64)  # never started: nothing is generated
    return create_app(eng, "stories260k", api_key=KEY, max_body_bytes=4096)


def _auth(key=KEY):
    return {"Authorization": f"Bearer {key}"}


def test_serve_binds_loopback_by_default():
    from slimswarm.cli import build_parser

    assert build_parser().parse_args(["serve", "stories260k"]).host == "127.0.0.1"


@pytest.mark.parametrize("host,key,warns", [("127.0.0.1", None, False), ("::1", None, False), ("[::1]", None, False),
                                            ("localhost", None, False), ("0.0.0.0", None, True), ("::", None, True),
                                            ("192.0.2.7", None, True), ("box.example", None, True),
                                            ("0.0.0.0", "k", False)])
def test_exposure_warning(host, key, warns):
    from slimswarm.engine.server import exposure_warning

    w = exposure_warning(host, key)
    assert (w is not None) == warns
    if warns:
        assert w.startswith(f"binding {host} without --api-key")


def test_cli_warns_before_serving_an_open_address_without_a_key(tmp_path):
    # the model does not exist, so nothing is ever bound: the warning comes first, then the error
    p = subprocess.run([sys.executable, "-m", "slimswarm.cli", "serve", str(tmp_path / "none"), "--host", "0.0.0.0"],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "SLIMSWARM_API_KEY": ""})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 2, p.stderr
    assert lines[0].startswith("slimswarm: warning: binding 0.0.0.0 without --api-key")
    assert lines[1].startswith("slimswarm: error: model")


def test_api_keys_are_compared_in_constant_time(app, monkeypatch):
    import hmac

    from slimswarm.engine import server

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(server.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    c = TestClient(app)
    assert c.get("/v1/models", headers=_auth()).status_code == 200
    r = c.get("/v1/models", headers=_auth("sk-secreT"))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert calls == [(KEY.encode(), KEY.encode()), (b"sk-secreT", KEY.encode())]


def test_body_and_prompt_limits(app):
    c = TestClient(app)
    big = {"model": "stories260k", "prompt": "x" * 5000}
    r = c.post("/v1/completions", json=big, headers=_auth())
    assert r.status_code == 413 and "exceeds the limit of 4,096" in r.json()["error"]["message"]
    r = c.post("/v1/completions", json={"model": "stories260k", "prompt": "Once upon a time " * 40}, headers=_auth())
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "context_length_exceeded"
    assert "does not fit the context length of 64 tokens" in err["message"]


@pytest.mark.parametrize("name", ["../../etc/passwd", "/work/shared/data/models/stories260K/hf", "stories260k/../x",
                                  "~/.ssh/id_rsa", "smollm2-135m", "stories260k-llama2c", "file:///etc/passwd"])
def test_model_names_never_reach_the_filesystem(app, monkeypatch, name):
    import slimswarm.compress.lora as lora
    import slimswarm.models.load as load

    def refuse(*a, **k):
        raise AssertionError(f"a request opened {a!r}")

    monkeypatch.setattr(load, "load", refuse)
    monkeypatch.setattr(load, "resolve", refuse)
    monkeypatch.setattr(lora, "load_adapter", refuse)
    c = TestClient(app)
    for path, body in (("/v1/completions", {"model": name, "prompt": "hi"}),
                       ("/v1/chat/completions", {"model": name, "messages": [{"role": "user", "content": "hi"}]})):
        r = c.post(path, json=body, headers=_auth())
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text
    assert c.get(f"/v1/models/{name}", headers=_auth()).status_code == 404


# ------------------------------------------------------------------------------------------------ YAML, pickle
_PAYLOAD = "!!python/object/apply:os.system ['touch {marker}']"


def test_yaml_tags_that_run_code_are_refused(tmp_path):
    from slimswarm.agents.config import load_team_config
    from slimswarm.compress.recipe import load_recipe

    marker = tmp_path / "pwned"
    (tmp_path / "recipe.yaml").write_text(f"name: x\nquantize: {_PAYLOAD.format(marker=marker)}\n")
    (tmp_path / "team.yaml").write_text(f"name: {_PAYLOAD.format(marker=marker)}\nagents: []\n")
    with pytest.raises(SlimswarmError, match="recipe.yaml: invalid YAML"):
        load_recipe(str(tmp_path / "recipe.yaml"))
    with pytest.raises(SlimswarmError, match="team.yaml: invalid YAML"):
        load_team_config(tmp_path / "team.yaml")
    assert not marker.exists()


def test_source_uses_safe_yaml_and_no_pickle():
    """Every YAML read is yaml.safe_load; nothing imports pickle; every torch.load passes weights_only=True."""
    offenders = []
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        for pat in (r"yaml\.load\(", r"yaml\.unsafe_load", r"yaml\.full_load", r"UnsafeLoader", r"FullLoader",
                    r"^\s*import pickle", r"^\s*from pickle", r"pickle\.loads?\(", r"dill", r"cloudpickle"):
            offenders += [f"{f.name}: {pat}" for _ in re.finditer(pat, text, re.M)]
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 0, m.end() - 1
            for end in range(m.end() - 1, len(text)):  # to the parenthesis that closes the call
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            call = text[m.start(): end + 1]
            if "weights_only=True" not in call:
                offenders.append(f"{f.name}: {call}")
    assert offenders == []


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_training_checkpoints_and_bin_weights_are_never_unpickled(tmp_path, stories):
    """A train_state.pt / .OUT.train_state.pt / pytorch_model.bin that would run code is refused, and runs nothing."""
    from slimswarm.compress.distill import _load_state
    from slimswarm.compress.lora import _load_finetune_state
    from slimswarm.models.hf import read_hf_weights

    marker = tmp_path / "pwned"
    evil = tmp_path / "train_state.pt"
    torch.save({"format": "slimswarm-distill/1", "x": _Evil(marker)}, evil)
    with pytest.raises(SlimswarmError, match="train_state.pt: unreadable training checkpoint"):
        _load_state(evil, "fp", torch.device("cpu"))
    with pytest.raises(SlimswarmError, match="train_state.pt: unreadable training checkpoint"):
        _load_finetune_state(evil, "fp")
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save({"model.norm.weight": _Evil(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(SlimswarmError, match="pytorch_model.bin: corrupt or truncated weights"):
        read_hf_weights(folder)
    assert not marker.exists()
