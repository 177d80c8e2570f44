"""Face replacement on real faces: a bank of LFW donors, LFW photos of other people replaced.

Donors are people with one or two LFW photos (sorted by name); the replaced photos are of people
with ten or more, so the two groups are disjoint. The three properties of a replaced face are
checked independently of the replacer's own check: found again after JPEG 75, and on every
recogniser beyond the match threshold from the original face and from each donor's own photo.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from conftest import models_root
from facecloak import io
from facecloak import replace as replace_module
from facecloak.align import estimate_similarity, transform_points
from facecloak.anonymize import blur_faces
from facecloak.cli import main
from facecloak.donor_bank import DonorBank, bank_folder, load_bank
from facecloak.donors import add_donors, refresh_bank, remove_donors
from facecloak.embed import embed_faces
from facecloak.errors import DonorBankError, InvalidInputError
from facecloak.evaluate import centre_face
from facecloak.faces import Faces
from facecloak.models import create_embedder, get_card
from facecloak.models.registry import embedding_distance
from facecloak.replace import (
    DONOR_MARGIN,
    GLASSES_FROM,
    MAX_YAW_GAP,
    MEASURED_DONOR_MARGINS,
    FaceReplacer,
    replace_faces,
)
from facecloak.synthesis import (
    CANONICAL_TEMPLATE,
    CHIP_EYE_DISTANCE_PX,
    CHIP_SIZE_PX,
    DETAIL_FROM,
    DETAIL_SCALE,
    SynthesisSettings,
    apply_thin_plate,
    canonical_chips,
    donor_warps,
    estimate_pose,
    face_statistics,
    features_weight,
    fit_thin_plate,
    glasses_strength,
    lab_to_rgb,
    mouth_width,
    part_weights,
    rgb_to_lab,
    synthesize_face,
    window_outside_share,
)
from facecloak.transforms import gaussian_blur

DONORS = 12
TARGETS = 4


def _people(images: Path, fewest: int, most: int) -> list[Path]:
    return [
        folder
        for folder in sorted(p for p in images.iterdir() if p.is_dir())
        if fewest <= len(list(folder.glob("*.jpg"))) <= most
    ]


@pytest.fixture(scope="module")
def data_home(tmp_path_factory):
    """A private XDG_DATA_HOME: banks made here never touch the user's."""
    path = tmp_path_factory.mktemp("data-home")
    before = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(path)
    yield path
    if before is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = before


@pytest.fixture(scope="module")
def donor_dir(lfw_dir, tmp_path_factory):
    """12 donor photos (LFW people with 1-2 photos, first by name) and one photo with no face."""
    folder = tmp_path_factory.mktemp("donor-photos")
    for person in _people(lfw_dir / "images", 1, 2)[:DONORS]:
        photo = sorted(person.glob("*.jpg"))[0]
        shutil.copy(photo, folder / photo.name)
    ramp = torch.linspace(0, 1, 200)
    io.write_image(folder / "zz_no_face.png", torch.stack([ramp[None].expand(200, -1)] * 3))
    return folder


@pytest.fixture(scope="module")
def models():
    """dlib-resnet, and MobileFace V2 when ../shared has it (not registered: the user's config stays)."""
    found = [create_embedder("dlib-resnet", device="cpu")]
    symbol = models_root() / "mobileface-v2" / "MobileFace_Identification_V2-symbol.json"
    if symbol.is_file():
        from facecloak.models.plugins import load_model_file

        found.append(load_model_file(symbol, name="mobileface", threshold=0.73))
    return found


@pytest.fixture(scope="module")
def bank(data_home, donor_dir, models, detector) -> DonorBank:
    report = add_donors([donor_dir], models, bank="lfw-test", licence="LFW, research use", detector=detector)
    assert [Path(p).name for p, _ in report.skipped] == ["zz_no_face.png"]
    assert len(report.added) == DONORS
    return load_bank("lfw-test")


@pytest.fixture(scope="module")
def targets(lfw_dir, detector):
    """Photos of 4 people with >= 10 LFW photos, and their centre faces."""
    photos = [sorted(p.glob("*.jpg"))[2] for p in _people(lfw_dir / "images", 10, 10_000)[:TARGETS]]
    images = [io.read_image(path).pixels for path in photos]
    faces = detector(images)
    centre = [
        int(faces.image_index.eq(i).nonzero()[centre_face(faces.for_image(i), 250, 250), 0])
        for i in range(len(images))
    ]
    return images, faces.select(centre)


@pytest.fixture(scope="module")
def replaced(bank, models, detector, targets):
    images, faces = targets
    # 12 donors leave few beyond the preferred 1.3 thresholds of each person: allow down to the
    # hard look-alike limit; the donor margins are the defaults, which cover the difference
    # between the replacer's check and the independent one below (a face 1.0x past a donor's
    # threshold in the check was 0.9995x of dlib's in that donor's own photo)
    replacer = FaceReplacer(bank, models, detector=detector, seed=0, prefer_beyond=1.2)
    return replacer(images, faces)


def _centre_embeddings(images, detector, model):
    faces = detector(images)
    picked = [
        int(
            faces.image_index.eq(i).nonzero()[centre_face(faces.for_image(i), *images[i].shape[-2:][::-1]), 0]
        )
        for i in range(len(images))
    ]
    return embed_faces(images, faces.select(picked), model)


def test_replaced_faces_are_found_again_and_match_nobody(replaced, bank, models, detector, targets):
    images, faces = targets
    # with 12 donors some faces sit at the edge of a threshold (here two of the four stay at
    # 0.58-0.73 on MobileFace whatever the set): one that no set takes past it in 6 tries is
    # blurred (protected, and reported so); the faces replaced must pass every check below
    kept = [k for k, record in enumerate(replaced.records) if record["method"] == "replace"]
    assert len(kept) >= 2, [r.get("reason") for r in replaced.records]
    assert bool(replaced.protected.all()), [r.get("reason") for r in replaced.records]
    uploaded = [io.jpeg_roundtrip(replaced.images[k], 75) for k in kept]
    assert min(detector(uploaded).count_per_image(len(uploaded))) >= 1
    for model in models:
        threshold = model.card.match_threshold
        original = embed_faces(images, faces, model)[kept]
        after = _centre_embeddings(uploaded, detector, model)
        to_original = embedding_distance(after, original, model.card.distance)
        assert bool((to_original > threshold).all()), (model.card.name, to_original)
        for k, record in enumerate(replaced.records[j] for j in kept):
            rows = [bank.ids.index(donor_id) for donor_id in record["donors"]]
            assert len(set(rows)) == 3
            sources = [io.read_image(bank.donors[r]["source"]).pixels for r in rows]
            donor_embeddings = _centre_embeddings(sources, detector, model)
            to_donors = embedding_distance(donor_embeddings, after[k][None], model.card.distance)
            assert bool((to_donors > threshold).all()), (model.card.name, record["donors"], to_donors)
            # the replacer's own check held its margin from each donor's stored chip
            name = model.card.name
            assert record["distance_to_donors"][name] >= record["donor_thresholds"][name]
    # how much larger each face is than its smallest donor, in their photos (a sign of softness)
    for k in kept:
        record = replaced.records[k]
        donors = [bank.donors[bank.ids.index(donor_id)] for donor_id in record["donors"]]
        donor_eyes = min(math.dist(*donor["landmarks"][:2]) for donor in donors)
        assert donor_eyes < CHIP_EYE_DISTANCE_PX  # LFW's donors, not the chip, limit the detail
        face_eyes = float((faces.landmarks[k][1] - faces.landmarks[k][0]).norm())
        assert record["donor_upscale"] == pytest.approx(face_eyes / donor_eyes, abs=0.01)
        assert record["detail_limit"] == "donors"


def test_only_the_face_region_changes(replaced, targets):
    images, faces = targets
    for image, output, box in zip(images, replaced.images, faces.boxes):
        x1, y1, x2, y2 = box.tolist()
        width, height = x2 - x1, y2 - y1
        keep = torch.ones(image.shape[-2:], dtype=torch.bool)
        keep[
            int(y1 - 0.3 * height) : int(y2 + 0.3 * height), int(x1 - 0.3 * width) : int(x2 + 0.3 * width)
        ] = False
        assert torch.equal(output[:, keep], image[:, keep])
        cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
        centre = (output - image)[:, cy - 10 : cy + 10, cx - 10 : cx + 10]
        assert float(centre.abs().mean()) > 0.01


def test_a_face_no_mix_protects_is_blurred_or_reported_not_protected(bank, models, detector, targets):
    """A margin no donor mix reaches: the default blurs the face; ``keep`` reports it NOT protected."""
    images, faces = targets
    one, face = images[:1], faces.select([0])
    blurred = FaceReplacer(bank, models, detector=detector, attempts=1, margin=3.0)(one, face)
    record = blurred.records[0]
    assert record["method"] == "blur" and record["protected"] and record["replaced"] is False
    assert "blurred instead" in record["reason"] and "1 tries" in record["reason"]
    assert torch.equal(blurred.images[0], blur_faces(one[0][None], face)[0])
    # the rejected try's figures are its own, apart: they describe pixels the output does not hold
    assert "distance_to_original" not in record and "donors" not in record and "redetected" not in record
    assert record["best_try"]["donors"] and "distance_to_original" in record["best_try"]
    assert record["box"] == face.to_records()[0]["box"]  # the face's own fields stay
    # no set at all: every donor too near the person (here: all, by a look-alike limit of 100
    # thresholds) was "no donor set could be used", without why or what to do
    none = FaceReplacer(bank, models, detector=detector, look_alike=100.0)(one, face).records[0]
    assert none["method"] == "blur" and "far enough from this person" in none["reason"]
    assert none["reason"].endswith("add donors: blurred instead")
    kept = FaceReplacer(bank, models, detector=detector, attempts=1, margin=3.0, fallback="keep")(one, face)
    assert kept.records[0]["method"] == "replace" and not bool(kept.protected[0])
    assert not torch.equal(kept.images[0], one[0]) and not torch.equal(kept.images[0], blurred.images[0])
    with pytest.raises(InvalidInputError, match="fallback"):
        FaceReplacer(bank, models, fallback="ignore")
    # the donor margin is its own check: far enough from the person, too near a donor
    near = FaceReplacer(bank, models, detector=detector, attempts=1, donor_margin=3.0, fallback="keep")
    record = near(one, face).records[0]
    assert record["reason"] == "still matches a donor used" and not record["protected"]
    assert record["donor_thresholds"]["dlib-resnet"] == pytest.approx(3.0 * 0.6)
    default = FaceReplacer(bank, models, detector=detector, attempts=1, fallback="keep")(one, face).records[0]
    # each model's own margin: dlib-resnet's measured one, the conservative default for a plug-in
    dlib_margin = MEASURED_DONOR_MARGINS["dlib-resnet"]
    assert default["donor_thresholds"]["dlib-resnet"] == pytest.approx(dlib_margin * 0.6)
    for model in models[1:]:
        expected = DONOR_MARGIN * model.card.match_threshold
        assert default["donor_thresholds"][model.card.name] == pytest.approx(expected)


def test_faces_beside_a_blurred_one_are_checked_in_the_final_photo(bank, models, detector, samples_dir):
    """A neighbour blurred after its tries failed changes the pixels around the faces that passed.

    Their check must have seen the photo as returned, not the one with the neighbour's last try:
    the blur moved a replaced LFW face's MobileFace distance to a donor by 0.17 thresholds.
    """
    photo = io.read_image(samples_dir / "group.jpg").pixels
    faces = detector([photo])
    assert len(faces) >= 3
    failing = int((faces.boxes[:, 2] - faces.boxes[:, 0]).argmax())  # the largest face: never passes
    replacer = FaceReplacer(bank, models, detector=detector, seed=0, prefer_beyond=1.2, donor_margin=1.0)
    seen = []
    verify = replacer._verify

    def forced(uploads, outputs, faces_, rows, targets_, tried):
        results = verify(uploads, outputs, faces_, rows, targets_, tried)
        seen.append({n: outputs[0].clone() for n in rows})
        if failing in results:
            record, _ = results[failing]
            results[failing] = (dict(record, protected=False, reason="still matches the original face"), -1.0)
        return results

    replacer._verify = forced
    result = replacer([photo], faces)
    assert result.records[failing]["method"] == "blur" and result.records[failing]["replaced"] is False
    kept = [n for n, r in enumerate(result.records) if r["method"] == "replace" and r["protected"]]
    assert kept, "no face beside the blurred one was replaced"
    for n in kept:
        last = [checked[n] for checked in seen if n in checked][-1]
        assert torch.equal(last, result.images[0]), f"face {n} was last checked on other pixels"


def test_a_blurred_face_stays_blurred_under_the_edge_of_a_new_face_beside_it(bank, models, detector, lfw_dir):
    """A crop's feathered edge was blended with the original photo: pasted over a neighbour that fell
    back to a blur, it put that face's own pixels back (a crescent of its cheek), still reported
    protected. The blur must hold wherever it changed the photo."""
    people = _people(lfw_dir / "images", 10, 10_000)[:2]
    left, right = (io.read_image(sorted(person.glob("*.jpg"))[2]).pixels for person in people)
    photo = torch.full((3, 250, 230), 0.5)
    photo[:, :, :150] = left[:, :, 50:200]
    photo[:, :, 80:230] = right[:, :, 50:200]  # the two faces' boxes overlap by a few pixels
    faces = detector([photo])
    assert len(faces) == 2
    failing = int(faces.boxes[:, 0].argmin())  # the left face falls back to a blur
    replacer = FaceReplacer(bank, models, detector=detector, seed=0, attempts=1, finish=False)
    verify = replacer._verify

    def forced(uploads, outputs, faces_, rows, targets_, tried):
        results = verify(uploads, outputs, faces_, rows, targets_, tried)
        for n in list(results):
            record, _ = results[n]
            results[n] = (
                (dict(record, protected=False, reason="still matches the original face"), -1.0)
                if n == failing
                else (dict(record, protected=True, reason=None), 2.0)
            )
        return results

    replacer._verify = forced
    result = replacer([photo], faces)
    assert result.records[failing]["method"] == "blur" and result.records[1 - failing]["method"] == "replace"
    blurred = blur_faces(photo[None], faces.select([failing]))[0]
    x0, y0, x1, y1 = (int(v) for v in faces.boxes[failing].clamp(min=0))
    out, blur, original = (t[:, y0:y1, x0:x1] for t in (result.images[0], blurred, photo))
    changed = (blur - original).abs().amax(0) > 0.02
    back = ((out - original).abs().amax(0) < (out - blur).abs().amax(0)) & changed
    assert int(back.sum()) == 0, f"{int(back.sum())} of the blurred face's pixels are its own again"


def test_a_try_that_stays_near_the_person_is_followed_by_donors_that_reach_farther(
    bank, models, detector, targets
):
    """The new face keeps the person's hair and outline, so it lies nearer the person than its
    donors' mean predicts. After such a try, the next set must be predicted to land past every
    threshold once the measured shortfall (`FaceReplacer._shrink`) is applied."""
    images, faces = targets
    one, face = images[:1], faces.select([0])
    replacer = FaceReplacer(
        bank, models, detector=detector, seed=0, prefer_beyond=1.2, attempts=2, finish=False
    )
    target = {m.card.name: embed_faces(one, face, m)[0] for m in models}
    picks, forced_checks = [], []
    verify = replacer._verify

    def first_try_too_near(uploads, outputs, faces_, rows, targets_, tried):
        results = verify(uploads, outputs, faces_, rows, targets_, tried)
        picks.append(tried[0][0])
        if len(picks) == 1:  # as if the new face had stayed at 0.95 of every threshold
            record, _ = results[0]
            near = {m.card.name: 0.95 * m.card.match_threshold for m in models}
            record = dict(record, protected=False, reason="still matches the original face")
            record.update(distance_to_original=near, _matched_donors=[])
            forced_checks.append(record)
            results[0] = (record, 0.95)
        return results

    replacer._verify = first_try_too_near
    replacer(one, face)
    assert len(picks) == 2, picks
    shrink = replacer._shrink(forced_checks[0], picks[0], target)
    assert bool((shrink < 1).all())

    def landing(rows) -> float:  # where a set's new face is predicted to land, in thresholds
        to_target = replacer._predicted_margins(torch.tensor([sorted(rows)]), target)[1][0]
        return float((to_target * shrink).min())

    # the first set, measured, lands at 0.95; the next is predicted to land farther
    assert landing(picks[0]) == pytest.approx(0.95, abs=1e-3)
    assert landing(picks[1]) > 1.0, (picks, shrink)


def test_same_seed_same_faces(bank, models, detector, targets):
    # the same call twice (a photo alone here: in a batch its check sees the batched detector's
    # boxes, a fraction of a pixel away, and a try at a threshold's edge can fall either side)
    images, faces = targets

    def run(seed: int):
        replacer = FaceReplacer(bank, models, detector=detector, seed=seed, prefer_beyond=1.2)
        return replacer(images[:1], faces.select([0]))

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(again.images[0], first.images[0])
    assert again.records[0]["donors"] == first.records[0]["donors"]
    assert not torch.equal(other.images[0], first.images[0])  # the seed matters: grain, draw order


def test_a_photos_new_face_does_not_depend_on_the_photos_beside_it(bank, models, detector, targets):
    # the draw and the grain were seeded by the face's place in the call: the same photo, seed and
    # donors gave another face in a batch than alone (or after a resumed or re-chunked run)
    images, faces = targets
    replacer = FaceReplacer(
        bank, models, detector=detector, seed=0, prefer_beyond=1.2, attempts=1, finish=False, fallback="keep"
    )
    alone = replacer([images[1]], faces.select([1]).shifted(-1))
    beside = replacer(images[:2], faces.select([0, 1]))
    assert beside.records[1]["donors"] == alone.records[0]["donors"]
    assert torch.equal(beside.images[1], alone.images[0])


def test_bank_round_trip(bank, data_home, tmp_path, models, donor_dir, detector):
    assert len(bank) == DONORS and len(set(bank.ids)) == DONORS
    manifest = json.loads((bank.folder / "bank.json").read_text())
    assert set(manifest["models"]) == {m.card.name for m in models}
    for donor in bank.donors:
        assert Path(donor["source"]).is_file() and donor["licence"] == "LFW, research use"
        assert (bank.folder / "chips" / f"{donor['id']}.png").is_file()
    for model in models:
        assert bank.embeddings[model.card.name].shape == (DONORS, model.card.embedding_dim)
    chips = bank.chips([0, 3])
    assert chips.shape == (2, 3, 256, 256) and 0 <= float(chips.min()) and float(chips.max()) <= 1
    # a bank is a folder: a copy loads by its path, with the same content
    copy = tmp_path / "copied-bank"
    shutil.copytree(bank.folder, copy)
    copied = load_bank(copy)
    assert copied.ids == bank.ids and torch.equal(copied.stats, bank.stats)
    for name, table in bank.embeddings.items():
        assert torch.equal(copied.embeddings[name], table)
    # the same photos added again add nothing (they doubled the bank); a removed donor comes back
    manifest_before = (copy / "bank.json").read_bytes()
    again = add_donors([donor_dir], models, bank=copy, detector=detector)
    assert again.added == [] and again.total_donors == DONORS
    assert (copy / "bank.json").read_bytes() == manifest_before  # not a source entry of 0 donors
    assert sum("in the bank already" in reason for _, reason in again.skipped) == DONORS
    # removing a donor removes its chip and its embedding row
    assert remove_donors(copy, [bank.ids[1]]) == 1
    smaller = load_bank(copy)
    assert smaller.ids == bank.ids[:1] + bank.ids[2:]
    assert not (copy / "chips" / f"{bank.ids[1]}.png").exists()
    assert torch.equal(smaller.embeddings["dlib-resnet"][1], bank.embeddings["dlib-resnet"][2])
    # the last donor removed and its photo added again: a new id (it got the removed one's, so a
    # replaced face's record naming that id then named another person)
    last = load_bank(copy).ids[-1]
    assert remove_donors(copy, [last]) == 1
    source = next(d["source"] for d in bank.donors if d["id"] == last)
    back = add_donors([source], models, bank=copy, detector=detector)
    assert len(back.added) == 1 and back.added[0] not in (last, bank.ids[1])


def test_missing_and_empty_banks_say_how_to_fix(data_home, tmp_path, bank):
    with pytest.raises(DonorBankError, match="facecloak donors add") as error:
        load_bank("no-such-bank")
    assert "\n" not in str(error.value)
    empty = tmp_path / "empty-bank"
    shutil.copytree(bank.folder, empty)
    remove_donors(empty, bank.ids)
    with pytest.raises(DonorBankError, match="is empty.*facecloak donors add"):
        load_bank(empty)


def test_model_set_mismatch_says_how_to_fix(bank, tmp_path):
    changed = tmp_path / "other-models"
    shutil.copytree(bank.folder, changed)
    manifest = json.loads((changed / "bank.json").read_text())
    manifest["models"]["dlib-resnet"]["fingerprint"] = "0" * 12
    (changed / "bank.json").write_text(json.dumps(manifest))
    with pytest.raises(DonorBankError, match="donors refresh") as error:
        FaceReplacer(load_bank(changed), [create_embedder("dlib-resnet", device="cpu")])
    assert "\n" not in str(error.value)


def test_a_bank_whose_model_changed_under_the_same_name_says_which(data_home, tmp_path):
    """A model added again or calibrated keeps its name: the refusal read "built with models
    dlib-resnet but this run uses dlib-resnet", naming no difference."""
    folder = tmp_path / "changed-model"
    folder.mkdir()
    record = {"fingerprint": "0" * 12, "metric": "euclidean", "threshold": 0.6}
    manifest = {"format": 1, "donors": [], "models": {"dlib-resnet": record}}
    (folder / "bank.json").write_text(json.dumps(manifest))
    with pytest.raises(DonorBankError, match=r"dlib-resnet \(dlib-resnet changed since") as error:
        load_bank(folder, allow_empty=True).check_models([get_card("dlib-resnet")])
    assert "donors refresh" in str(error.value) and "\n" not in str(error.value)


def test_a_bank_with_more_models_serves_a_check_with_fewer(bank, models):
    """A bank embeds its donors with every model it was built with; a replacement checked by some
    of them (the evaluator's --models) needs only theirs, and a model it lacks is refused."""
    if len(models) < 2:
        pytest.skip("needs MobileFace V2 in ../shared/models")
    assert set(bank.models) == {m.card.name for m in models}
    FaceReplacer(bank, models[:1])  # dlib-resnet alone
    with pytest.raises(DonorBankError, match="donors refresh"):
        bank.check_models(models[:1])  # adding donors needs every model of the bank
    from facecloak.models.plugins import load_model_file

    symbol = models_root() / "mobileface-v2" / "MobileFace_Identification_V2-symbol.json"
    unknown = load_model_file(symbol, name="not-in-the-bank", threshold=0.73)
    with pytest.raises(DonorBankError, match="donors refresh"):
        FaceReplacer(bank, [models[0], unknown])


def test_tiny_face_is_blurred_and_reported(bank, models, detector, lfw_dir):
    photo = sorted(_people(lfw_dir / "images", 10, 10_000)[0].glob("*.jpg"))[3]
    image = io.read_image(photo).pixels
    small = F.interpolate(image[None], size=(90, 90), mode="area")[0]
    faces = detector([small])
    assert len(faces)
    result = FaceReplacer(bank, models, detector=detector)([small], faces)
    record = result.records[centre_face(faces, 90, 90)]
    assert record["method"] == "blur" and record["protected"] and "blurred instead" in record["reason"]
    assert not torch.equal(result.images[0], small)


def test_cli_donors_then_replace_exactly_as_documented(data_home, donor_dir, lfw_dir, tmp_path):
    runner = CliRunner()
    added = runner.invoke(main, ["donors", "add", str(donor_dir), "--bank", "clibank"])
    assert added.exit_code == 1, added.output  # the photo without a face is listed and skipped
    assert "zz_no_face.png: no face found" in added.output
    assert f"{DONORS} donor(s) added" in added.output
    listed = runner.invoke(main, ["donors", "list"])
    assert listed.exit_code == 0 and "clibank" in listed.output
    photos = tmp_path / "photos"
    photos.mkdir()
    for person in _people(lfw_dir / "images", 10, 10_000)[TARGETS : TARGETS + 2]:
        shutil.copy(sorted(person.glob("*.jpg"))[4], photos)
    out = tmp_path / "out"
    result = runner.invoke(
        main, ["anonymize", str(photos), "-o", str(out), "--method", "replace", "--donors", "clibank"]
    )
    assert result.exit_code == 0, result.output
    written = sorted(out.glob("*_replace.jpg"))
    assert len(written) == 2
    before = [path.read_bytes() for path in written]
    command = ["anonymize", str(photos), "-o", str(out), "--method", "replace", "--donors", "clibank"]
    again = runner.invoke(main, [*command, "--json"])
    assert again.exit_code == 0, again.output  # -o is journaled: a second run redoes nothing
    assert json.loads(again.stdout)["resumed_files"] == 2
    assert [path.read_bytes() for path in written] == before
    ray = runner.invoke(main, [*command, "--ray"])
    assert ray.exit_code == 2 and "--ray" in ray.output


def test_cli_donor_margin_sets_one_margin_for_every_model(data_home, donor_dir, lfw_dir, tmp_path):
    runner = CliRunner()
    added = runner.invoke(main, ["donors", "add", str(donor_dir), "--bank", "marginbank"])
    assert f"{DONORS} donor(s) added" in added.output
    photo = str(sorted(_people(lfw_dir / "images", 10, 10_000)[TARGETS].glob("*.jpg"))[5])
    command = ["anonymize", photo, "-o", str(tmp_path), "--method", "replace", "--donors", "marginbank"]
    # three thresholds from every donor: no mix gets there, so the face is blurred and says why
    strict = runner.invoke(main, [*command, "--donor-margin", "3", "--json"])
    assert strict.exit_code == 0, strict.output
    report = json.loads(strict.stdout)
    face = report["files"][0]["faces"][0]
    assert face["method"] == "blur" and face["replaced"] is False
    assert "still matches a donor used" in face["reason"]
    assert face["best_try"]["donor_thresholds"]["dlib-resnet"] == pytest.approx(3.0 * 0.6)
    assert report["options"]["donor_margin"] == 3.0
    blur = runner.invoke(main, ["anonymize", photo, "-o", str(tmp_path / "b"), "--donor-margin", "1.1"])
    assert blur.exit_code == 2 and "--donor-margin is for --method replace" in blur.output
    # more donors per face than the bank holds: a usage error before any work (every photo failed, exit 3)
    few = tmp_path / "three donors"
    few.mkdir()
    for donor in sorted(donor_dir.glob("*.jpg"))[:3]:
        shutil.copy(donor, few / donor.name)
    assert runner.invoke(main, ["donors", "add", str(few), "--bank", "threebank"]).exit_code == 0
    many = ["anonymize", photo, "-o", str(tmp_path / "many"), "--method", "replace", "--donors", "threebank"]
    too_many = runner.invoke(main, [*many, "--donors-per-face", "4"])
    assert too_many.exit_code == 2, too_many.output
    assert "holds 3 usable donor(s), fewer than --donors-per-face 4" in too_many.output
    assert not (tmp_path / "many").exists()


def test_cli_bad_banks_are_one_line_usage_errors(data_home, lfw_dir, tmp_path):
    runner = CliRunner()
    photo = str(sorted(_people(lfw_dir / "images", 10, 10_000)[0].glob("*.jpg"))[0])
    missing = runner.invoke(
        main, ["anonymize", photo, "-o", str(tmp_path), "--method", "replace", "--donors", "nope"]
    )
    assert missing.exit_code == 2
    assert missing.output.strip().count("\n") == 0 and "facecloak donors add" in missing.output
    no_bank = runner.invoke(main, ["anonymize", photo, "-o", str(tmp_path), "--method", "replace"])
    assert no_bank.exit_code == 2 and "--donors" in no_bank.output
    not_replace = runner.invoke(main, ["anonymize", photo, "-o", str(tmp_path), "--no-finish"])
    assert not_replace.exit_code == 2 and "--no-finish is for --method replace" in not_replace.output
    finish = runner.invoke(main, ["anonymize", photo, "-o", str(tmp_path), "--method", "mask", "--finish"])
    assert finish.exit_code == 2 and "--finish is for --method replace" in finish.output  # was taken
    mouth = runner.invoke(main, ["anonymize", photo, "-o", str(tmp_path), "--keep-mouth"])
    assert mouth.exit_code == 2 and "--keep-mouth is for --method replace" in mouth.output
    seed = runner.invoke(main, ["anonymize", photo, "-o", str(tmp_path), "--seed", str(10**20)])
    assert seed.exit_code == 2 and "--seed" in seed.output  # it crashed deep in torch


def test_cli_donors_list_names_a_manifest_that_is_no_json_object(data_home):
    """A bank.json holding ``[]`` or ``null`` was an AttributeError traceback from `donors list`,
    which then listed no bank at all; now it is one line naming the file, the others still listed."""
    runner = CliRunner()
    for name, content in (("not-an-object", "[]"), ("null-manifest", "null")):
        folder = bank_folder(name)
        folder.mkdir(parents=True)
        (folder / "bank.json").write_text(content)
        one = runner.invoke(main, ["donors", "list", name])
        assert one.exit_code == 2 and isinstance(one.exception, SystemExit)
        assert one.output.strip().count("\n") == 0
        assert str(folder / "bank.json") in one.output and "not a JSON object" in one.output
        removed = runner.invoke(main, ["donors", "remove", name, "--donor", "d00001"])
        assert removed.exit_code == 2 and "not a JSON object" in removed.output
    listing = runner.invoke(main, ["donors", "list"])
    assert not isinstance(listing.exception, AttributeError)
    assert listing.stderr.count("not a JSON object") == 2
    assert listing.exit_code == 3  # the listing went on, and says a bank is damaged (it was 0)
    assert runner.invoke(main, ["donors", "list", "--json"]).exit_code == 3
    for name in ("not-an-object", "null-manifest"):
        shutil.rmtree(bank_folder(name))


def test_cli_donors_add_of_faceless_photos_creates_no_empty_bank(data_home, tmp_path):
    """Photos without a face left an empty bank behind (under a mistyped name too), listed by
    `donors list` and refused later by `anonymize --donors` as empty; now none is created."""
    photos = tmp_path / "faceless"
    photos.mkdir()
    ramp = torch.linspace(0, 1, 200)
    io.write_image(photos / "no_face.png", torch.stack([ramp[None].expand(200, -1)] * 3))
    runner = CliRunner()
    result = runner.invoke(
        main, ["donors", "add", str(photos), "--bank", "faceless", "--licence", "x", "--device", "cpu"]
    )
    assert result.exit_code == 1, result.output
    assert "no_face.png: no face found" in result.output and "no bank was created" in result.output
    assert not bank_folder("faceless").exists()
    assert "faceless" not in runner.invoke(main, ["donors", "list"]).output


def test_donors_add_that_cannot_write_its_bank_fails_with_exit_3_and_json(data_home, tmp_path, samples_dir):
    """Every error was exit 2, a usage error, with no JSON document under --json: a bank whose
    folder cannot be made (a file in its way) said "cannot lock the bank (File exists)"."""
    (tmp_path / "afile").write_text("not a folder")
    photo = str(samples_dir / "grace_hopper.jpg")
    result = CliRunner().invoke(
        main, ["donors", "add", photo, "--bank", str(tmp_path / "afile" / "bank"), "--licence", "x", "--json"]
    )
    assert result.exit_code == 3, result.output
    document = json.loads(result.stdout.splitlines()[0])
    assert document["exit_code"] == 3 and "a file is in the way of its folder" in document["error"]
    result = CliRunner().invoke(main, ["donors", "add", photo, "--bank", "bad name!", "--json"])
    assert result.exit_code == 2 and json.loads(result.stdout.splitlines()[0])["exit_code"] == 2


def test_a_bank_built_with_other_models_is_a_usage_error_before_any_work(bank, data_home, lfw_dir, tmp_path):
    """It was found once the models were loaded: printed twice, and the photo failed (exit 3)."""
    other = bank_folder("other-models")
    shutil.copytree(bank.folder, other)
    manifest = json.loads((other / "bank.json").read_text())
    manifest["models"]["dlib-resnet"]["fingerprint"] = "0" * 12  # as if built with another dlib card
    (other / "bank.json").write_text(json.dumps(manifest))
    photo = str(sorted(_people(lfw_dir / "images", 10, 10_000)[0].glob("*.jpg"))[0])
    out = tmp_path / "out"
    result = CliRunner().invoke(
        main, ["anonymize", photo, "-o", str(out), "--method", "replace", "--donors", "other-models"]
    )
    assert result.exit_code == 2 and "facecloak donors refresh other-models" in result.stderr
    assert result.stderr.count("was built with models") == 1 and "photo(s) to do" not in result.stderr
    assert not out.exists()


def test_keep_mouth_leaves_the_persons_lips_and_replaces_the_rest(bank, models, detector, targets):
    """With ``keep_mouth`` the middle of the person's mouth is their own pixels, exactly; the eyes
    are new as without it. Through `FaceReplacer` (as ``--keep-mouth`` runs it), the new face still
    passes every check and its record says so."""
    images, faces = targets
    image, landmarks = images[1], faces.landmarks[1]
    chips, points = bank.chips([0, 1, 2]), bank.points[:3]
    warps = donor_warps(points.mean(0), points, chips)
    made = {
        keep: synthesize_face(
            image, landmarks, chips, points, settings=SynthesisSettings(keep_mouth=keep), warps=warps
        )
        for keep in (False, True)
    }
    mouth = landmarks[3:].mean(0)
    eyes = landmarks[:2]

    def patch(result, centre) -> torch.Tensor:
        x0, y0 = result.box[:2]
        x, y = int(centre[0]) - x0, int(centre[1]) - y0
        return result.pixels[:, y - 1 : y + 2, x - 2 : x + 3]

    def original(result, centre) -> torch.Tensor:
        x, y = int(centre[0]), int(centre[1])
        return image[:, y - 1 : y + 2, x - 2 : x + 3]

    assert torch.equal(patch(made[True], mouth), original(made[True], mouth))
    assert (patch(made[False], mouth) - original(made[False], mouth)).abs().amax() > 0.05
    for keep in (False, True):
        for eye in eyes:
            assert (patch(made[keep], eye) - original(made[keep], eye)).abs().amax() > 0.05, (keep, eye)
    replacer = FaceReplacer(bank, models, detector=detector, seed=0, prefer_beyond=1.2, keep_mouth=True)
    assert replacer.settings.keep_mouth and not FaceReplacer(bank, models).settings.keep_mouth
    result = replacer(images[1:2], faces.select([1]).shifted(-1))
    record = result.records[0]
    if record["method"] == "replace":
        assert torch.equal(
            result.images[0][:, int(mouth[1]), int(mouth[0])], image[:, int(mouth[1]), int(mouth[0])]
        )
    assert bool(result.protected[0]), record


def test_replace_faces_api_and_anonymizer(bank, models, detector, targets):
    from facecloak.anonymize import Anonymizer

    images, faces = targets
    small_bank = {"prefer_beyond": 1.2, "donor_margin": 1.0}  # 12 donors: see `replaced`
    result = replace_faces(images[:1], faces.select([0]), bank, models=models, **small_bank)
    assert result.records[0]["method"] == "replace" and len(result.images) == 1
    out = Anonymizer("replace", bank=bank, models=models, **small_bank)(images[0][None], faces.select([0]))
    assert torch.equal(out[0], result.images[0])


# -- the pure parts --------------------------------------------------------------------------------


def test_thin_plate_interpolates_its_control_points():
    generator = torch.Generator().manual_seed(0)
    source = torch.rand(2, 9, 2, generator=generator) * 100
    target = source + torch.randn(2, 9, 2, generator=generator) * 3
    params = fit_thin_plate(source, target)  # lightly regularised: within a tenth of a pixel
    assert torch.allclose(apply_thin_plate(params, source, source), target, atol=0.1)
    shift = fit_thin_plate(source, source + 5.0)  # an affine map is reproduced everywhere
    points = torch.rand(2, 20, 2) * 100
    assert torch.allclose(apply_thin_plate(shift, source, points), points + 5.0, atol=1e-2)


def test_lab_round_trip_and_known_colours():
    colours = torch.rand(1, 3, 8, 8)
    assert torch.allclose(lab_to_rgb(rgb_to_lab(colours)), colours, atol=1e-4)
    white = rgb_to_lab(torch.ones(1, 3, 1, 1)).flatten()
    assert torch.allclose(white, torch.tensor([100.0, 0.0, 0.0]), atol=0.05)


def test_pose_of_a_frontal_template_and_a_turned_face():
    frontal = torch.tensor([CANONICAL_TEMPLATE])
    assert float(estimate_pose(frontal).abs().max()) < 0.05
    turned = frontal.clone()
    turned[0, 2, 0] += 10  # nose to the viewer's right
    assert float(estimate_pose(turned)[0, 0]) > 0.1


def test_part_weights_sum_to_one():
    points = torch.rand(50, 2) * 256
    for count in (2, 3, 5):
        weights = part_weights(points, count)
        assert weights.shape == (count, 50) and torch.allclose(weights.sum(0), torch.ones(50))
    # with two donors the second (the replacer's pick for expression) gives the mouth, not the nose
    (_, eye_y), _, (nose_x, nose_y), (_, mouth_y), _ = CANONICAL_TEMPLATE
    mouth, nose = torch.tensor([nose_x, mouth_y + 0.02 * (mouth_y - eye_y)]), torch.tensor([nose_x, nose_y])
    assert part_weights(mouth, 2)[1] > 0.9 and part_weights(nose, 2)[0] > 0.9
    assert part_weights(mouth, 3)[2] > 0.9 and part_weights(nose, 3)[1] > 0.9


def test_synthesis_changes_only_inside_its_weight(bank, targets):
    images, faces = targets
    result = synthesize_face(images[0], faces.landmarks[0], bank.chips([0, 1, 2]), bank.points[:3])
    x0, y0, x1, y1 = result.box
    outside = result.weight[0] == 0
    assert torch.equal(result.pixels[:, outside], images[0][:, y0:y1, x0:x1][:, outside])
    assert float(result.weight.max()) == 1.0


def test_a_grey_photo_gets_a_grey_face(bank, targets):
    """Colour donors on a black-and-white photo: the new face is grey too (it came out tinted)."""
    from facecloak.transforms import is_grey, to_grey

    images, faces = targets
    grey = to_grey(images[0][None])[0]
    coloured = synthesize_face(images[0], faces.landmarks[0], bank.chips([0, 1, 2]), bank.points[:3])
    result = synthesize_face(grey, faces.landmarks[0], bank.chips([0, 1, 2]), bank.points[:3])
    inside = result.weight[0] > 0
    assert float((coloured.pixels.amax(0) - coloured.pixels.amin(0))[inside].max()) > 0.02
    assert bool(is_grey(result.pixels[None])[0])
    x0, y0, x1, y1 = result.box
    assert float((result.pixels - grey[:, y0:y1, x0:x1])[:, inside].abs().mean()) > 0.02  # still replaced
    # a scan stored in colour: grey up to a level's noise a channel. It kept half the donors' colour
    # (the chroma gain's floor): a spread of 12 levels on lips and eyes, against 2 in the photo
    noise = torch.randint(-1, 2, grey.shape, generator=torch.Generator().manual_seed(0)) / 255
    scan = (grey + noise).clamp(0, 1)
    result = synthesize_face(scan, faces.landmarks[0], bank.chips([0, 1, 2]), bank.points[:3])
    assert float((result.pixels.amax(0) - result.pixels.amin(0))[inside].max()) <= 3 / 255


def test_eye_share_leans_only_the_eyes_to_their_donor(bank, targets):
    images, faces = targets
    chips, points = bank.chips([0, 1, 2]), bank.points[:3]
    warps = donor_warps(points.mean(0), points, chips)

    def made(eye_share: float):
        settings = SynthesisSettings(eye_share=eye_share, grain=0.0)
        return synthesize_face(images[0], faces.landmarks[0], chips, points, settings=settings, warps=warps)

    plain, leaning, whole = made(0.5), made(0.8), made(1.0)
    # the eyes' band: the rows above the eye line plus a fifth of an eye distance
    eye_row = float(faces.landmarks[0, :2, 1].mean())
    unit = float((faces.landmarks[0, 1] - faces.landmarks[0, 0]).norm())
    top = plain.box[1]
    eyes = slice(0, max(1, int(eye_row + 0.2 * unit) - top))
    mouth = slice(int(eye_row + 1.2 * unit) - top, None)

    def gap(a, b, rows):
        return float((a.pixels[:, rows] - b.pixels[:, rows]).abs().mean())

    # the structure there moves linearly toward the eye donor's: 0.8 is 2/5 of 0.5's way from 1.0
    assert gap(leaning, whole, eyes) < 0.6 * gap(plain, whole, eyes)
    assert gap(plain, whole, eyes) > 1e-3
    # and nothing below the eyes' band moves (up to the band's soft edge)
    assert gap(plain, leaning, mouth) < 0.05 * gap(plain, leaning, eyes)


def test_bank_folder_accepts_names_and_paths(data_home, tmp_path):
    assert bank_folder("mine") == data_home / "facecloak" / "donors" / "mine"
    with pytest.raises(DonorBankError):
        bank_folder("bad name!")


def test_a_bank_named_with_a_space_opens_by_the_name_donors_list_shows(data_home, tmp_path, monkeypatch):
    """A bank folder ``my bank`` (made by its path, or copied into the data folder) was listed by
    ``donors list`` under a name every command refused ("must be letters, digits..."): only its
    path opened it. Its name now works, and the commands facecloak prints quote it."""
    monkeypatch.chdir(tmp_path)  # no folder of that name beside: the name alone must find it
    folder = data_home / "facecloak" / "donors" / "my bank"
    folder.mkdir(parents=True)
    (folder / "bank.json").write_text(json.dumps({"format": 1, "donors": [], "models": {}}))
    assert bank_folder("my bank") == folder
    with pytest.raises(DonorBankError, match="--bank 'my bank'"):  # pasted into a shell: one bank
        load_bank("my bank")
    runner = CliRunner()
    listed = runner.invoke(main, ["donors", "list"])
    assert listed.exit_code == 0 and "my bank" in listed.output, listed.output
    shown = runner.invoke(main, ["donors", "list", "my bank"])
    assert shown.exit_code == 0 and shown.output.startswith("my bank: 0 donor(s)"), shown.output
    for bad in ("bad name!", " my bank", "my bank "):  # still one safe folder name, no edge spaces
        with pytest.raises(DonorBankError):
            bank_folder(bad)
    removed = runner.invoke(main, ["donors", "remove", "my bank"])
    assert removed.exit_code == 0 and not folder.exists(), removed.output


def test_a_bank_name_means_the_listed_bank_not_a_copy_of_that_name_beside_it(
    data_home, tmp_path, monkeypatch
):
    # `donors remove twin` run in a folder holding a copy called twin deleted the copy, and said
    # it had removed bank twin: the bank `donors list` names stayed
    manifest = json.dumps({"format": 1, "donors": [], "models": {}})
    listed, beside = data_home / "facecloak" / "donors" / "twin", tmp_path / "twin"
    for folder in (listed, beside):
        folder.mkdir(parents=True)
        (folder / "bank.json").write_text(manifest)
    monkeypatch.chdir(tmp_path)
    assert bank_folder("twin") == listed
    remove_donors("twin")
    assert not listed.exists() and (beside / "bank.json").is_file()
    assert bank_folder("twin") == Path("twin")  # with no bank of that name listed, the folder here


def test_removing_a_bank_that_is_not_there_leaves_no_folder_or_lock_behind(data_home, tmp_path):
    """`donors remove new/deep/bank` (a typo) made ``new/deep/`` and a ``.bank.lock`` in it, then
    said there was no such bank; a mistyped name left a lock file in the data folder."""
    with pytest.raises(DonorBankError, match="no donor bank"):
        remove_donors(tmp_path / "new" / "deep" / "bank")
    assert not (tmp_path / "new").exists()
    with pytest.raises(DonorBankError, match="no donor bank"):
        remove_donors("no-such-bank-typo")
    assert not (data_home / "facecloak" / "donors" / ".no-such-bank-typo.lock").exists()


def test_removing_a_bank_linked_into_the_data_folder_removes_the_link_not_its_folder(data_home, tmp_path):
    """`donors remove linked` of a bank symlinked in ended in rmtree's traceback."""
    real = tmp_path / "realbank"
    real.mkdir()
    (real / "bank.json").write_text(json.dumps({"format": 1, "donors": [], "models": {}}))
    linked = data_home / "facecloak" / "donors" / "linked"
    linked.parent.mkdir(parents=True, exist_ok=True)
    linked.symlink_to(real)
    assert remove_donors("linked") == 0
    assert not linked.is_symlink() and (real / "bank.json").is_file()


def test_evaluator_adapter_records_realism_and_donor_matches(bank, models, detector, targets, monkeypatch):
    from facecloak.evaluate import PersonProtector, PipelineAttacker
    from facecloak.protection import ReplaceFaces

    images, _ = targets
    replacer = FaceReplacer(  # 12 donors: see `replaced`
        bank, models, detector=detector, prefer_beyond=1.2, donor_margin=1.0
    )
    protect = PersonProtector(ReplaceFaces(replacer), detector, [PipelineAttacker(models[0], detector)])
    images = [images[0], images[3]]  # two the 12 donors can replace (see the first test)
    outputs, records = protect(images, [Path("a.jpg"), Path("b.jpg")], "someone")
    assert len(outputs) == 2 and len(records) == 2
    for record in records:
        realism = record["realism"]
        assert realism["found"] and realism["score_protected"] > 0.9
        assert 0.3 < realism["detail_protected"] < 3.0
        assert record["donor_match"] == {"dlib-resnet": False}
        assert record["donor_distance"]["dlib-resnet"] >= 1.0 and "photo" not in record
    # the summary counts replaced subjects apart from any blurred fallback
    from facecloak.evaluate.summary import quality_summary

    replaced_subjects = sum(r["replace"][r["realism"]["face"]]["method"] == "replace" for r in records)
    summary = quality_summary(images, outputs, records)
    assert summary["realism"]["replaced_subjects"] == replaced_subjects == 2
    assert summary["realism"]["redetected_replaced"] == 1.0
    assert summary["replace"]["photos_matching_a_donor"] == {}
    # a subject within a donor's threshold is named, with its distance, in the summary
    records[1].update(donor_match={"dlib-resnet": True}, donor_distance={"dlib-resnet": 0.97}, photo="b.jpg")
    named = quality_summary(images, outputs, records)["replace"]
    assert named["photos_matching_a_donor"] == {"b.jpg": {"dlib-resnet": 0.97}}
    assert named["subjects_matching_a_donor"] == {"dlib-resnet": 0.5}
    # a match names the photo with its person: two people's 1.jpg were one key, one match lost
    import facecloak.evaluate.protect as protect_module

    monkeypatch.setattr(protect_module, "embedding_distance", lambda a, b, metric: torch.zeros(len(a), 1))
    _, matched = protect(images[:1], [Path("Alice") / "1.jpg"], "Alice")
    assert matched[0]["photo"] == "Alice/1.jpg"


def test_a_turned_face_narrows_only_the_side_turned_away():
    """far_side_shrink keeps the new face off the hair and background behind a turned face's far cheek."""
    from facecloak.synthesis import SynthesisSettings, region_weight

    template = torch.tensor(CANONICAL_TEMPLATE)
    unit = float((template[1] - template[0]).norm())
    centre_x, centre_y = float(template[:2, 0].mean()), float(template[2, 1])
    left = torch.tensor([centre_x - 0.85 * unit, centre_y])
    right = torch.tensor([centre_x + 0.85 * unit, centre_y])
    points = torch.stack([left, right])
    plain = region_weight(points, SynthesisSettings(far_side_shrink=0.0), yaw=0.4)
    shrunk = region_weight(points, SynthesisSettings(far_side_shrink=1.0), yaw=0.4)  # nose to the right
    assert torch.equal(shrunk, region_weight(points, SynthesisSettings(), yaw=0.4))  # on by default
    frontal = region_weight(points, SynthesisSettings(), yaw=0.0)
    assert torch.equal(frontal, region_weight(points, SynthesisSettings(far_side_shrink=0.0), yaw=0.0))
    assert float(shrunk[0]) == float(plain[0]) > 0  # the near (left) side keeps its reach
    assert float(shrunk[1]) == 0 < float(plain[1])  # the far (right) side ends sooner
    mirrored = region_weight(points, SynthesisSettings(far_side_shrink=1.0), yaw=-0.4)
    assert torch.allclose(mirrored, shrunk.flip(0))


def test_a_turned_face_keeps_the_background_behind_its_far_cheek(bank, lfw_dir, detector):
    """On a real turned face (LFW, yaw -0.39) no new pixel lands half an eye distance past the far eye.

    Without the narrowing (far_side_shrink 0) the new face reached there, over the curtain behind
    the cheek (seen at 2x: skin and a second nose on the background); the near side is unchanged.
    """
    from facecloak.synthesis import SynthesisSettings, estimate_pose, eye_distance, synthesize_face

    image = io.read_image(lfw_dir / "images" / "Paul_Bremer" / "Paul_Bremer_0002.jpg").pixels
    found = detector([image])
    landmarks = found.landmarks[centre_face(found, 250, 250)]
    assert float(estimate_pose(landmarks[None])[0, 0]) < -0.3  # nose to the viewer's left: far side left
    unit = float(eye_distance(landmarks[None])[0])
    rows = [0, 1, 2]

    def reach(settings: SynthesisSettings) -> tuple[int, int]:
        made = synthesize_face(image, landmarks, bank.chips(rows), bank.points[rows], settings=settings)
        x0, y0, x1, y1 = made.box
        xs = torch.arange(x0, x1, dtype=torch.float32).expand(y1 - y0, -1)
        changed = made.weight[0] > 0
        far = int((changed & (xs < float(landmarks[0, 0]) - 0.5 * unit)).sum())
        near = int((changed & (xs > float(landmarks[1, 0]) + 0.5 * unit)).sum())
        return far, near

    far, near = reach(SynthesisSettings(grain=0.0))
    far_before, near_before = reach(SynthesisSettings(grain=0.0, far_side_shrink=0.0))
    assert far == 0 < 100 < far_before
    assert near == near_before > 0


def test_donor_warps_of_several_faces_at_once_equal_one_at_a_time(bank):
    """The replacer registers every face's donors in one call: the same warps as face by face."""
    sets = [[0, 1, 2], [3, 4, 5], [2, 6, 7]]
    chips = torch.stack([bank.chips(rows) for rows in sets])
    points = torch.stack([bank.points[rows] for rows in sets])
    together = donor_warps(points.mean(1), points, chips)
    for k in range(len(sets)):
        alone = donor_warps(points[k].mean(0), points[k], chips[k])
        assert torch.allclose(together[k], alone, atol=1e-3)
    moved = (together - donor_warps(points.mean(1), points, chips, register=False)).abs()
    assert float(moved.amax()) > 0.5  # the registration did move the donors beyond the spline


def test_a_face_larger_than_its_donors_is_reported_softer(bank, models, detector, samples_dir, targets):
    """Grace Hopper's face is about twice an LFW donor's: the summary says it is soft, and why.

    With donors from photos three times larger but no detail chips (a bank made before them), the
    chip the new face is read from limits it instead (her eyes are 88 px apart, the chip's 56):
    still soft, and the summary says the donors are not the cause.
    """
    from facecloak.batch_types import BatchReport, FileOutcome
    from facecloak.defaults import SOFT_DONOR_UPSCALE

    photo = io.read_image(samples_dir / "grace_hopper.jpg").pixels
    large = detector([photo])
    lfw_images, lfw_faces = targets
    replacer = FaceReplacer(bank, models, detector=detector, seed=0, prefer_beyond=1.2, donor_margin=1.0)
    records = replacer([photo], large).records + replacer(lfw_images[:1], lfw_faces.select([0])).records
    assert [r["method"] for r in records] == ["replace", "replace"], records
    assert records[0]["donor_upscale"] >= SOFT_DONOR_UPSCALE > records[1]["donor_upscale"]
    assert [r["detail_limit"] for r in records] == ["donors", "donors"]
    outcomes = [
        FileOutcome("grace_hopper.jpg", "protected", faces=[records[0]]),
        FileOutcome("lfw.jpg", "protected", faces=[records[1]]),
    ]
    summary = str(BatchReport("anonymize", {}, outcomes))
    assert "1 replaced face(s) softer than their photo" in summary
    assert f"grace_hopper.jpg: {records[0]['donor_upscale']:.2f}x its smallest donor" in summary
    assert "lfw.jpg" not in summary.split("softer than their photo")[1]

    as_if_larger = [
        dict(donor, landmarks=[[3 * x, 3 * y] for x, y in donor["landmarks"]]) for donor in bank.donors
    ]
    from_larger = FaceReplacer(
        replace(bank, donors=as_if_larger),
        models,
        detector=detector,
        seed=0,
        prefer_beyond=1.2,
        donor_margin=1.0,
    )
    record = from_larger([photo], large).records[0]
    assert record["detail_limit"] == "chip"
    eyes = float((large.landmarks[0][1] - large.landmarks[0][0]).norm())
    assert record["donor_upscale"] == pytest.approx(eyes / CHIP_EYE_DISTANCE_PX, abs=0.01)
    assert record["donor_upscale"] >= SOFT_DONOR_UPSCALE
    summary = str(
        BatchReport("anonymize", {}, [FileOutcome("grace_hopper.jpg", "protected", faces=[record])])
    )
    assert "the chips its new face is read from" in summary and "smallest donor" not in summary


def _textured_large_photos(donor_dir: Path, count: int) -> list[torch.Tensor]:
    """LFW donor photos at 3x, with a fine texture (2 px checks) only a detail chip can hold."""
    photos = []
    for path in sorted(donor_dir.glob("*.jpg"))[:count]:
        pixels = F.interpolate(io.read_image(path).pixels[None], scale_factor=3, mode="bicubic")[0]
        ys, xs = torch.meshgrid(torch.arange(750), torch.arange(750), indexing="ij")
        checks = ((ys // 2 + xs // 2) % 2).float() * 2 - 1
        photos.append((pixels + 0.06 * checks).clamp(0, 1))
    return photos


def test_a_large_face_reads_its_pixels_from_detail_chips(donor_dir, detector, samples_dir):
    """Donors from large photos: a large new face holds detail a 256 px chip cannot, in the same place."""
    photos = _textured_large_photos(donor_dir, 3)
    found = detector(photos)
    first = [int((found.image_index == i).nonzero()[0, 0]) for i in range(3)]
    donors = found.select(first)
    stacked = torch.stack(photos)
    chips, points = canonical_chips(stacked, donors.landmarks, donors.image_index)
    detail, detail_points = canonical_chips(stacked, donors.landmarks, donors.image_index, DETAIL_SCALE)
    assert detail.shape[-1] == DETAIL_SCALE * chips.shape[-1] and torch.equal(points, detail_points)
    photo = io.read_image(samples_dir / "grace_hopper.jpg").pixels
    face = detector([photo])
    assert float((face.landmarks[0, 1] - face.landmarks[0, 0]).norm()) > DETAIL_FROM * CHIP_EYE_DISTANCE_PX
    settings = SynthesisSettings(grain=0.0)
    plain = synthesize_face(photo, face.landmarks[0], chips, points, settings=settings)
    fine = synthesize_face(photo, face.landmarks[0], chips, points, settings=settings, detail_chips=detail)
    assert plain.box == fine.box
    inside = (plain.weight > 0.9).expand(3, -1, -1)

    def fine_detail(pixels):  # what a 3 px blur takes away: the checks, the edges
        return (pixels - gaussian_blur(pixels[None], 1.0)[0])[inside].std()

    assert float(fine_detail(fine.pixels)) > 1.5 * float(fine_detail(plain.pixels))
    # the same face, finer: both chips are read at the same places
    coarse_gap = (gaussian_blur(fine.pixels[None], 3.0) - gaussian_blur(plain.pixels[None], 3.0))[0][inside]
    assert float(coarse_gap.abs().mean()) < 0.004  # 0.0008; a chip pixel off: 0.012


def test_a_folder_added_in_small_blocks_gives_the_same_bank(
    tmp_path, bank, donor_dir, models, detector, monkeypatch
):
    """`EMBED_BLOCK`: donors are embedded and written a block at a time (bounded memory); blocks
    of 5 give the bank one block gives: the same ids, chips and embeddings, in the same order."""
    from facecloak import donors as donors_module

    monkeypatch.setattr(donors_module, "EMBED_BLOCK", 5)
    report = add_donors(
        [donor_dir], models, bank=tmp_path / "blocks", licence="LFW, research use", detector=detector
    )
    assert len(report.added) == DONORS
    blocks = load_bank(tmp_path / "blocks")
    assert blocks.ids == bank.ids
    assert torch.equal(blocks.chips(list(range(DONORS))), bank.chips(list(range(DONORS))))
    for model in models:
        name = model.card.name
        assert torch.allclose(blocks.embeddings[name], bank.embeddings[name], atol=1e-5), name


def test_a_bank_keeps_detail_chips_of_large_donor_photos(tmp_path, donor_dir, models, detector):
    """Large donor photos keep a 2x chip (written, read, removed); small ones give their chip upscaled."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for k, pixels in enumerate(_textured_large_photos(donor_dir, 2)):
        io.write_image(folder / f"large_{k}.png", pixels)
    shutil.copy(sorted(donor_dir.glob("*.jpg"))[2], folder / "small.jpg")
    report = add_donors([folder], models[:1], bank=tmp_path / "bank", licence="test", detector=detector)
    assert len(report.added) == 3
    bank = load_bank(tmp_path / "bank")
    assert [bank.detail_scale(row) for row in range(3)] == [DETAIL_SCALE, DETAIL_SCALE, 1]
    large_id = bank.ids[0]
    assert (bank.folder / "chips" / f"{large_id}@{DETAIL_SCALE}x.jpg").is_file()
    detail = bank.detail_chips([0, 2])
    assert detail.shape == (2, 3, DETAIL_SCALE * CHIP_SIZE_PX, DETAIL_SCALE * CHIP_SIZE_PX)
    # a detail chip is its chip, finer: the same face at the same place
    coarse = F.avg_pool2d(detail, DETAIL_SCALE)
    assert float((coarse - bank.chips([0, 2])).abs().mean()) < 0.01
    remove_donors(tmp_path / "bank", [large_id])
    assert not (bank.folder / "chips" / f"{large_id}@{DETAIL_SCALE}x.jpg").exists()


WITH_GLASSES = (
    "Bill_Gates_0001",
    "Colin_Powell_0001",
    "David_Stern_0001",
    "Gerry_Adams_0001",
    "Placido_Domingo_0001",
    "Ricardo_Sanchez_0001",
    "Sean_Patrick_OMalley_0001",
)
BARE = (
    "Anna_Kournikova_0001",
    "Brad_Garrett_0001",
    "Doris_Roberts_0001",
    "Kalpana_Chawla_0001",
    "King_Abdullah_II_0001",
    "Oscar_De_La_Hoya_0001",
    "Steve_Ballmer_0001",
    "Vicente_Fox_0001",
)
"""LFW photos labelled by eye: spectacles (thin metal rims, rimless, thick frames) or none. The bare
ones include four that got a ghost of a donor's frames before donors were matched on glasses."""


def test_glasses_strength_tells_faces_with_spectacles_from_bare_ones(lfw_dir, detector):
    """Every face with glasses measures stronger than every bare one; the bare ones lie under
    GLASSES_FROM (no glasses as far as the donor choice is concerned)."""

    def strength(stem: str) -> float:
        image = io.read_image(lfw_dir / "images" / stem[:-5] / f"{stem}.jpg").pixels
        faces = detector([image])
        face = faces.select([centre_face(faces, 250, 250)])
        chips, _ = canonical_chips(image[None], face.landmarks, torch.zeros(1, dtype=torch.long))
        measured = float(glasses_strength(rgb_to_lab(chips)[:, :1])[0])
        assert measured == pytest.approx(float(face_statistics(chips)[0, -1]))
        return measured

    glasses, bare = [strength(s) for s in WITH_GLASSES], [strength(s) for s in BARE]
    assert min(glasses) > max(bare), (glasses, bare)
    assert max(bare) < GLASSES_FROM + 0.6, bare


def _donor_choice_inputs(image: torch.Tensor, face, models) -> tuple[tuple, dict]:
    """What `FaceReplacer._donor_sets` takes for one face: (pose, smile, statistics), embeddings."""
    chips, _ = canonical_chips(image[None], face.landmarks, torch.zeros(1, dtype=torch.long))
    plan = (estimate_pose(face.landmarks)[0], mouth_width(face.landmarks)[0], face_statistics(chips)[0])
    return plan, {m.card.name: embed_faces([image], face, m)[0] for m in models}


def test_a_bare_face_is_not_given_a_donor_with_glasses(bank, models, targets, monkeypatch):
    """On 40 LFW faces, 7 bare ones came out with a ghost of a donor's spectacle frames across the
    eyes: the donor ranked first for a bare face drops out of its first set once it wears glasses,
    and nothing but the glasses cost drops it."""
    images, faces = targets
    replacer = FaceReplacer(bank, models, seed=0, prefer_beyond=1.2)
    plan, target = _donor_choice_inputs(images[0], faces.select([0]), models)
    assert float(plan[2][-1]) < GLASSES_FROM, "the target must be a bare face"
    favourite = replacer._donor_sets(*plan, target, 0)[0][0][0]
    original = bank.stats
    spectacled = original.clone()
    spectacled[favourite, -1] = 20.0  # as strong as thick frames

    def first_set(stats: torch.Tensor) -> tuple[int, ...]:
        try:
            bank.stats = stats
            return replacer._donor_sets(*plan, target, 0)[0][0]
        finally:
            bank.stats = original

    assert favourite not in first_set(spectacled)
    monkeypatch.setattr("facecloak.replace.GLASSES_COST", 0.0)
    assert first_set(spectacled) == first_set(original)


def test_a_bank_from_before_a_new_statistic_gets_it_from_its_chips(
    bank, models, detector, donor_dir, tmp_path
):
    """A bank whose donors carry one statistic fewer (made before `glasses`) still loads: the
    statistics are computed from its stored chips, the same as a new bank's; adding donors to it
    stores them."""
    old = tmp_path / "old-bank"
    shutil.copytree(bank.folder, old)
    manifest = json.loads((old / "bank.json").read_text())
    for donor in manifest["donors"]:
        donor["stats"] = donor["stats"][:-1]
    (old / "bank.json").write_text(json.dumps(manifest))
    loaded = load_bank(old)
    assert loaded.stats.shape == bank.stats.shape
    torch.testing.assert_close(loaded.stats, bank.stats, atol=1e-3, rtol=0)
    assert not loaded._chips, "the chips read for it are not kept"
    photo = tmp_path / "another_copy.png"  # a photo the bank holds, by path or bytes, is not added again
    from PIL import Image

    Image.open(sorted(donor_dir.glob("*.jpg"))[0]).save(photo)
    add_donors([photo], models, bank=str(old), licence="LFW, research use", detector=detector)
    stored = json.loads((old / "bank.json").read_text())["donors"]
    assert len(stored) == len(bank) + 1
    assert all(len(donor["stats"]) == bank.stats.shape[1] for donor in stored)


def test_a_face_cut_off_by_the_photos_edge_is_no_donor(lfw_dir, models, detector, data_home, tmp_path):
    """A face at a photo's edge is detected with landmarks beyond it; as a donor its chip was half
    black or showed the person beside it (4 of 296 LFW donors). The largest face of this LFW photo
    is such a man; the donor taken from it is the photo's subject instead, and a crop holding
    only him is skipped with the reason. The photo's size is stored, so a loaded bank knows."""
    photo = lfw_dir / "images" / "Alberta_Lee" / "Alberta_Lee_0001.jpg"
    image = io.read_image(photo)
    faces = detector([image.pixels])
    outside = window_outside_share(faces.landmarks, *image.size)
    sides = (faces.boxes[:, 2:] - faces.boxes[:, :2]).amin(1)
    assert float(outside[sides.argmax()]) > 0.5, "the largest face must be the one cut off"
    report = add_donors([photo], models, bank=str(tmp_path / "edge"), licence="LFW", detector=detector)
    bank = load_bank(tmp_path / "edge")
    assert len(report.added) == 1 and bank.donors[0]["photo_size"] == [250, 250]
    assert float(bank.outside[0]) == 0.0 and bool(bank.usable[0])
    centre = torch.tensor(bank.donors[0]["box"]).view(2, 2).mean(0)
    assert (centre - 125).abs().max() < 40, "the subject at the centre, not the man at the edge"

    crop = tmp_path / "only_him.png"
    io.write_image(crop, image.pixels[:, 90:250, 0:100])
    skipped = add_donors([crop], models, bank=str(tmp_path / "edge"), licence="LFW", detector=detector)
    assert not skipped.added
    assert len(skipped.skipped) == 1 and "cut off by the photo's edge" in skipped.skipped[0][1]


def test_a_cut_off_donor_of_an_older_bank_is_found_by_refresh_and_never_used(
    bank, models, detector, targets, tmp_path
):
    """A bank made before photo sizes were stored cannot tell a cut-off donor (every donor counts
    as usable); `refresh` reads each source photo's size again, and a donor cut off by its edge is
    then never in a set the replacer tries."""
    old = tmp_path / "old-bank"
    shutil.copytree(bank.folder, old)
    manifest = json.loads((old / "bank.json").read_text())
    for donor in manifest["donors"]:
        donor.pop("photo_size")
    # the first donor as if its photo had been cropped through its face: 100 px wide
    manifest["donors"][0]["source"] = str(tmp_path / "cropped.png")
    source = io.read_image(Path(bank.donors[0]["source"])).pixels
    io.write_image(tmp_path / "cropped.png", source[:, :, :100])
    (old / "bank.json").write_text(json.dumps(manifest))
    loaded = load_bank(old)
    assert bool(loaded.outside.isnan().all()) and bool(loaded.usable.all())
    assert loaded.summary()["unmeasured"] == len(bank)
    listed = CliRunner().invoke(main, ["donors", "list", str(old)])
    assert f"{len(bank)} donor(s) added before photo sizes were stored" in listed.output
    refreshed = refresh_bank(old, models, detector)
    assert refreshed.donors[0]["photo_size"] == [100, 250]
    assert not bool(refreshed.usable[0]) and bool(refreshed.usable[1:].all())
    assert refreshed.summary()["cut_off"] == 1 and refreshed.summary()["unmeasured"] == 0
    listed = CliRunner().invoke(main, ["donors", "list", str(old)]).output
    assert "1 donor(s) cut off by their photo's edge" in listed
    assert f"{bank.ids[0]}  licence: LFW, research use  CUT OFF (not used)" in listed

    images, faces = targets
    plan, target = _donor_choice_inputs(images[0], faces.select([0]), models)
    replacer = FaceReplacer(bank, models, seed=0, prefer_beyond=1.2)
    favourite = replacer._donor_sets(*plan, target, 0)[0][0][0]
    original = bank.outside
    try:
        bank.outside = original.clone()
        bank.outside[favourite] = 0.5
        sets = replacer._donor_sets(*plan, target, 0)
    finally:
        bank.outside = original
    assert sets and not any(favourite in rows for rows, _ in sets)


def test_a_donor_turned_away_from_the_face_is_not_chosen(bank, models, detector, targets, monkeypatch):
    """Five points cannot warp a turned face onto a frontal one (its eyes come out doubled): the
    donor ranked first for a face drops out of every set a replacement tries once it is turned a
    little more than MAX_YAW_GAP away from that face; its pose cost alone keeps it in one of the
    first three."""
    images, faces = targets
    replacer = FaceReplacer(bank, models, detector=detector, seed=0, prefer_beyond=1.2)
    plan, target = _donor_choice_inputs(images[0], faces.select([0]), models)
    pose = plan[0]
    favourite = replacer._donor_sets(*plan, target, 0)[0][0][0]
    assert int(((bank.pose[:, 0] - pose[0]).abs() <= MAX_YAW_GAP).sum()) >= 4, "too few frontal donors"
    original = bank.pose
    turned = original.clone()
    # just past MAX_YAW_GAP from the face, on its side: mirrored, it is farther still
    side = 1.0 if float(pose[0]) >= 0 else -1.0
    turned[favourite, 0] = side * (float(pose[0].abs()) + MAX_YAW_GAP + 0.02)

    def first_sets(count: int) -> list[tuple[int, ...]]:
        try:
            bank.pose = turned
            return [rows for rows, _ in replacer._donor_sets(*plan, target, 0)[:count]]
        finally:
            bank.pose = original

    assert not any(favourite in rows for rows in first_sets(replacer.attempts))
    monkeypatch.setattr("facecloak.replace.MAX_YAW_GAP", math.inf)  # the pose cost alone keeps it
    assert any(favourite in rows for rows in first_sets(3))


def test_a_large_face_is_made_from_donors_whose_photos_hold_its_detail(
    bank, models, detector, samples_dir, targets, monkeypatch
):
    """Grace Hopper's eyes are 88 px apart, an LFW donor's about 40. When half the bank's donors come
    from large photos (detail chips), her face is given more of them than without the size cost
    (`RESOLUTION_COST`), whichever half it is; an LFW-sized face, which every donor fills, is given
    the same sets as from the plain bank."""
    photo = io.read_image(samples_dir / "grace_hopper.jpg").pixels
    large_face = detector([photo])
    images, faces = targets
    small_face = faces.select([0])
    eyes = [float((f.landmarks[0, 1] - f.landmarks[0, 0]).norm()) for f in (large_face, small_face)]
    donor_eyes = torch.tensor([donor["landmarks"] for donor in bank.donors]).diff(dim=1)[:, 0].norm(dim=-1)
    held = donor_eyes.clamp(max=CHIP_EYE_DISTANCE_PX)  # what each plain donor's chip can give
    assert eyes[0] > replace_module.RESOLUTION_FREE * float(held.max()), "every plain donor is too small"
    assert eyes[1] <= replace_module.RESOLUTION_FREE * float(held.min()), "every donor fills the LFW face"

    def as_if_from_large_photos(rows: set[int]) -> DonorBank:
        donors = [
            dict(donor, landmarks=[[3 * x, 3 * y] for x, y in donor["landmarks"]], detail_scale=DETAIL_SCALE)
            if row in rows
            else donor
            for row, donor in enumerate(bank.donors)
        ]
        return replace(bank, donors=donors)

    def chosen(mixed: DonorBank, image, face, eye_px: float, count: int = 6) -> list[int]:
        replacer = FaceReplacer(mixed, models, detector=detector, seed=0, prefer_beyond=1.2)
        plan, target = _donor_choice_inputs(image, face, models)
        sets = replacer._donor_sets(*plan, target, 0, eye_px=eye_px)[:count]
        return [row for rows, _ in sets for row in rows]

    halves = [set(range(0, DONORS, 2)), set(range(1, DONORS, 2))]
    shares = []
    for cost in (replace_module.RESOLUTION_COST, 0.0):
        monkeypatch.setattr("facecloak.replace.RESOLUTION_COST", cost)
        for large in halves:
            rows = chosen(as_if_from_large_photos(large), photo, large_face, eyes[0])
            shares.append(sum(row in large for row in rows) / len(rows))
        if cost > 0:
            for large in halves:
                mixed = as_if_from_large_photos(large)
                assert chosen(mixed, images[0], small_face, eyes[1]) == chosen(
                    bank, images[0], small_face, eyes[1]
                )
    with_cost, without = shares[:2], shares[2:]
    assert all(a >= b + 0.1 for a, b in zip(with_cost, without)), shares  # here 0.56 -> 0.72, 0.44 -> 0.61


def test_shading_from_skin_keeps_the_faces_features_out_of_the_new_face(bank, targets):
    """The target's lighting is measured on its skin only, so its eyes, brows and mouth do not come
    back, low-passed, as dark ghosts under the donors' (they move the new face back toward the
    person, too). Painting the target's features over with skin barely changes the new face
    then; measured everywhere, it changes it several times more."""
    images, faces = targets
    image, landmarks = images[0], faces.landmarks[0]
    chips, points = bank.chips([0, 1, 2]), bank.points[:3]
    warps = donor_warps(points.mean(0), points, chips)
    # the target's features, painted over with its mean cheek colour
    template = torch.tensor(CANONICAL_TEMPLATE)
    chip_from_image = estimate_similarity(landmarks[None].double(), template[None].double()).float()
    height, width = image.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    in_chip = transform_points(chip_from_image, torch.stack([xs, ys], -1).view(1, -1, 2))[0]
    features = features_weight(in_chip).view(height, width).bool()
    assert 0.01 < float(features.float().mean()) < 0.5
    skin = image[:, ~features].median(dim=1).values
    painted = image.clone()
    painted[:, features] = skin[:, None]

    def gap(from_skin: bool) -> float:
        settings = SynthesisSettings(shading_from_skin=from_skin, grain=0.0)
        made = [
            synthesize_face(photo, landmarks, chips, points, settings=settings, warps=warps)
            for photo in (image, painted)
        ]
        x0, y0, x1, y1 = made[0].box
        inside = features[y0:y1, x0:x1] & (made[0].weight[0] == 1)
        return float((made[0].pixels - made[1].pixels)[:, inside].abs().mean())

    from_skin, everywhere = gap(True), gap(False)
    assert from_skin < 0.4 * everywhere, (from_skin, everywhere)


def _landing_at(bank, models, detector, one, face, ratio: float) -> dict:
    """Replacer options under which the face's first try lands at ``ratio`` of the margin from the
    original face (and at 1.25 of its donors'): a near miss made to measure."""
    options = dict(detector=detector, seed=0, prefer_beyond=1.2, attempts=1, fallback="keep")
    first = FaceReplacer(bank, models, finish=False, **options)(one, face).records[0]
    assert first["redetected"], first
    reach = min(first["distance_to_original"][m.card.name] / m.card.match_threshold for m in models)
    spare = min(first["distance_to_donors"][m.card.name] / m.card.match_threshold for m in models)
    return dict(options, margin=reach / ratio, donor_margin=spare / 1.25)


def _assert_finished_and_faint(finished, kept, one, face, models, detector, margin: float, most: float):
    """Independently of the check: the finished face is found again after JPEG 75, past ``margin``
    x each threshold from the original face, and differs from the unfinished try by at most
    ``most`` (in 1/255), only around the face."""
    uploaded = [io.jpeg_roundtrip(finished.images[0], 75)]
    for model in models:
        after = _centre_embeddings(uploaded, detector, model)
        distance = float(embedding_distance(after, embed_faces(one, face, model), model.card.distance)[0])
        assert distance > margin * model.card.match_threshold, (model.card.name, distance)
    change = (finished.images[0] - kept.images[0]).abs()
    assert 0 < float(change.max()) <= most / 255
    x0, y0, x1, y1 = face.boxes[0].tolist()
    w, h = x1 - x0, y1 - y0
    outside = torch.ones(change.shape[-2:], dtype=torch.bool)
    outside[int(y0 - 0.2 * h) : int(y1 + 0.2 * h) + 1, int(x0 - 0.2 * w) : int(x1 + 0.2 * w) + 1] = False
    assert float(change[:, outside].max()) == 0.0


def test_a_near_miss_is_finished_by_an_away_cloak_and_then_passes(bank, models, detector, targets):
    """A new face that falls a little short of a threshold is cloaked away from the original face
    and its donors (at `low`, the first of `FINISH_LEVELS`), then checked again. With the margins
    set so that a first try lands at 0.92 of the original's margin (and 1.25 of its donors'), the
    face is blurred without the finish, and replaced with it: a faint change on top of the same
    new face, which passes the independent check."""
    images, faces = targets
    one, face = images[:1], faces.select([0])
    options = _landing_at(bank, models, detector, one, face, 0.92)
    kept = FaceReplacer(bank, models, finish=False, **options)(one, face)
    assert kept.records[0]["reason"] == "still matches the original face" and not bool(kept.protected[0])
    blurred = FaceReplacer(bank, models, finish=False, **dict(options, fallback="blur"))(one, face)
    assert blurred.records[0]["method"] == "blur"
    finished = FaceReplacer(bank, models, **options)(one, face)
    record = finished.records[0]
    assert record["method"] == "replace" and record["finished"] and bool(finished.protected[0]), record
    assert record["finish_level"] == "low" and record["donors"] == kept.records[0]["donors"]
    _assert_finished_and_faint(finished, kept, one, face, models, detector, options["margin"], 12)


def test_a_face_the_low_finish_leaves_short_is_finished_at_mid(bank, models, detector, targets, monkeypatch):
    """A first try landing at 0.87 of the margin is too far for the `low` finish (it fell short
    from about 0.89 down on this face's first donor set) but not for `mid` (which reached from
    about 0.855): the second level of `FINISH_LEVELS` starts again from the unfinished try and
    passes. FINISH_FROM is lowered so the try counts as a near miss wherever the test puts it."""
    images, faces = targets
    one, face = images[:1], faces.select([0])
    options = _landing_at(bank, models, detector, one, face, 0.87)
    monkeypatch.setattr(replace_module, "FINISH_FROM", 0.7)
    monkeypatch.setattr(replace_module, "FINISH_LEVELS", ("low",))
    kept = FaceReplacer(bank, models, **options)(one, face)
    assert not bool(kept.protected[0]) and not kept.records[0]["finished"], kept.records[0]
    monkeypatch.setattr(replace_module, "FINISH_LEVELS", ("low", "mid"))
    finished = FaceReplacer(bank, models, **options)(one, face)
    record = finished.records[0]
    assert bool(finished.protected[0]) and record["finish_level"] == "mid", record
    _assert_finished_and_faint(finished, kept, one, face, models, detector, options["margin"], 16)


KIN_WOMEN = (
    "Amber_Tamblyn",
    "Amy_Pascal",
    "Beatrice_Dalle",
    "Betty_Williams",
    "Brooke_Gordon",
    "Carey_Lowell",
    "Carin_Koch",
    "Catherine_Bell",
    "Charlotte_Rampling",
    "Cindy_Margolis",
)
KIN_MEN = (
    "Aaron_Patterson",
    "Aaron_Sorkin",
    "Abbas_Kiarostami",
    "Alex_Wallau",
    "Arturo_Gatti",
    "Atom_Egoyan",
    "Barry_Zito",
    "Bison_Dele",
    "Brett_Boone",
    "Carlos_Ghosn",
)
"""LFW people with one or two photos, women and men: a labelled donor bank."""


def test_donors_are_matched_on_the_kin_they_share_with_the_face(lfw_dir, detector, data_home, monkeypatch):
    """Of 20 labelled donors, the first set chosen for 5 women and 3 men holds at most one donor of
    the other sex, and fewer such donors in all than without the kin cost (where Caroline Kennedy,
    as on the README's contact sheet, was given two men)."""
    images = lfw_dir / "images"
    folder = data_home / "kin-photos"
    folder.mkdir()
    for name in KIN_WOMEN + KIN_MEN:
        shutil.copy(sorted((images / name).glob("*.jpg"))[0], folder)
    models = [create_embedder("dlib-resnet", device="cpu")]
    add_donors([folder], models, bank="kin-test", licence="LFW, research use", detector=detector)
    bank = load_bank("kin-test")
    people = [Path(donor["source"]).name.rsplit("_", 1)[0] for donor in bank.donors]
    women = {row for row, person in enumerate(people) if person in KIN_WOMEN}
    assert len(women) == len(KIN_WOMEN) and len(bank) == len(KIN_WOMEN) + len(KIN_MEN)
    faces = {
        "Caroline_Kennedy": True,
        "Emmanuelle_Beart": True,
        "Nicole_Kidman": True,
        "Julie_Gerberding": True,
        "Renee_Zellweger": True,
        "Colin_Powell": False,
        "Tiger_Woods": False,
        "Hu_Jintao": False,
    }
    plans = []
    for name in faces:
        image = io.read_image(sorted((images / name).glob("*.jpg"))[0]).pixels
        found = detector([image])
        plans.append(_donor_choice_inputs(image, found.select([centre_face(found, 250, 250)]), models))

    def other_sex() -> list[int]:
        replacer = FaceReplacer(bank, models, seed=0, prefer_beyond=1.2)
        counts = []
        for (plan, target), woman in zip(plans, faces.values()):
            rows = replacer._donor_sets(*plan, target, 0)[0][0]
            counts.append(sum((row in women) != woman for row in rows))
        return counts

    matched = other_sex()
    monkeypatch.setattr("facecloak.replace.KIN_COST", 0.0)
    unmatched = other_sex()
    assert max(matched) <= 1, matched
    assert sum(matched) < sum(unmatched) and max(unmatched) >= 2, (matched, unmatched)


def test_a_replacer_keeping_the_mouth_shares_what_the_bank_costs(bank, models, detector):
    """`FaceReplacer.keeping_mouth`: the other variant, with the same bank, models and kin (not
    related again), and the first replacer left as it was."""
    plain = FaceReplacer(bank, models, detector=detector)
    mouth = plain.keeping_mouth(True)
    assert mouth.settings.keep_mouth and not plain.settings.keep_mouth
    assert mouth._kin is plain._kin and mouth.bank is plain.bank and mouth.models == plain.models
    assert not mouth.keeping_mouth(False).settings.keep_mouth


def test_a_donors_grey_features_stay_grey_in_a_cooler_skin():
    """A donor's colours reach the target's skin by a gain on a* and b*, not by a shift: a shift
    by the skins' difference turned a donor's grey eye shadow blue on the samples' astronaut
    (warm donor skin, cooler target skin). Synthetic: a warm donor with a grey patch, a cooler
    target; the new skin takes the target's colour, the patch stays neutral."""
    from facecloak.synthesis import _match_and_blend

    size = 96
    donor_lab = torch.zeros(1, 3, size, size)
    donor_lab[:, 0], donor_lab[:, 1], donor_lab[:, 2] = 65.0, 15.0, 25.0  # warm skin
    patch = (slice(40, 56), slice(24, 72))
    donor_lab[0, 0][patch], donor_lab[0, 1][patch], donor_lab[0, 2][patch] = 40.0, 0.0, 0.0  # grey
    target_lab = torch.zeros(1, 3, size, size)
    target_lab[:, 0], target_lab[:, 1], target_lab[:, 2] = 70.0, 10.0, 12.0  # cooler skin
    donors = lab_to_rgb(donor_lab).expand(2, -1, -1, -1)
    lighting = torch.ones(1, 1, size, size)
    lighting[..., patch[0], patch[1]] = 0.0
    out = _match_and_blend(
        lab_to_rgb(target_lab),
        donors,
        torch.full((2, 1, size, size), 0.5),
        torch.ones(1, 1, size, size),
        lighting,
        40.0,
        SynthesisSettings(grain=0.0),
        None,
        lighting=lighting,
    )
    new_lab = rgb_to_lab(out)[0]
    skin_ab = new_lab[1:, 4:20, 4:20].mean((1, 2))
    patch_ab = new_lab[1:, 44:52, 36:60].mean((1, 2))
    assert torch.allclose(skin_ab, torch.tensor([10.0, 12.0]), atol=1.5), skin_ab
    assert float(patch_ab.min()) > -1.0, patch_ab  # a shift gave b* -8: blue
    assert float(patch_ab.abs().max()) < 6.0, patch_ab  # near neutral, not the skin's colour


def test_a_damaged_embeddings_file_says_how_to_fix_and_refresh_mends_it(bank, models, detector, tmp_path):
    """A truncated ``embeddings.npz`` (not a zip any more) was a traceback from every command
    that loads the bank, `donors list` included; and the fix every embeddings error names,
    `donors refresh`, loaded the embeddings first and failed the same way."""
    copy = tmp_path / "damaged-bank"
    shutil.copytree(bank.folder, copy)
    path = copy / "embeddings.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DonorBankError, match=f"donors refresh {copy}`") as error:
        load_bank(copy)  # a bank outside the data folder is named by its path
    assert "\n" not in str(error.value)
    mended = refresh_bank(copy, models, detector)
    assert mended.ids == bank.ids
    for name, table in bank.embeddings.items():
        assert torch.allclose(mended.embeddings[name], table, atol=1e-4)
    path.unlink()  # missing altogether: the same error, the same fix
    with pytest.raises(DonorBankError, match="donors refresh"):
        load_bank(copy)
    assert refresh_bank(copy, models[:1], detector).ids == bank.ids


def test_a_deleted_chip_names_its_donor_and_the_fix(bank, tmp_path):
    """A chip deleted by hand failed each photo whose donors included it with the file's path
    alone; the error names the donor and the command that mends the bank."""
    copy = tmp_path / "chipless-bank"
    shutil.copytree(bank.folder, copy)
    (copy / "chips" / f"{bank.ids[2]}.png").unlink()
    damaged = load_bank(copy)
    assert damaged.chips([0, 1]).shape[0] == 2
    with pytest.raises(DonorBankError, match=f"donors remove {copy} --donor {bank.ids[2]}`") as error:
        damaged.chips([1, 2])
    assert "\n" not in str(error.value)
    remove_donors(copy, [bank.ids[2]])
    assert len(load_bank(copy).chips(range(DONORS - 1))) == DONORS - 1


def test_replace_faces_by_bank_name_builds_one_replacer(bank, models, detector, lfw_dir):
    """`replace_faces(..., "NAME")` (and ``Anonymizer("replace", bank=NAME)``, once per batch)
    loaded the bank afresh each call, so each call built and kept a new replacer: 25 MB more per
    call with dlib-resnet alone. One is kept per bank while its folder is unchanged."""
    photo = sorted(_people(lfw_dir / "images", 10, 10_000)[0].glob("*.jpg"))[3]
    small = F.interpolate(io.read_image(photo).pixels[None], size=(90, 90), mode="area")[0]
    faces = detector([small])  # a face under min_face: blurred, so each call is quick
    assert len(faces)
    replace_module._replacers.clear()
    first = replace_faces([small], faces, "lfw-test", models=models, detector=detector)
    again = replace_faces([small], faces, "lfw-test", models=models, detector=detector)
    assert len(replace_module._replacers) == 1
    assert torch.equal(first.images[0], again.images[0])
    (replacer,) = replace_module._replacers.values()
    assert replacer.bank.folder == bank.folder
    # the bank changed on disk (donors added or removed): loaded again, and its old replacer goes
    manifest = bank.folder / "bank.json"
    stamp = manifest.stat()
    os.utime(manifest, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))
    replace_faces([small], faces, "lfw-test", models=models, detector=detector)
    assert len(replace_module._replacers) == 1
    assert next(iter(replace_module._replacers.values())) is not replacer
    replace_module._replacers.clear()


def test_many_donors_per_face_plan_a_bounded_number_of_sets(bank, models, targets, monkeypatch):
    """After a try that fell short the pool of donors doubles (to 28): at --donors-per-face 8
    its 3.1 million sets took 46 s and 7.7 GB to plan one face, after every such try. The pool
    narrows until it gives at most `MAX_DONOR_SETS`; 3 donors (3,276 sets) plan as before."""
    images, faces = targets
    # the bank's 12 donors three times over: a pool of 28 from a bank of 36
    bigger = DonorBank(
        name="bigger",
        folder=bank.folder,
        donors=[dict(donor, id=f"{donor['id']}-{k}") for k in range(3) for donor in bank.donors],
        points=bank.points.repeat(3, 1, 1),
        pose=bank.pose.repeat(3, 1),
        stats=bank.stats.repeat(3, 1),
        embeddings={name: table.repeat(3, 1) for name, table in bank.embeddings.items()},
        models=bank.models,
    )
    plan, target = _donor_choice_inputs(images[0], faces.select([0]), models)
    scored = []
    predicted = FaceReplacer._predicted_margins

    def counted(self, combos, target_):
        scored.append(len(combos))
        return predicted(self, combos, target_)

    monkeypatch.setattr(FaceReplacer, "_predicted_margins", counted)
    replacer = FaceReplacer(bigger, models, donors_per_face=5, prefer_beyond=1.2)
    sets = replacer._donor_sets(*plan, target, 0, shrink=torch.full((len(models),), 0.9))
    assert sets and all(len(rows) == 5 for rows, _ in sets)
    assert len(scored) == 1 and 0 < scored[0] <= 25_000, scored  # `MAX_DONOR_SETS`; 42,504 before


def test_a_manifest_edited_by_hand_is_a_one_line_error(bank, data_home, tmp_path):
    """A donor record that lost a field (a hand edit) was a KeyError traceback from every command
    that loads the bank, `donors list` of every bank included."""
    copy = tmp_path / "edited-bank"
    shutil.copytree(bank.folder, copy)
    manifest = json.loads((copy / "bank.json").read_text())
    del manifest["donors"][1]["pose"]
    (copy / "bank.json").write_text(json.dumps(manifest))
    with pytest.raises(DonorBankError, match="bank manifest is damaged.*'pose'") as error:
        load_bank(copy)
    assert "\n" not in str(error.value)


def test_a_donor_named_twice_is_removed_and_counted_once(bank, tmp_path):
    copy = tmp_path / "removal-bank"
    shutil.copytree(bank.folder, copy)
    assert remove_donors(copy, [bank.ids[0], bank.ids[0]]) == 1  # said "removed 2 donor(s)"
    assert load_bank(copy).ids == bank.ids[1:]


def test_a_replacer_without_a_seed_is_refused_at_once(bank, models):
    """`check_seed` lets None through (a fresh draw, for a cloak); the replacer then failed with a
    TypeError deep in its first donor draw."""
    with pytest.raises(InvalidInputError, match="seed must be an integer"):
        FaceReplacer(bank, models, seed=None)


def test_a_bank_with_too_few_usable_donors_is_refused_at_once(bank, models):
    """Donors cut off by their photo's edge are never used: a bank of 12 with 10 cut off built a
    replacer for 3 donors a face, which then blurred every face ("no donor set could be used")."""
    original = bank.outside
    try:
        bank.outside = original.clone()
        bank.outside[2:] = 0.5
        with pytest.raises(DonorBankError, match=r"holds 2 usable donor\(s\) \(10 cut off"):
            FaceReplacer(bank, models, donors_per_face=3)
        FaceReplacer(bank, models, donors_per_face=2)
    finally:
        bank.outside = original


def test_refresh_embeds_a_block_at_a_time(tmp_path, bank, models, detector, monkeypatch):
    """`donors refresh` held every chip of the bank as floats and detected them all in one batch
    (0.8 MB a donor: 8 GB for ten thousand); it goes `EMBED_BLOCK` chips at a time, as `donors add`
    does, to the same embeddings and statistics."""
    from facecloak import donors as donors_module

    copy = tmp_path / "refreshed-bank"
    shutil.copytree(bank.folder, copy)
    sizes = []
    embed = donors_module.embed_donor_chips

    def counted(chips, models_, detector_=None):
        sizes.append(len(chips))
        return embed(chips, models_, detector_)

    monkeypatch.setattr(donors_module, "EMBED_BLOCK", 5)
    monkeypatch.setattr(donors_module, "embed_donor_chips", counted)
    refreshed = refresh_bank(copy, models, detector)
    assert sizes == [5, 5, DONORS - 10], sizes
    assert refreshed.ids == bank.ids and torch.allclose(refreshed.stats, bank.stats, atol=1e-3)
    for name, table in bank.embeddings.items():
        assert torch.allclose(refreshed.embeddings[name], table, atol=1e-5), name


def test_donors_add_lists_the_files_it_passes_over(tmp_path, donor_dir, models, detector):
    """The folder walk's passed-over files were dropped: a link to a folder of donor photos
    (not followed) added nothing and said nothing. Listed now, as a batch lists them."""
    photos = tmp_path / "donor-photos"
    photos.mkdir()
    shutil.copy(sorted(donor_dir.glob("*.jpg"))[0], photos)
    (photos / "LICENCE.txt").write_text("own photos")
    (photos / "more").symlink_to(donor_dir, target_is_directory=True)
    report = add_donors([photos], models, bank=tmp_path / "walked", detector=detector)
    assert len(report.added) == 1
    reasons = {Path(path).name: reason for path, reason in report.passed_over}
    assert reasons.keys() == {"LICENCE.txt", "more"} and "not followed" in reasons["more"]
    assert "2 file(s) passed over" in str(report) and len(report.to_dict()["passed_over"]) == 2


def test_a_face_checked_alone_never_takes_its_overlapping_neighbours_detection(
    bank, models, detector, lfw_dir
):
    """Face 1 overlaps face 0 (done at an earlier try) and has no face of its own: not found again."""
    people = _people(lfw_dir / "images", 10, 10_000)
    image = io.read_image(sorted(people[0].glob("*.jpg"))[0]).pixels
    stranger = io.read_image(sorted(people[1].glob("*.jpg"))[0]).pixels
    found = detector([image])
    face = found.select([centre_face(found, image.shape[-1], image.shape[-2])])
    shift = torch.tensor([0.3 * float(face.boxes[0, 2] - face.boxes[0, 0]), 0.0])
    faces = Faces(
        torch.cat([face.boxes, face.boxes + shift.repeat(2)]),
        torch.cat([face.landmarks, face.landmarks + shift]),
        face.scores.repeat(2),
        torch.zeros(2, dtype=torch.long),
    )
    other = detector([stranger])
    other = other.select([centre_face(other, stranger.shape[-1], stranger.shape[-2])])
    target = {m.card.name: embed_faces([stranger], other, m)[0] for m in models}
    replacer = FaceReplacer(bank, models, detector=detector)
    check, _ = replacer._verify(
        replace_module._Uploads([image]), [image], faces, [1], {1: target}, {1: ((0, 1, 2), (False,) * 3)}
    )[1]
    assert not check["redetected"] and not check["protected"]


def test_embeddings_of_the_wrong_width_are_a_one_line_error_with_the_fix(bank, models, tmp_path):
    """An embeddings table cut to the wrong width by hand was a traceback from the first distance."""
    import numpy as np

    copy = tmp_path / "narrow-bank"
    shutil.copytree(bank.folder, copy)
    with np.load(copy / "embeddings.npz") as data:
        tables = dict(data)
    name = models[0].card.name
    tables[name] = tables[name][:, :64]
    np.savez(copy / "embeddings.npz", **tables)
    with pytest.raises(DonorBankError, match=f"donors refresh {copy}`") as error:
        FaceReplacer(load_bank(copy), models)
    assert "\n" not in str(error.value)


def test_a_face_no_donor_set_could_be_tried_for_is_not_said_to_have_failed_0_tries():
    """A face with no usable donor set was "blurred: no donor mix passed every check in 0 tries"."""
    from facecloak.replace import _fallback_reason

    none_tried = _fallback_reason({"attempts": 0, "reason": "no donor set could be used for this face"})
    assert none_tried == "no donor set could be used for this face: blurred instead"
    tried = _fallback_reason({"attempts": 3, "reason": "matches donor"})
    assert tried == "no donor mix passed every check in 3 tries (matches donor): blurred instead"


def test_a_bank_emptied_by_removal_takes_donors_again(bank, models, detector, donor_dir, tmp_path):
    """Removing every donor left embeddings of width 1 (no row to say otherwise): the next
    `donors add` into that bank was refused as "damaged", and `donors refresh` could not mend it."""
    copy = tmp_path / "emptied-bank"
    shutil.copytree(bank.folder, copy)
    assert remove_donors(copy, bank.ids) == DONORS
    assert len(load_bank(copy, allow_empty=True)) == 0
    photos = tmp_path / "again"
    photos.mkdir()
    for photo in sorted(donor_dir.glob("*.jpg"))[:2]:
        shutil.copy(photo, photos / photo.name)
    report = add_donors([photos], models, bank=copy, detector=detector)
    assert len(report.added) == 2 and report.total_donors == 2
    again = load_bank(copy)
    for model in models:
        assert again.embeddings[model.card.name].shape == (2, model.card.embedding_dim)


def test_an_emptied_bank_that_takes_no_donor_is_not_said_to_be_uncreated(bank, models, detector, tmp_path):
    # "no donor added, so no bank was created" was said of a bank that exists, emptied by removal
    emptied = tmp_path / "emptied"
    shutil.copytree(bank.folder, emptied)
    remove_donors(emptied, bank.ids)
    ramp = torch.linspace(0, 1, 120)
    io.write_image(tmp_path / "no_face.png", torch.stack([ramp[None].expand(120, -1)] * 3))
    report = add_donors([tmp_path / "no_face.png"], models, bank=emptied, detector=detector)
    assert (emptied / "bank.json").is_file()
    assert str(report).splitlines()[0] == f"bank emptied: 0 donor(s) added, 0 in all ({emptied})"


def test_two_adds_into_one_bank_at_once_keep_every_donor(bank, models, detector, donor_dir, tmp_path):
    """Two `donors add` into one bank at once both numbered from the same manifest and wrote their
    own: the first to finish lost every donor it reported added (and a chip could be another's).
    Here the first add pauses after its first photo while the second runs."""
    import threading

    jpgs = sorted(donor_dir.glob("*.jpg"))
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, photos in ((first, jpgs[:2]), (second, jpgs[2:4])):
        folder.mkdir()
        for photo in photos:
            shutil.copy(photo, folder / photo.name)
    target = tmp_path / "shared-bank"
    started, second_done = threading.Event(), threading.Event()
    reports = {}

    def pause(done, total):
        if done == 1:
            started.set()
            second_done.wait(3)  # with the lock the second waits for us: go on after 3 s

    def add(name, folder, progress=None):
        reports[name] = add_donors([folder], models, bank=target, detector=detector, on_progress=progress)
        if name == "second":
            second_done.set()

    one = threading.Thread(target=add, args=("first", first, pause))
    one.start()
    assert started.wait(60)
    two = threading.Thread(target=add, args=("second", second))
    two.start()
    one.join(120)
    two.join(120)
    assert set(reports) == {"first", "second"}
    final = load_bank(target)
    assert len(final) == 4 and len(set(final.ids)) == 4
    assert set(reports["first"].added) | set(reports["second"].added) == set(final.ids)
    # each donor's stored embedding is its own chip's
    again = refresh_bank(target, models[:1], detector)
    name = models[0].card.name
    assert torch.allclose(again.embeddings[name], final.embeddings[name], atol=1e-4)


def test_adding_to_a_bank_with_a_model_this_run_lacks_does_not_advise_dropping_it(bank, models):
    """`donors add` into a bank of three recognisers, run with one, was told to run `donors
    refresh`: that re-embeds the bank with the run's one model and drops the others' embeddings.
    The message names the model the run lacks, how to register it, and what a refresh drops."""
    if len(models) < 2:
        pytest.skip("needs MobileFace V2 in ../shared/models")
    with pytest.raises(DonorBankError) as error:
        bank.check_models(models[:1])
    message = str(error.value)
    lacking = models[1].card.name
    assert "facecloak models add" in message and f"dropping {lacking}" in message and "\n" not in message
    # a run with a model the bank lacks is still told to refresh, with nothing dropped
    with pytest.raises(DonorBankError, match="donors refresh") as error:
        bank.check_models([*models, _renamed(models[1], "not-in-the-bank")])
    assert "dropping" not in str(error.value)


def _renamed(model, name):
    from facecloak.models.plugins import load_model_file

    symbol = models_root() / "mobileface-v2" / "MobileFace_Identification_V2-symbol.json"
    return load_model_file(symbol, name=name, threshold=model.card.match_threshold)


def test_a_donor_id_given_twice_is_refused_not_made_from_the_other_donors_chip(bank, tmp_path):
    """Donors copied in from another bank under ids this one holds: both records read the one chip
    and embedding, so a face was silently made from another donor than its record named."""
    copy = tmp_path / "merged-bank"
    shutil.copytree(bank.folder, copy)
    manifest = json.loads((copy / "bank.json").read_text())
    manifest["donors"][1]["id"] = manifest["donors"][0]["id"]
    (copy / "bank.json").write_text(json.dumps(manifest))
    with pytest.raises(DonorBankError, match=f"donor id '{bank.ids[0]}' is given to 2 donors") as error:
        load_bank(copy)
    assert error.value.path == str(copy / "bank.json")


@pytest.mark.parametrize(
    ("edit", "said"),
    [
        (lambda m: m["donors"][0].update(licence=5), "'licence' of donor"),
        (lambda m: m["donors"][0].update(licence=["CC0"]), "'licence' of donor"),
        (lambda m: m["donors"][0].pop("source"), "no 'source'"),
        (lambda m: m["donors"][0].update(detail_scale="2"), "'detail_scale' of donor"),
        (lambda m: m.update(sources="my photos"), "'sources' must be"),
        (lambda m: m.update(models=["dlib-resnet"]), "'models' must map"),
        (lambda m: next(iter(m["models"].values())).pop("fingerprint"), "'models' must map"),
    ],
)
def test_a_manifest_field_edited_to_the_wrong_type_is_a_one_line_error(bank, tmp_path, edit, said):
    """A licence, source, detail scale, sources or models record of the wrong type (a hand edit)
    was a TypeError, KeyError or AttributeError traceback from `donors list` (of every bank) and
    `donors add`."""
    copy = tmp_path / "edited"
    shutil.copytree(bank.folder, copy)
    manifest = json.loads((copy / "bank.json").read_text())
    edit(manifest)
    (copy / "bank.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["donors", "list", str(copy)])
    assert result.exit_code == 2 and not isinstance(result.exception, Exception), result.output
    assert result.output.startswith(f"error: {copy / 'bank.json'}: bank manifest is damaged (")
    assert said in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_embeddings_of_text_are_a_one_line_error_with_the_fix(bank, tmp_path):
    """An embeddings table of text (overwritten by hand) was a ValueError traceback."""
    import numpy as np

    copy = tmp_path / "text-embeddings"
    shutil.copytree(bank.folder, copy)
    with np.load(copy / "embeddings.npz") as data:
        tables = dict(data)
    for name in tables.keys() - {"ids"}:
        tables[name] = tables[name].astype(str)
        tables[name][0, 0] = "n/a"
    np.savez(copy / "embeddings.npz", **tables)
    with pytest.raises(DonorBankError, match=f"donors refresh {copy}`") as error:
        load_bank(copy)
    assert error.value.path == str(copy / "embeddings.npz")


def test_a_donor_renamed_by_hand_does_not_stop_the_bank_taking_donors(
    bank, models, detector, donor_dir, tmp_path
):
    """A donor id renamed by hand to another plain name (which `load_bank` accepts) was an int()
    traceback from every later `donors add` into that bank."""
    import numpy as np

    copy = tmp_path / "renamed-bank"
    shutil.copytree(bank.folder, copy)
    manifest = json.loads((copy / "bank.json").read_text())
    old = manifest["donors"][0]["id"]
    manifest["donors"][0]["id"] = "alice"
    (copy / "bank.json").write_text(json.dumps(manifest))
    (copy / "chips" / f"{old}.png").rename(copy / "chips" / "alice.png")
    with np.load(copy / "embeddings.npz") as data:
        tables = dict(data)
    tables["ids"] = np.array(["alice" if i == old else i for i in tables["ids"]])
    np.savez(copy / "embeddings.npz", **tables)
    photos = tmp_path / "one"
    photos.mkdir()
    from PIL import Image  # a photo the bank holds, by path or bytes, is not added again

    Image.open(sorted(donor_dir.glob("*.jpg"))[0]).save(photos / "again.png")
    report = add_donors([photos], models, bank=copy, detector=detector)
    assert report.added == [f"d{DONORS + 1:05d}"] and report.total_donors == DONORS + 1
    assert load_bank(copy).ids[0] == "alice"


def test_a_licence_note_with_a_newline_lists_as_one_donor_line(bank, tmp_path):
    """`donors list BANK` printed a licence note's newline as it was: a shared bank's note could
    show a donor the bank does not hold, and push the real donor's source photo onto its line."""
    copy = tmp_path / "shared-bank"
    shutil.copytree(bank.folder, copy)
    manifest = json.loads((copy / "bank.json").read_text())
    manifest["donors"][0]["licence"] = "own photos ü\n  d09999  licence: CC0  /elsewhere/forged.jpg"
    (copy / "bank.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["donors", "list", str(copy)])
    assert result.exit_code == 0, result.output
    donor_lines = [line for line in result.output.splitlines() if line.startswith("  d")]
    assert len(donor_lines) == DONORS and not any(line.startswith("  d09999") for line in donor_lines)
    assert donor_lines[0].startswith(f"  {bank.ids[0]}  licence: own photos ü\\n  d09999")
    assert donor_lines[0].endswith(bank.donors[0]["source"])


def test_a_bank_is_never_made_among_the_users_files_and_removing_it_deletes_only_its_own(
    data_home, donor_dir, models, detector, tmp_path
):
    """``donors add stock --bank stock/`` wrote the bank among the user's photos, and ``donors
    remove`` then deleted the folder with them (``--bank .``: the working directory). A bank whose
    manifest was damaged could not be removed at all."""
    stock = tmp_path / "stock"
    stock.mkdir()
    photos = sorted(donor_dir.glob("*.jpg"))[:2]
    for photo in photos:
        shutil.copy(photo, stock / photo.name)
    (stock / "notes.txt").write_text("my only copy")
    with pytest.raises(DonorBankError, match="holds files and no bank"):
        add_donors([stock], models[:1], bank=f"{stock}/", licence="own", detector=detector)
    assert sorted(p.name for p in stock.iterdir()) == sorted([*(p.name for p in photos), "notes.txt"])

    runner = CliRunner()
    mine = tmp_path / "mine"
    add_donors([stock], models[:1], bank=f"{mine}/", licence="own", detector=detector)
    (mine / "notes.txt").write_text("the user's, put beside the bank")
    removed = runner.invoke(main, ["donors", "remove", f"{mine}/"])
    assert removed.exit_code == 0 and "removed 2 donor(s)" in removed.output, removed.output
    assert "it holds files the bank did not write" in removed.output
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    damaged = tmp_path / "damaged"
    add_donors([stock], models[:1], bank=f"{damaged}/", licence="own", detector=detector)
    (damaged / "bank.json").write_text('{"format": 0,')
    removed = runner.invoke(main, ["donors", "remove", f"{damaged}/"])
    assert removed.exit_code == 0 and "removed its donors" in removed.output, removed.output
    assert not damaged.exists() and all(p.exists() for p in (stock / "notes.txt", *photos))


def test_a_face_that_still_matches_the_person_says_so_even_when_it_matches_a_donor_too(bank, models):
    """A kept try that matched the person and a donor was reported as "still matches a donor used"
    alone: a user keeping it was told a donor was recognisable when the person was."""
    replacer = FaceReplacer(bank, models, fallback="keep")
    rows = (0, 1, 2)
    donor = {model.card.name: bank.embeddings[model.card.name][0] for model in models}
    person = {name: vector.clone() for name, vector in donor.items()}  # the person: the same face
    elsewhere = {name: -vector for name, vector in donor.items()}
    both, _ = replacer._judge(0, (rows, (False,) * 3), person, donor, 1.0)
    assert both["reason"] == "still matches the original face and a donor used"
    only_donor, _ = replacer._judge(0, (rows, (False,) * 3), elsewhere, donor, 1.0)
    assert only_donor["reason"] == "still matches a donor used"


def test_a_bank_holding_a_model_not_registered_here_says_fewer_checks_run(bank, lfw_dir, tmp_path):
    """A bank built with a model since removed from the config replaced faces checked on the
    remaining models only, and said nothing of it."""
    if len(bank.models) < 2:
        pytest.skip("the bank holds one model here (no MobileFace in ../shared)")
    photo = str(sorted(_people(lfw_dir / "images", 10, 10_000)[TARGETS].glob("*.jpg"))[6])
    command = ["anonymize", photo, "-o", str(tmp_path), "--method", "replace", "--donors", "lfw-test"]
    result = CliRunner().invoke(main, command)
    assert "also holds mobileface, which is not registered here" in result.stderr, result.output
    assert "checked with dlib-resnet only" in result.stderr


def test_a_removed_bank_leaves_no_lock_file_and_its_waiters_lock_the_new_one(data_home, tmp_path):
    """`donors remove` left ``.NAME.lock`` beside every bank it removed. Deleting it must not let
    two writers in at once: one waiting on the deleted file, another on the file made after it."""
    import threading
    import time

    from facecloak.donors import bank_lock

    folder = tmp_path / "gone"
    folder.mkdir()
    (folder / "bank.json").write_text(json.dumps({"format": 1, "donors": [], "models": {}}))
    assert remove_donors(folder) == 0
    assert not folder.exists() and not (tmp_path / ".gone.lock").exists()

    inside, holding, events = [], threading.Event(), []

    def remover():
        with bank_lock(folder) as lock_file:
            holding.set()
            time.sleep(0.3)  # the waiter is blocked on this file by now
            lock_file.unlink()

    def writer(name):
        with bank_lock(folder):
            inside.append(name)
            events.append(len(inside))
            time.sleep(0.3)
            inside.remove(name)

    first = threading.Thread(target=remover)
    first.start()
    assert holding.wait(10)
    waiter = threading.Thread(target=writer, args=("waiter",))
    waiter.start()
    first.join(10)
    newcomer = threading.Thread(target=writer, args=("newcomer",))
    newcomer.start()
    waiter.join(10)
    newcomer.join(10)
    assert events == [1, 1]  # one writer at a time


def test_a_donor_photo_copied_under_another_name_is_not_a_second_donor(models, detector, donor_dir, tmp_path):
    """The same photo under two names became two donors of one identity (in one add, or later)."""
    photo = sorted(donor_dir.glob("*.jpg"))[0]
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(photo, photos / "a.jpg")
    shutil.copy(photo, photos / "b.jpg")
    target = tmp_path / "dedup-bank"
    report = add_donors([photos], models, bank=target, detector=detector)
    assert len(report.added) == 1
    assert report.skipped == [(str(photos / "b.jpg"), f"the same photo as donor {report.added[0]}")]
    later = tmp_path / "later"
    later.mkdir()
    shutil.copy(photo, later / "c.jpg")
    again = add_donors([later], models, bank=target, detector=detector)
    assert again.added == []
    assert again.skipped == [(str(later / "c.jpg"), f"the same photo as donor {report.added[0]}")]
    assert len(load_bank(target)) == 1


def test_a_donors_sharp_highlight_is_softened_and_smooth_lighting_kept():
    """A donor's specular highlight on a nose, set on the target's own lit nose tip, came out as a
    white blob (L* 100 on a nose of 73) on the samples' group photo."""
    from facecloak.synthesis import HIGHLIGHT_DETAIL_L, _highlights_softened

    ramp = torch.linspace(40.0, 80.0, 64).expand(64, 64).clone()[None, None]  # smooth lighting
    assert torch.allclose(_highlights_softened(ramp, 4.0), ramp, atol=0.5)
    spot = ramp.clone()
    spot[..., 30:33, 30:33] += 35.0  # a sharp highlight
    softened = _highlights_softened(spot, 4.0)
    assert float(softened[..., 31, 31] - ramp[..., 31, 31]) < HIGHLIGHT_DETAIL_L + 0.3 * 35.0
    dark = ramp.clone()
    dark[..., 30:33, 30:33] -= 35.0  # a dark detail (a nostril, a lash) is left as it is
    assert torch.equal(_highlights_softened(dark, 4.0)[..., 31, 31], dark[..., 31, 31])


def test_a_bank_and_the_evaluators_cache_are_the_owners_alone(tmp_path, donor_dir, models, detector):
    """A bank holds faces of real people and their embeddings, the evaluator's cache every
    photo's embedding: under the usual umask (022) both were readable by every user."""
    import os

    from facecloak.evaluate import EmbeddingCache

    old = os.umask(0o022)
    try:
        folder = tmp_path / "photos"
        folder.mkdir()
        shutil.copy(sorted(donor_dir.glob("*.jpg"))[0], folder / "one.jpg")
        add_donors([folder], models[:1], bank=tmp_path / "bank", licence="test", detector=detector)
        cache = EmbeddingCache(tmp_path / "cache" / "embeddings")
        cache.put("attacker", folder / "one.jpg", torch.zeros(3).numpy())
        cache.save()
    finally:
        os.umask(old)
    assert (tmp_path / "bank" / "chips").is_dir()
    assert (tmp_path / "bank").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "cache" / "embeddings").stat().st_mode & 0o777 == 0o700
