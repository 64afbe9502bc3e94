"""English text from this machine: the Python standard library's docstrings and, for the
``english-mix`` source, man pages, the documentation that ships in installed packages and
Debian's fortune quotations.

Calibration and distillation need text, and nothing may be downloaded at run time; the
standard library's docstrings are a few megabytes of plain English prose that every Python
carries. The sources are parsed, never imported (importing `antigravity` opens a
browser, `this` prints a poem), in sorted path order, so the same Python gives the same
corpus. Each docstring is cleaned, split into sentences, and the sentences are
deduplicated and grouped into chunks. A chunk goes to the held-out split by a hash of its
text, so the split of a chunk does not depend on what else is in the corpus.

Docstrings are one register (terse, technical); a model distilled on them alone fits
docstrings, not language. ``english-mix`` adds, each chunk tagged with its source:

- ``man-pages``: the English manual pages (sections 5, 7 and 8 under /usr/share/man, the
  first 20 sentences of a page), roff markup stripped;
- ``package-docs``: the long descriptions (README text) in the METADATA of the packages
  installed beside sparseserve, code and markup dropped;
- ``fortunes-<file>``: Debian's ``fortunes`` quotations (/usr/share/games/fortunes; `make
  corpus-text` installs them), one source per file: everyday English.

One source, `data.heldout_source` (e.g. ``fortunes-literature``), is never trained on and
is evaluated on its own: a kind of text the student never saw, besides the held-out
chunks of the kinds it did.

In a recipe these are the data sources ``stdlib-docstrings`` and ``english-mix``: chunks
of at most `RECIPE_CHUNK_WORDS` words, `data.test_fraction` of them held out, the training
chunks shuffled by `data.seed`, both tokenized by the architecture's tokenizer in batches
of `data.batch_size`.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import random
import re
import sys
import sysconfig
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
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


def _is_prose(
    sentence: str, min_words: int, max_chars: int, markers: tuple[str, ...] = _CODE_MARKERS
) -> bool:
    """A sentence of words, not a signature, a doctest or a table row."""
    if len(sentence) > max_chars or any(marker in sentence for marker in markers):
        return False
    words = _WORD.findall(sentence)
    if len(words) < min_words:
        return False
    letters = sum(len(word) for word in words)
    # Mostly letters, and ending like a sentence.
    return letters >= 0.7 * len(sentence.replace(" ", "")) and sentence[-1] in ".!?"


def sentences(root: Path | None = None, *, min_words: int = 6, max_chars: int = 400) -> list[str]:
    """Deduplicated prose sentences from the docstrings under `root` (the stdlib by
    default), in a deterministic order. The standard library's are read once per process
    (parsing it takes about 5 s; it does not change under a running interpreter)."""
    if root is None:
        return list(_stdlib_sentences(min_words, max_chars))
    return _read_sentences(root, min_words, max_chars)


@functools.lru_cache(maxsize=4)
def _stdlib_sentences(min_words: int, max_chars: int) -> tuple[str, ...]:
    return tuple(_read_sentences(stdlib_directory(), min_words, max_chars))


def _read_sentences(root: Path, min_words: int, max_chars: int) -> list[str]:
    seen: set[str] = set()
    found: list[str] = []
    for path in _source_files(root):
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


def _text_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


def _is_heldout(text: str, heldout_fraction: float) -> bool:
    return int.from_bytes(_text_hash(text)[:8], "big") / 2**64 < heldout_fraction


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


# Where the other sources live on a Debian machine.
MAN_DIRECTORY = Path("/usr/share/man")
# File formats, overviews and administration: the sections with the most running prose
# (section 1 alone has ~18,000 pages of mostly option lists, and reading it takes ~40 s).
MAN_SECTIONS = ("man5", "man7", "man8")
# The description at the top of a page; the option lists below it say the same thing
# over and over.
MAN_SENTENCES_PER_PAGE = 20
FORTUNES_DIRECTORY = Path("/usr/share/games/fortunes")
# Not prose: pictures made of characters.
_SKIPPED_FORTUNES = frozenset({"ascii-art"})
# Quotations have ellipses and dashes; only real code marks a fortune as not prose.
_FORTUNE_CODE_MARKERS = (">>>", "==", "()", "{}", "->", "__", "\\", "::")
_ROFF_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_ROFF_STRING = re.compile(r"\\\*(\[[^\]]*\]|\(..|.)")
_ROFF_SIZE = re.compile(r"\\s[+-]?\d+")
_ROFF_CHARACTERS = {"\\(aq": "'", "\\(dq": '"', "\\(lq": '"', "\\(rq": '"', "\\(oq": "'",
                    "\\(cq": "'", "\\(em": " - ", "\\(en": "-", "\\(hy": "-", "\\-": "-",
                    "\\&": "", "\\%": "", "\\ ": " ", "\\~": " ", "\\|": "", "\\^": "",
                    "\\c": "", "\\e": "\\"}  # fmt: skip
_ROFF_OTHER_CHARACTER = re.compile(r"\\\(..|\\\[[^\]]*\]")
# Macros whose arguments are running text in another font.
_ROFF_INLINE = frozenset({"B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB"})
_MARKDOWN_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")


def _sentences_of(
    paragraphs: Iterable[str],
    seen: set[str],
    *,
    min_words: int = 6,
    max_chars: int = 400,
    markers: tuple[str, ...] = _CODE_MARKERS,
) -> list[str]:
    """Prose sentences of `paragraphs` not in `seen` (which they join), in order."""
    found = []
    for paragraph in paragraphs:
        flat = " ".join(paragraph.split())
        for sentence in _SENTENCE_END.split(flat):
            if sentence not in seen and _is_prose(sentence, min_words, max_chars, markers):
                seen.add(sentence)
                found.append(sentence)
    return found


def _roff_text(source: str) -> list[str]:
    """The running text of a roff (man page) source, as paragraphs."""
    paragraphs: list[str] = []
    current: list[str] = []
    skipping = False  # inside SYNOPSIS: command lines, not sentences

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for line in source.splitlines():
        if line.startswith(('.\\"', "'\\\"", "'")):
            continue
        if line.startswith("."):
            name, _, arguments = line[1:].strip().partition(" ")
            if name in ("SH", "SS"):
                flush()
                skipping = arguments.strip().strip('"').upper() in ("SYNOPSIS", "NAME")
                continue
            if name in _ROFF_INLINE and not skipping:
                line = arguments.replace('"', "")
            else:
                flush()
                continue
        if skipping:
            continue
        text = _ROFF_FONT.sub("", line)
        text = _ROFF_STRING.sub("", text)
        text = _ROFF_SIZE.sub("", text)
        for escape, replacement in _ROFF_CHARACTERS.items():
            text = text.replace(escape, replacement)
        text = _ROFF_OTHER_CHARACTER.sub("", text)
        if not text.strip():
            flush()
        else:
            current.append(text)
    flush()
    return paragraphs


def man_page_sentences(root: Path = MAN_DIRECTORY, seen: set[str] | None = None) -> list[str]:
    """Prose sentences of the English manual pages under `root` (`MAN_SECTIONS`, at most
    `MAN_SENTENCES_PER_PAGE` a page), in sorted path order; pages that only point to
    another (``.so``) are skipped."""
    seen = set() if seen is None else seen
    found: list[str] = []
    for section in MAN_SECTIONS:
        folder = root / section
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_symlink() or not path.is_file():
                continue  # an alias of a page read under its own name
            try:
                raw = (
                    gzip.decompress(path.read_bytes())
                    if path.suffix == ".gz"
                    else path.read_bytes()
                )
            except (OSError, EOFError, gzip.BadGzipFile):
                continue
            text = raw.decode("utf-8", errors="replace")
            if text.lstrip().startswith(".so "):
                continue
            found += _sentences_of(_roff_text(text)[: MAN_SENTENCES_PER_PAGE * 2], seen)[
                :MAN_SENTENCES_PER_PAGE
            ]
    return found


def _markdown_paragraphs(text: str) -> list[str]:
    """Paragraphs of a README (Markdown or reStructuredText) without code or markup."""
    paragraphs: list[str] = []
    current: list[str] = []
    fenced = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            fenced = not fenced
            continue
        is_markup = stripped.startswith(("#", "|", "..", ":", "=", "<", "*", "-", "+", ">"))
        if fenced or not stripped or line.startswith((" ", "\t")) or is_markup:
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(_MARKDOWN_LINK.sub(r"\1", stripped).replace("`", "").replace("**", ""))
    if current:
        paragraphs.append(" ".join(current))
    return paragraphs


def site_packages_directory() -> Path:
    """Where this interpreter's installed packages (and their METADATA) live."""
    return Path(sysconfig.get_paths()["purelib"])


def package_doc_sentences(root: Path | None = None, seen: set[str] | None = None) -> list[str]:
    """Prose sentences of the long descriptions of the packages installed under `root`
    (this interpreter's site-packages by default), by sorted package folder."""
    seen = set() if seen is None else seen
    found: list[str] = []
    for metadata in sorted((root or site_packages_directory()).glob("*.dist-info/METADATA")):
        try:
            text = metadata.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        _headers, _, description = text.partition("\n\n")
        found += _sentences_of(_markdown_paragraphs(description), seen)
    return found


def fortune_sentences(
    root: Path = FORTUNES_DIRECTORY, seen: set[str] | None = None
) -> dict[str, list[str]]:
    """Sentences of each fortune file under `root`, by file name, attributions dropped."""
    seen = set() if seen is None else seen
    found: dict[str, list[str]] = {}
    if not root.is_dir():
        return found
    for path in sorted(root.iterdir()):
        if path.suffix or not path.is_file() or path.name in _SKIPPED_FORTUNES:
            continue  # .dat indexes and .u8 links
        text = path.read_text(encoding="utf-8", errors="replace")
        paragraphs = []
        for entry in re.split(r"^%$", text, flags=re.MULTILINE):
            lines = [line for line in entry.splitlines() if not line.strip().startswith("--")]
            paragraphs.append(" ".join(lines))
        sentences = _sentences_of(paragraphs, seen, min_words=4, markers=_FORTUNE_CODE_MARKERS)
        if sentences:
            found[path.name] = sentences
    return found


@dataclass(frozen=True)
class SourcedChunk:
    """A chunk of text and the source it came from (``man-pages``, ``fortunes-art``...)."""

    text: str
    source: str


@dataclass(frozen=True)
class MixedCorpus:
    """Chunks of several sources: `train` and `heldout` split by hash as in `Corpus`, and
    `heldout_source`, every chunk of the one source never trained on."""

    train: tuple[SourcedChunk, ...]
    heldout: tuple[SourcedChunk, ...]
    heldout_source: tuple[SourcedChunk, ...]
    heldout_source_name: str | None
    chunks_per_source: dict[str, int] = field(default_factory=dict)

    def describe(self) -> str:
        """The sources and their sizes, for manifests."""
        counts = ", ".join(f"{name} {count}" for name, count in self.chunks_per_source.items())
        return f"chunks per source: {counts}"


def _in_source(source: str, selector: str | None) -> bool:
    """`selector` names a source, or a family of them (``fortunes`` for every file)."""
    return selector is not None and (source == selector or source.startswith(selector + "-"))


def english_corpus(
    *,
    max_words: int = 48,
    heldout_fraction: float = 0.1,
    heldout_source: str | None = None,
    stdlib_root: Path | None = None,
    man_root: Path | None = MAN_DIRECTORY,
    packages_root: Path | None = None,
    fortunes_root: Path | None = FORTUNES_DIRECTORY,
    include_packages: bool = True,
) -> MixedCorpus:
    """Every source's sentences (deduplicated across sources, first source wins), chunked
    per source; `heldout_source`'s chunks set apart, the rest split by hash. A root of
    None skips that source (the stdlib's None means this interpreter's)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    seen: set[str] = set()
    by_source: dict[str, list[str]] = {"stdlib-docstrings": []}
    for sentence in sentences(stdlib_root):
        if sentence not in seen:
            seen.add(sentence)
            by_source["stdlib-docstrings"].append(sentence)
    if man_root is not None:
        by_source["man-pages"] = man_page_sentences(man_root, seen)
    if include_packages:
        by_source["package-docs"] = package_doc_sentences(packages_root, seen)
    if fortunes_root is not None:
        for name, found in fortune_sentences(fortunes_root, seen).items():
            by_source[f"fortunes-{name}"] = found
    if heldout_source is not None and not any(_in_source(s, heldout_source) for s in by_source):
        raise ValueError(
            f"heldout_source {heldout_source!r} is not among this machine's sources: "
            f"{', '.join(by_source)}"
        )
    train: list[SourcedChunk] = []
    heldout: list[SourcedChunk] = []
    apart: list[SourcedChunk] = []
    counts: dict[str, int] = {}
    for source, found in by_source.items():
        grouped = [SourcedChunk(text, source) for text in chunks(found, max_words)]
        if not grouped:
            continue
        counts[source] = len(grouped)
        if _in_source(source, heldout_source):
            apart += grouped
            continue
        for chunk in grouped:
            (heldout if _is_heldout(chunk.text, heldout_fraction) else train).append(chunk)
    return MixedCorpus(tuple(train), tuple(heldout), tuple(apart), heldout_source, counts)


def length_sorted(texts: list[str], window: int) -> list[str]:
    """`texts` sorted by length within consecutive windows of `window` texts (stable), so
    that batches cut from them pad less; the order of the windows stays shuffled."""
    if window <= 1:
        return list(texts)
    out: list[str] = []
    for start in range(0, len(texts), window):
        out += sorted(texts[start : start + window], key=len)
    return out


def _text_batches(
    config: DataConfig, architecture: Architecture, source: str
) -> Callable[[list[str]], list[Feed]]:
    if architecture.text_encoder is None:
        raise RecipeError(
            f"data.source: {source!r} is text, and architecture "
            f"{architecture.name!r} has no tokenizer to turn it into input"
        )
    encode = architecture.text_encoder()

    def batches(texts: list[str]) -> list[Feed]:
        size = config.batch_size
        return [encode(texts[start : start + size]) for start in range(0, len(texts), size)]

    return batches


def _training_order(config: DataConfig, texts: list[str]) -> list[str]:
    train = list(texts[: config.train_samples])
    random.Random(config.seed).shuffle(train)
    return length_sorted(train, config.sort_window_batches * config.batch_size)


@register_data_source("stdlib-docstrings")
def _stdlib_docstrings(config: DataConfig, architecture: Architecture) -> LabelledData:
    batches = _text_batches(config, architecture, "stdlib-docstrings")
    if config.heldout_source is not None:
        raise RecipeError("data.heldout_source: 'stdlib-docstrings' is one source; use english-mix")
    corpus = stdlib_corpus(max_words=RECIPE_CHUNK_WORDS, heldout_fraction=config.test_fraction)
    heldout = list(corpus.heldout[: config.test_samples])
    return LabelledData(
        x_train=batches(_training_order(config, list(corpus.train))),
        y_train=None,
        x_test=batches(heldout),
        y_test=None,
        test_description=f"{corpus.source}; {len(heldout)} held-out chunks",
    )


@register_data_source("english-mix")
def _english_mix(config: DataConfig, architecture: Architecture) -> LabelledData:
    batches = _text_batches(config, architecture, "english-mix")
    try:
        corpus = english_corpus(
            max_words=RECIPE_CHUNK_WORDS,
            heldout_fraction=config.test_fraction,
            heldout_source=config.heldout_source,
        )
    except ValueError as exc:
        raise RecipeError(f"data.heldout_source: {exc}") from None
    # Ordered by a hash of the text, not by source: the first `test_samples` then mix
    # every source, and do not depend on the seed.
    heldout = sorted((chunk.text for chunk in corpus.heldout), key=_text_hash)
    heldout = heldout[: config.test_samples]
    apart = [chunk.text for chunk in corpus.heldout_source[: config.test_samples]]
    version = ".".join(str(part) for part in sys.version_info[:3])
    what = (
        f"english-mix (Python {version} docstrings, man pages, package docs, fortunes; "
        f"chunks of <= {RECIPE_CHUNK_WORDS} words)"
    )
    return LabelledData(
        x_train=batches(_training_order(config, [chunk.text for chunk in corpus.train])),
        y_train=None,
        x_test=batches(heldout),
        y_test=None,
        test_description=f"{what}; {len(heldout)} held-out chunks of the trained sources",
        x_test_source=batches(apart) if apart else None,
        test_source_description=(
            f"{len(apart)} chunks of {corpus.heldout_source_name}, a source never trained on"
        ),
    )
