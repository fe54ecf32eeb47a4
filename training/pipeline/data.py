"""Word-level language-modelling corpora: vocabulary, batching, BPTT windows.

Layout: a corpus folder holds ``train.txt``, ``valid.txt`` and ``test.txt``
(``$DROPCHECK_DATA/ptb``, ``$DROPCHECK_DATA/wikitext-2``; provenance and
checksums in that folder's README).  Tokenisation is the
``word_language_model`` one: every line is ``line.split()`` plus one
``<eos>``, empty lines included, so PTB has 929,589 training tokens and a
10,000-word vocabulary, WikiText-2 2,088,628 and 33,278.  The vocabulary is
built from ``train.txt`` in order of first appearance; a word of
``valid``/``test`` missing from it is an error (both corpora guarantee there
is none).  A UTF-8 byte-order mark at the start of a file is dropped.

Where the corpora are: ``--data DIR`` or the environment variable
``DROPCHECK_DATA``; ``DIR`` is either a corpus folder (holding ``train.txt``)
or a folder holding ``ptb/`` and ``wikitext-2/``.

Every problem with a file (missing, unreadable, not UTF-8, empty) raises one
``DataError`` naming the file.

A corpus is identified by content, never by where it lies:
``Corpus.identity(name)`` is its name, the SHA-256 of its three files and
of its vocabulary (the words in index order), which run headers and
checkpoints record; a resume refuses a checkpoint of another corpus.  A
folder whose files are PTB's or WikiText-2's (``KNOWN_CORPORA``, the
checksums of the data folder's README), or which is named ``ptb`` or
``wikitext-2``, is that corpus: asking for the other one is refused
(``check_corpus_name``).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from dropcheck import DataError

EOS = "<eos>"
SPLITS = ("train", "valid", "test")
CORPORA = ("ptb", "wikitext-2")

# SHA-256 of each corpus's files (the data folder's README, which gives their provenance)
KNOWN_CORPORA = {
    "ptb": {
        "train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
        "valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
        "test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    },
    "wikitext-2": {
        "train.txt": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
        "valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        "test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    },
}

__all__ = [
    "EOS",
    "KNOWN_CORPORA",
    "check_corpus_name",
    "Dictionary",
    "Corpus",
    "resolve_corpus_dir",
    "load_corpus",
    "read_lines",
    "batchify",
    "get_batch",
    "sample_seq_len",
]


@dataclass
class Dictionary:
    """Word <-> index map; indices in order of first appearance."""

    word2idx: dict = field(default_factory=dict)
    idx2word: list = field(default_factory=list)

    def add(self, word: str) -> int:
        idx = self.word2idx.get(word)
        if idx is None:
            idx = len(self.idx2word)
            self.word2idx[word] = idx
            self.idx2word.append(word)
        return idx

    def __len__(self) -> int:
        return len(self.idx2word)


@dataclass
class Corpus:
    """A tokenised corpus: ``train``/``valid``/``test`` are 1-D int64 tensors."""

    path: Path
    dictionary: Dictionary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    sha256: dict = field(default_factory=dict)  # file name -> SHA-256 of its bytes

    @property
    def vocab_size(self) -> int:
        return len(self.dictionary)

    @property
    def known_as(self) -> Optional[str]:
        """The corpus these files are (``KNOWN_CORPORA``; else the folder's
        name when it is one of ``CORPORA``), or None."""
        for name, files in KNOWN_CORPORA.items():
            if self.sha256 and all(self.sha256.get(f) == h for f, h in files.items()):
                return name
        return self.path.name if self.path.name in CORPORA else None

    def vocab_sha256(self) -> str:
        """SHA-256 of the vocabulary: its words in index order, one per line."""
        return hashlib.sha256("\n".join(self.dictionary.idx2word).encode("utf-8", "surrogatepass")).hexdigest()

    def identity(self, name: str) -> dict:
        """What runs record of the corpus (module docstring): no machine path."""
        return {"name": name, "files": dict(sorted(self.sha256.items())), "vocab_size": self.vocab_size,
                "vocab_sha256": self.vocab_sha256()}

    def split(self, name: str) -> torch.Tensor:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def resolve_corpus_dir(data: Optional[str | os.PathLike], corpus: str) -> Path:
    """The folder holding ``corpus``'s three files.

    ``data`` (``--data``) wins over ``$DROPCHECK_DATA``; either may name the
    corpus folder itself or the folder holding ``ptb/`` and ``wikitext-2/``.
    """
    src = "--data"
    if data is None or str(data) == "":
        env = os.environ.get("DROPCHECK_DATA")
        if not env:
            raise DataError(
                f"no corpus folder given: pass --data DIR or set DROPCHECK_DATA "
                f"(a folder holding {corpus}/train.txt, or the {corpus} folder itself)"
            )
        data, src = env, "DROPCHECK_DATA"
    root = Path(data).expanduser()
    if not root.exists():
        raise DataError(f"{src}={root}: no such folder")
    if not root.is_dir():
        raise DataError(f"{src}={root}: not a folder")
    if (root / "train.txt").exists():
        return root
    if (root / corpus).is_dir():
        return root / corpus
    raise DataError(
        f"{src}={root}: holds neither train.txt nor a {corpus}/ folder "
        f"(expected {root / corpus / 'train.txt'} or {root / 'train.txt'})"
    )


def read_lines(path: Path) -> list[str]:
    """The file's lines (strict UTF-8); a clear ``DataError`` naming the file otherwise."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"missing corpus file {path}")
    if not path.is_file():
        raise DataError(f"corpus file {path} is not a regular file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read corpus file {path}: {exc.strerror or exc}") from None
    if not raw:
        raise DataError(f"corpus file {path} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"corpus file {path} is not valid UTF-8 (byte {exc.start}, line {line}: {exc.reason})"
        ) from None
    text = text.removeprefix("\ufeff")  # a UTF-8 byte-order mark is not part of the first word
    if "\x00" in text:
        raise DataError(f"corpus file {path} contains NUL bytes: not a text corpus")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line
    if not any(line.split() for line in lines):
        raise DataError(f"corpus file {path} holds no words")
    return lines


def _tokenize(path: Path, dictionary: Dictionary, grow: bool) -> torch.Tensor:
    lines = read_lines(path)
    ids: list[int] = []
    w2i = dictionary.word2idx
    for lineno, line in enumerate(lines, 1):
        for word in line.split() + [EOS]:
            idx = w2i.get(word)
            if idx is None:
                if not grow:
                    raise DataError(
                        f"corpus file {path}, line {lineno}: word {word!r} is not in the "
                        f"training vocabulary (built from train.txt)"
                    )
                idx = dictionary.add(word)
            ids.append(idx)
    return torch.tensor(ids, dtype=torch.int64)


def load_corpus(path: str | os.PathLike) -> Corpus:
    """Tokenise ``path/{train,valid,test}.txt`` (vocabulary from ``train.txt``)."""
    path = Path(path)
    d = Dictionary()
    train = _tokenize(path / "train.txt", d, grow=True)
    valid = _tokenize(path / "valid.txt", d, grow=False)
    test = _tokenize(path / "test.txt", d, grow=False)
    sums = {f"{s}.txt": hashlib.sha256((path / f"{s}.txt").read_bytes()).hexdigest() for s in SPLITS}
    return Corpus(path, d, train, valid, test, sums)


def check_corpus_name(corpus: Corpus, name: str) -> None:
    """A ``DataError`` when the config's ``corpus`` is not the folder's own
    (``Corpus.known_as``): a run labelled WikiText-2 must not train on PTB."""
    known = corpus.known_as
    if known is not None and known != name:
        raise DataError(f"corpus={name} but {corpus.path} holds {known}: pass the {name} folder "
                        f"(--data DIR with DIR/{name}/train.txt) or set corpus={known}")


def batchify(data: torch.Tensor, bsz: int) -> torch.Tensor:
    """``(N,)`` tokens -> ``(N // bsz, bsz)``: column ``b`` is the ``b``-th
    contiguous slice of the stream (the remainder is dropped)."""
    if bsz < 1:
        raise DataError(f"batch size must be >= 1, got {bsz}")
    nbatch = data.size(0) // bsz
    if nbatch < 2:
        raise DataError(
            f"{data.size(0)} tokens are too few for batch size {bsz} (need at least {2 * bsz})"
        )
    return data[: nbatch * bsz].view(bsz, nbatch).t().contiguous()


def get_batch(source: torch.Tensor, i: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``source[i:i+L]`` and next-word targets ``source[i+1:i+1+L]``,
    ``L = min(seq_len, len(source) - 1 - i)``; both ``(L, B)``."""
    L = min(int(seq_len), source.size(0) - 1 - i)
    return source[i : i + L], source[i + 1 : i + 1 + L]


def sample_seq_len(
    gen: torch.Generator,
    bptt: int,
    *,
    std: float = 5.0,
    p_full: float = 0.95,
    min_len: int = 5,
    max_extra: int = 20,
) -> int:
    """AWD-LSTM's variable BPTT length (Merity et al. 2018, Section 4.1).

    With probability ``p_full`` the base length is ``bptt``, otherwise
    ``bptt/2``; the length is ``N(base, std²)`` truncated to an int, at least
    ``min_len`` and at most ``bptt + max_extra`` (AWD-LSTM's guard against
    rare long windows).  Draws two numbers from ``gen`` (a CPU generator),
    so the sequence of lengths is reproducible and identical on every rank.
    """
    u = float(torch.rand((), generator=gen))
    z = float(torch.randn((), generator=gen))
    base = bptt if u < p_full else bptt / 2.0
    n = int(base + std * z)  # truncation, as AWD-LSTM's int(np.random.normal(...))
    return max(min(min_len, bptt), min(n, max_seq_len(bptt, max_extra=max_extra)))


def max_seq_len(bptt: int, *, max_extra: int = 20) -> int:
    """The longest length ``sample_seq_len`` can return (a model with a fixed
    number of positions needs at least this many)."""
    return int(bptt) + max_extra
