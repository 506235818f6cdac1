"""Every checkpoint carries its tokenizer: evaluation of a checkpoint moved away from its data
folder uses it, a data folder of another tokenizer is refused, an older checkpoint without
one says what it uses or what to pass, and the HF export carries it too."""

import json
import os
import shutil

import pytest

from conftest import ROOT, gpt2_model_dir, load_tool, tiny_config
from mose_ds import checkpoint
from mose_ds.tokenizer import EOT_ID, RECORD_FILE, VOCAB_FILE, TextCodec, TokenizerError, read_record, write_record

evaluate = load_tool("evaluate")
calibrate_gamma = load_tool("calibrate")
prepare_data = load_tool("prepare")
convert_mose_to_hf = load_tool("export_hf")

SAMPLE = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n" * 8
PAIRS = [("To be, or not to be, that is", " the question"), ("", "whether 'tis nobler")]


@pytest.fixture(scope="module")
def bytes_run(world, tmp_path_factory):
    """(run folder, data folder, text file): a tiny model trained two steps on UTF-8 bytes with
    a compact vocabulary, so its ids are neither GPT-2's nor raw bytes."""
    from mose_ds.train import train
    root = tmp_path_factory.mktemp("bytes")
    text = root / "text.txt"
    with open(os.path.join(ROOT, "corpus", "tinyshakespeare.txt")) as f:
        text.write_text(f.read(20_000))
    data = root / "data"
    prepare_data.main(["--input", str(text), "--out", str(data), "--tokenizer", "bytes", "--compact-vocab"])
    run = root / "run"
    train(tiny_config(data={"path": str(data)}, logging={"out_dir": str(run)}, train={"max_iters": 2}), quiet=True)
    (root / "sample.txt").write_text(SAMPLE)
    return str(run), str(data), str(root / "sample.txt")


def ppl(capsys, *argv) -> dict:
    capsys.readouterr()
    assert evaluate.main(["ppl", *argv, "--batches", "2", "--batch-size", "2", "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def loglikelihoods(**model_args) -> list:
    from lm_eval.api.instance import Instance
    from mose_ds.lm_eval_adapter import MoSELM
    requests = [Instance(request_type="loglikelihood", arguments=p, doc={}, idx=0) for p in PAIRS]
    return MoSELM(**model_args).loglikelihood(requests, disable_tqdm=True)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def tag_folder(run: str) -> str:
    return checkpoint.newest_good(os.path.join(run, "checkpoints"))


def test_the_checkpoint_records_its_tokenizer_under_the_manifest(bytes_run):
    run, data, _ = bytes_run
    folder = tag_folder(run)
    with open(os.path.join(folder, checkpoint.MANIFEST)) as f:
        assert {RECORD_FILE, VOCAB_FILE} <= set(json.load(f)["files"])
    record = read_record(folder)
    assert (record["tokenizer"], record["compact_vocab_size"]) == ("bytes", len(TextCodec.for_data(data).vocab))
    path = os.path.join(folder, VOCAB_FILE)
    original = open(path, "rb").read()
    try:
        with open(path, "wb") as f:                        # a damaged map fails both checks
            f.write(original[:-1] + bytes([original[-1] ^ 1]))
        assert any(f"{VOCAB_FILE} fails its CRC-32 check" in p for p in checkpoint.problems(folder))
        with pytest.raises(TokenizerError, match="do not match it"):
            read_record(folder)
    finally:
        with open(path, "wb") as f:
            f.write(original)


def test_a_checkpoint_moved_without_its_data_evaluates_with_its_own_tokenizer(bytes_run, tmp_path, capsys):
    run, data, sample = bytes_run
    here, here_ll = ppl(capsys, "--ckpt", run, "--text", sample), loglikelihoods(checkpoint=run)
    moved = str(tmp_path / "elsewhere")
    shutil.copytree(run, moved)
    os.rename(data, data + ".away")
    try:
        there, there_ll = ppl(capsys, "--ckpt", moved, "--text", sample), loglikelihoods(checkpoint=moved)
    finally:
        os.rename(data + ".away", data)
    assert (there["ppl"], there["loss"], there["tokens"]) == (here["ppl"], here["loss"], here["tokens"])
    assert there_ll == here_ll


def test_a_data_folder_of_another_tokenizer_is_refused_in_one_line(bytes_run, corpus, tmp_path, capsys):
    run, _, sample = bytes_run
    folder = tag_folder(run)
    for argv in (["ppl", "--ckpt", run, "--data", corpus], ["ppl", "--ckpt", run, "--data", corpus, "--text", sample],
                 ["tasks", "--ckpt", run, "--task", "lambada", "--files", sample, "--vocab-data", corpus]):
        capsys.readouterr()
        assert evaluate.main(argv) == 2, argv
        err = one_line_error(capsys)
        assert f"data folder {corpus} holds ids of GPT-2 BPE with a compact vocabulary" in err, err
        assert f"checkpoint {folder} was trained with UTF-8 bytes with a compact vocabulary" in err, err
    assert calibrate_gamma.main(["--ckpt", run, "--data", corpus, "--out", str(tmp_path / "g.yaml")]) == 2
    assert "holds ids of GPT-2 BPE" in one_line_error(capsys) and not (tmp_path / "g.yaml").exists()
    with pytest.raises(TokenizerError, match="UTF-8 bytes"):
        loglikelihoods(checkpoint=run, data=corpus)


def test_a_checkpoint_without_a_record_uses_its_data_folder_and_says_so(bytes_run, tmp_path, capsys):
    """An older checkpoint (no record; its manifest never listed one) reads the tokenizer of
    its training data folder when that exists, and says so; without it, one line on what to pass."""
    run, data, sample = bytes_run
    here = ppl(capsys, "--ckpt", run, "--text", sample)
    old = tmp_path / "old"
    shutil.copytree(run, old)
    folder = tag_folder(str(old))
    os.remove(os.path.join(folder, RECORD_FILE))
    manifest = json.loads(open(os.path.join(folder, checkpoint.MANIFEST)).read())
    del manifest["files"][RECORD_FILE]
    with open(os.path.join(folder, checkpoint.MANIFEST), "w") as f:
        json.dump(manifest, f)
    capsys.readouterr()
    assert evaluate.main(["ppl", "--ckpt", str(old), "--text", sample, "--batches", "2", "--batch-size", "2",
                          "--json"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["ppl"] == here["ppl"]
    assert f"checkpoint {folder} records no tokenizer" in out.err and f"data folder {data}" in out.err
    os.rename(data, data + ".away")
    try:
        assert evaluate.main(["ppl", "--ckpt", str(old), "--text", sample]) == 2
        err = one_line_error(capsys)
        assert f"checkpoint {folder} records no tokenizer" in err and f"{data} is absent" in err
        assert "pass the prepared data folder it was trained on (--data DIR" in err
        assert ppl(capsys, "--ckpt", str(old), "--text", sample, "--data", data + ".away")["ppl"] == here["ppl"]
    finally:
        os.rename(data + ".away", data)


def test_the_hf_export_carries_the_tokenizer(tmp_path, capsys):
    """A record of an HF tokenizer.json (here GPT-2's, from the shared vocab/merges) exports as
    that file, a tokenizer_config.json naming its end-of-text token and our record: AutoTokenizer
    and our codec both read the export and give the checkpoint's ids."""
    from transformers import AutoTokenizer
    model_dir = tmp_path / "model"
    gpt2_model_dir(model_dir)
    (tmp_path / "t.txt").write_text(SAMPLE)
    prepare_data.main(["--input", str(tmp_path / "t.txt"), "--out", str(tmp_path / "data"), "--tokenizer",
                       str(model_dir)])
    ckpt, out = tmp_path / "ckpt", tmp_path / "export"
    ckpt.mkdir()
    out.mkdir()
    assert write_record(str(tmp_path / "data"), str(ckpt)) == ["tokenizer.json", RECORD_FILE]
    names = convert_mose_to_hf.tokenizer_files(str(ckpt), None)
    assert convert_mose_to_hf.write_tokenizer(str(ckpt), names, str(out)) == \
        ["mose_tokenizer.json", "tokenizer.json", "tokenizer_config.json"]
    ours = TextCodec.for_checkpoint(str(ckpt))
    hf = AutoTokenizer.from_pretrained(str(out))
    assert hf.encode(SAMPLE) == ours.encode(SAMPLE) and hf.eos_token_id == ours.eot == EOT_ID
    assert TextCodec.for_checkpoint(str(out)).encode(SAMPLE) == ours.encode(SAMPLE)
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text().replace("Ġthe", "Ġthx", 1))
    with pytest.raises(convert_mose_to_hf.Failure, match=f"--tokenizer-from {other}: its tokenizer.json is not"):
        convert_mose_to_hf.tokenizer_files(str(ckpt), str(other))
    assert convert_mose_to_hf.tokenizer_files(str(ckpt), str(model_dir)) == names
