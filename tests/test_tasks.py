"""Evaluation tasks (lm-eval's rules on local files), the log-likelihood scorer against a
direct computation from a tiny model's logits, and the lm-eval adapter."""

import bz2
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_config
from mose_ds.model import MoSEGPT
from mose_ds.scoring import Scorer
from mose_ds.tasks import (TASKS, TaskError, hellaswag_preprocess, load_wikitext, run_task,
                           wikitext_detokenize, wsc_normalize_option)
from mose_ds.tokenizer import TextCodec
from mose_ds.widths import UniformPolicy


class FakeScorer:
    """The scorer interface with chosen answers: `lls[(context, continuation)]`, and for
    rolling texts -len(text) / 10 over len(text) // 4 tokens. Records every request."""

    def __init__(self, lls=None, greedy=()):
        self.lls, self.greedy, self.requests, self.texts = lls or {}, set(greedy), [], []

    def loglikelihood(self, pairs):
        self.requests += list(pairs)
        return [(self.lls[p], p in self.greedy) for p in pairs]

    def rolling_scores(self, texts):
        self.texts += list(texts)
        return [(-len(t) / 10, len(t) // 4) for t in texts]


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def jsonl(path, rows):
    return write_lines(path, [json.dumps(r) for r in rows])


# ---------------------------------------------------------------------------------------
# Tasks on hand-made files.

def test_lambada_context_is_all_but_the_last_word(tmp_path):
    path = jsonl(tmp_path / "l.jsonl", [{"text": "the cat sat on the mat"}, {"text": "a b\n\nc"}])
    a, b = ("the cat sat on the", " mat"), ("a", " b\n\nc")
    scorer = FakeScorer({a: -1.0, b: -3.0}, greedy=[a])
    out = run_task("lambada", scorer, [path], None)
    assert scorer.requests == [a, b]
    assert out == {"acc": 0.5, "ppl": pytest.approx(math.exp(2.0)), "items": 2}


WIKI = [" ", " = First Page = ", " ", " It was a ( small ) dog , with 1 @,@ 000 legs . ", " ",
        " = = History = = ", " ", " The dog 's name was \" Rex \" . ", " ",
        " = Second = ", " ", " Words @-@ here . ", " "]


def test_wikitext_articles_split_at_titles_and_scored_on_detokenized_text(tmp_path):
    path = write_lines(tmp_path / "w.txt", WIKI)
    pages = load_wikitext(path)
    assert pages == ["\n".join(WIKI[1:9]), "\n".join(WIKI[9:])]
    assert wikitext_detokenize(pages[1]) == " = Second =\n\nWords-here.\n"
    assert wikitext_detokenize(WIKI[3] + WIKI[7]) == " It was a (small) dog, with 1,000 legs.  The dog's name was \"Rex\". "
    scorer = FakeScorer()
    out = run_task("wikitext", scorer, [path], None)
    assert scorer.texts == [wikitext_detokenize(p) for p in pages]
    ll = sum(-len(t) / 10 for t in scorer.texts)
    words = sum(len(p.split()) + 2 for p in pages)       # lm-eval counts the empty edge pieces
    nbytes = sum(len(p.encode()) for p in pages)
    tokens = sum(len(t) // 4 for t in scorer.texts)
    assert out["word_perplexity"] == pytest.approx(math.exp(-ll / words))
    assert out["byte_perplexity"] == pytest.approx(math.exp(-ll / nbytes))
    assert out["bits_per_byte"] == pytest.approx(-ll / nbytes / math.log(2))
    assert out["token_perplexity"] == pytest.approx(math.exp(-ll / tokens))
    assert run_task("wikitext", FakeScorer(), [path], 1)["items"] == 1


def test_hellaswag_preprocessing_requests_and_acc_norm(tmp_path):
    path = tmp_path / "h.txt.bz2"
    lines = ["Cooking: How to boil [title] Fill a pot.  he", "1", "stirs.", "pours [step] the water out slowly.",
             "x", "y",
             "Sport: a man runs", "0", "jumps", "falls", "sits", "waves"]
    path.write_bytes(bz2.compress("\n".join(lines).encode() + b"\n"))
    query = "Cooking: How to boil. Fill a pot. he"
    lls = {(query, " stirs."): -1.0, (query, " pours the water out slowly."): -2.0,
           (query, " x"): -5.0, (query, " y"): -5.0}
    lls.update({("Sport: a man runs", " " + e): -1.0 for e in ("jumps", "falls", "sits", "waves")})
    scorer = FakeScorer(lls)
    out = run_task("hellaswag", scorer, [str(path)], None)
    assert scorer.requests[:4] == list(lls)[:4]
    # item 1: acc picks 'stirs.' (gold 1 is the long ending), acc_norm picks the long one;
    # item 2: acc ties go to the first choice (gold), and so does acc_norm's tie of 5-letter words.
    assert out == {"acc": 0.5, "acc_norm": 1.0, "items": 2}


def test_hellaswag_preprocess_rules():
    assert hellaswag_preprocess("  A [header] b [title] c  d [step] e ") == "A b. c d e"


def test_piqa_prompt_and_labels(tmp_path):
    rows = [{"goal": "Open a jar", "sol1": "twist", "sol2": "twist the lid firmly"},
            {"goal": "Dry hair", "sol1": "towel", "sol2": "water"}]
    data, labels = jsonl(tmp_path / "p.jsonl", rows), write_lines(tmp_path / "p.lst", ["1", "0"])
    q1, q2 = "Question: Open a jar\nAnswer:", "Question: Dry hair\nAnswer:"
    lls = {(q1, " twist"): -1.0, (q1, " twist the lid firmly"): -2.0, (q2, " towel"): -1.0, (q2, " water"): -4.0}
    out = run_task("piqa", FakeScorer(lls), [data, labels], None)
    assert out == {"acc": 0.5, "acc_norm": 1.0, "items": 2}


def test_siqa_prompt_and_one_based_labels(tmp_path):
    row = {"context": "Tracy stayed.", "question": "Why?", "answerA": "a", "answerB": "bbbbbbbb", "answerC": "c"}
    data, labels = jsonl(tmp_path / "s.jsonl", [row]), write_lines(tmp_path / "s.lst", ["2"])
    q = "Q: Tracy stayed. Why?\nA:"
    out = run_task("siqa", FakeScorer({(q, " a"): -1.0, (q, " bbbbbbbb"): -1.5, (q, " c"): -3.0}), [data, labels], None)
    assert out == {"acc": 0.0, "acc_norm": 1.0, "items": 1}


def test_wsc_option_normalisation_follows_lm_eval():
    text = "The man lifted the boy. His son was heavy because he ate."
    assert wsc_normalize_option(text, "he", text.index("he ate"), "The boy") == "the boy"
    assert wsc_normalize_option(text, "His", text.index("His"), "The man") == "The man's"   # sentence start
    mid = "Bob told Tom that his dog barked."
    assert wsc_normalize_option(mid, "his", mid.index("his"), "Tom") == "Tom's"
    assert wsc_normalize_option(mid, "his", mid.index("his"), "The Theatre") == "the theatre's"  # every 'The'


def test_wsc273_partial_evaluation(tmp_path):
    row = {"text": "The trophy doesn't fit into the suitcase because it is too large.", "pronoun": "it",
           "pronoun_loc": 49, "options": ["The trophy", "the suitcase"], "label": 0}
    path = write_lines(tmp_path / "w.jsonl", [repr(row)])
    prefix, rest = "The trophy doesn't fit into the suitcase because ", "  is too large."
    scorer = FakeScorer({(prefix + "the trophy", rest): -2.0, (prefix + "the suitcase", rest): -1.0})
    assert run_task("wsc273", scorer, [path], None) == {"acc": 0.0, "items": 1}
    assert [c for c, _ in scorer.requests] == [prefix + "the trophy", prefix + "the suitcase"]


@pytest.mark.parametrize("lines, message", [
    (['{"goal": "g", "sol1": "a"}'], "p.jsonl:1: missing field 'sol2'"),
    (['{"goal": "g", "sol1": "a", "sol2": "b"}', "not json"], "p.jsonl:2: not a record"),
    (['{"goal": "g", "sol1": "a", "sol2": "b"}'] * 2, "p.lst: 1 labels for 2 items"),
    (['{"goal": 3, "sol1": "a", "sol2": "b"}'], "p.jsonl:1: field 'goal' is not a string"),
])
def test_piqa_bad_files_name_the_file_and_line(tmp_path, lines, message):
    data, labels = write_lines(tmp_path / "p.jsonl", lines), write_lines(tmp_path / "p.lst", ["0"])
    with pytest.raises(TaskError, match=message):
        run_task("piqa", FakeScorer(), [data, labels], None)


def test_bad_inputs_raise_task_errors(tmp_path):
    with pytest.raises(TaskError, match="nope.jsonl: no such file"):
        run_task("lambada", FakeScorer(), [str(tmp_path / "nope.jsonl")], None)
    hs = tmp_path / "h.txt.bz2"
    hs.write_bytes(bz2.compress(b"ctx\n7\na\nb\nc\nd\n"))
    with pytest.raises(TaskError, match=r"h.txt.bz2:2: gold index '7' is not 0-3"):
        run_task("hellaswag", FakeScorer(), [str(hs)], None)
    hs.write_bytes(bz2.compress(b"ctx\n1\na\n"))
    with pytest.raises(TaskError, match="not a multiple of 6"):
        run_task("hellaswag", FakeScorer(), [str(hs)], None)
    siqa_labels = write_lines(tmp_path / "s.lst", ["0"])
    row = {"context": "c", "question": "q", "answerA": "a", "answerB": "b", "answerC": "c"}
    with pytest.raises(TaskError, match=r"s.lst:1: label '0' is not one of 1, 2, 3"):
        run_task("siqa", FakeScorer(), [jsonl(tmp_path / "s.jsonl", [row]), siqa_labels], None)
    wsc = write_lines(tmp_path / "w.jsonl", [repr({"text": "a b", "pronoun": "it", "pronoun_loc": 0,
                                                   "options": ["x", "y"], "label": 0})])
    with pytest.raises(TaskError, match="w.jsonl:1: the pronoun 'it' is not at pronoun_loc 0"):
        run_task("wsc273", FakeScorer(), [wsc], None)
    with pytest.raises(TaskError, match="no ' = Title = ' heading"):
        run_task("wikitext", FakeScorer(), [write_lines(tmp_path / "t.txt", ["just text"])], None)
    with pytest.raises(TaskError, match="unknown task 'mmlu': known tasks are lambada, wikitext"):
        run_task("mmlu", FakeScorer(), [], None)
    with pytest.raises(TaskError, match=r"task piqa takes 2 path\(s\)"):
        run_task("piqa", FakeScorer(), ["x"], None)
    assert set(TASKS) == {"lambada", "wikitext", "hellaswag", "piqa", "siqa", "wsc273"}


# ---------------------------------------------------------------------------------------
# The scorer on a real tiny model.

@pytest.fixture(scope="module")
def tiny(world):
    cfg = tiny_config()
    model = MoSEGPT(cfg.model, cfg.moe)
    for layer in model.moe_layers():
        layer.set_deepspeed_parallelism()
    model.init_weights(0)
    return model.eval(), TextCodec(np.arange(4000))


@torch.no_grad()
def direct(model, inputs, targets):
    """Sum of log-softmax of `targets` at the last len(targets) positions of `inputs`, and
    whether argmax picks each of them."""
    logits = model(torch.tensor([inputs]), UniformPolicy(0.5))[0][0, -len(targets):]
    logp = torch.log_softmax(logits.float(), -1)
    t = torch.tensor(targets)
    return logp.gather(-1, t[:, None]).sum().item(), bool((logp.argmax(-1) == t).all())


TEXT = ("The king is dead, long live the king. The queen is here, and the court is full of "
        "people who talk of the war, of the sea, and of the time when all of us were young and "
        "the world was new. Now we are old and the world is old, and we sit by the fire and tell "
        "the old tales again to the children.")


def test_loglikelihood_equals_direct_computation(tiny):
    model, codec = tiny
    scorer = Scorer(model, codec, UniformPolicy(0.5))
    ctx, cont = codec.encode("The king is"), codec.encode("The king is dead")[3:]
    ll, greedy = scorer.loglikelihood([("The king is ", "dead")])[0]
    want_ll, want_greedy = direct(model, ctx + cont[:-1], cont)
    assert ll == pytest.approx(want_ll) and greedy == want_greedy
    assert scorer.encode_pair("The king is ", "dead") == (ctx, cont)
    # empty context: conditioned on end-of-text; long input: the last seq_len + 1 tokens
    assert scorer.loglikelihood([("", "The king")])[0][0] == pytest.approx(
        direct(model, [codec.eot] + codec.encode("The king")[:-1], codec.encode("The king"))[0])
    ids = codec.encode(TEXT)
    assert len(ids) > 40
    ll_long = scorer.loglikelihood_tokens([(ids[:-2], ids[-2:])])[0][0]
    assert ll_long == pytest.approx(direct(model, ids[-33:-1], ids[-2:])[0])
    # one sequence per forward: a request's score does not depend on its neighbours
    pair = ("The queen", " is here")
    assert scorer.loglikelihood([pair])[0] == scorer.loglikelihood([("x y z", " w"), pair])[1]
    assert scorer.meter.tokens > 0 and scorer.meter.mflops()["standard"] > 0


def test_rolling_loglikelihood_windows(tiny):
    model, codec = tiny
    scorer = Scorer(model, codec, UniformPolicy(0.5))
    short = codec.encode("The king is dead.")
    assert scorer.loglikelihood_rolling(["The king is dead."])[0] == pytest.approx(
        direct(model, [codec.eot] + short[:-1], short)[0])
    ids = codec.encode(TEXT)
    n, L = len(ids), model.cfg.seq_len
    assert 2 * L < n < 3 * L
    # lm-eval's windows (context_len=1): [eot]+ids[:31] -> ids[:32], ids[31:63] -> ids[32:64],
    # and the last chunk fed with a full window of what precedes it.
    expected = (direct(model, [codec.eot] + ids[:L - 1], ids[:L])[0]
                + direct(model, ids[L - 1:2 * L - 1], ids[L:2 * L])[0]
                + direct(model, ids[n - 1 - L:n - 1], ids[2 * L:])[0])
    assert scorer.rolling_scores([TEXT]) == [(pytest.approx(expected), n)]
    assert scorer.loglikelihood_rolling([""]) == [0.0]


def test_requests_and_windows_match_lm_eval_helpers(tiny):
    """Our token split and rolling windows against the harness's own code on the same ids."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    model, codec = tiny
    scorer = Scorer(model, codec)

    class Recorder(TemplateLM):
        eot_token_id = codec.eot
        tok_encode = staticmethod(lambda s, **kw: codec.encode(s))
        _loglikelihood_tokens = staticmethod(lambda reqs, **kw: [(c, x) for _, c, x in reqs])
        loglikelihood_rolling = generate_until = None

    pairs = [("Hello  \n ", "world"), ("a,b", " c d"), ("", " The king"), ("x\n\n", "\n\ny")]
    requests = [type("R", (), {"args": p})() for p in pairs]
    assert Recorder().loglikelihood(requests, disable_tqdm=True) == [scorer.encode_pair(*p) for p in pairs]
    L = model.cfg.seq_len
    for n in (1, L - 1, L, L + 1, 2 * L, 2 * L + 5):
        ids = list(range(10, 10 + n))
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, codec.eot, L, 1)]
        ours = [(c[-(L + 1 - len(x)):], x) for c, x in scorer.rolling_windows(ids)]
        assert ours == theirs, n


# ---------------------------------------------------------------------------------------
# The lm-eval adapter.

def test_lm_eval_adapter_answers_from_the_models_own_logits(tiny):
    """Each request type against log-softmax and argmax of the model's forward at the width
    asked for (width=0.5), computed here: log-likelihoods, greedy flags (one continuation is
    the model's own argmax token, one is not), a rolling score, a greedy generation."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    from mose_ds.lm_eval_adapter import MoSELM

    assert get_model("mose") is MoSELM
    model, codec = tiny
    lm = MoSELM(model=model, codec=codec, policy="uniform", width=0.5, batch_size=8)

    def next_token(ids):
        with torch.no_grad():
            return int(model(torch.tensor([ids[-model.cfg.seq_len:]]), UniformPolicy(0.5))[0][0, -1].argmax())

    ctx = codec.encode("The king is")
    argmax = codec.decode([next_token(ctx)])
    pairs = [("The king is", argmax), ("The king is", " dead"), ("long live", " the king.")]
    want = []
    for context, continuation in pairs:
        c = codec.encode(context)
        x = codec.encode(context + continuation)[len(c):]
        want.append(direct(model, c + x[:-1], x))
    queen = codec.encode("The queen")
    pairs.append(("", "The queen"))
    want.append(direct(model, [codec.eot] + queen[:-1], queen))
    assert [flag for _, flag in want] == [True, False, False, False]
    requests = [Instance(request_type="loglikelihood", arguments=p, doc={}, idx=0) for p in pairs]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    assert [flag for _, flag in got] == [flag for _, flag in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], rel=1e-5)
    with torch.no_grad():                                      # the width matters to the answer
        full = torch.log_softmax(model(torch.tensor([ctx]), UniformPolicy(1.0))[0][0, -1], -1)[
            codec.encode("The king is" + argmax)[-1]].item()
    assert full != pytest.approx(want[0][0], rel=1e-3)

    short = codec.encode("The king is dead.")
    rolling = [Instance(request_type="loglikelihood_rolling", arguments=("The king is dead.",), doc={}, idx=0)]
    assert lm.loglikelihood_rolling(rolling, disable_tqdm=True) == \
        [pytest.approx(direct(model, [codec.eot] + short[:-1], short)[0], rel=1e-5)]

    ids, new = codec.encode("The king"), []
    for _ in range(3):
        token = next_token(ids)
        if token == codec.eot:
            break
        ids, new = ids + [token], new + [token]
    gen = [Instance(request_type="generate_until", arguments=("The king", {"until": ["\n"], "max_gen_toks": 3}),
                    doc={}, idx=0)]
    assert lm.generate_until(gen, disable_tqdm=True) == [codec.decode(new).split("\n")[0]]
    assert lm.get_model_info()["mose_mflops_per_token"]["paper"] > 0
    with pytest.raises(ValueError, match="unknown mose model_args: colour"):
        MoSELM(model=model, codec=codec, colour="red")


def test_adapter_import_without_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    monkeypatch.delitem(sys.modules, "mose_ds.lm_eval_adapter", raising=False)
    with pytest.raises(ImportError, match=r"pip install -e \.\[eval\]"):
        import mose_ds.lm_eval_adapter  # noqa: F401


# ---------------------------------------------------------------------------------------
# The adapter's device: CUDA when torch sees it, else the CPU, unless one is named.

@pytest.mark.skipif(os.environ.get("MOSE_DS_FAKE_CUDA") == "1",
                    reason="a fake GPU host chooses CUDA (tests/test_devices.py) but cannot hold a model there")
def test_the_adapter_without_a_device_takes_cuda_when_present_else_the_cpu(trained, monkeypatch):
    from lm_eval.api.registry import get_model
    import mose_ds.lm_eval_adapter  # noqa: F401  (registers "mose")
    from mose_ds import devices
    monkeypatch.delenv(devices.ENV_DEVICE, raising=False)
    # what simple_evaluate(model="mose", model_args=...) passes when given no device
    lm = get_model("mose").create_from_arg_string(f"checkpoint={trained},policy=full",
                                                  {"batch_size": 1, "max_batch_size": None, "device": None})
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert lm.scorer.loglikelihood([("The king is ", "dead")])[0][0] < 0


def test_the_adapter_cli_asks_for_auto_unless_a_device_is_named(monkeypatch, tmp_path):
    """lm-eval's CLI would pass its default device 'cuda:0' to the model."""
    from mose_ds.lm_eval_adapter import parse_cli
    argv = ["lm_eval_adapter", "--model", "mose", "--model_args", "checkpoint=RUN", "--tasks", "lambada_openai"]
    config = tmp_path / "run.yaml"
    config.write_text("device: cpu\n")
    for extra, device in (([], "auto"), (["--device", "cpu"], "cpu"), (["--config", str(config)], None)):
        monkeypatch.setattr(sys, "argv", argv + extra)
        assert parse_cli()[1].device == device, extra          # None: the config file's device applies
    # a device in --model_args: the CLI's stays unset (the harness passes both to the model)
    monkeypatch.setattr(sys, "argv", argv[:4] + ["checkpoint=RUN,device=cpu"] + argv[5:])
    assert parse_cli()[1].device is None


def test_an_unavailable_device_is_a_one_line_error_naming_it(trained, monkeypatch, capsys):
    from conftest import load_tool
    from lm_eval.config.evaluate_config import EvaluatorConfig
    from mose_ds.devices import DeviceError
    from mose_ds.lm_eval_adapter import MoSELM, main
    monkeypatch.setattr(EvaluatorConfig, "process_tasks", lambda self, metadata=None: None)  # the task index: slow
    for device in ["cuda:7"] + ([] if torch.cuda.is_available() else ["cuda"]):
        with pytest.raises(DeviceError) as error:
            MoSELM(checkpoint=trained, device=device)
        assert f"device {device}" in str(error.value).replace("'", "") and "\n" not in str(error.value)
        monkeypatch.setattr(sys, "argv", ["lm_eval_adapter", "--model", "mose", "--model_args",
                                          f"checkpoint={trained}", "--tasks", "lambada_openai", "--device", device])
        with pytest.raises(SystemExit) as exit_:
            main()
        assert str(exit_.value) == f"lm_eval_adapter: error: {error.value}"
        capsys.readouterr()
        assert load_tool("evaluate").main(["ppl", "--ckpt", trained, "--device", device]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and device in err, err
