"""Zero-shot evaluation tasks on local files, scored the way lm-evaluation-harness scores them.

Each task reads its own file format (paths are always arguments), turns the items into
the harness's requests (same prompts, same target delimiter, same preprocessing) and
aggregates the harness's metrics:

| task | file(s) | requests | metrics |
| --- | --- | --- | --- |
| lambada | jsonl `{"text"}` | text minus last word -> " " + last word | acc, ppl |
| wikitext | WikiText-2 tokenized text | one rolling log-likelihood per article | word/byte/token perplexity, bits_per_byte |
| hellaswag | bz2 text, 6 lines per item | query -> " " + ending (4 choices) | acc, acc_norm |
| piqa | jsonl + labels (0/1) | "Question: {goal}\\nAnswer:" -> " " + solution | acc, acc_norm |
| siqa | jsonl + labels (1-3) | "Q: {context} {question}\\nA:" -> " " + answer | acc, acc_norm |
| wsc273 | Python dict literal per line | text up to the pronoun with each option -> shared rest | acc |

`acc` picks the choice of highest log-likelihood, `acc_norm` the highest log-likelihood per
character of the choice (ties go to the first choice, like numpy's argmax).

A scorer is anything with `loglikelihood(pairs) -> [(ll, greedy)]` and
`rolling_scores(texts) -> [(ll, tokens)]`, normally `mose_ds.scoring.Scorer`.
"""

from __future__ import annotations

import ast
import bz2
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from tqdm import tqdm


class TaskError(ValueError):
    """A task file is missing or not in its task's format, or a task name is unknown."""


@dataclass(frozen=True)
class MultipleChoice:
    requests: list[tuple[str, str]]   # one (context, continuation) per choice
    gold: int                         # index of the right choice
    choices: list[str]                # the choice texts, whose lengths normalise acc_norm


# ---------------------------------------------------------------------------------------
# Reading files.

def _read_lines(path: str) -> list[str]:
    """The file's lines (split on '\\n' only, so other line-like characters inside text
    survive), without the empty string after a final newline; `.bz2` is decompressed."""
    if not os.path.isfile(path):
        raise TaskError(f"{path}: no such file")
    try:
        opener = bz2.open if path.endswith(".bz2") else open
        with opener(path, "rb") as f:
            text = f.read().decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    return lines[:-1] if lines and lines[-1] == "" else lines


def _records(path: str, fields: Sequence[str], parse: Callable[[str], Any] = json.loads) -> list[dict]:
    """One dict per line (JSON objects, or Python literals with `ast.literal_eval`), each
    checked to have every field in `fields`."""
    rows = []
    for lineno, line in enumerate(_read_lines(path), 1):
        try:
            row = parse(line)
        except (ValueError, SyntaxError, TypeError) as e:
            raise TaskError(f"{path}:{lineno}: not a record ({type(e).__name__}: {e})") from None
        if not isinstance(row, dict):
            raise TaskError(f"{path}:{lineno}: expected an object, got {type(row).__name__}")
        missing = [f for f in fields if f not in row]
        if missing:
            raise TaskError(f"{path}:{lineno}: missing field {missing[0]!r}")
        rows.append(row)
    if not rows:
        raise TaskError(f"{path}: no items")
    return rows


def _text_field(row: dict, field: str, path: str, lineno: int) -> str:
    if not isinstance(row[field], str):
        raise TaskError(f"{path}:{lineno}: field {field!r} is not a string")
    return row[field]


def _labels(path: str, allowed: Sequence[str], count: int, items_path: str) -> list[str]:
    """One label per line, each one of `allowed`, as many as the items file has items."""
    labels = [line.strip() for line in _read_lines(path)]
    if len(labels) != count:
        raise TaskError(f"{path}: {len(labels)} labels for {count} items in {items_path}")
    for lineno, label in enumerate(labels, 1):
        if label not in allowed:
            raise TaskError(f"{path}:{lineno}: label {label!r} is not one of {', '.join(allowed)}")
    return labels


# ---------------------------------------------------------------------------------------
# LAMBADA (lambada_openai).

def load_lambada(path: str) -> list[tuple[str, str]]:
    """(text minus its last word, " " + last word) per passage, words split on ' '."""
    items = []
    for lineno, row in enumerate(_records(path, ["text"]), 1):
        words = _text_field(row, "text", path, lineno).split(" ")
        items.append((" ".join(words[:-1]), " " + words[-1]))
    return items


def score_lambada(scorer, items: list[tuple[str, str]]) -> dict:
    """acc: greedy decoding reproduces the last word; ppl: exp of minus the mean per-passage
    log-likelihood of the last word (the harness's `perplexity` aggregation)."""
    results = [scorer.loglikelihood([item])[0] for item in _progress(items, "lambada")]
    return {"acc": _mean([float(greedy) for _, greedy in results]),
            "ppl": math.exp(-_mean([ll for ll, _ in results]))}


# ---------------------------------------------------------------------------------------
# WikiText.

def _is_title(line: str) -> bool:
    """A top-level heading ` = Title = ` (section headings are ` = = Section = = `)."""
    s = line.strip()
    return s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")


def load_wikitext(path: str) -> list[str]:
    """The articles of a WikiText file (tokenized form), each from its title line to the
    line before the next title, lines joined with '\\n' (the document-level dataset the
    harness uses). Blank stretches before the first title are dropped."""
    lines = _read_lines(path)
    starts = [i for i, line in enumerate(lines) if _is_title(line)]
    if not starts:
        raise TaskError(f"{path}: no ' = Title = ' heading line: not a WikiText file")
    head = "\n".join(lines[:starts[0]])
    pages = [head] if head.strip() else []
    for start, end in zip(starts, starts[1:] + [len(lines)]):
        pages.append("\n".join(lines[start:end]))
    return pages


def wikitext_detokenize(page: str) -> str:
    """Undo WikiText's tokenisation (spaces around punctuation, @-@ joins), rule for rule
    as the harness's wikitext task does before scoring."""
    s = page.replace("s '", "s'")
    s = re.sub(r"/' [0-9]/", r"/'[0-9]/", s)
    for joined in ("-", ",", "."):
        s = s.replace(f" @{joined}@ ", joined)
    for mark in (":", ";", ".", "!", "?", ","):
        s = s.replace(f" {mark} ", f"{mark} ")
    for left, right in (("(", ")"), ("[", "]"), ("{", "}")):
        l, r = re.escape(left), re.escape(right)
        s = re.sub(rf"{l}\s*([^{r}]*?)\s*{r}", rf"{left}\1{right}", s)
    s = re.sub(r"\"\s*([^\"]*?)\s*\"", r'"\1"', s)
    s = re.sub(r"'\s*([^']*?)\s*'", r"'\1'", s)
    for spaced, tight in (("= = = =", "===="), ("= = =", "==="), ("= =", "==")):
        s = s.replace(spaced, tight)
    s = s.replace(" \u00b0 ", "\u00b0")
    s = s.replace(" \n", "\n").replace("\n ", "\n")
    s = s.replace(" N ", " 1 ")
    return s.replace(" 's", "'s")


def wikitext_words(page: str) -> int:
    """Words of the original (tokenized) page: pieces between whitespace runs, counted as
    the harness counts them (an edge whitespace run yields an empty piece that counts)."""
    return len(re.split(r"\s+", page))


def score_wikitext(scorer, pages: list[str]) -> dict:
    """Perplexities of the detokenized articles; words and bytes are counted in the original
    pages (as the harness does), tokens are the model's."""
    ll = words = nbytes = tokens = 0
    for page in _progress(pages, "wikitext"):
        page_ll, page_tokens = scorer.rolling_scores([wikitext_detokenize(page)])[0]
        ll += page_ll
        tokens += page_tokens
        words += wikitext_words(page)
        nbytes += len(page.encode("utf-8"))
    return {"word_perplexity": math.exp(-ll / words), "byte_perplexity": math.exp(-ll / nbytes),
            "bits_per_byte": -ll / nbytes / math.log(2),
            "token_perplexity": math.exp(-ll / tokens) if tokens else float("nan")}


# ---------------------------------------------------------------------------------------
# Multiple choice.

def _choices(context: str, choices: list[str], gold: int) -> MultipleChoice:
    """The harness's multiple-choice requests: one shared context, ' ' + each choice."""
    return MultipleChoice([(context, " " + c) for c in choices], gold, choices)


def hellaswag_preprocess(text: str) -> str:
    """The harness's cleanup of HellaSwag text: WikiHow's ' [title]' becomes '. ', other
    bracketed tags are removed, double spaces collapsed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: str) -> list[MultipleChoice]:
    """Items of 6 lines: `activity: context`, the gold index (0-3), four endings.

    This file stores the context with ctx_a and ctx_b already joined, so the harness's
    capitalisation of ctx_b's first letter cannot be reproduced: the query keeps the case
    the file has (usually a lowercase continuation such as '... on a roof. he').
    """
    lines = _read_lines(path)
    if not lines or len(lines) % 6:
        raise TaskError(f"{path}: {len(lines)} lines, not a multiple of 6 (context, gold, 4 endings)")
    items = []
    for first in range(0, len(lines), 6):
        query, gold, *endings = lines[first:first + 6]
        if gold.strip() not in ("0", "1", "2", "3"):
            raise TaskError(f"{path}:{first + 2}: gold index {gold!r} is not 0-3")
        items.append(_choices(hellaswag_preprocess(query), [hellaswag_preprocess(e) for e in endings],
                              int(gold)))
    return items


def load_piqa(path: str, labels_path: str) -> list[MultipleChoice]:
    """"Question: {goal}\\nAnswer:" with the two solutions; labels 0/1, one per line."""
    rows = _records(path, ["goal", "sol1", "sol2"])
    labels = _labels(labels_path, ["0", "1"], len(rows), path)
    items = []
    for lineno, (row, label) in enumerate(zip(rows, labels), 1):
        goal, sol1, sol2 = (_text_field(row, f, path, lineno) for f in ("goal", "sol1", "sol2"))
        items.append(_choices(f"Question: {goal}\nAnswer:", [sol1, sol2], int(label)))
    return items


def load_siqa(path: str, labels_path: str) -> list[MultipleChoice]:
    """"Q: {context} {question}\\nA:" with the three answers; labels 1-3, one per line."""
    fields = ["context", "question", "answerA", "answerB", "answerC"]
    rows = _records(path, fields)
    labels = _labels(labels_path, ["1", "2", "3"], len(rows), path)
    items = []
    for lineno, (row, label) in enumerate(zip(rows, labels), 1):
        context, question, *answers = (_text_field(row, f, path, lineno) for f in fields)
        items.append(_choices(f"Q: {context} {question}\nA:", answers, int(label) - 1))
    return items


_UPPER_PRONOUNS = ("A", "An", "The", "She", "He", "It", "They", "My", "His", "Her", "Their")
_POSSESSIVES = ("my", "his", "her", "our", "their")


def wsc_normalize_option(text: str, pronoun: str, pronoun_loc: int, option: str) -> str:
    """An option made to fit where the pronoun stood, as the harness's wsc273 does: "'s"
    appended when the pronoun is a possessive determiner, and a capitalised leading
    determiner/pronoun lowercased (every occurrence of that word) unless the pronoun starts
    a sentence (the character two before it is a '.')."""
    if pronoun.lower() in _POSSESSIVES:
        option += "'s"
    first = option.split()[0]
    start_of_sentence = pronoun_loc < 2 or text[pronoun_loc - 2] == "."
    if not start_of_sentence and first in _UPPER_PRONOUNS:
        return option.replace(first, first.lower())
    return option


def load_wsc273(path: str) -> list[MultipleChoice]:
    """Partial evaluation: the text up to the pronoun with each option substituted is the
    context, the rest of the sentence after the pronoun the shared continuation (with the
    harness's ' ' delimiter in front of it, though it already starts with a space)."""
    fields = ["text", "pronoun", "pronoun_loc", "options", "label"]
    items = []
    for lineno, row in enumerate(_records(path, fields, ast.literal_eval), 1):
        text = _text_field(row, "text", path, lineno).replace("  ", " ")
        pronoun, loc, options, label = row["pronoun"], row["pronoun_loc"], row["options"], row["label"]
        if not (isinstance(pronoun, str) and isinstance(loc, int) and pronoun and loc >= 0
                and text[loc:loc + len(pronoun)] == pronoun):
            raise TaskError(f"{path}:{lineno}: the pronoun {pronoun!r} is not at pronoun_loc {loc!r} of the text")
        two_options = isinstance(options, list) and len(options) == 2
        if not (two_options and all(isinstance(o, str) and o.split() for o in options)):
            raise TaskError(f"{path}:{lineno}: options must be two non-empty strings")
        if label not in (0, 1):
            raise TaskError(f"{path}:{lineno}: label {label!r} is not 0 or 1")
        contexts = [text[:loc] + wsc_normalize_option(text, pronoun, loc, o) for o in options]
        rest = " " + text[loc + len(pronoun):]
        items.append(MultipleChoice([(c, rest) for c in contexts], label, contexts))
    return items


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first one on ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_multiple_choice(scorer, items: list[MultipleChoice], name: str = "choices",
                          norm: bool = True) -> dict:
    """acc (and, with `norm`, acc_norm: log-likelihood per character of the choice)."""
    acc, acc_norm = [], []
    for item in _progress(items, name):
        lls = [ll for ll, _ in scorer.loglikelihood(item.requests)]
        acc.append(float(_argmax(lls) == item.gold))
        per_char = [ll / max(len(c), 1) for ll, c in zip(lls, item.choices)]
        acc_norm.append(float(_argmax(per_char) == item.gold))
    return {"acc": _mean(acc), **({"acc_norm": _mean(acc_norm)} if norm else {})}


# ---------------------------------------------------------------------------------------
# Registry.

@dataclass(frozen=True)
class Task:
    files: tuple[str, ...]                     # what each path argument is, for messages
    load: Callable[..., list]
    score: Callable[[Any, list], dict]


TASKS: dict[str, Task] = {
    "lambada": Task(("jsonl",), load_lambada, score_lambada),
    "wikitext": Task(("text file",), load_wikitext, score_wikitext),
    "hellaswag": Task(("txt.bz2",), load_hellaswag,
                      lambda s, items: score_multiple_choice(s, items, "hellaswag")),
    "piqa": Task(("jsonl", "labels"), load_piqa, lambda s, items: score_multiple_choice(s, items, "piqa")),
    "siqa": Task(("jsonl", "labels"), load_siqa, lambda s, items: score_multiple_choice(s, items, "siqa")),
    "wsc273": Task(("jsonl",), load_wsc273,
                   lambda s, items: score_multiple_choice(s, items, "wsc273", norm=False)),
}


def run_task(name: str, scorer, paths: Sequence[str], limit: int | None = None) -> dict:
    """The task's metrics on the first `limit` items (all with None), plus `items`."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}: known tasks are {', '.join(TASKS)}")
    task = TASKS[name]
    if len(paths) != len(task.files):
        raise TaskError(f"task {name} takes {len(task.files)} path(s) ({', '.join(task.files)}), "
                        f"got {len(paths)}")
    items = task.load(*paths)
    if limit is not None:
        items = items[:max(limit, 0)]
    if not items:
        raise TaskError(f"task {name}: no items to score (limit={limit})")
    return {**task.score(scorer, items), "items": len(items)}


def _progress(items: Sequence, name: str):
    return tqdm(items, desc=name, file=sys.stderr, leave=False, disable=len(items) < 2)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
