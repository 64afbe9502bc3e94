"""English text from this machine: the docstrings of the Python standard library.

Calibration and distillation need text, and nothing may be downloaded at run time; the
standard library's docstrings are a few megabytes of plain English prose that every Python
carries. The sources are parsed, never imported (importing `antigravity` opens a
browser, `this` prints a poem), in sorted path order, so the same Python gives the same
corpus. Each docstring is cleaned, split into sentences, and the sentences are
deduplicated and grouped into chunks. A chunk goes to the held-out split by a hash of its
text, so the split of a chunk does not depend on what else is in the corpus.

In a recipe this is the data source ``stdlib-docstrings``: chunks of at most
`RECIPE_CHUNK_WORDS` words, `data.test_fraction` of them held out, the training chunks
shuffled by `data.seed`, both tokenized by the architecture's tokenizer in batches of
`data.batch_size`.
"""

from __future__ import annotations

import ast
import hashlib
import random
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sparseserve.sparsify.catalog import Architecture, LabelledData, register_data_source
from sparseserve.sparsify.recipe import DataConfig, Feed, RecipeError

# A sentence or two, about 1.4 tokens a word: chunks stay well under MiniLM's 128-token cut.
RECIPE_CHUNK_WORDS = 32

# Tests, the IDE, vendored code and generated tables: little prose, or the same prose again.
_SKIPPED_PARTS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages",
     "__pycache__", "encodings", "pydoc_data", "turtledemo", "ensurepip"}
)  # fmt: skip
# A sentence ends at . ! or ? followed by whitespace and an upper-case letter or a quote.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_CODE_MARKERS = ("::", ">>>", "...", "==", "()", "[]", "{}", "->", "__", "\\")
_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class Corpus:
    """Text chunks split in two: `train` for calibration and distillation, `heldout` for
    evaluation. `source` says where the text came from, for manifests."""

    train: tuple[str, ...]
    heldout: tuple[str, ...]
    source: str


def stdlib_directory() -> Path:
    """Where this interpreter's pure-Python standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def _source_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        if not _SKIPPED_PARTS.intersection(path.relative_to(root).parts):
            yield path


def _docstrings(path: Path) -> Iterator[str]:
    """Module, class and function docstrings of one file, in source order."""
    try:
        source = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():
            # Old escapes in some stdlib files ("\d" in a plain string) warn when parsed.
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(source, filename=str(path))
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return
    nodes = [tree, *ast.walk(tree)]
    for node in nodes:
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            text = ast.get_docstring(node, clean=True)
            if text:
                yield text


def _is_prose(sentence: str, min_words: int, max_chars: int) -> bool:
    """A sentence of words, not a signature, a doctest or a table row."""
    if len(sentence) > max_chars or any(marker in sentence for marker in _CODE_MARKERS):
        return False
    words = _WORD.findall(sentence)
    if len(words) < min_words:
        return False
    letters = sum(len(word) for word in words)
    # Mostly letters, and ending like a sentence.
    return letters >= 0.7 * len(sentence.replace(" ", "")) and sentence[-1] in ".!?"


def sentences(root: Path | None = None, *, min_words: int = 6, max_chars: int = 400) -> list[str]:
    """Deduplicated prose sentences from the docstrings under `root` (the stdlib by
    default), in a deterministic order."""
    seen: set[str] = set()
    found: list[str] = []
    for path in _source_files(root or stdlib_directory()):
        for docstring in _docstrings(path):
            # Paragraphs first: a blank line never sits inside a sentence.
            for paragraph in re.split(r"\n\s*\n", docstring):
                flat = " ".join(paragraph.split())
                for sentence in _SENTENCE_END.split(flat):
                    if sentence not in seen and _is_prose(sentence, min_words, max_chars):
                        seen.add(sentence)
                        found.append(sentence)
    return found


def chunks(sentence_list: list[str], max_words: int) -> list[str]:
    """Join consecutive sentences into chunks of at most `max_words` words (a longer
    sentence stays a chunk of its own): longer inputs for calibration, in order."""
    grouped: list[str] = []
    current: list[str] = []
    count = 0
    for sentence in sentence_list:
        words = len(sentence.split())
        if current and count + words > max_words:
            grouped.append(" ".join(current))
            current, count = [], 0
        current.append(sentence)
        count += words
    if current:
        grouped.append(" ".join(current))
    return grouped


def _is_heldout(text: str, heldout_fraction: float) -> bool:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < heldout_fraction


def stdlib_corpus(
    *,
    max_words: int = 48,
    heldout_fraction: float = 0.1,
    root: Path | None = None,
) -> Corpus:
    """The standard library's docstrings as chunks of up to `max_words` words, with
    about `heldout_fraction` of them held out for evaluation."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    if max_words < 1:
        raise ValueError(f"max_words must be at least 1, got {max_words}")
    text = chunks(sentences(root), max_words)
    if not text:
        raise ValueError(f"no docstring prose found under {root or stdlib_directory()}")
    heldout = tuple(chunk for chunk in text if _is_heldout(chunk, heldout_fraction))
    train = tuple(chunk for chunk in text if not _is_heldout(chunk, heldout_fraction))
    version = ".".join(str(part) for part in sys.version_info[:3])
    source = f"Python {version} standard library docstrings, chunks of <= {max_words} words"
    return Corpus(train=train, heldout=heldout, source=source)


@register_data_source("stdlib-docstrings")
def _stdlib_docstrings(config: DataConfig, architecture: Architecture) -> LabelledData:
    if architecture.text_encoder is None:
        raise RecipeError(
            f"data.source: 'stdlib-docstrings' is text, and architecture "
            f"{architecture.name!r} has no tokenizer to turn it into input"
        )
    corpus = stdlib_corpus(max_words=RECIPE_CHUNK_WORDS, heldout_fraction=config.test_fraction)
    train = list(corpus.train[: config.train_samples])
    random.Random(config.seed).shuffle(train)
    heldout = list(corpus.heldout[: config.test_samples])
    encode = architecture.text_encoder()

    def batches(texts: list[str]) -> list[Feed]:
        size = config.batch_size
        return [encode(texts[start : start + size]) for start in range(0, len(texts), size)]

    return LabelledData(
        x_train=batches(train),
        y_train=None,
        x_test=batches(heldout),
        y_test=None,
        test_description=f"{corpus.source}; {len(heldout)} held-out chunks",
    )
