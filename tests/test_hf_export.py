"""The slimmable Hugging Face export: `transformers` alone (trust_remote_code) loads the model and
its tokenizer; logits equal ours under full width, uniform 0.5, normalised probability Gamma = 1
and an embedded gamma table; greedy `generate()` gives our greedy text; for both families and
every tokenizer kind (GPT-2 BPE, bytes, an HF tokenizer.json, each with a compact vocabulary)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from conftest import ROOT, gpt2_model_dir, load_tool, tiny_config
from mose_ds.config import from_dict
from mose_ds.generation import PlainDecoding
from mose_ds.inference import load_model
from mose_ds.policies import PolicySpec, build_policy
from mose_ds.tokenizer import TextCodec

export_hf = load_tool("export_hf")
prepare = load_tool("prepare")
TEXT = "ROMEO: What light through yonder window breaks? It is the east, and Juliet is the sun."


def small_text(folder) -> str:
    path = os.path.join(folder, "text.txt")
    with open(os.path.join(ROOT, "corpus", "tinyshakespeare.txt")) as f, open(path, "w") as out:
        out.write(f.read(30_000))
    return path


def train_run(cfg, folder) -> str:
    from mose_ds.train import train
    train(cfg, quiet=True)
    return str(folder)


@pytest.fixture(scope="module")
def runs(world, trained, tmp_path_factory):
    """{kind: run folder}: GPT-2 BPE (the suite's trained tiny model), UTF-8 bytes, and a
    DeepSeek-V2 model on an HF tokenizer.json; all with compact vocabularies."""
    root = tmp_path_factory.mktemp("hf_export")
    text = small_text(root)
    out = {"gpt2_bpe": trained}
    prepare.main(["--input", text, "--out", str(root / "bytes_data"), "--tokenizer", "bytes", "--compact-vocab"])
    out["bytes"] = train_run(tiny_config(data={"path": str(root / "bytes_data")}, train={"max_iters": 2},
                                         logging={"out_dir": str(root / "bytes_run")}), root / "bytes_run")
    model_dir = gpt2_model_dir(root / "hf_model")
    prepare.main(["--input", text, "--out", str(root / "hf_data"), "--tokenizer", model_dir, "--compact-vocab"])
    raw = {"model": {"hf_config": os.path.join(ROOT, "ds_configs", "hf", "tiny_deepseek_v2"), "seq_len": 32},
           "moe": {"drop_tokens": False}, "data": {"path": str(root / "hf_data")},
           "train": {"micro_batch_size": 4, "max_iters": 2, "eval_interval": 1000, "eval_batches": 1},
           "engine": {"zero_stage": 0, "precision": "fp32"}, "logging": {"tensorboard": False,
                                                                         "out_dir": str(root / "ds_run")}}
    out["deepseek_hf_tokenizer"] = train_run(from_dict(raw), root / "ds_run")
    return out


def gamma_table(loaded, path) -> str:
    """A layer-wise gamma table for this checkpoint (as mose-calibrate writes one)."""
    layers = loaded.identity["moe_layers"]
    table = {"checkpoint": loaded.identity, "policy": {"wmin": 0.25, "wmax": 1.0, "round_to_grid": True},
             "modes": {"layerwise": [{"budget": 1.0, "gamma": [3.0 - i for i in range(layers)]}]}}
    with open(path, "w") as f:
        yaml.safe_dump(table, f)
    return str(path)


@pytest.mark.parametrize("kind", ["gpt2_bpe", "bytes", "deepseek_hf_tokenizer"])
def test_the_export_is_our_model_under_every_policy_with_our_tokenizer(runs, kind, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    loaded = load_model(runs[kind], dropless=True)
    table = gamma_table(loaded, tmp_path / "gamma.yaml")
    out = tmp_path / "export"
    assert export_hf.main(["--ckpt", runs[kind], "--out", str(out), "--slimmable", "--gamma-table", table,
                           "--policy", "uniform", "--width", "0.75"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == ("deepseek_v2" if kind.startswith("deepseek") else "gpt2")
    assert not any(n.startswith(("mose_ds", "deepspeed", "megatron")) for n in
                   _imports(out / "modeling_mose.py") | _imports(out / "tokenization_mose.py"))
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    codec = TextCodec.for_checkpoint(loaded.folder, report=lambda msg: None)
    ids = codec.encode(TEXT)[:30]
    assert tok(TEXT)["input_ids"][:30] == ids and tok.decode(ids) == codec.decode(ids)
    assert tok.eos_token_id == codec.eot
    x = torch.tensor([ids])
    cases = [(PolicySpec("full"), {"kind": "full"}), (PolicySpec("uniform", width=0.5), {"kind": "uniform", "width": 0.5}),
             (PolicySpec("normprob", budget=1.0), {"kind": "normprob", "budget": 1.0}),
             (PolicySpec("gamma", budget=1.0, table=table), {"kind": "gamma", "budget": 1.0})]
    with torch.no_grad():
        for spec, per_call in cases:
            ours = loaded.model(x, build_policy(spec, loaded.cfg, loaded.identity))[0]
            theirs = hf(x, width_policy=per_call).logits
            assert (ours - theirs).abs().max() < 1e-4, (kind, per_call)
        default = loaded.model(x, build_policy(PolicySpec("uniform", width=0.75), loaded.cfg))[0]
        assert (hf(x).logits - default).abs().max() < 1e-4                      # the config's policy
    greedy = hf.generate(x[:, :6], max_new_tokens=8, do_sample=False, width_policy={"kind": "uniform", "width": 0.5})
    ours = PlainDecoding(loaded.model, build_policy(PolicySpec("uniform", width=0.5), loaded.cfg)).generate(
        [ids[:6]], 8)
    assert greedy[0, 6:].tolist()[:len(ours.tokens[0])] == ours.tokens[0]


def _imports(path) -> set[str]:
    import ast
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return names | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}


def test_export_refusals_are_one_line_errors(runs, tmp_path, capsys):
    out = tmp_path / "x"
    out.mkdir()
    assert export_hf.main(["--ckpt", runs["bytes"], "--out", str(out), "--slimmable"]) == 2
    assert "exists" in capsys.readouterr().err and os.listdir(out) == []           # nothing replaced
    assert export_hf.main(["--ckpt", runs["bytes"], "--out", str(tmp_path / "y"), "--slimmable",
                           "--policy", "uniform"]) == 2                   # a default policy that cannot load
    assert "uniform policy needs a width" in capsys.readouterr().err
    other = load_model(runs["gpt2_bpe"])
    table = gamma_table(other, tmp_path / "other.yaml")
    assert export_hf.main(["--ckpt", runs["bytes"], "--out", str(tmp_path / "y"), "--slimmable",
                           "--gamma-table", table]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gamma table" in err and "this checkpoint has 1" in err, err
    assert not os.path.exists(tmp_path / "y") and not os.path.exists(tmp_path / "y.partial")
