"""The batch on a real local Ray cluster (2 CPUs): same outputs and same journal as the plain batch."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from facecloak.batch import Options, run_batch
from facecloak.distributed import run_distributed
from facecloak.errors import InvalidInputError
from facecloak.journal import JOURNAL_NAME, read_journal
from facecloak.pipeline import ProtectorSpec, run_resumable_batch

NO_RAY = "Ray is not installed: pip install 'facecloak[ray]' (about 500 MB with pyarrow and pandas)"


@pytest.fixture(scope="module")
def ray_installed():
    """Ray and Ray Data, for the tests that need them (the one without Ray runs anywhere)."""
    ray = pytest.importorskip("ray", reason=NO_RAY)
    pytest.importorskip("ray.data", reason=NO_RAY)
    return ray


@pytest.fixture(scope="module")
def local_cluster(ray_installed):
    ray_installed.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray_installed.shutdown()


def digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def test_samples_on_ray_match_the_plain_batch(local_cluster, tmp_path, samples_dir):
    photos = tmp_path / "photos"
    (photos / "nested").mkdir(parents=True)
    shutil.copy(samples_dir / "astronaut.jpg", photos / "astronaut.jpg")
    shutil.copy(samples_dir / "grace_hopper.jpg", photos / "grace_hopper.jpg")
    shutil.copy(samples_dir / "group.jpg", photos / "nested" / "group.jpg")
    (photos / "notes.txt").write_text("not a photo")
    spec = ProtectorSpec("anonymize", {"method": "blur"})

    plain = run_batch([photos], spec.build("cpu"), Options(out_dir=str(tmp_path / "plain"), device="cpu"))
    on_ray = run_distributed([photos], spec, Options(out_dir=str(tmp_path / "ray"), device="cpu", chunk=2))

    assert on_ray.exit_code == plain.exit_code == 0
    assert on_ray.faces == plain.faces == 6
    assert len(on_ray.skipped) == 1
    assert digests(tmp_path / "ray") == digests(tmp_path / "plain")  # byte for byte the same files
    assert len(digests(tmp_path / "ray")) == 3

    again = run_distributed([photos], spec, Options(out_dir=str(tmp_path / "ray"), device="cpu", chunk=2))
    assert again.resumed == 3 and again.faces == 6  # same journal semantics: nothing redone
    done = [r for r in read_journal(tmp_path / "ray") if r.get("event") == "done"]
    assert sorted(r["input"] for r in done) == ["astronaut.jpg", "grace_hopper.jpg", "nested/group.jpg"]


BLUR = ProtectorSpec("anonymize", {"method": "blur"})


def test_a_resumed_animation_on_ray_is_still_reported_as_its_first_frame_only(
    local_cluster, tmp_path, samples_dir
):
    """As the local batch: the run that wrote a GIF's first frame said so; a resumed Ray run did
    not (its journal kept no word of it)."""
    face = Image.open(samples_dir / "astronaut.jpg").convert("RGB")
    (tmp_path / "in").mkdir()
    face.save(tmp_path / "in" / "wave.gif", save_all=True, append_images=[face.rotate(5)], duration=100)
    options = Options(out_dir=str(tmp_path / "out"), rotations="none")
    first = run_distributed([tmp_path / "in"], BLUR, options)
    assert first.to_dict()["first_frame_only_files"] == 1
    resumed = run_distributed([tmp_path / "in"], BLUR, options)
    assert resumed.resumed == 1 and resumed.to_dict()["first_frame_only_files"] == 1
    assert "ONLY THE FIRST frame" in str(resumed)


def test_without_ray_a_batch_on_ray_says_what_to_install(tmp_path, samples_dir, monkeypatch):
    """The CLI's guard imports this module, which needs no Ray: a missing Ray was a traceback."""
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where it is not installed
    with pytest.raises(InvalidInputError, match=r"pip install 'facecloak\[ray\]'"):
        run_distributed([samples_dir / "grace_hopper.jpg"], BLUR, Options(out_dir=str(tmp_path / "out")))


def test_an_output_the_journal_did_not_write_is_skipped_not_failed(ray_installed, tmp_path, samples_dir):
    """As the local batch: a file of the user's under an output's name is left alone and skipped (exit 0).

    The Ray batch computed the photo, then failed it ("output exists"): exit 3.
    """
    (tmp_path / "in").mkdir()
    shutil.copy(samples_dir / "grace_hopper.jpg", tmp_path / "in" / "g.jpg")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "g_blur.jpg").write_bytes(b"mine")
    report = run_distributed(
        [tmp_path / "in"], BLUR, Options(out_dir=str(tmp_path / "out"), rotations="none")
    )
    assert [outcome.status for outcome in report.outcomes] == ["skipped"]
    assert report.exit_code == 0
    assert (tmp_path / "out" / "g_blur.jpg").read_bytes() == b"mine"


def test_the_output_folder_inside_the_input_folder_is_not_read(ray_installed, tmp_path, samples_dir):
    """``-o photos/out``: a photo in there is passed over and said, as the local batch does.

    The Ray batch took it for an input and wrote ``out/out/mine_blur.jpg``.
    """
    photos, out = tmp_path / "photos", tmp_path / "photos" / "out"
    out.mkdir(parents=True)
    shutil.copy(samples_dir / "grace_hopper.jpg", photos / "g.jpg")
    (out / "g_blur.jpg").write_bytes(b"mine")  # skipped too: no photo to compute, so no cluster to start
    shutil.copy(samples_dir / "astronaut.jpg", out / "mine.jpg")
    report = run_distributed([photos], BLUR, Options(out_dir=str(out), rotations="none"))
    assert [(Path(o.path).name, o.status) for o in report.outcomes] == [("g.jpg", "skipped")]
    why = "inside the output folder: not read (give it on its own, or another -o)"
    passed_over = [(Path(path).name, reason) for path, reason in report.skipped]
    assert passed_over == [("g_blur.jpg", why), ("mine.jpg", why)]
    assert not (out / "out").exists()


def test_a_file_uri_does_not_read_its_own_output_folder_back(local_cluster, tmp_path, samples_dir):
    """``file:///photos`` with ``-o /photos/out``: the second run took ``out/g_blur.jpg`` for a new
    photo and wrote ``out/out/g_blur_blur.jpg``; it is passed over, as the local walk does."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(samples_dir / "grace_hopper.jpg", photos / "g.jpg")
    options = Options(out_dir=str(photos / "out"), rotations="none", device="cpu")
    run_distributed([photos.as_uri()], BLUR, options)
    again = run_distributed([photos.as_uri()], BLUR, options)
    assert [(Path(o.path).name, o.status) for o in again.outcomes] == [("g.jpg", "protected")]
    assert [(Path(path).name, reason) for path, reason in again.skipped] == [
        ("g_blur.jpg", "inside the output folder: not read (give it on its own, or another -o)")
    ]
    assert not (photos / "out" / "out").exists()


def test_two_photos_with_one_output_name_are_refused_not_overwritten(local_cluster, tmp_path, samples_dir):
    """``g.jpg`` and ``g.png`` with ``--format png`` both make ``g_blur.png``: the second is refused.

    The Ray batch wrote both there, the second over the first, and reported both protected.
    """
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(samples_dir / "grace_hopper.jpg", photos / "g.jpg")
    Image.open(samples_dir / "astronaut.jpg").save(photos / "g.png")
    options = Options(out_dir=str(tmp_path / "out"), rotations="none", format="png", device="cpu")
    report = run_distributed([photos], BLUR, options)
    assert [(Path(o.path).name, o.status) for o in report.outcomes] == [
        ("g.jpg", "protected"),
        ("g.png", "failed"),
    ]
    assert "is also the output of" in report.outcomes[1].error
    assert report.exit_code == 3
    done = [r for r in read_journal(tmp_path / "out") if r.get("event") == "done"]
    assert [r["input"] for r in done] == ["g.jpg"]


def test_two_uris_with_one_output_name_do_not_take_turns_replacing_it(local_cluster, tmp_path, samples_dir):
    """URIs are planned only once decoded: a photo resumed from the journal did not claim its output.

    The other photo then replaced it on every run after the first, each reported protected (the
    resumed one pointing at an output that now held the other photo), and the next run swapped back.
    """
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(samples_dir / "grace_hopper.jpg", photos / "g.jpg")
    Image.open(samples_dir / "astronaut.jpg").save(photos / "g.png")
    options = Options(out_dir=str(tmp_path / "out"), rotations="none", format="png", device="cpu", chunk=1)
    first = run_distributed([photos.as_uri()], BLUR, options)
    written = (tmp_path / "out" / "g_blur.png").read_bytes()
    owner = next(o.path for o in first.outcomes if o.status == "protected")
    again = run_distributed([photos.as_uri()], BLUR, options)
    assert (tmp_path / "out" / "g_blur.png").read_bytes() == written
    assert {o.path: o.status for o in again.outcomes} == {
        o.path: "protected" if o.path == owner else "failed" for o in first.outcomes
    }
    assert again.resumed == 1 and again.exit_code == 3


def test_a_cloak_on_ray_is_held_on_its_file_as_written(local_cluster, tmp_path, samples_dir, dlib_resnet):
    """A JPEG cloak holds its caps on the file as encoded (``stored_as``) and reports it, as locally.

    The actor cloaked the pixels and encoded them after: other bytes than the local batch's, a
    report measured on pixels no file holds, and no ``box_dssim_written``.
    """
    (tmp_path / "in").mkdir()
    shutil.copy(samples_dir / "grace_hopper.jpg", tmp_path / "in" / "g.jpg")
    spec = ProtectorSpec.cloak("untargeted", "low", ["dlib-resnet"], steps=3)

    def options(name: str) -> Options:
        return Options(out_dir=str(tmp_path / name), rotations="none", format="jpeg", device="cpu")

    plain = run_resumable_batch(
        [tmp_path / "in"], spec.build("cpu"), options("plain"), settings=spec.settings()
    )
    on_ray = run_distributed([tmp_path / "in"], spec, options("ray"))
    assert "box_dssim_written" in on_ray.outcomes[0].faces[0]
    assert on_ray.outcomes[0].faces == plain.outcomes[0].faces
    assert digests(tmp_path / "ray") == digests(tmp_path / "plain")
    (record,) = [r for r in read_journal(tmp_path / "ray") if r.get("event") == "done"]
    assert json.dumps(record["faces"]) == json.dumps(on_ray.outcomes[0].faces)  # the journal keeps it


def test_no_image_says_where_it_looked_and_leaves_no_folder(ray_installed, tmp_path):
    """As the local batch: the summary names the folder given, and no journal is made for nothing.

    The Ray batch said "no image found in (nothing given)" and created the output folder.
    """
    (tmp_path / "empty").mkdir()
    report = run_distributed([tmp_path / "empty"], BLUR, Options(out_dir=str(tmp_path / "out")))
    assert report.exit_code == 1
    assert str(tmp_path / "empty") in str(report)
    assert not (tmp_path / "out" / JOURNAL_NAME).exists()


def test_a_uri_from_another_folder_does_not_replace_an_output_of_the_same_name(
    local_cluster, tmp_path, samples_dir
):
    """A URI's journal records held no place: ``file:///day2`` after ``file:///day1`` (each with an
    IMG.jpg) replaced day 1's output, "1 done", and a later local run replaced it back."""
    days = [tmp_path / "day1", tmp_path / "day2"]
    for day, photo in zip(days, ("grace_hopper.jpg", "astronaut.jpg")):
        day.mkdir()
        shutil.copy(samples_dir / photo, day / "IMG.jpg")
    options = Options(out_dir=str(tmp_path / "out"), rotations="none", device="cpu")
    run_distributed([days[0].as_uri()], BLUR, options)
    written = (tmp_path / "out" / "IMG_blur.jpg").read_bytes()
    second = run_distributed([days[1].as_uri()], BLUR, options)
    assert [o.status for o in second.outcomes] == ["failed"] and second.exit_code == 3
    assert "is the output of another photo" in second.outcomes[0].error
    local = run_resumable_batch([days[1]], BLUR.build("cpu"), options, settings=BLUR.settings())
    assert [o.status for o in local.outcomes] == ["failed"]
    assert (tmp_path / "out" / "IMG_blur.jpg").read_bytes() == written


def test_a_model_the_workers_cannot_load_is_one_line_not_a_ray_traceback(
    local_cluster, tmp_path, samples_dir
):
    """A misspelt ``--models`` on Ray died in every actor: Ray's 300-line traceback, exit 1 (read as
    "a face NOT protected"). A misspelt name is refused before Ray starts; a model whose file the
    workers lack is the model's own one-line error."""
    from click.testing import CliRunner

    from facecloak.cli import main
    from facecloak.errors import FacecloakError, ModelNotFoundError

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(samples_dir / "grace_hopper.jpg", photos / "g.jpg")
    out = tmp_path / "out"
    refused = CliRunner().invoke(main, ["cloak", str(photos), "-o", str(out), "--models", "nosuch", "--ray"])
    assert refused.exit_code == 2 and "unknown face model 'nosuch'" in refused.output, refused.output
    spec = ProtectorSpec.cloak("untargeted", "low", ["facenet-vggface2"])  # its weights: a file not given
    with pytest.raises(FacecloakError) as failed:
        run_distributed([str(photos)], spec, Options(out_dir=str(out), rotations="none", device="cpu"))
    assert isinstance(failed.value, ModelNotFoundError) and "facenet-vggface2" in str(failed.value)
