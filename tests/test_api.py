"""The Python API as a researcher calls it: wrong inputs fail in one line that says what to pass."""

from __future__ import annotations

import pytest

from facecloak import InvalidInputError, detect_faces, read_image
from facecloak.datasets import Person, read_lfw_pairs, split_people


@pytest.mark.parametrize(
    ("photo", "given"),
    [
        (lambda pixels: pixels.permute(1, 2, 0), "(512, 512, 3)"),  # HWC, as numpy and PIL hold it
        (lambda pixels: pixels[None], "(1, 3, 512, 512)"),  # a batch of one inside the list
    ],
)
def test_a_listed_photo_of_another_shape_is_told_it_must_be_3_h_w(samples_dir, photo, given):
    """It was told "must have shape (B, 3, H, W), got (1, 512, 512, 3)": a shape it never had, and
    for a (1, 3, H, W) photo a shape it had."""
    pixels = read_image(samples_dir / "astronaut.jpg").pixels
    with pytest.raises(InvalidInputError) as error:
        detect_faces([photo(pixels)])
    assert str(error.value) == f"images[0] must have shape (3, H, W), got {given}"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, "cannot read the pairs file (No such file or directory)"),
        ("1 1\nAbel_Pacheco 1 x\nAbel_Pacheco 1 Akhmed_Zakayev 1\n", "line 2: photo number 'x' is not"),
        ("1 1\n\nAbel_Pacheco 1 4\n\nAbel_Pacheco 1\n", "malformed pair on line 5 "),  # blank lines count
        ("1 1\nNo_Such_Person 1 2\nAbel_Pacheco 1 Akhmed_Zakayev 1\n", "line 2: no photo "),
        ("1 1\nAbel_Pacheco 1 4\nAbel_Pacheco 1 Akhmed_Zakayev 99\n", "line 3: no photo "),
        ("0 300\n", "first line must be '<folds> <pairs per class>', both at least 1"),
    ],
)
def test_a_malformed_pairs_file_fails_in_one_line_naming_file_and_line(lfw_dir, tmp_path, text, reason):
    """A missing file or a bad photo number was a Python traceback, a missing person passed (and
    failed only when embedded, after the photos before it), a line number skipped the blank lines,
    and 0 folds gave no pairs without a word."""
    pairs_file = tmp_path / "pairs.txt"
    if text is not None:
        pairs_file.write_text(text)
    with pytest.raises(InvalidInputError) as error:
        read_lfw_pairs(pairs_file, lfw_dir / "images")
    message = str(error.value)
    assert message.startswith(f"{pairs_file}: {reason}"), message
    assert "\n" not in message


def test_a_well_formed_pairs_file_reads_with_its_folds(lfw_dir, tmp_path):
    """Blank lines and Windows line ends are read past; a byte-order mark (a Windows editor's
    "UTF-8") failed as "first line must be '<folds> <pairs per class>'"."""
    pairs_file = tmp_path / "pairs.txt"
    pairs_file.write_text(
        "\ufeff2 1\nAbel_Pacheco 1 4\n\nAbel_Pacheco 1 Akhmed_Zakayev 1\r\nAkhmed_Zakayev 1 3\n"
        "Akhmed_Zakayev 2 Abel_Pacheco 2\n"
    )
    pairs = read_lfw_pairs(pairs_file, lfw_dir / "images")
    assert [(p.same, p.fold) for p in pairs] == [(True, 0), (False, 0), (True, 1), (False, 1)]
    assert pairs[3].second == lfw_dir / "images" / "Abel_Pacheco" / "Abel_Pacheco_0002.jpg"


@pytest.mark.parametrize(
    ("keywords", "reason"),
    [
        ({"far": "1e-3"}, "far must be a number between 0 and 1, got '1e-3'"),  # a TypeError traceback
        ({"max_photos": 0}, "max_photos must be a whole number of at least 2, got 0"),  # "no readable photos"
        (
            {"max_photos": 100.0},
            "max_photos must be a whole number of at least 2, got 100.0",
        ),  # a slice's TypeError
    ],
)
def test_calibrate_threshold_refuses_what_its_cli_refuses_in_one_line(
    dlib_resnet, lfw_dir, tmp_path, keywords, reason
):
    from facecloak.calibrate import calibrate_threshold

    for person in ("Abel_Pacheco", "Akhmed_Zakayev"):
        (tmp_path / person).mkdir()
        for photo in sorted((lfw_dir / "images" / person).glob("*.jpg")):
            (tmp_path / person / photo.name).write_bytes(photo.read_bytes())
    with pytest.raises(InvalidInputError) as error:
        calibrate_threshold(dlib_resnet, tmp_path, **keywords)
    assert str(error.value) == reason


@pytest.mark.parametrize(
    ("keywords", "reason"),
    [
        ({"protected": -1}, "protected must be a number of people from 1, or their names; got -1"),
        ({"protected": 2.0}, "protected must be a number of people from 1, or their names; got 2.0"),
        (
            {"protected": "Ian_Thorpe"},
            "protected must be a number of people from 1, or their names; got 'Ian_Thorpe'",
        ),
        ({"protected": 1, "control": -1}, "control must be a number of people from 0; got -1"),
        ({"protected": 1, "probes": 1.5}, "need probes >= 1 and min_photos > probes, both whole numbers"),
    ],
)
def test_split_people_refuses_counts_it_cannot_draw_in_one_line(lfw_dir, keywords, reason):
    """protected=-1 protected all but one eligible person without a word (a slice's end); the
    others failed with a TypeError traceback."""
    people = _lfw_people(lfw_dir)
    with pytest.raises(InvalidInputError) as error:
        split_people(people, **{"control": 1, "min_photos": 10, **keywords})
    assert str(error.value) == reason


def test_split_people_takes_names_as_a_tuple_as_a_list(lfw_dir):
    """A tuple of names failed with "can only concatenate tuple (not "int") to tuple"."""
    people = _lfw_people(lfw_dir)
    split = split_people(people, protected=("Hu_Jintao", "Ian_Thorpe"), control=1, min_photos=10)
    assert [p.name for p in split.protected] == ["Hu_Jintao", "Ian_Thorpe"]
    assert split == split_people(people, protected=["Hu_Jintao", "Ian_Thorpe"], control=1, min_photos=10)


def _lfw_people(lfw_dir) -> list[Person]:
    """Four LFW people with 10 or more photos (listing all of LFW takes long on shared storage)."""
    names = ("Colin_Powell", "Hu_Jintao", "Ian_Thorpe", "Vicente_Fox")
    return [Person(name, tuple(sorted((lfw_dir / "images" / name).glob("*.jpg")))) for name in names]


def test_cloak_image_given_a_name_instead_of_a_cloak_is_one_line(samples_dir):
    """``cloak_image(photo, "untargeted")`` was an AttributeError traceback ("no attribute 'detector'")."""
    from facecloak.commands import cloak_image

    photo = read_image(samples_dir / "astronaut.jpg").pixels
    with pytest.raises(InvalidInputError, match="cloak must be a Cloak .*create_cloak.*got str"):
        cloak_image(photo, "untargeted")


@pytest.mark.parametrize(
    "settings",
    [
        {"smoothing": float("nan")},
        {"diversity": 5.0},
        {"feather": 5.0},
        {"feather": float("nan")},
        {"laggard_weight": -5.0},
        {"max_dssim": 2.0},
    ],
)
def test_a_cloak_setting_out_of_range_is_refused_before_any_work(settings, dlib_resnet):
    """The command line's ranges held only there: ``feather=5`` cut the change to nearly nothing,
    ``feather=nan`` failed after the whole optimisation, NaN smoothing ran on."""
    from facecloak.cloak import create_cloak

    with pytest.raises(InvalidInputError, match=next(iter(settings))):
        create_cloak("untargeted", [dlib_resnet], "mid", **settings)


def test_wrong_values_for_api_arguments_are_one_line_errors(dlib_resnet):
    """Model names instead of models, a NaN detector size, a fractional mosaic, records for other
    faces: an AttributeError, a ValueError, a silent cut, an IndexError."""
    import torch

    from facecloak.anonymize import pixelate_faces
    from facecloak.cloak import create_cloak
    from facecloak.detect import FaceDetector
    from facecloak.faces import Faces

    for models in ("dlib-resnet", ["dlib-resnet"]):
        with pytest.raises(InvalidInputError, match="models must be a list of loaded face models"):
            create_cloak("untargeted", models, "mid")
    for size in ({"min_size": float("nan")}, {"min_size": 2.5}, {"max_side": float("nan")}):
        with pytest.raises(InvalidInputError, match="min_size must be a whole number"):
            FaceDetector(**size)
    face = Faces(
        boxes=torch.tensor([[10.0, 10.0, 60.0, 60.0]]),
        scores=torch.ones(1),
        landmarks=torch.full((1, 5, 2), 30.0),
        image_index=torch.zeros(1, dtype=torch.long),
    )
    for blocks in (2.5, True):
        with pytest.raises(InvalidInputError, match="blocks must be a whole number"):
            pixelate_faces(torch.rand(1, 3, 80, 80), face, blocks=blocks)
    cloak = create_cloak("untargeted", [dlib_resnet], "low", steps=0, verify=False)
    result = cloak([torch.rand(3, 80, 80)], face)
    with pytest.raises(InvalidInputError, match="records need the 1 face"):
        result.records(Faces.cat([face, face]))
