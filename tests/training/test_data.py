"""Corpora: counts against the data README, batching, BPTT windows, bad data."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import pytest

from dropcheck import DataError
from training.pipeline.data import (
    EOS,
    batchify,
    get_batch,
    load_corpus,
    read_lines,
    resolve_corpus_dir,
    sample_seq_len,
)


def test_ptb_counts_match_readme(data_root):
    c = load_corpus(resolve_corpus_dir(data_root, "ptb"))
    # /work/shared/data/README.md: tokens incl. eos, vocab + eos
    assert c.train.numel() == 929_589
    assert c.valid.numel() == 73_760
    assert c.test.numel() == 82_430
    assert c.vocab_size == 10_000
    assert EOS in c.dictionary.word2idx and "<unk>" in c.dictionary.word2idx
    assert int((c.train == c.dictionary.word2idx["<unk>"]).sum()) == 45_020
    assert int((c.train == c.dictionary.word2idx[EOS]).sum()) == 42_068  # one per line


def test_wikitext2_counts_match_readme(data_root):
    c = load_corpus(data_root / "wikitext-2")
    assert c.train.numel() == 2_088_628
    assert c.valid.numel() == 217_646
    assert c.test.numel() == 245_569
    assert c.vocab_size == 33_278
    assert int((c.train == c.dictionary.word2idx[EOS]).sum()) == 36_718  # empty lines included


def test_resolve_root_corpus_folder_and_env(data_root, monkeypatch, tmp_path):
    assert resolve_corpus_dir(data_root, "ptb") == data_root / "ptb"
    assert resolve_corpus_dir(data_root / "ptb", "wikitext-2") == data_root / "ptb"  # a corpus folder wins
    monkeypatch.setenv("DROPCHECK_DATA", str(data_root))
    assert resolve_corpus_dir(None, "wikitext-2") == data_root / "wikitext-2"
    monkeypatch.delenv("DROPCHECK_DATA")
    with pytest.raises(DataError, match="--data DIR or set DROPCHECK_DATA"):
        resolve_corpus_dir(None, "ptb")
    with pytest.raises(DataError, match="no such folder"):
        resolve_corpus_dir(tmp_path / "nope", "ptb")
    with pytest.raises(DataError, match="holds neither train.txt nor a ptb/ folder"):
        resolve_corpus_dir(tmp_path, "ptb")


def _broken(make, tmp_path, name, content: bytes | None):
    root = make(tmp_path / "c", lines=8)
    f = root / name
    if content is None:
        f.unlink()
    else:
        f.write_bytes(content)
    return root, f


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("valid.txt", None, "missing corpus file"),
        ("train.txt", b"", "is empty"),
        ("test.txt", b"\n\n  \n", "holds no words"),
        ("train.txt", b" the cat \n caf\xe9 \n", "is not valid UTF-8 \\(byte 14, line 2"),
        ("valid.txt", b" the zebra \n", "line 1: word 'zebra' is not in the training vocabulary"),
        ("test.txt", b" a\x00b \n", "NUL bytes"),
    ],
)
def test_bad_files_give_one_clear_error_naming_the_file(make_tiny_corpus, tmp_path, name, content, message):
    root, f = _broken(make_tiny_corpus, tmp_path, name, content)
    with pytest.raises(DataError, match=message) as exc:
        load_corpus(root)
    assert str(f) in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_data_through_the_cli_exits_2_with_one_line(make_tiny_corpus, tmp_path, capsys):
    from dropcheck.cli import main

    root, f = _broken(make_tiny_corpus, tmp_path, "train.txt", b"\xff\xfe bad \n")
    rc = main(["train", "--config", "smoke", "--data", str(root), "--out", str(tmp_path / "o"), "max_steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and str(f) in err[0] and "UTF-8" in err[0]


def test_read_lines_keeps_empty_lines(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text(" a b \n \n c \n", encoding="utf-8")
    assert read_lines(f) == [" a b ", " ", " c "]


def test_tokens_are_words_plus_eos_per_line(tiny_corpus_dir):
    c = load_corpus(tiny_corpus_dir)
    lines = (tiny_corpus_dir / "valid.txt").read_text().split("\n")[:-1]
    expect = [c.dictionary.word2idx[w] for line in lines for w in line.split() + [EOS]]
    assert c.valid.tolist() == expect


@given(n=st.integers(10, 200), bsz=st.integers(1, 5))
def test_batchify_columns_are_contiguous_slices(n, bsz):
    data = torch.arange(n)
    if n // bsz < 2:
        with pytest.raises(DataError):
            batchify(data, bsz)
        return
    b = batchify(data, bsz)
    rows = n // bsz
    assert b.shape == (rows, bsz)
    for j in range(bsz):
        assert b[:, j].tolist() == list(range(j * rows, (j + 1) * rows))
    x, y = get_batch(b, rows - 3, 10)  # clipped at the end
    assert x.shape == (2, bsz) and torch.equal(y, b[rows - 2 :])
    assert torch.equal(x[1:], y[:-1])


def test_sample_seq_len_is_awd_lstm_schedule_and_reproducible():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [sample_seq_len(g1, 70) for _ in range(4000)]
    b = [sample_seq_len(g2, 70) for _ in range(4000)]
    assert a == b
    assert min(a) >= 5 and max(a) <= 90
    t = torch.tensor(a, dtype=torch.float64)
    half = (t < 52).double().mean()  # the bptt/2 branch (35 ± 5) vs the full one (70 ± 5)
    assert 0.035 < half < 0.065
    full = t[t >= 52]
    assert abs(full.mean() - 69.5) < 0.4  # int() truncation lowers the mean by ~0.5
    assert 4.3 < full.std() < 5.7
    assert sample_seq_len(torch.Generator().manual_seed(0), 3) >= 3  # tiny bptt: min(5, bptt)
