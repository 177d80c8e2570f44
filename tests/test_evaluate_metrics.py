"""The evaluator's pure metrics (`facecloak.evaluate.metrics`) and its typed result rows."""

from __future__ import annotations

import math

import pytest
import torch

from facecloak.errors import InvalidInputError
from facecloak.evaluate import (
    EvaluationResult,
    EvaluationRow,
    distance_matrix,
    rank_k_hit_rate,
    rank_k_hits,
    tar_at_far,
    verification_accuracy,
)
from facecloak.evaluate.metrics import verification_pairs


def test_rank_k_on_a_hand_made_gallery():
    gallery = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [float("nan"), 0.0]])
    ids = torch.tensor([1, 2, 3, 4])
    probes = torch.tensor([[0.9, 0.0], [0.1, 0.8], [0.0, 0.0], [float("nan"), 1.0]])
    probe_ids = torch.tensor([2, 1, 4, 3])
    assert rank_k_hits(gallery, ids, probes, probe_ids, k=1).tolist() == [True, False, False, False]
    assert rank_k_hits(gallery, ids, probes, probe_ids, k=2).tolist() == [True, True, False, False]
    assert float(rank_k_hit_rate(gallery, ids, probes, probe_ids, k=1)) == 0.25
    cosine = distance_matrix(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0], [3.0, 0.0]]), "cosine")
    assert torch.allclose(cosine, torch.tensor([[1.0, 0.0]]))


def test_rank_k_never_matches_a_face_not_found_even_when_few_are_found():
    """A gallery with fewer found faces than k (a blurred person, no control, no distractors):
    the faces not found must not fill the k places and match the probe."""
    nan = float("nan")
    gallery = torch.tensor([[nan, nan], [nan, nan], [5.0, 5.0]])
    ids = torch.tensor([1, 1, 2])
    probe, probe_id = torch.tensor([[0.0, 0.0]]), torch.tensor([1])
    assert rank_k_hits(gallery, ids, probe, probe_id, k=2).tolist() == [False]
    assert rank_k_hits(gallery[:2], ids[:2], probe, probe_id, k=1).tolist() == [False]
    assert rank_k_hits(gallery, ids, torch.tensor([[4.0, 4.0]]), torch.tensor([2]), k=5).tolist() == [True]


def test_tar_at_far():
    impostor = torch.linspace(0.5, 1.5, 1000)
    genuine = torch.tensor([0.1, 0.2, 0.49, 0.6, float("nan")])  # NaN: face not found, never accepted
    tar, threshold = tar_at_far(genuine, impostor, far=1e-3)
    assert math.isclose(threshold, float(impostor[1]), rel_tol=1e-6)
    assert tar == pytest.approx(3 / 5)


def test_verification_accuracy_picks_thresholds_on_other_folds():
    distances = torch.tensor([0.1, 0.2, 0.9, 0.8] * 3 + [0.3, float("nan"), 0.7, 0.95])
    same = torch.tensor([True, True, False, False] * 4)
    folds = torch.arange(16) // 4
    result = verification_accuracy(distances, same, folds)
    assert result["fold_accuracies"][:3] == [1.0, 1.0, 1.0]
    assert result["fold_accuracies"][3] == 0.75  # the NaN pair counts as wrong
    assert result["pairs_with_missing_face"] == 1


def test_verification_accuracy_of_one_fold_is_a_one_line_error():
    """Pairs of a single fold leave no other fold to choose its threshold on: it was a RuntimeError
    traceback from ``max()`` of an empty tensor."""
    distances = torch.tensor([0.1, 0.9, 0.2, 0.8])
    same = torch.tensor([True, False, True, False])
    for folds in (torch.zeros(4, dtype=torch.long), torch.zeros(0, dtype=torch.long)):
        with pytest.raises(InvalidInputError, match="at least 2 folds") as error:
            verification_accuracy(distances[: len(folds)], same[: len(folds)], folds)
        assert "\n" not in str(error.value)
    # a fold whose other folds have no face found has no threshold: not measured, not a traceback
    missing = torch.tensor([math.nan, math.nan, 0.2, 0.8])
    result = verification_accuracy(missing, same, torch.tensor([0, 0, 1, 1]))
    assert math.isnan(result["fold_accuracies"][1]) and math.isnan(result["accuracy"])
    assert result["fold_accuracies"][0] == 0.0 and result["pairs_with_missing_face"] == 2


def test_verification_pairs_split_genuine_and_impostor():
    gallery = torch.tensor([[0.0, 0.0], [1.0, 0.0], [float("nan"), 0.0], [0.0, 2.0]])
    gallery_ids = torch.tensor([1, 2, 1, 1])
    probes = torch.tensor([[0.0, 1.0], [3.0, 0.0]])
    probe_ids = torch.tensor([1, 2])
    is_protected = torch.tensor([True, False])
    genuine, impostor = verification_pairs(
        gallery, gallery_ids, probes, probe_ids, is_protected, 3, "euclidean"
    )
    # probe 0 (person 1) vs the protected rows of person 1: row 0 (1.0) and row 2 (NaN: no face)
    assert genuine[0] == pytest.approx(1.0) and math.isnan(float(genuine[1]))
    assert impostor.tolist() == pytest.approx([math.sqrt(2.0)])  # vs person 2's row 1


def _row(**changes) -> EvaluationRow:
    values = dict(
        attacker="a",
        upload="jpeg75",
        adaptive=False,
        protected_rank1=0.25,
        protected_rank5=0.5,
        control_rank1=1.0,
        control_rank5=1.0,
        protection=0.75,
        tar_at_far_1e3=0.1,
        far_threshold=0.5,
        protected_probes=4,
        control_probes=4,
        protected_gallery_faces_found=1.0,
        gallery_size=10,
    )
    return EvaluationRow(**{**values, **changes})


def test_rows_keep_the_report_keys():
    data = _row().to_json()
    assert "tar_at_far_1e-3" in data and "tar_at_far_1e3" not in data and "level" not in data
    assert list(data)[:3] == ["attacker", "upload", "adaptive"]
    assert _row(level="mid").to_json()["level"] == "mid"
    result = EvaluationResult(settings={}, rows=[_row(), _row(upload="none", adaptive="linear")])
    assert result.to_dict()["rows"][1]["adaptive"] == "linear"
    assert result.row("a", "none", "linear").upload == "none"
    with pytest.raises(KeyError):
        result.row("a", "blur")


def test_report_json_is_strict_json_with_null_for_figures_without_a_value(tmp_path):
    """Control rank-1 without control people is NaN in memory; report.json said ``NaN``, which is
    not JSON: strict parsers (jq, browsers) refused the whole report. It is ``null`` now."""
    import json

    from facecloak.evaluate import EvaluationResult
    from facecloak.report import write_json

    result = EvaluationResult(
        settings={"control": 0, "rates": [0.5, float("inf")]}, timings={"s": float("nan")}
    )
    text = write_json(result, tmp_path / "report.json").read_text()

    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    report = json.loads(text, parse_constant=refuse)
    assert report["settings"]["rates"] == [0.5, None] and report["timings"]["s"] is None


def test_a_row_counts_the_probes_the_attacker_could_search_with():
    """A probe with no face found is a miss for protected and control people alike; the row now
    says how many each had, so a protection the attacker's own detector gives can be told apart."""
    from types import SimpleNamespace

    from facecloak.evaluate.rows import score_row

    nan = float("nan")
    gallery = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    gallery_ids = torch.tensor([1, 2, 3])
    probes = torch.tensor([[nan, nan], [0.05, 0.0], [1.0, 0.1], [0.0, 0.9]])
    probe_ids = torch.tensor([1, 1, 2, 3])
    is_protected = torch.tensor([True, True, False, False])
    attacker = SimpleNamespace(name="toy", metric="euclidean")
    row = score_row(
        attacker, "none", False, gallery, gallery_ids, probes, probe_ids, is_protected, gallery[:1]
    )
    assert (row.protected_probes, row.protected_probes_found) == (2, 1)
    assert (row.control_probes, row.control_probes_found) == (2, 2)
    assert row.protection == 0.5 and row.control_rank1 == 1.0  # the probe not found: a miss
    assert row.to_json()["protected_probes_found"] == 1


def test_report_does_not_call_photos_of_another_size_unchanged(lfw_dir):
    """Photos protected elsewhere at another size cannot be compared with their originals; the
    terminal said "PSNR infinite (no photo changed)" of photos that were every one changed."""
    import torch.nn.functional as F

    from facecloak.evaluate.summary import quality_summary
    from facecloak.io import read_image
    from facecloak.report import summary_table

    photo = read_image(sorted((lfw_dir / "images" / "Abel_Pacheco").glob("*.jpg"))[0]).pixels
    smaller = F.interpolate(photo[None], scale_factor=0.5, mode="area")[0]
    quality = quality_summary([photo], [smaller], [{"source": "folder"}])
    text = summary_table(EvaluationResult(settings={}, quality=quality))
    assert "no photo changed" not in text and "nan" not in text
    assert "not measured" in text


def test_report_says_which_protected_photos_its_figures_leave_out(lfw_dir):
    """A protected photo of another size is not in the quality figures, and one the protection
    found no face in went into the gallery as it was: both were silent in the terminal and HTML."""
    import torch.nn.functional as F

    from facecloak.evaluate.summary import quality_summary
    from facecloak.io import read_image
    from facecloak.report import render_html, summary_table

    photo = read_image(sorted((lfw_dir / "images" / "Abel_Pacheco").glob("*.jpg"))[0]).pixels
    smaller = F.interpolate(photo[None], scale_factor=0.5, mode="area")[0]
    quality = quality_summary(
        [photo, photo, photo], [photo.flip(-1), smaller, photo], [{"faces": 1}, {"faces": 1}, {"faces": 0}]
    )
    assert quality["photos"] == 2 and quality["photos_of_another_size"] == 1
    result = EvaluationResult(settings={}, quality=quality)
    for text in (summary_table(result), render_html(result)):
        assert "1 of 3 protected photos have another size" in text
        assert "1 protected photo(s) had no face found by the protection" in text


def test_row_after_a_level_sweep_is_that_of_the_reported_level():
    """After ``--level all`` each attacker and upload has a row per level; ``row`` gave the first
    (level low) while the result's other figures and settings are those of level mid."""
    rows = [_row(level=level, protection=p) for level, p in (("low", 0.2), ("mid", 0.5), ("high", 0.9))]
    result = EvaluationResult(settings={"level": "mid"}, rows=rows)
    assert result.row("a", "jpeg75").level == "mid"
    assert EvaluationResult(settings={}, rows=rows).row("a", "jpeg75").level == "low"


def test_tar_at_far_1e3_is_not_reported_from_fewer_than_a_thousand_impostor_pairs():
    """With under 1 / FAR impostor pairs the threshold was the closest impostor: TAR at FAR 0,
    reported as TAR at FAR 1e-3 (a small run's figure understated what the scraper accepts)."""
    from types import SimpleNamespace

    from facecloak.evaluate.rows import score_row

    def row(people: int):
        ids = torch.arange(people)
        gallery = torch.nn.functional.normalize(
            torch.randn(people, 8, generator=torch.Generator().manual_seed(0))
        )
        protected = torch.zeros(people, dtype=torch.bool)
        protected[:2] = True
        attacker = SimpleNamespace(name="m", metric="euclidean")
        return score_row(attacker, "none", False, gallery, ids, gallery.clone(), ids, protected, gallery[:2])

    assert math.isnan(row(40).tar_at_far_1e3)  # 2 probes x 39 others: 78 impostor pairs
    assert row(600).tar_at_far_1e3 == 1.0  # 1,198 impostor pairs: measured (each probe is its own photo)
