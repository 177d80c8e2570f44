"""The batch API: planning before work, skipping existing outputs, progress events, per-file errors."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from facecloak import io
from facecloak.anonymize import Anonymizer
from facecloak.batch import Options, plan_batch, run_batch
from facecloak.cloak import create_cloak
from facecloak.protection import AnonymizeFaces, CloakFaces


@pytest.fixture()
def photos(tmp_path, samples_dir):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("astronaut.jpg", "group.jpg"):
        shutil.copy(samples_dir / name, folder / name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return folder


class RefusingDetector:
    """Stands in for the detector where a run must do no work at all."""

    def __call__(self, images):
        raise AssertionError("nothing should be detected")


def test_plan_decides_every_output_before_any_work(photos, tmp_path):
    out = tmp_path / "out"
    (out / "in").mkdir(parents=True)  # several paths given: each is mirrored under its own name
    (out / "in" / "astronaut_blur.jpg").write_bytes(b"earlier")
    plan = plan_batch([photos, tmp_path / "missing.png"], "blur", Options(out_dir=str(out)))
    assert [(job.path.name, target) for job, target in plan.todo] == [
        ("group.jpg", out / "in" / "group_blur.jpg")
    ]
    assert plan.existing == [(photos / "astronaut.jpg", out / "in" / "astronaut_blur.jpg")]
    failed = {outcome.path: outcome.error for outcome in plan.failed}
    assert "not an image" in failed[str(photos / "broken.jpg")]
    assert "no such file or folder" in failed[str(tmp_path / "missing.png")]
    again = plan_batch([photos, tmp_path / "missing.png"], "blur", Options(out_dir=str(out), overwrite=True))
    assert len(again.todo) == 1 and not again.existing  # "earlier" is not the photo: not replaced
    failed = {outcome.path: outcome.error for outcome in again.failed}
    assert "is not this photo with its faces changed" in failed[str(photos / "astronaut.jpg")]
    shutil.copy(photos / "astronaut.jpg", out / "in" / "astronaut_blur.jpg")  # as an earlier output looks
    again = plan_batch([photos, tmp_path / "missing.png"], "blur", Options(out_dir=str(out), overwrite=True))
    assert len(again.todo) == 2 and not again.existing


def test_a_file_named_on_the_command_line_is_always_an_input(tmp_path, samples_dir):
    """``anonymize party.jpg party_blur.jpg --overwrite`` replaced the user's party_blur.jpg."""
    shutil.copy(samples_dir / "grace_hopper.jpg", tmp_path / "party.jpg")
    shutil.copy(samples_dir / "astronaut.jpg", tmp_path / "party_blur.jpg")
    named = [tmp_path / "party.jpg", tmp_path / "party_blur.jpg", tmp_path / "party.jpg"]
    plan = plan_batch(named, "blur", Options(overwrite=True))
    assert [job.path.name for job, _ in plan.todo] == ["party_blur.jpg"]  # named twice: one input
    assert not plan.not_images
    (failed,) = plan.failed
    assert failed.path == str(tmp_path / "party.jpg")
    assert "party_blur.jpg is an input too: not overwritten" in failed.error
    # found in a folder instead, the same file is taken for an earlier output, and named as such
    walked = plan_batch([tmp_path], "blur", Options())
    assert walked.not_images == [
        (tmp_path / "party_blur.jpg", f"the blur output of {tmp_path / 'party.jpg'}")
    ]
    # ...but never replaced for one by --overwrite: it is another photo, so it is an input, and
    # party.jpg's output fails (`anonymize DIR --overwrite` replaced it with party.jpg blurred)
    walked = plan_batch([tmp_path], "blur", Options(overwrite=True))
    assert [job.path.name for job, _ in walked.todo] == ["party_blur.jpg"] and not walked.not_images
    assert "party_blur.jpg is an input too: not overwritten" in walked.failed[0].error
    # a real earlier output beside its photo is still redone by --overwrite
    from PIL import Image, ImageFilter

    with Image.open(tmp_path / "party.jpg") as photo:
        face = photo.crop((200, 100, 400, 350)).filter(ImageFilter.GaussianBlur(12))
        photo.paste(face, (200, 100))
        photo.save(tmp_path / "party_blur.jpg", quality=90)
    walked = plan_batch([tmp_path], "blur", Options(overwrite=True))
    assert [job.path.name for job, _ in walked.todo] == ["party.jpg"] and not walked.failed
    # named after a folder that holds it, it is still named: an input (it was passed over)
    both = plan_batch([tmp_path, tmp_path / "party_blur.jpg"], "blur", Options(out_dir=str(tmp_path / "o")))
    assert sorted(job.path.name for job, _ in both.todo) == ["party.jpg", "party_blur.jpg"]
    assert not both.not_images


def test_two_formats_of_one_photo_clash_under_one_format_and_are_told_how_to_part_them(tmp_path, samples_dir):
    """photo.jpg and photo.png both become photo_cloaked.png (a cloak's default format): one fails,
    and its reason says what parts them. It said "give -o" also when -o was given, which mirrors
    the folder and clashes the same."""
    from PIL import Image

    shutil.copy(samples_dir / "grace_hopper.jpg", tmp_path / "photo.jpg")
    Image.open(samples_dir / "grace_hopper.jpg").save(tmp_path / "photo.png")
    plan = plan_batch([tmp_path], "cloaked", Options(out_dir=str(tmp_path / "o"), format="png"))
    (failed,) = plan.failed
    assert "is also the output of" in failed.error and "give -o" not in failed.error
    assert "--format input keeps each input's format" in failed.error
    assert len(plan.todo) == 1
    assert not plan_batch([tmp_path], "cloaked", Options(out_dir=str(tmp_path / "o"))).failed  # input formats
    # each input's format already: a JPEG named .png gives the same output; only a name parts them
    shutil.copy(samples_dir / "astronaut.jpg", tmp_path / "photo.png")
    (failed,) = plan_batch([tmp_path], "blur", Options(out_dir=str(tmp_path / "o"))).failed
    assert failed.error.endswith("(rename one)"), failed.error


def test_an_output_path_held_by_a_folder_fails_and_protects_nothing(tmp_path, samples_dir, detector):
    """It counted as "skipped: output exists" (exit 0), and with --overwrite its face as protected."""
    shutil.copy(samples_dir / "astronaut.jpg", tmp_path / "a.jpg")
    (tmp_path / "out" / "a_blur.jpg").mkdir(parents=True)
    for overwrite in (False, True):
        options = Options(out_dir=str(tmp_path / "out"), overwrite=overwrite)
        report = run_batch(
            [tmp_path / "a.jpg"], AnonymizeFaces(Anonymizer("blur")), options, detector=detector
        )
        assert report.exit_code == 3 and "a_blur.jpg is a folder" in report.outcomes[0].error
        assert report.protected_faces == 0 and "0 protected" in str(report)


def test_outputs_of_other_methods_in_a_folder_are_not_taken_for_photos(tmp_path, samples_dir):
    """Runs of several methods into one folder: a_pixelate.jpg was masked, then both were cloaked."""
    shutil.copy(samples_dir / "astronaut.jpg", tmp_path / "a.jpg")
    for earlier in ("a_pixelate.jpg", "a_mask.jpg", "a_pixelate_mask.jpg", "a_cloaked.jpg"):
        shutil.copy(samples_dir / "astronaut.jpg", tmp_path / earlier)
    shutil.copy(samples_dir / "group.jpg", tmp_path / "b_blurry.jpg")  # not a tag: a photo
    plan = plan_batch([tmp_path], "cloaked", Options())
    assert [job.path.name for job, _ in plan.todo] == ["b_blurry.jpg"]
    assert plan.existing == [(tmp_path / "a.jpg", tmp_path / "a_cloaked.jpg")]  # cloaked before
    reasons = {path.name: reason for path, reason in plan.not_images}
    assert reasons["a_pixelate_mask.jpg"] == f"the mask output of {tmp_path / 'a_pixelate.jpg'}"
    assert reasons["a_mask.jpg"] == f"the mask output of {tmp_path / 'a.jpg'}"
    assert len(reasons) == 4


def test_run_batch_reports_progress_and_skips_on_rerun(photos, tmp_path, detector):
    out = tmp_path / "out"
    events = []
    protector = AnonymizeFaces(Anonymizer("pixelate"))
    options = Options(out_dir=str(out), chunk=1)
    report = run_batch([photos], protector, options, detector=detector, on_progress=events.append)
    assert report.exit_code == 3 and report.count("protected") == 2 and report.count("failed") == 1
    assert protector.tag == "pixelate" and (out / "group_pixelate.jpg").is_file()
    stages = [event.stage for event in events]
    assert stages[0] == "plan" and "detect" in stages and "protect" in stages
    assert stages.count("file") == 3  # one per input, as each finishes
    first_protect = next(event for event in events if event.stage == "protect")
    assert first_protect.faces_total == 5  # every face is known before protecting starts
    finished = [event for event in events if event.stage == "file"]
    assert [event.files_done for event in finished] == [1, 2, 3]
    assert finished[0].outcome.status == "failed"  # the unreadable file is reported before any work
    assert events[-1].faces_done == 5 and events[-1].fraction == pytest.approx(1.0)
    # a re-run skips what exists: nothing detected, exit code 0 apart from the broken file
    rerun = run_batch(
        [photos / "astronaut.jpg", photos / "group.jpg"],
        None,
        options,
        plan=plan_batch([photos / "astronaut.jpg", photos / "group.jpg"], "pixelate", options),
        detector=RefusingDetector(),
    )
    assert rerun.exit_code == 0 and rerun.count("skipped") == 2 and "2 image(s) skipped" in str(rerun)


def test_cloak_progress_reports_steps_and_distance(samples_dir, tmp_path, detector, dlib_resnet):
    events = []
    cloak = CloakFaces(create_cloak("untargeted", [dlib_resnet], "low", steps=4, detector=detector))
    report = run_batch(
        [samples_dir / "astronaut.jpg"],
        cloak,
        Options(out_dir=str(tmp_path)),
        detector=detector,
        on_progress=events.append,
    )
    assert report.count("failed") == 0
    steps = [event for event in events if event.stage in ("protect", "check") and event.step]
    assert [event.step for event in steps] == [1, 2, 3, 4] and steps[0].steps == 4
    assert all(event.distance is not None and event.distance > 0 for event in steps)
    assert steps[-1].stage == "check" and steps[0].aim == pytest.approx(1.3)
    assert steps[-1].eta_seconds is not None and steps[0].fraction < steps[-1].fraction <= 1.0


def test_empty_input_is_exit_1(tmp_path):
    report = run_batch([tmp_path], AnonymizeFaces(Anonymizer("blur")), Options(), detector=RefusingDetector())
    assert report.empty and report.exit_code == 1 and "no image found" in str(report)


def test_a_cloak_of_a_photo_over_the_default_pixel_limit_is_measured_not_failed(
    tmp_path, samples_dir, monkeypatch
):
    """With --max-pixels raised for a large photo, reading its written cloak back failed the file.

    The change as written was measured under the default limit: the output was in place (and
    journaled done) but the file reported failed, "raise it with --max-pixels".
    """
    from facecloak import io
    from facecloak.batch import write_output

    image = io.read_image(samples_dir / "astronaut.jpg")
    monkeypatch.setenv("FACECLOAK_MAX_PIXELS", "1000")  # the default limit, far under the photo
    output = image.pixels.clone()
    output[:, 80:160, 200:260] += 1 / 255
    face = {"box": [190.0, 70.0, 270.0, 170.0], "dssim": 0.001, "protected": True}
    options = Options(format="png", max_pixels=10_000_000)
    outcome = write_output(
        image.path, image, output.clamp(0, 1), tmp_path / "a_cloaked.png", [face], options, 1.0
    )
    assert outcome.status == "protected", outcome.error
    assert face["box_dssim_written"] == pytest.approx(face["box_dssim_cloaked"], abs=1e-5)


def test_the_journal_s_done_record_holds_the_change_as_written(tmp_path, samples_dir):
    """The change of the written file was measured after the journal's "done": its record lacked it."""
    from facecloak import io
    from facecloak.batch import write_output

    image = io.read_image(samples_dir / "astronaut.jpg")
    output = image.pixels.clone()
    output[:, 80:160, 200:260] += 2 / 255
    face = {"box": [190.0, 70.0, 270.0, 170.0], "dssim": 0.001, "protected": True}
    journaled: list[dict] = []
    outcome = write_output(
        image.path,
        image,
        output.clamp(0, 1),
        tmp_path / "a_cloaked.jpg",
        [face],
        Options(format="jpg"),
        1.0,
        after=lambda status, written: journaled.append(dict(face)),
    )
    assert outcome.status == "protected", outcome.error
    assert journaled[0]["box_dssim_written"] == face["box_dssim_written"] > 0
    assert journaled[0]["linf_written"] >= 1


def test_the_plan_line_does_not_call_an_output_clash_unreadable(tmp_path, samples_dir):
    """photo.jpg and photo.png clash under one format: the plan line said "1 cannot be read"."""
    from PIL import Image

    from facecloak.progress import plan_line

    shutil.copy(samples_dir / "grace_hopper.jpg", tmp_path / "photo.jpg")
    Image.open(samples_dir / "grace_hopper.jpg").save(tmp_path / "photo.png")
    plan = plan_batch([tmp_path], "cloaked", Options(out_dir=str(tmp_path / "o"), format="png"))
    line = plan_line("cloak", plan)
    assert line == "cloak: 1 photo(s) to do, 1 failed already (named at the end)"


def test_an_animation_is_written_as_its_first_frame_and_every_report_says_so(samples_dir, tmp_path, detector):
    """Frames past the first of a GIF were dropped from the output with no word in any report."""
    from PIL import Image

    face = Image.open(samples_dir / "astronaut.jpg").convert("RGB")
    frames = [face, face.transpose(Image.Transpose.FLIP_LEFT_RIGHT), face.rotate(5)]
    frames[0].save(tmp_path / "wave.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    options = Options(out_dir=str(tmp_path / "out"))
    report = run_batch(
        [tmp_path / "wave.gif"], AnonymizeFaces(Anonymizer("blur")), options, detector=detector
    )
    (outcome,) = report.outcomes
    assert outcome.status == "protected" and report.exit_code == 0  # the faces it holds are protected
    assert "only the first of 3 frames was protected and written" in outcome.message
    summary = str(report)
    assert "1 image(s) with several frames or pages: ONLY THE FIRST frame" in summary
    assert f"{tmp_path / 'wave.gif'}: first of 3 frames -> {outcome.output}" in summary
    as_json = report.to_dict()
    assert as_json["first_frame_only_files"] == 1
    assert as_json["files"][0]["written"]["frames_in_source"] == 3
    assert "only the first of 3 frames" in as_json["files"][0]["written"]["notes"][0]


def test_a_transparent_photo_written_as_jpeg_is_flattened_onto_white_before_its_faces_are_protected(
    samples_dir, tmp_path, detector
):
    """``--format jpeg`` of a transparent PNG showed black where it was transparent.

    The resumable batch (``-o``) flattens at read time: the face is found and protected as the
    JPEG shows it, and the written change is measured against that photo, not the black one.
    """
    import numpy as np
    from PIL import Image

    from facecloak.pipeline import run_resumable_batch

    rgba = np.array(Image.open(samples_dir / "astronaut.jpg").convert("RGBA"))
    rgba[:, :60] = 0  # a cut-out: transparent black at the left
    Image.fromarray(rgba, "RGBA").save(tmp_path / "cut.png")
    options = Options(out_dir=str(tmp_path / "out"), format="jpeg")
    report = run_resumable_batch(
        [tmp_path / "cut.png"],
        AnonymizeFaces(Anonymizer("blur")),
        options,
        settings={},
        detector=detector,
    )
    (outcome,) = report.outcomes
    assert outcome.status == "protected" and report.exit_code == 0
    written = np.asarray(Image.open(outcome.output).convert("RGB"))
    assert written[:, :50].min() >= 250  # white, as a browser shows the PNG
    assert outcome.written["alpha_flattened"] == "white"
    assert "transparency composited onto white: JPEG has none" in outcome.message
    assert "composited onto white (--format png keeps it)" in str(report)


def test_a_photo_whose_output_name_is_too_long_fails_alone_instead_of_stopping_the_batch(
    tmp_path, samples_dir
):
    """A 255-byte photo name gives a 260-byte NAME_blur.jpg: plan_batch raised OSError (a traceback)."""
    folder = tmp_path / "in"
    folder.mkdir()
    long_name = "x" * 251 + ".jpg"  # 255 bytes: a legal name
    shutil.copy(samples_dir / "astronaut.jpg", folder / long_name)
    shutil.copy(samples_dir / "astronaut.jpg", folder / "short.jpg")
    for out_dir in (None, str(tmp_path / "out")):
        plan = plan_batch([folder], "blur", Options(out_dir=out_dir))
        assert [job.path.name for job, _ in plan.todo] == ["short.jpg"]
        (failed,) = plan.failed
        assert failed.path == str(folder / long_name)
        assert "more than the 255 a file name can have" in failed.error


def test_a_photo_whose_mirrored_output_path_is_too_long_fails_alone_instead_of_stopping_the_batch(
    tmp_path, samples_dir
):
    """Deep folders mirrored under a deep -o: past PATH_MAX, ``is_dir()`` raised OSError (a traceback)."""
    folder = tmp_path / "in"
    deep = folder.joinpath(*["d" * 200] * ((3950 - len(str(folder))) // 201))  # under 4096 bytes: legal
    deep.mkdir(parents=True)
    shutil.copy(samples_dir / "astronaut.jpg", deep / "photo.jpg")
    shutil.copy(samples_dir / "astronaut.jpg", folder / "short.jpg")
    out = tmp_path.joinpath("out", *["o" * 200] * 3)
    plan = plan_batch([folder], "blur", Options(out_dir=str(out)))
    assert [job.path.name for job, _ in plan.todo] == ["short.jpg"]
    (failed,) = plan.failed
    assert failed.path == str(deep / "photo.jpg") and "\n" not in failed.error
    assert "its output path cannot be used (File name too long; a shorter -o)" in failed.error


def test_photos_in_the_output_folder_are_named_and_its_outputs_are_never_re_read(
    tmp_path, samples_dir, detector
):
    """``-o photos/sub`` passed over photos/sub/own.jpg without a word (a photo left unprotected and
    unreported), and a later run without -o took photos/sub's outputs for photos and blurred them again."""
    from facecloak.pipeline import run_resumable_batch

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    shutil.copy(samples_dir / "astronaut.jpg", photos / "a.jpg")
    shutil.copy(samples_dir / "grace_hopper.jpg", photos / "sub" / "own.jpg")
    options = Options(out_dir=str(photos / "sub"))
    report = run_resumable_batch(
        [photos], AnonymizeFaces(Anonymizer("blur")), options, settings={}, detector=detector
    )
    assert [(outcome.path, outcome.status) for outcome in report.outcomes] == [
        (str(photos / "a.jpg"), "protected")
    ]
    assert (photos / "sub" / "a_blur.jpg").exists()
    assert dict(report.skipped)[str(photos / "sub" / "own.jpg")].startswith("inside the output folder")
    later = plan_batch([photos], "pixelate", Options())
    assert sorted(job.path.name for job, _ in later.todo) == ["a.jpg", "own.jpg"]
    assert "an output of an earlier run" in dict(later.not_images)[photos / "sub" / "a_blur.jpg"]


def test_a_photo_replaced_after_its_faces_were_found_fails_instead_of_being_written_unprotected(
    tmp_path, samples_dir, detector
):
    """run_batch reads each photo twice (detect all, then protect): a photo replaced in between
    got the old photo's boxes blurred and its new face written in the clear, reported protected."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(samples_dir / "astronaut.jpg", folder / "a.jpg")
    shutil.copy(samples_dir / "grace_hopper.jpg", folder / "b.jpg")

    def replace_a_once_detected(event):
        if event.stage == "detect" and event.current == ("b.jpg",):  # a.jpg's faces are known
            shutil.copy(samples_dir / "grace_hopper.jpg", folder / "a.jpg")

    report = run_batch(
        [folder],
        AnonymizeFaces(Anonymizer("blur")),
        Options(chunk=1),
        detector=detector,
        on_progress=replace_a_once_detected,
    )
    outcomes = {outcome.path: outcome for outcome in report.outcomes}
    assert outcomes[str(folder / "a.jpg")].status == "failed"
    assert "changed while the batch ran" in outcomes[str(folder / "a.jpg")].error
    assert not (folder / "a_blur.jpg").exists()
    assert outcomes[str(folder / "b.jpg")].status == "protected"
    assert report.exit_code == 3


def test_outputs_that_lack_what_their_input_had_are_named_on_one_line_each():
    """A name holding a newline split the summary's line on a flattened output in two."""
    from facecloak.batch import BatchReport, FileOutcome

    output = "out/tr\nans_blur.jpg"
    flattened = FileOutcome(
        "in/tr\nans.png", "protected", output=output, written={"alpha_flattened": "white"}
    )
    lines = str(BatchReport("anonymize", {}, [flattened])).splitlines()
    assert "    out/tr\\nans_blur.jpg" in lines


def test_a_photo_that_failed_on_another_files_error_is_still_named():
    """The failed list printed each error alone: a model file's error named the model, twice, and
    never which photos it failed."""
    from facecloak.batch_types import BatchReport, FileOutcome

    model_error = "/models/x.onnx: model does not run on 112x112 nchw chips"
    report = BatchReport(
        "cloak",
        {},
        [
            FileOutcome("in/a.jpg", "failed", error=model_error),
            FileOutcome("in/b.jpg", "failed", error="in/b.jpg: not an image"),
        ],
    )
    text = str(report)
    assert f"    in/a.jpg: {model_error}" in text
    assert "    in/b.jpg: not an image" in text and "in/b.jpg: in/b.jpg" not in text
    assert report.outcomes[0].message == f"error: in/a.jpg: {model_error}"


def test_overwrite_knows_a_large_photos_earlier_output_under_the_runs_own_pixel_limit(
    tmp_path, samples_dir, monkeypatch
):
    """``--max-pixels`` raised for a photo over the default limit: `looks_like` still opened it under
    the default, failed, and took the photo's own earlier output for another photo (an input). The
    limits lowered under the sample's 307,200 pixels stand in for a 200 MP photo."""
    from PIL import Image

    shutil.copy(samples_dir / "grace_hopper.jpg", tmp_path / "g.jpg")
    io.write_image(tmp_path / "g_blur.png", io.read_image(tmp_path / "g.jpg").pixels)
    monkeypatch.setenv("FACECLOAK_MAX_PIXELS", "100000")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000)
    plan = plan_batch([tmp_path], "blur", Options(overwrite=True, format="png", max_pixels=1_000_000))
    assert [job.path.name for job, _ in plan.todo] == ["g.jpg"] and not plan.failed


class _SlowSteps:
    """A blur that first reports optimisation steps for seconds, as a cloak's chunk on a CPU does."""

    kind, tag, steps, aim = "anonymize", "blur", 300, None

    def for_worker(self) -> _SlowSteps:
        return self

    def protect(self, images, faces, *, identity=None, on_step=None, stored_as=None):
        done, ratios = torch.zeros(len(faces), dtype=torch.bool), torch.ones(len(faces))
        for step in range(1, self.steps + 1):
            time.sleep(0.02)
            on_step(step, self.steps, done, ratios)
        return AnonymizeFaces(Anonymizer("blur")).protect(images, faces)


def test_ctrl_c_stops_a_pipelined_batch_s_workers_at_their_next_step(photos, tmp_path, detector, request):
    """Ctrl-C waited for each compute thread to finish its chunk (a CPU cloak's: a minute), its
    progress still printing, before the batch stopped."""
    from facecloak.pipeline import run_resumable_batch

    (photos / "broken.jpg").unlink()
    main = threading.main_thread().ident
    sent: list[float] = []

    def interrupt_at_a_worker_s_second_step(event) -> None:
        if event.stage == "protect" and event.step == 2 and not sent:
            sent.append(time.perf_counter())
            signal.pthread_kill(main, signal.SIGINT)

    options = Options(out_dir=str(tmp_path / "out"), chunk=1)
    # Ctrl-C's own handler: a process started in the background by a shell without job control
    # (nohup ... &, as some CI runners start their steps) inherits SIGINT ignored, and no
    # KeyboardInterrupt ever came
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    with pytest.raises(KeyboardInterrupt):
        run_resumable_batch(
            [photos],
            _SlowSteps(),
            options,
            settings={},
            detector=detector,
            workers=2,
            on_progress=interrupt_at_a_worker_s_second_step,
        )
    assert sent and time.perf_counter() - sent[0] < 2  # a chunk left to finish took 6 s
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("facecloak-compute")]


def test_ctrl_c_pressed_again_while_a_batch_stops_still_lets_it_stop_cleanly(
    photos, tmp_path, detector, request, monkeypatch
):
    """A second Ctrl-C while the batch stopped left its reader and writer threads running: the
    journal was closed under the writer (every photo "not written: the journal is not open") and
    torch's threads at exit aborted the process (exit 134)."""
    from facecloak import pipeline

    (photos / "broken.jpg").unlink()
    main = threading.main_thread().ident
    drain, pressed = pipeline._drain, []

    def drain_pressed_again(target) -> None:  # in the stopping batch's clean-up, on the main thread
        if not pressed:
            pressed.append(True)
            signal.pthread_kill(main, signal.SIGINT)
        drain(target)

    def interrupt_at_a_worker_s_second_step(event) -> None:
        if event.stage == "protect" and event.step == 2 and not pressed:
            monkeypatch.setattr(pipeline, "_drain", drain_pressed_again)
            signal.pthread_kill(main, signal.SIGINT)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    request.addfinalizer(lambda: signal.signal(signal.SIGINT, previous))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_resumable_batch(
            [photos],
            _SlowSteps(),
            Options(out_dir=str(tmp_path / "out"), chunk=1),
            settings={},
            detector=detector,
            workers=2,
            on_progress=interrupt_at_a_worker_s_second_step,
        )
    assert pressed
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("facecloak-")]


class _NeedsRoom:
    """A blur that runs out of memory on more than one photo at a time, and on one photo even alone.

    ``error``: what the allocator raises (a GPU's `torch.OutOfMemoryError`, or the CPU allocator's
    RuntimeError); ``too_large``: the (H, W) of the photo that never fits.
    """

    kind, tag, steps, aim = "anonymize", "blur", 0, None

    def __init__(self, error: type, too_large: tuple[int, int]) -> None:
        self.error, self.too_large, self.calls = error, too_large, []

    def for_worker(self) -> _NeedsRoom:
        return self

    def protect(self, images, faces, *, identity=None, on_step=None, stored_as=None):
        self.calls.append(len(images))
        if len(images) > 1 or tuple(images[0].shape[-2:]) == self.too_large:
            if self.error is RuntimeError:
                raise RuntimeError(
                    "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"
                )
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return AnonymizeFaces(Anonymizer("blur")).protect(images, faces)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, RuntimeError])
@pytest.mark.parametrize("journaled", [False, True], ids=["beside", "out-folder"])
def test_a_chunk_that_runs_out_of_memory_is_protected_in_parts_and_only_a_photo_too_large_alone_fails(
    tmp_path, samples_dir, detector, error, journaled
):
    """One chunk of large photos that did not fit in memory failed every file of it (with -o), or
    stopped the whole batch with a traceback (outputs beside the inputs), though each photo alone fit."""
    from facecloak.pipeline import run_resumable_batch

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("astronaut.jpg", "grace_hopper.jpg", "group.jpg"):
        shutil.copy(samples_dir / name, folder / name)
    protection = _NeedsRoom(error, too_large=(620, 1100))  # the group photo
    if journaled:
        options = Options(out_dir=str(tmp_path / "out"), chunk=8)
        events: list = []
        report = run_resumable_batch(
            [folder],
            protection,
            options,
            settings={},
            detector=detector,
            workers=1,
            on_progress=events.append,
        )
    else:
        report = run_batch([folder], protection, Options(chunk=8), detector=detector)
    by_name = {outcome.path.rsplit("/", 1)[-1]: outcome for outcome in report.outcomes}
    assert by_name["astronaut.jpg"].status == by_name["grace_hopper.jpg"].status == "protected"
    assert all(
        face["protected"] for name in ("astronaut.jpg", "grace_hopper.jpg") for face in by_name[name].faces
    )
    failed = by_name["group.jpg"]
    assert failed.status == "failed" and "\n" not in failed.error
    assert failed.error.startswith(f"{folder / 'group.jpg'}: out of memory even alone (")
    assert "--max-pixels" in failed.error
    assert report.exit_code == 3
    assert protection.calls == [3, 2, 1, 1, 1]  # halved until each part fits
    assert not list(folder.glob("group_*")) and not list((tmp_path / "out").glob("group_*"))
    if journaled:  # the faces found are counted once, not again in each part
        assert events[-1].faces_total == events[-1].faces_done == 2


def test_a_chunk_whose_detection_runs_out_of_memory_is_detected_in_parts(photos, detector):
    """Detection of a chunk that did not fit in memory stopped the batch (outputs beside the inputs)."""

    class OneAtATime:
        def __init__(self) -> None:
            self.calls: list[int] = []

        def __call__(self, images):
            self.calls.append(len(images))
            if len(images) > 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return detector(images)

    detect = OneAtATime()
    report = run_batch([photos], AnonymizeFaces(Anonymizer("blur")), Options(chunk=8), detector=detect)
    statuses = {outcome.path.rsplit("/", 1)[-1]: outcome.status for outcome in report.outcomes}
    assert statuses == {"astronaut.jpg": "protected", "group.jpg": "protected", "broken.jpg": "failed"}
    assert detect.calls == [2, 1, 1]


def test_a_model_error_fails_its_chunk_s_files_and_the_batch_goes_on(photos, detector):
    """A FacecloakError from the protection (a model that cannot run) stopped a batch whose outputs
    go beside its inputs, unlike one with -o, where that chunk's files fail and the rest go on."""
    from facecloak.errors import ModelNotFoundError

    class Refuses:
        kind, tag, steps, aim = "anonymize", "blur", 0, None
        calls = 0

        def protect(self, images, faces, *, identity=None, on_step=None, stored_as=None):
            Refuses.calls += 1
            if Refuses.calls == 1:
                raise ModelNotFoundError("model x: weights gone", "/models/x.onnx")
            return AnonymizeFaces(Anonymizer("blur")).protect(images, faces)

    report = run_batch([photos], Refuses(), Options(chunk=1), detector=detector)
    statuses = sorted(
        (outcome.path.rsplit("/", 1)[-1], outcome.status, outcome.error) for outcome in report.outcomes
    )
    assert (
        statuses[0][:2] == ("astronaut.jpg", "failed")
        and statuses[0][2] == "/models/x.onnx: model x: weights gone"
    )
    assert statuses[2][:2] == ("group.jpg", "protected")
    assert report.exit_code == 3


class _SlowPerFace:
    """A blur that takes 0.4 s a face, as a cloak's time goes to its faces."""

    kind, tag, steps, aim = "anonymize", "blur", 1, None

    def for_worker(self) -> _SlowPerFace:
        return self

    def protect(self, images, faces, *, identity=None, on_step=None, stored_as=None):
        time.sleep(0.4 * len(faces))
        return AnonymizeFaces(Anonymizer("blur")).protect(images, faces)


def test_a_photo_without_a_face_is_not_given_the_time_of_its_chunks_faces(tmp_path, samples_dir, detector):
    """Each photo of a chunk was shown an even share of the chunk's time: a faceless photo beside
    cloaked ones showed 23 s."""
    from facecloak.pipeline import run_resumable_batch

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(samples_dir / "group.jpg", folder / "group.jpg")  # four faces
    ramp = torch.linspace(0, 1, 200)
    io.write_image(folder / "plain.png", torch.stack([ramp[None].expand(150, -1)] * 3))
    plain = run_batch([folder], _SlowPerFace(), Options(out_dir=str(tmp_path / "a")), detector=detector)
    journaled = run_resumable_batch(
        [folder], _SlowPerFace(), Options(out_dir=str(tmp_path / "b")), settings={}, detector=detector
    )
    for report in (plain, journaled):
        seconds = {Path(outcome.path).name: outcome.seconds for outcome in report.outcomes}
        assert seconds["group.jpg"] > 1.6 and seconds["plain.png"] < 0.5 * seconds["group.jpg"], seconds


def test_faces_of_a_file_that_failed_are_counted_apart_not_as_not_protected():
    """A file that failed to write, its face short: "1 face(s) NOT protected:" listed no file, and
    a failed blur's faces were neither protected nor unprotected in the JSON."""
    from facecloak.batch_types import BatchReport, FileOutcome

    short = {"protected": False, "models": {}}
    report = BatchReport(
        command="cloak",
        options={},
        outcomes=[
            FileOutcome("ro/a.jpg", "failed", faces=[short], error="ro/a.jpg: permission denied"),
            FileOutcome("b.jpg", "protected", output="b_cloaked.png", faces=[{"protected": True}]),
        ],
    )
    assert report.unprotected_faces == 0 and report.protected_faces == 1 and report.faces_in_failed_files == 1
    text = str(report)
    assert "NOT protected" not in text and "2 face(s) found, 1 protected, 1 in files that failed, in" in text
    assert report.to_dict()["faces_in_failed_files"] == 1


def test_an_earlier_output_two_photos_share_names_them_both(tmp_path, samples_dir):
    """b.JPG and b.jpeg both give b_blur.png: the file there was credited to the last one found,
    which may not be the photo it came from."""
    from PIL import Image

    shutil.copy(samples_dir / "grace_hopper.jpg", tmp_path / "b.JPG")
    shutil.copy(samples_dir / "astronaut.jpg", tmp_path / "b.jpeg")
    Image.open(samples_dir / "grace_hopper.jpg").save(tmp_path / "b_blur.png")
    plan = plan_batch([tmp_path], "blur", Options(format="png"))
    reasons = {Path(path).name: reason for path, reason in plan.not_images}
    assert reasons["b_blur.png"].startswith("the blur output of ")
    assert (
        str(tmp_path / "b.JPG") in reasons["b_blur.png"] and str(tmp_path / "b.jpeg") in reasons["b_blur.png"]
    )
