import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, clean_env, gpt2_model_dir, load_tool
from mose_ds.config import ConfigError
from mose_ds.data import TokenSplit, micro_batch, train_window_ids
from mose_ds.tokenizer import EOT_ID, gpt2

PREPARE = ("-m", "mose_ds.commands.prepare")
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}     # no test reaches the network


def run_prepare(*args):
    return subprocess.run([sys.executable, *PREPARE, *args], capture_output=True, text=True,
                          env={**clean_env(), **OFFLINE})


@pytest.fixture
def prepare(tmp_path, monkeypatch, capsys):
    """mose-prepare run in this process, which has imported datasets already (a run
    takes well under a second, not the seconds of a fresh interpreter), offline and with its
    own datasets cache. datasets and huggingface_hub read HF_HUB_OFFLINE when imported, so
    their flags are set as the variable would have set them. Returns (exit code, stderr)."""
    import datasets
    import huggingface_hub.constants
    for name, value in OFFLINE.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    tool = load_tool("prepare")

    def run(*args) -> tuple[int, str]:
        try:
            tool.main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err
    return run


def write_parquet(path, texts: list[str]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": texts}), path, row_group_size=700)
    return str(path)


def one_line_error(stderr: str) -> str:
    """The error a run ended with, checked to be one line and no traceback (progress bars before
    it redraw with carriage returns, so they end no line of their own)."""
    last = stderr.rstrip("\n").split("\n")[-1]
    assert "Traceback" not in stderr and stderr.count("prepare_data: error") == 1, stderr
    assert last.startswith("prepare_data: error: "), stderr
    return last


def shards(folder) -> tuple[bytes, bytes]:
    return (folder / "train.bin").read_bytes(), (folder / "val.bin").read_bytes()


def test_gpt2_tokenizer_works_offline_with_gpt2_ids():
    enc = gpt2()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.encode("<|endoftext|>", allowed_special="all") == [EOT_ID]
    assert enc.decode(enc.encode_ordinary("Slimmable experts, 0.25x!")) == "Slimmable experts, 0.25x!"


def test_prepare_folder_of_documents(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(10):
        (docs / f"{i}.txt").write_text(f"Document number {i}. " * 20)
    out = tmp_path / "out"
    result = run_prepare("--input", str(docs), "--out", str(out), "--val-fraction", "0.2")
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    train = np.memmap(out / "train.bin", dtype=np.uint16, mode="r")
    val = np.memmap(out / "val.bin", dtype=np.uint16, mode="r")
    assert meta["documents"] == 10 and len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"]
    assert (train == EOT_ID).sum() == 8 and (val == EOT_ID).sum() == 2   # split at a document boundary
    assert gpt2().decode(list(val[:-1][: (val == EOT_ID).argmax()])).startswith("Document number 8.")


def test_prepare_through_hf_datasets_with_local_files(tmp_path):
    rows = tmp_path / "docs.jsonl"
    rows.write_text("".join(json.dumps({"body": f"Row {i} of a local dataset."}) + "\n" for i in range(20)))
    out = tmp_path / "hf"
    result = run_prepare("--hf-dataset", "json", "--hf-data-files", str(rows), "--text-field", "body",
                         "--out", str(out), "--num-proc", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["documents"] == 20 and meta["source"] == "hf:json"
    train = np.memmap(out / "train.bin", dtype=np.uint16, mode="r")
    assert gpt2().decode(list(train[:8])).startswith("Row 0 of a local dataset.")
    result = run_prepare("--hf-dataset", "json", "--hf-data-files", str(rows), "--text-field", "text",
                         "--out", str(tmp_path / "hf2"))
    assert result.returncode == 2 and "--text-field 'text'" in result.stderr


def test_prepare_local_parquet_files(tmp_path, prepare):
    docs = write_parquet(tmp_path / "docs.parquet", [f"Row {i} of a parquet file." for i in range(20)])
    code, err = prepare("--hf-dataset", "parquet", "--hf-data-files", docs, "--out", tmp_path / "out")
    assert code == 0, err
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["documents"] == 20 and meta["source"] == "hf:parquet" and meta["tokenize_rate"]["tokens_per_s"] > 0
    train = np.memmap(tmp_path / "out" / "train.bin", dtype=np.uint16, mode="r")
    assert gpt2().decode(list(train[:8])).startswith("Row 0 of a parquet file.")


def test_prepare_a_folder_written_by_save_to_disk(tmp_path, prepare):
    """Passed as --hf-dataset FOLDER and read in place by load_from_disk (no copy into the datasets
    cache, which the arrow builder would make); --hf-split picks the split."""
    import datasets
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["Training text."] * 30}),
                          "validation": datasets.Dataset.from_dict({"text": [f"Held out {i}." for i in range(6)]}),
                          }).save_to_disk(str(saved))
    code, err = prepare("--hf-dataset", saved, "--hf-split", "validation", "--out", tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["documents"] == 6
    train = np.memmap(tmp_path / "out" / "train.bin", dtype=np.uint16, mode="r")
    assert gpt2().decode(list(train[:5])).startswith("Held out 0.")
    assert not (tmp_path / "hf-cache").exists()


def test_a_folder_with_a_loading_script_is_a_one_line_error(tmp_path, prepare):
    folder = tmp_path / "owt"
    folder.mkdir()
    (folder / "owt.py").write_text("import datasets\n")
    code, err = prepare("--hf-dataset", folder, "--out", tmp_path / "out")
    msg = one_line_error(err)
    assert code == 2 and "loading script (owt.py), which datasets>=4 no longer runs" in msg and "--hf-data-files" in msg
    assert not (tmp_path / "out").exists()


def test_a_missing_split_names_the_splits_there_are(tmp_path, prepare):
    import datasets
    docs = write_parquet(tmp_path / "docs.parquet", ["Only a train split."] * 4)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(tmp_path / "saved"))
    for source in (["parquet", "--hf-data-files", docs], [tmp_path / "saved"]):
        code, err = prepare("--hf-dataset", *source, "--hf-split", "validation", "--out", tmp_path / "out")
        msg = one_line_error(err)
        assert code == 2 and "--hf-split validation" in msg and "['train']" in msg
    assert not (tmp_path / "out").exists()


def test_an_unreachable_hub_is_a_one_line_error(tmp_path, prepare):
    """Offline, the recipe's name and a hub repo both say how to fetch the files for offline use."""
    for name, download in (("openwebtext", "hf download Skylion007/openwebtext --repo-type dataset --revision"),
                           ("someone/some-dataset", "hf download someone/some-dataset --repo-type dataset")):
        code, err = prepare("--hf-dataset", name, "--out", tmp_path / "out")
        msg = one_line_error(err)
        assert code == 2 and "offline mode is on" in msg and download in msg and "--hf-data-files" in msg
    assert not (tmp_path / "out").exists()


MANY_DOCS = [f"Document {i}: " + "slimmable experts route tokens " * (i % 9) for i in range(5500)]


def test_streaming_writes_the_same_shards(tmp_path, prepare):
    """Streamed, in this process and on two workers: six batches of documents, more than the
    workers hold in flight, so results come back while batches are still being sent."""
    docs = write_parquet(tmp_path / "docs.parquet", MANY_DOCS)
    for name, flags in {"arrow": [], "stream": ["--streaming"], "stream2": ["--streaming", "--num-proc", "2"]}.items():
        code, err = prepare("--hf-dataset", "parquet", "--hf-data-files", docs, "--out", tmp_path / name, *flags)
        assert code == 0, err
    assert shards(tmp_path / "stream") == shards(tmp_path / "arrow") == shards(tmp_path / "stream2")


def test_num_proc_2_writes_the_same_shards_as_1(tmp_path, prepare):
    docs = write_parquet(tmp_path / "docs.parquet", MANY_DOCS)
    for n in (1, 2):
        code, err = prepare("--hf-dataset", "parquet", "--hf-data-files", docs, "--out", tmp_path / f"p{n}",
                            "--num-proc", n)
        assert code == 0, err
    assert shards(tmp_path / "p1") == shards(tmp_path / "p2")
    assert not (tmp_path / "p2" / "tokenized.tmp").exists()


def test_compact_vocab_maps_back_to_gpt2_ids(corpus):
    meta = json.load(open(os.path.join(corpus, "meta.json")))
    used = np.load(os.path.join(corpus, "vocab.npy"))
    train = np.memmap(os.path.join(corpus, "train.bin"), dtype=np.uint16, mode="r")
    assert meta["vocab_size"] == len(used) < 4096 and train.max() < len(used)
    assert gpt2().decode(used[train[:20]].tolist()).startswith("First Citizen")


def test_byte_tokenizer_prepares_and_round_trips(tmp_path):
    from mose_ds.tokenizer import TextCodec
    text = tmp_path / "t.txt"
    text.write_text("Slimmable experts: déjà vu.\n" * 40, encoding="utf-8")
    result = run_prepare("--input", str(text), "--out", str(tmp_path / "bytes"), "--tokenizer", "bytes",
                         "--compact-vocab")
    assert result.returncode == 0, result.stderr
    meta = json.load(open(tmp_path / "bytes" / "meta.json"))
    train = np.memmap(tmp_path / "bytes" / "train.bin", dtype=np.uint16, mode="r")
    # 20 ASCII bytes + 3 bytes of é and à (two each, sharing the lead byte) + end-of-text
    assert meta["tokenizer"] == "bytes" and meta["vocab_size"] == 24 and train.max() < 24
    codec = TextCodec.for_data(str(tmp_path / "bytes"))
    ids = codec.encode("déjà vu. Z")
    assert codec.decode(ids[:-1]) == "déjà vu. " and ids[-1] == codec.unk_id and codec.unknown == 1
    assert TextCodec(tokenizer="bytes").encode("é") == [0xC3, 0xA9]




def test_an_hf_tokenizer_json_prepares_data_with_its_own_ids(tmp_path):
    """A model directory's tokenizer.json (here GPT-2's, built from the shared vocab/merges)
    gives exactly the ids of our GPT-2 tokenizer, and the folder keeps its own copy."""
    from mose_ds.tokenizer import TextCodec
    model_dir = tmp_path / "model"
    gpt2_model_dir(model_dir)
    text = tmp_path / "t.txt"
    text.write_text("Slimmable experts, 0.25x! " * 50 + "\nNaïve café.\n")
    out = tmp_path / "hf"
    result = run_prepare("--input", str(text), "--out", str(out), "--tokenizer", str(model_dir))
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["tokenizer"], meta["dtype"], meta["vocab_size"], meta["eot_id"]) == \
        ("tokenizer.json", "uint16", 50257, EOT_ID)
    ids = np.concatenate([np.fromfile(out / "train.bin", np.uint16), np.fromfile(out / "val.bin", np.uint16)])
    assert ids.tolist() == gpt2().encode_ordinary(text.read_text()) + [EOT_ID]
    (model_dir / "tokenizer.json").unlink()                     # the prepared folder stands alone
    codec = TextCodec.for_data(str(out))
    assert codec.decode(codec.encode("Naïve café.")) == "Naïve café." and codec.eot == EOT_ID


def test_a_vocabulary_beyond_uint16_is_stored_as_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = {f"w{i}": i for i in range(70_000)}
    tok = Tokenizer(models.WordLevel({**words, "[UNK]": 70_000, "</s>": 70_001}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "</s>"}}))
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{i}" for i in range(69_000, 69_990)))
    out = tmp_path / "big"
    result = run_prepare("--input", str(text), "--out", str(out), "--tokenizer",
                         str(tmp_path / "tokenizer.json"), "--val-fraction", "0.5")
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["dtype"], meta["vocab_size"], meta["eot_id"]) == ("uint32", 70_002, 70_001)
    split = TokenSplit(str(out), "train", 8, 70_002)
    x, y = split.batch(np.array([0]))
    assert x[0].tolist() == list(range(69_000, 69_008)) and y[0, -1] == 69_008
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    result = run_prepare("--input", str(text), "--out", str(tmp_path / "o"), "--tokenizer", str(bad))
    assert result.returncode == 2 and "bad.json: not a tokenizer.json" in result.stderr
    assert "Traceback" not in result.stderr


def test_prepare_refuses_to_overwrite_and_missing_input(tmp_path, corpus):
    before = os.path.getmtime(os.path.join(corpus, "train.bin"))
    result = run_prepare("--input", os.path.join(ROOT, "corpus", "tinyshakespeare.txt"), "--out", corpus)
    assert result.returncode == 2 and "already holds prepared data" in result.stderr
    assert os.path.getmtime(os.path.join(corpus, "train.bin")) == before
    fresh = tmp_path / "again"
    assert run_prepare("--input", os.path.join(ROOT, "corpus", "tinyshakespeare.txt"), "--out", str(fresh),
                       "--val-fraction", "0.5").returncode == 0
    first = json.loads((fresh / "meta.json").read_text())
    assert run_prepare("--input", os.path.join(ROOT, "corpus", "tinyshakespeare.txt"), "--out", str(fresh),
                       "--overwrite").returncode == 0
    second = json.loads((fresh / "meta.json").read_text())
    assert second["val_tokens"] < first["val_tokens"] and not list(fresh.glob("*.tmp"))
    result = run_prepare("--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "nope.txt: no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_batches_are_deterministic_and_cover_each_epoch(corpus):
    split = TokenSplit(corpus, "train", 32, 4096)
    n = split.num_windows
    epoch0 = train_window_ids(split, seed=3, start=0, count=n)
    assert sorted(epoch0.tolist()) == list(range(n))
    assert not np.array_equal(epoch0, train_window_ids(split, seed=3, start=n, count=n))
    x1, y1 = micro_batch(split, 3, position=40, micro=1, rank=1, world=2, micro_batch_size=4)
    x2, y2 = micro_batch(split, 3, position=40, micro=1, rank=1, world=2, micro_batch_size=4)
    assert x1.shape == (4, 32) and (x1 == x2).all() and (x1[:, 1:] == y1[:, :-1]).all()


def test_missing_data_path_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path: no such directory: .*missing_dir"):
        TokenSplit(str(tmp_path / "missing_dir"), "train", 32, 4096)


def test_vocab_larger_than_model_is_refused(corpus):
    with pytest.raises(ConfigError, match=r"exceeds model\.vocab_size=100"):
        TokenSplit(corpus, "train", 32, 100)


def test_device_batches_read_ahead_in_the_training_order(corpus):
    """The prefetching iterator yields exactly the micro-batches of the plain order, iteration
    by iteration (this rank's share of each global batch), from any starting position."""
    import torch
    from mose_ds.data import device_batches
    split = TokenSplit(corpus, "train", 16, 4096)
    rank, world, mb, ga, position = 1, 2, 3, 2, 12
    batches = device_batches(split, 7, position, rank, world, mb, ga, torch.device("cpu"))
    for iteration in range(3):
        for micro in range(ga):
            want = micro_batch(split, 7, position + iteration * mb * ga * world, micro, rank, world, mb)
            got = next(batches)
            assert all(torch.equal(g, w) for g, w in zip(got, want)), (iteration, micro)
