"""Recipes compose passes: prune → lowrank → distill/lora recovery → quantize, through ``slimswarm compress``."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from slimswarm.compress.recipe import Recipe, apply_recipe
from slimswarm.errors import SlimswarmError
from slimswarm.evaluate.perplexity import document_perplexity


def _stories_docs(data_dir):
    text = (data_dir / "text/tinystories-sample.txt").read_text()
    return [d.strip() for d in text.split("<|endoftext|>") if d.strip()]


def _calib(tok, data_dir, n=4, t=64):
    ids = tok.encode((data_dir / "text/tinystories-sample.txt").read_text())
    return torch.tensor([ids[i * t:(i + 1) * t] for i in range(n)])


TRAIN = {"steps": 30, "batch_size": 4, "seq_len": 64, "lr": 3e-3, "warmup": 0, "seed": 0}


def test_distill_pass_recovers_a_layer_dropped_model(stories, data_dir):
    """The same structured cut, with and without the recovery pass: distillation brings perplexity back down."""
    text = (data_dir / "text/tinystories-sample.txt").read_text()
    calib = _calib(stories.tokenizer, data_dir)
    docs = _stories_docs(data_dir)
    cut = copy.deepcopy(stories.model)
    apply_recipe(cut, Recipe.model_validate({"prune": {"structured": {"layers": 1}}}), calib)
    healed = copy.deepcopy(stories.model)
    meta = apply_recipe(healed, Recipe.model_validate({"prune": {"structured": {"layers": 1}}, "distill": TRAIN}),
                        calib, tokenizer=stories.tokenizer, text=text)
    assert healed.config.num_hidden_layers == cut.config.num_hidden_layers == 4
    assert meta["recovery"]["pass"] == "distill" and len(meta["recovery"]["history"]) == 30
    p_cut = document_perplexity(cut, stories.tokenizer, docs).perplexity
    p_healed = document_perplexity(healed, stories.tokenizer, docs).perplexity
    assert p_healed < 0.8 * p_cut, (p_cut, p_healed)


def test_lora_recovery_is_merged_and_keeps_the_sparsity(stories, data_dir):
    text = (data_dir / "text/tinystories-sample.txt").read_text()
    calib = _calib(stories.tokenizer, data_dir)
    m = copy.deepcopy(stories.model)
    recipe = Recipe.model_validate({"prune": {"method": "wanda", "sparsity": 0.5, "storage": "dense"},
                                    "lora": {"r": 4, "train": TRAIN}})
    pruned = copy.deepcopy(stories.model)
    apply_recipe(pruned, Recipe.model_validate({"prune": recipe.prune.model_dump()}), calib)
    meta = apply_recipe(m, recipe, calib, tokenizer=stories.tokenizer, text=text)
    assert meta["recovery"]["merged"] == 7 * m.config.num_hidden_layers
    for (name, a), b in zip(pruned.named_modules(), m.modules()):
        if isinstance(a, torch.nn.Linear) and name.startswith("model.layers"):
            assert torch.equal(a.weight == 0, b.weight == 0), name  # exactly the pruned positions are zero
    assert any(not torch.equal(a.weight, b.weight) for a, b in zip(pruned.modules(), m.modules())
               if isinstance(a, torch.nn.Linear))  # and the merged adapter changed the kept weights


@pytest.mark.parametrize("data, words", [
    ({"prune": {"structured": {"layers": 1}}, "distill": {"steps": 1}, "lora": {}}, "one recovery pass"),
    ({"distill": {"steps": 1}, "quantize": {"bits": 4}}, "nothing to recover from"),
    ({"lora": {"r": 0}}, "lora.r"),
])
def test_bad_recovery_recipes(data, words, tmp_path):
    import yaml

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(data))
    r = subprocess.run([sys.executable, "-m", "slimswarm.cli", "compress", "stories260k", "--recipe", str(p),
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and words in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_compress_cli_prune_distill_quantize_checkpoint(tmp_path, data_dir):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"name": "drop1-kd-w8", "prune": {"structured": {"layers": 1}},
                                  "distill": {**TRAIN, "steps": 4},
                                  "quantize": {"method": "rtn", "bits": 8, "group_size": -1},
                                  "calibration": {"samples": 4, "seq_len": 64}}))
    out = tmp_path / "ck"
    r = subprocess.run([sys.executable, "-m", "slimswarm.cli", "compress", "stories260k", "--recipe", str(recipe),
                        "--out", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert row["params"] < row["params_before"] and row["weight_bytes"] < row["weight_bytes_before"] / 2
    doc = json.loads((out / "slimswarm.json").read_text())
    assert doc["passes"]["recovery"]["pass"] == "distill" and doc["passes"]["prune"]
    from slimswarm import load

    m = load(out)
    assert m.model.config.num_hidden_layers == 4
    ppl = document_perplexity(m.model, m.tokenizer, _stories_docs(data_dir)).perplexity
    assert 3.5 < ppl < 200


def test_recovery_pass_needs_the_tokenizer(stories):
    recipe = Recipe.model_validate({"prune": {"structured": {"layers": 1}}, "distill": {"steps": 1}})
    with pytest.raises(SlimswarmError, match="needs the tokenizer"):
        apply_recipe(copy.deepcopy(stories.model), recipe, torch.zeros(2, 32, dtype=torch.long))


def test_recovered_2of4_model_is_stored_compactly(stories, data_dir):
    from slimswarm.compress.prune.sparse import SparseLinear

    text = (data_dir / "text/tinystories-sample.txt").read_text()
    m = copy.deepcopy(stories.model)
    recipe = Recipe.model_validate({"prune": {"method": "wanda", "pattern": "2:4"},
                                    "lora": {"r": 4, "train": {**TRAIN, "steps": 3}}})
    meta = apply_recipe(m, recipe, _calib(stories.tokenizer, data_dir), tokenizer=stories.tokenizer, text=text)
    sparse = [mod for mod in m.modules() if isinstance(mod, SparseLinear)]
    assert len(sparse) == 7 * m.config.num_hidden_layers and {s.fmt for s in sparse} == {"nm"}
    assert all(info["format"] == "nm" for info in meta["prune"]["layers"].values())
    x = torch.tensor([stories.tokenizer.encode("Once upon a time")])
    with torch.no_grad():
        assert torch.isfinite(m(x)).all()
