"""The DeepSeek-V2 family against `transformers`' DeepseekV2ForCausalLM (the reference), and
its configuration, routing and loss maths on hand cases."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from conftest import ROOT
from mose_ds.config import ConfigError, from_dict

TINY_HF = os.path.join(ROOT, "..", "shared", "data", "deepseek", "tiny_deepseek_v2_config.json")
LITE_HF = os.path.join(ROOT, "..", "shared", "data", "deepseek", "deepseek_v2_lite_config.json")


def reference_model(folder, seed: int = 0, **overrides):
    """A seeded tiny DeepseekV2ForCausalLM saved with save_pretrained into `folder`."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    with open(TINY_HF) as f:
        hf = {**json.load(f), **overrides}
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(**hf)).eval()
    model.save_pretrained(folder)
    return model


def load_reference_weights(model, folder) -> None:
    """Our model's weights from the reference's safetensors, through the name mapping."""
    from safetensors.torch import load_file
    from mose_ds.hf_mapping import hf_to_ours, merge_fc1, to_ours
    ours, halves = dict(model.named_parameters()), {}
    with torch.no_grad():
        for name, tensor in load_file(os.path.join(folder, "model.safetensors")).items():
            target, layout = hf_to_ours(name)
            if layout.startswith("fc1"):
                halves.setdefault(target, {})[layout] = tensor
                if len(halves[target]) == 2:
                    ours[target].copy_(merge_fc1(halves[target]["fc1.gate"], halves[target]["fc1.up"]))
            else:
                ours[target].copy_(to_ours(tensor, layout))


def deepseek_config(**moe):
    return from_dict({"model": {"hf_config": TINY_HF, "seq_len": 48}, "moe": {"drop_tokens": False, **moe}})


@pytest.mark.parametrize("yarn", [True, False])
def test_full_width_logits_match_the_reference(world, tmp_path, yarn):
    from mose_ds.model import MoSEGPT
    overrides = {} if yarn else {"rope_scaling": None}
    reference = reference_model(tmp_path, **overrides)
    cfg = from_dict({"model": {"hf_config": str(tmp_path), "seq_len": 48}, "moe": {"drop_tokens": False}})
    ours = MoSEGPT(cfg.model, cfg.moe).eval()
    load_reference_weights(ours, tmp_path)
    tokens = torch.randint(0, cfg.model.vocab_size, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
        logits, routing = ours(tokens)
    assert (logits - expected).abs().max().item() <= 1e-4
    assert len(routing) == 2 and all(r.stats.dropped_frac == 0 for r in routing)   # dropless


def test_config_is_derived_from_the_hf_file_and_checked():
    cfg = deepseek_config()
    assert (cfg.model.family, cfg.model.num_layers, cfg.model.moe_offset, cfg.model.expert_hidden_size,
            cfg.model.ffn_hidden_size, cfg.model.shared_expert_hidden_size, cfg.model.tie_embeddings) == \
        ("deepseek_v2", 3, 1, 32, 128, 64, False)
    assert (cfg.moe.num_experts, cfg.moe.top_k) == (8, 2)
    # the resolved config (as saved with checkpoints) rebuilds the same model without the file
    from mose_ds.config import to_dict
    raw = to_dict(cfg)
    raw["model"]["hf_config"] = ""
    assert from_dict(raw).architecture() == cfg.architecture()
    with pytest.raises(ConfigError, match=r"moe.num_experts=4 disagrees with the HF config \(8\)"):
        from_dict({"model": {"hf_config": TINY_HF}, "moe": {"num_experts": 4}})
    with pytest.raises(ConfigError, match="no such file"):
        from_dict({"model": {"hf_config": "/nonexistent/config.json"}})


def test_a_config_of_another_model_type_is_refused(tmp_path):
    with open(TINY_HF) as f:
        hf = json.load(f)
    (tmp_path / "config.json").write_text(json.dumps({**hf, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type 'llama' is not 'deepseek_v2'"):
        from_dict({"model": {"hf_config": str(tmp_path)}})


def test_softmax_routing_without_renormalisation_and_scaling():
    from mose_ds.gating import RouterSpec, top_k_routing
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    idx, p = top_k_routing(logits, 2, RouterSpec(scores="softmax", normalize=False, scale=2.0))
    assert idx.tolist() == [[0, 1]] and torch.allclose(p, torch.tensor([[1.0, 0.6]]))
    idx, p = top_k_routing(logits, 2, RouterSpec(scores="softmax", normalize=True))
    assert torch.allclose(p, torch.tensor([[0.625, 0.375]]))


def test_sequence_balance_loss_on_hand_cases():
    from mose_ds.gating import sequence_balance_loss
    E, K, S, B = 4, 1, 4, 2
    probs = torch.full((S * B, E), 1.0 / E)
    # sequence 0 (tokens s*B + 0) uses every expert once; sequence 1 always expert 0
    idx = torch.tensor([[0], [0], [1], [0], [2], [0], [3], [0]])
    # seq 0: f = 1 each, sum f P = 1; seq 1: f_0 = 4, sum = 4 * 1/4 = 1 -> uniform P gives 1 for both
    assert math.isclose(sequence_balance_loss(probs, idx, B).item(), 1.0, rel_tol=1e-6)
    probs_1 = probs.clone()
    probs_1[1::2] = torch.tensor([0.7, 0.1, 0.1, 0.1])          # sequence 1 also prefers expert 0
    assert math.isclose(sequence_balance_loss(probs_1, idx, B).item(), (1.0 + 4 * 0.7) / 2, rel_tol=1e-6)
    assert idx.shape[-1] == K


def test_lite_parameter_counts():
    """DeepSeek-V2-Lite: 15.7B total, about 2.4B active per token (built on the meta device)."""
    from mose_ds import engine
    from mose_ds.model import MoSEGPT, count_parameters
    engine.init_distributed()
    cfg = from_dict({"model": {"hf_config": LITE_HF, "seq_len": 4096}})
    with torch.device("meta"):
        model = MoSEGPT(cfg.model, cfg.moe)
    counts = count_parameters(model)
    assert round(counts["params_total"] / 1e9, 1) == 15.7
    assert 2.4e9 <= counts["params_active_excl_embedding"] < 2.5e9


# --------------------------------------------------------------------------- HF -> MoSE conversion

def convert(hf_folder, out, *extra) -> int:
    from conftest import load_tool
    return load_tool("convert_hf").main(["--hf", str(hf_folder), "--out", str(out), *extra])


def test_conversion_carries_the_models_tokenizer(converted, tmp_path):
    """An HF directory with a tokenizer.json converts into a folder recording it (the model's
    own end-of-sequence id included), so evaluating the converted weights never guesses."""
    import shutil
    from conftest import gpt2_model_dir
    from mose_ds.tokenizer import EOT_ID, RECORD_FILE, TextCodec, read_record
    _, hf, _ = converted
    with_tokenizer = tmp_path / "hf"
    shutil.copytree(hf, with_tokenizer)
    gpt2_model_dir(tmp_path / "tok")
    shutil.copyfile(tmp_path / "tok" / "tokenizer.json", with_tokenizer / "tokenizer.json")
    (with_tokenizer / "tokenizer_config.json").write_text('{"eos_token": "<|endoftext|>"}')
    assert convert(with_tokenizer, tmp_path / "mose", "--seq-len", "48") == 0
    record = read_record(str(tmp_path / "mose"))
    assert record["tokenizer"] == "tokenizer.json" and record["base_eot_id"] == EOT_ID
    codec = TextCodec.for_checkpoint(str(tmp_path / "mose"))
    assert codec.encode("Slimmable experts") == [50, 2475, 44102, 6154]      # GPT-2 BPE ids
    assert not (converted[2] / RECORD_FILE).exists()                 # no tokenizer.json, no record


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(reference model, its HF folder, the converted weights folder)."""
    root = tmp_path_factory.mktemp("deepseek")
    reference = reference_model(root / "hf")
    assert convert(root / "hf", root / "mose", "--seq-len", "48") == 0
    return reference, root / "hf", root / "mose"


def test_converted_weights_reproduce_the_reference_with_one_and_two_expert_parallel_ranks(
        world, converted, tmp_path):
    from conftest import run_ranks
    from mose_ds import checkpoint
    from mose_ds.model import MoSEGPT
    reference, _, weights = converted
    tokens = torch.randint(0, 50257, (3, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
    cfg = checkpoint.checkpoint_config(str(weights))
    cfg.moe.drop_tokens = False
    model = MoSEGPT(cfg.model, cfg.moe).eval()
    assert checkpoint.load_weights(model, str(weights)) == len(list(model.parameters()))
    with torch.no_grad():
        assert (model(tokens)[0] - expected).abs().max().item() <= 1e-4
    run_ranks(2, "deepseek_worker.py", weights, tmp_path / "ep2.pt")
    assert (torch.load(tmp_path / "ep2.pt") - expected).abs().max().item() <= 1e-4


def _break(folder, how):
    """A copy-modified HF folder for the bad-input cases."""
    from safetensors.torch import load_file, save_file
    if how == "model_type":
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    elif how == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "shape":
        tensors = load_file(folder / "model.safetensors")
        tensors["model.layers.1.mlp.experts.3.up_proj.weight"] = torch.zeros(31, 64)
        save_file(tensors, folder / "model.safetensors")
    elif how == "index":
        tensors = load_file(folder / "model.safetensors")
        weight_map = {n: "model.safetensors" for n in tensors}
        weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("how, message", [
    ("model_type", "model_type 'llama' is not 'deepseek_v2'"),
    ("truncated", "model.safetensors: truncated"),
    ("shape", "has shape [31, 64] in model.safetensors, the config implies [32, 64]"),
    ("index", "names absent file(s): model-00002-of-00002.safetensors"),
    ("ep", "moe.num_experts=8 is not divisible by moe.expert_parallel_size=3"),
])
def test_bad_hf_input_is_a_one_line_error_and_writes_nothing(converted, tmp_path, capsys, how, message):
    import shutil
    _, hf, _ = converted
    broken = tmp_path / "hf"
    shutil.copytree(hf, broken)
    _break(broken, how)
    out = tmp_path / "out"
    assert convert(broken, out, *(["--expert-parallel-size", "3"] if how == "ep" else [])) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


# --------------------------------------------------------------------------- MoSE -> HF, CPT, resume

def export(ckpt, out, *extra) -> int:
    from conftest import load_tool
    return load_tool("export_hf").main(["--ckpt", str(ckpt), "--out", str(out), *extra])


def hf_tensors(folder):
    from safetensors.torch import load_file
    out = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            out.update(load_file(os.path.join(folder, file)))
    return out


def test_hf_to_mose_to_hf_is_bit_identical_and_loads_in_transformers(converted, tmp_path):
    from transformers import AutoModelForCausalLM
    reference, hf, weights = converted
    assert export(weights, tmp_path / "back", "--max-shard-size", "8MB") == 0
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()       # sharded (26 MB of fp32)
    original, back = hf_tensors(hf), hf_tensors(tmp_path / "back")
    assert sorted(original) == sorted(back)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)


def cpt_run(converted, corpus, out, **train_overrides):
    """Two-pass continual pre-training of the converted tiny model (ZeRO-1, fp32, one rank)."""
    from conftest import tiny_raw
    from mose_ds.train import train
    _, hf, weights = converted
    raw = tiny_raw(train={"max_iters": 6, "grad_accum_steps": 2, **train_overrides},
                   engine={"zero_stage": 1}, data={"path": corpus}, logging={"out_dir": str(out)},
                   checkpoint={"interval": 100, "init_from": str(weights)}, mose={"eval_widths": [0.25, 1.0]})
    raw["model"], raw["moe"] = {"hf_config": str(hf), "seq_len": 32}, {}
    return train(from_dict(raw), quiet=True)


def test_cpt_from_converted_weights_resumes_exactly_and_exports(converted, corpus, tmp_path):
    """init_from starts a run (iteration 0, evaluated before training); an interrupted CPT run
    resumed from its checkpoint (not from init_from) ends with the uninterrupted run's losses,
    weights and optimizer state; the result exports to an HF model with our logits."""
    import dataclasses
    from transformers import AutoModelForCausalLM
    from mose_ds.inference import load_model
    from mose_ds.model import MoSEGPT
    reference, _, _ = converted
    straight = cpt_run(converted, corpus, tmp_path / "straight")
    first = cpt_run(converted, corpus, tmp_path / "resumed", stop_at=3)
    assert first["state"].iteration == 3 and set(first["val_start"]) == {0.25, 1.0}
    second = cpt_run(converted, corpus, tmp_path / "resumed")
    assert second["val_start"] == {} and [h["iteration"] for h in second["history"]] == [4, 5, 6]
    assert second["history"] == straight["history"][3:]
    a, b = straight["engine"].module.state_dict(), second["engine"].module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))
    opt_a, opt_b = (r["engine"].optimizer.state_dict() for r in (straight, second))
    flat_a, flat_b = (torch.cat([s["exp_avg_sq"].flatten() for s in o["base_optimizer_state"]["state"].values()])
                      for o in (opt_a, opt_b))
    assert torch.equal(flat_a, flat_b)

    assert export(tmp_path / "straight", tmp_path / "hf-cpt") == 0
    from mose_ds.tokenizer import TextCodec       # the corpus's tokenizer: GPT-2 with a compact vocabulary
    exported_codec = TextCodec.for_checkpoint(str(tmp_path / "hf-cpt"))
    assert exported_codec.encode("To be") == TextCodec.for_data(corpus).encode("To be")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf-cpt").eval()
    loaded = load_model(str(tmp_path / "straight"))
    ours = MoSEGPT(loaded.cfg.model, dataclasses.replace(loaded.cfg.moe, drop_tokens=False)).eval()
    ours.load_state_dict(loaded.model.state_dict())                # dropless, as the HF model computes
    tokens = torch.randint(0, 4096, (2, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = exported(tokens).logits
        assert (ours(tokens)[0] - expected).abs().max().item() <= 1e-4
        assert (reference(tokens).logits - expected).abs().max().item() > 1e-3      # CPT changed it


def test_export_refuses_bad_input(converted, corpus, tmp_path, capsys):
    from conftest import tiny_config
    from mose_ds.train import train
    cfg = tiny_config(data={"path": corpus}, logging={"out_dir": str(tmp_path / "gpt2")}, train={"max_iters": 1})
    train(cfg, quiet=True)
    cases = [(tmp_path / "gpt2", "a gpt2 model; only the DeepSeek-V2 family has an HF export"),
             (tmp_path / "nowhere", "nowhere: no such file or directory")]
    for ckpt, message in cases:
        capsys.readouterr()
        assert export(ckpt, tmp_path / "out") == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
