"""Text corpora for language-model distillation, read from local files (never downloaded).

Classification text (a sentence → a category), for sentence-encoder students:

* :func:`load_wordnet_glosses` — WordNet 3.0 glosses (Miller 1995), 117,659 synset
  definitions labelled with one of 45 lexicographer categories (:data:`WORDNET_CATEGORIES`,
  e.g. ``noun.animal``, ``verb.motion``). Debian ``wordnet-base``; NLTK's ``wordnet``
  corpus and the Princeton ``dict/`` folder have the same ``data.{noun,verb,adj,adv}`` files.
* :func:`load_fortunes` — the BSD ``fortune`` database: 15,217 quotes in 43 category
  files (Debian ``fortunes``).

Long-form public-domain English, for causal-LM students:

* :func:`load_kjv` — the King James Bible, 31,102 verses in canonical order, from a plain
  text file (e.g. Project Gutenberg's ``pg10.txt``) or from Debian ``bible-kjv``'s
  ``bible`` command.
* :func:`load_pydoc_topics` — the Python documentation topics shipped in the standard
  library (``pydoc_data.topics``, ≈ 465 KB), nothing to install.

Lookup order for each corpus: the ``root`` argument, then ``$KDISTILL_DATA/<corpus>``, then
the corpus's own environment variable (WordNet's ``$WNSEARCHDIR``), then the standard system
paths. When nothing is found, :class:`~kdistill.data.fashion_mnist.DatasetNotFoundError`
lists every place searched and how to install the data.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kdistill.data.fashion_mnist import DatasetNotFoundError

__all__ = [
    "ENV_VAR",
    "FORTUNE_DIRS",
    "KJV_BOOKS",
    "WORDNET_CATEGORIES",
    "WORDNET_DIRS",
    "WORDNET_POS",
    "TextClassificationData",
    "find_fortunes",
    "find_wordnet",
    "load_fortunes",
    "load_kjv",
    "load_pydoc_topics",
    "load_wordnet_glosses",
    "parse_fortune_file",
    "parse_wordnet_data_file",
]

ENV_VAR = "KDISTILL_DATA"

# WordNet's lexicographer files, indexed by the two-digit ``lex_filenum`` of data.* lines
# (WordNet 3.0 ``lexnames(5WN)``).
WORDNET_CATEGORIES: tuple[str, ...] = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal",
    "noun.artifact", "noun.attribute", "noun.body", "noun.cognition", "noun.communication",
    "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession",
    "noun.process", "noun.quantity", "noun.relation", "noun.shape", "noun.state",
    "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession",
    "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)  # fmt: skip
WORDNET_POS: tuple[str, ...] = ("noun", "verb", "adj", "adv")
# Standard places of the WordNet dict folder (Debian, Princeton's installer, NLTK).
WORDNET_DIRS: tuple[Path, ...] = (
    Path("/usr/share/wordnet"),
    Path("/usr/local/WordNet-3.0/dict"),
    Path("/usr/local/share/wordnet"),
    Path.home() / "nltk_data" / "corpora" / "wordnet",
    Path("/usr/share/nltk_data/corpora/wordnet"),
)
# Standard places of the fortune database (Debian, Fedora/Arch, BSD).
FORTUNE_DIRS: tuple[Path, ...] = (
    Path("/usr/share/games/fortunes"),
    Path("/usr/share/fortune"),
    Path("/usr/local/share/games/fortunes"),
    Path("/usr/share/games/fortune"),
)
# The 66 books in the order of the ``bible`` command's verse references.
KJV_BOOKS = 66
_KJV_RANGE = "Gen1:1-Rev22:21"


@dataclass(frozen=True)
class TextClassificationData:
    """Texts with integer labels.

    Attributes:
        texts: the ``N`` texts.
        labels: ``(N,)`` int64 class indices into ``classes``.
        classes: class names; ``classes[labels[i]]`` is the category of ``texts[i]``.
        source: the folder the texts were read from.
    """

    texts: list[str]
    labels: np.ndarray
    classes: tuple[str, ...]
    source: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextClassificationData:
        """The texts at ``indices`` (same classes)."""
        idx = np.asarray(indices, dtype=np.int64)
        return TextClassificationData(
            [self.texts[i] for i in idx], self.labels[idx], self.classes, self.source
        )

    def split(
        self, fractions: Sequence[float], seed: int = 0
    ) -> tuple[TextClassificationData, ...]:
        """Stratified random split into ``len(fractions)`` disjoint parts.

        Each class is shuffled (``numpy.random.default_rng(seed)``) and cut by the
        cumulative fractions, so every part keeps the class shares (up to rounding) and the
        same seed gives the same split. Fractions must be positive and sum to at most 1
        (the remainder is dropped).
        """
        fracs = [float(f) for f in fractions]
        if not fracs or any(f <= 0 for f in fracs) or sum(fracs) > 1 + 1e-9:
            raise ValueError(
                f"fractions must be positive and sum to at most 1, got {list(fractions)}"
            )
        rng = np.random.default_rng(seed)
        edges = np.cumsum([0.0, *fracs])
        parts: list[list[np.ndarray]] = [[] for _ in fracs]
        for cls in np.unique(self.labels):
            members = rng.permutation(np.flatnonzero(self.labels == cls))
            cuts = np.floor(edges * len(members) + 1e-9).astype(int)
            for k in range(len(fracs)):
                parts[k].append(members[cuts[k] : cuts[k + 1]])
        return tuple(self.subset(np.sort(np.concatenate(p))) for p in parts)


# -- locating -------------------------------------------------------------------------------


def _search(
    root: str | os.PathLike[str] | None,
    subdir: str,
    own_env: str | None,
    system_dirs: Sequence[Path],
) -> list[tuple[Path, str]]:
    """Candidate folders, in priority order, each with where it came from."""
    candidates: list[tuple[Path, str]] = []
    if root is not None:
        r = Path(root).expanduser()
        candidates += [(r, "root argument"), (r / subdir, "root argument")]
    env = os.environ.get(ENV_VAR)
    if env:
        candidates.append((Path(env).expanduser() / subdir, f"${ENV_VAR}"))
    if own_env and os.environ.get(own_env):
        candidates.append((Path(os.environ[own_env]).expanduser(), f"${own_env}"))
    candidates += [(Path(d), "standard path") for d in system_dirs]
    return candidates


def _not_found(what: str, need: str, candidates: list[tuple[Path, str]], hint: str) -> str:
    lines = [f"{what} not found. Need {need}. Searched:"]
    lines += [f"  - {folder} ({origin})" for folder, origin in candidates]
    lines.append(hint)
    return "\n".join(lines)


def find_wordnet(root: str | os.PathLike[str] | None = None) -> Path:
    """The first folder holding all four ``data.{noun,verb,adj,adv}`` WordNet files.

    Searched: ``root`` (or ``root/wordnet``), ``$KDISTILL_DATA/wordnet``, ``$WNSEARCHDIR``,
    then :data:`WORDNET_DIRS`.
    """
    candidates = _search(root, "wordnet", "WNSEARCHDIR", WORDNET_DIRS)
    for folder, _ in candidates:
        if all((folder / f"data.{pos}").is_file() for pos in WORDNET_POS):
            return folder
    raise DatasetNotFoundError(
        _not_found(
            "WordNet",
            "data.noun, data.verb, data.adj and data.adv",
            candidates,
            "Install it with: sudo apt-get install wordnet-base (Debian/Ubuntu), or "
            "python -m nltk.downloader wordnet (unzipped), or pass root=/path/to/wordnet/dict.",
        )
    )


def _fortune_files(folder: Path) -> list[Path]:
    """Category files of a fortune folder: plain files with no dot in the name."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and "." not in p.name)


def find_fortunes(root: str | os.PathLike[str] | None = None) -> Path:
    """The first folder holding fortune category files (names without a dot).

    Searched: ``root`` (or ``root/fortunes``), ``$KDISTILL_DATA/fortunes``, then
    :data:`FORTUNE_DIRS`.
    """
    candidates = _search(root, "fortunes", None, FORTUNE_DIRS)
    for folder, _ in candidates:
        if _fortune_files(folder):
            return folder
    raise DatasetNotFoundError(
        _not_found(
            "The fortune database",
            "category files (e.g. 'science', 'love'; entries separated by '%' lines)",
            candidates,
            "Install it with: sudo apt-get install fortunes (Debian/Ubuntu), "
            "dnf install fortune-mod (Fedora), or pass root=/path/to/fortunes.",
        )
    )


# -- parsing --------------------------------------------------------------------------------

_WORDNET_LINE = re.compile(r"^(\d{8}) (\d{2}) ([nvasr]) ")
_QUOTED_EXAMPLE = re.compile(r'(;\s*)?"[^"]*"')


def parse_wordnet_data_file(path: str | os.PathLike[str]) -> list[tuple[str, int]]:
    """``(gloss, lex_filenum)`` for every synset line of a WordNet ``data.*`` file.

    Format (``wndb(5WN)``): licence lines start with two spaces and are skipped; a synset
    line is ``offset lex_filenum ss_type w_cnt word lex_id ... | gloss``. Files are
    latin-1. Glosses are returned whitespace-stripped, with their quoted examples.

    Raises:
        ValueError: naming the file and line number, for a malformed line.
    """
    path = Path(path)
    out: list[tuple[str, int]] = []
    with open(path, encoding="latin-1") as f:
        for number, line in enumerate(f, start=1):
            if line.startswith("  ") or not line.strip():
                continue
            match = _WORDNET_LINE.match(line)
            if match is None or " | " not in line:
                raise ValueError(
                    f"{path}:{number} is not a WordNet synset line "
                    f"('offset lex_filenum ss_type ... | gloss'): {line[:80]!r}"
                )
            category = int(match.group(2))
            if category >= len(WORDNET_CATEGORIES):
                raise ValueError(
                    f"{path}:{number} has lex_filenum {category}; WordNet 3.0 has "
                    f"{len(WORDNET_CATEGORIES)} categories (0..{len(WORDNET_CATEGORIES) - 1})"
                )
            out.append((line.split(" | ", 1)[1].strip(), category))
    return out


def load_wordnet_glosses(
    root: str | os.PathLike[str] | None = None,
    pos: Sequence[str] = WORDNET_POS,
    strip_examples: bool = False,
) -> TextClassificationData:
    """WordNet glosses labelled with their lexicographer category (45 classes).

    Args:
        root: folder with the ``data.*`` files (see :func:`find_wordnet`).
        pos: parts of speech to read, a subset of ``("noun", "verb", "adj", "adv")``.
        strip_examples: drop the quoted usage examples (``; "..."``), keeping the
            definition alone.

    Returns:
        Texts in file order (noun, verb, adj, adv by default); ``classes`` is always the
        full :data:`WORDNET_CATEGORIES`, so labels are the WordNet category numbers.
    """
    unknown = [p for p in pos if p not in WORDNET_POS]
    if unknown or not pos:
        raise ValueError(f"pos must be a non-empty subset of {WORDNET_POS}, got {list(pos)}")
    folder = find_wordnet(root)
    texts: list[str] = []
    labels: list[int] = []
    for p in pos:
        for gloss, category in parse_wordnet_data_file(folder / f"data.{p}"):
            if strip_examples:
                gloss = _QUOTED_EXAMPLE.sub("", gloss).strip().rstrip(";").strip()
            texts.append(gloss)
            labels.append(category)
    return TextClassificationData(
        texts, np.asarray(labels, dtype=np.int64), WORDNET_CATEGORIES, folder
    )


# "x<BS>x" (bold), "_<BS>x" (underline) and the "___<BS>WORD" variant in some files.
_OVERSTRIKE = re.compile(r"_+\x08+|.\x08")


def parse_fortune_file(path: str | os.PathLike[str]) -> list[str]:
    """The entries of one fortune file: text between lines holding only ``%``.

    Overstrike sequences (``char, backspace``: old terminal bold/underline) and stray
    backspaces are removed,
    entries are whitespace-stripped, empty ones dropped. Read as UTF-8 (bad bytes replaced).
    """
    raw = Path(path).read_text(encoding="utf-8", errors="replace")
    raw = _OVERSTRIKE.sub("", raw).replace("\x08", "")
    entries = re.split(r"^%[ \t]*$", raw, flags=re.MULTILINE)
    return [e.strip() for e in entries if e.strip()]


def load_fortunes(root: str | os.PathLike[str] | None = None) -> TextClassificationData:
    """Fortune quotes labelled with their category file (43 in Debian's ``fortunes``).

    ``classes`` are the category file names, sorted; texts in class then file order.
    """
    folder = find_fortunes(root)
    texts: list[str] = []
    labels: list[int] = []
    classes: list[str] = []
    for file in _fortune_files(folder):
        entries = parse_fortune_file(file)
        if not entries:
            continue
        texts += entries
        labels += [len(classes)] * len(entries)
        classes.append(file.name)
    return TextClassificationData(texts, np.asarray(labels, dtype=np.int64), tuple(classes), folder)


# -- long text ------------------------------------------------------------------------------

_BIBLE_VERSE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def load_kjv(path: str | os.PathLike[str] | None = None) -> list[str]:
    """The King James Bible as a list of verses, in canonical order (31,102 from Debian).

    Args:
        path: a plain-text KJV file (e.g. Project Gutenberg's ``pg10.txt``, whose licence
            header and footer are kept: cut them first), returned as its non-empty
            paragraphs (blank-line separated, inner newlines joined). Else
            ``$KDISTILL_DATA/kjv.txt`` if present, else the Debian ``bible`` command
            (package ``bible-kjv``), whose verse references are stripped.

    Raises:
        DatasetNotFoundError: none of these exists; says how to install ``bible-kjv``.
    """
    candidates: list[Path] = []
    if path is not None:
        candidates.append(Path(path).expanduser())
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]).expanduser() / "kjv.txt")
    for file in candidates:
        if file.is_file():
            text = file.read_text(encoding="utf-8", errors="replace")
            paragraphs = re.split(r"\n\s*\n", text)
            return [" ".join(p.split()) for p in paragraphs if p.strip()]
    if path is not None:
        raise DatasetNotFoundError(f"KJV text file {path} does not exist")
    bible = shutil.which("bible")
    if bible is None:
        searched = ", ".join(str(c) for c in candidates) or f"no ${ENV_VAR}/kjv.txt"
        raise DatasetNotFoundError(
            f"King James Bible not found (searched {searched} and the `bible` command). "
            "Install it with: sudo apt-get install bible-kjv (Debian/Ubuntu), or pass "
            "path=/path/to/kjv.txt (e.g. Project Gutenberg pg10.txt)."
        )
    result = subprocess.run(
        [bible, "-f", _KJV_RANGE], capture_output=True, text=True, check=False, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(f"`bible -f {_KJV_RANGE}` failed: {result.stderr.strip()[:200]}")
    verses = []
    for line in result.stdout.splitlines():
        match = _BIBLE_VERSE.match(line)
        if match:
            verses.append(match.group(4).strip())
    if not verses:
        raise RuntimeError(f"`bible -f {_KJV_RANGE}` printed no verses: {result.stdout[:200]!r}")
    return verses


def load_pydoc_topics() -> list[str]:
    """Python's documentation topics (``pydoc_data.topics.topics``), sorted by topic name.

    About 465 KB of English prose with code in 80-odd documents; part of the standard
    library, so always present (some distributions strip ``pydoc_data``: then
    :class:`DatasetNotFoundError`).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as err:
        raise DatasetNotFoundError(
            "pydoc_data.topics is missing from this Python (some distributions strip it); "
            "install the full standard library (e.g. Debian: apt-get install libpython3-stdlib)"
        ) from err
    return [topics[name].strip() for name in sorted(topics) if topics[name].strip()]
