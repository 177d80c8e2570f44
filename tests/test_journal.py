"""The resumable batch: kill -9 in the middle, run again, every photo done exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from facecloak.anonymize import Anonymizer
from facecloak.batch import Options
from facecloak.errors import ImageReadError
from facecloak.io import read_image
from facecloak.journal import (
    JOURNAL_NAME,
    Journal,
    JournalError,
    read_journal,
    settings_fingerprint,
    source_key,
)
from facecloak.pipeline import run_resumable_batch
from facecloak.protection import AnonymizeFaces

REPO = Path(__file__).resolve().parents[1]


def photo_folder(folder: Path, lfw_images: Path | None, count: int, samples_dir: Path) -> list[Path]:
    """``count`` photos in nested folders: real LFW faces when present, else copies of the samples."""
    sources = sorted(lfw_images.rglob("*.jpg"))[:count] if lfw_images else []
    while len(sources) < count:
        sources += sorted(samples_dir.glob("*.jpg"))
    made = []
    for i, source in enumerate(sources[:count]):
        target = folder / f"set{i % 3}" / f"photo_{i:03d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        made.append(target)
    return made


def done_records(out: Path) -> list[dict]:
    return [record for record in read_journal(out) if record.get("event") == "done"]


def facecloak(*args: str, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", "from facecloak.cli import main; main()", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_kill_9_then_resume(tmp_path, samples_dir):
    from conftest import data_root

    lfw = data_root() / "lfw" / "images"
    inputs = photo_folder(tmp_path / "photos", lfw if lfw.is_dir() else None, 60, samples_dir)
    out = tmp_path / "out"
    command = ("anonymize", str(tmp_path / "photos"), "-o", str(out), "-q", "--json")

    first = facecloak(*command)
    deadline = time.monotonic() + 300
    while len(done_records(out)) < 8 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.poll() is None, "the batch ended before it could be killed"
    first.send_signal(signal.SIGKILL)
    first.wait()
    done_before = len(done_records(out))
    assert 8 <= done_before < len(inputs)
    for output in out.rglob("*_blur.jpg"):  # whatever has a final name is a whole image
        read_image(output)

    second = facecloak(*command)
    stdout, stderr = second.communicate(timeout=600)
    assert second.returncode in (0, 1), stderr.decode()[-2000:]
    report = json.loads(stdout)
    assert report["resumed_files"] == done_before
    assert report["images"] == len(inputs) and report["failed_files"] == 0

    done = Counter(record["input"] for record in done_records(out))
    assert len(done) == len(inputs) and set(done.values()) == {1}  # every photo done exactly once
    for path in inputs:
        relative = path.relative_to(tmp_path / "photos")
        read_image(out / relative.with_name(f"{path.stem}_blur.jpg"))  # none lost, none corrupt
    assert not [p for p in out.rglob(".facecloak-*") if p.name != JOURNAL_NAME]  # no temporary file left

    third = facecloak(*command)
    stdout, _ = third.communicate(timeout=600)
    assert json.loads(stdout)["resumed_files"] == len(inputs)  # nothing left to do
    assert len(done_records(out)) == len(inputs)


@pytest.fixture()
def three_photos(tmp_path, samples_dir) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut.jpg", "grace_hopper.jpg", "group.jpg"):
        shutil.copy(samples_dir / name, folder / name)
    return folder


def blur_batch(
    folder: Path, out: Path, detector, method: str = "blur", *, on_progress=None, workers=None, **options
):
    protector = AnonymizeFaces(Anonymizer(method))
    return run_resumable_batch(
        [folder],
        protector,
        Options(out_dir=str(out), **options),
        settings={"method": method},
        detector=detector,
        on_progress=on_progress,
        workers=workers,
    )


def test_changed_input_or_settings_is_redone(three_photos, tmp_path, detector):
    out = tmp_path / "out"
    first = blur_batch(three_photos, out, detector)
    assert first.resumed == 0 and first.count("protected") == 3
    rerun = blur_batch(three_photos, out, detector)
    assert rerun.resumed == 3
    assert "3 image(s): 0 done, 3 skipped, 0 failed" in str(rerun)  # the summary counts them as skipped

    shutil.copy(three_photos / "astronaut.jpg", three_photos / "grace_hopper.jpg")  # changed input
    again = blur_batch(three_photos, out, detector)
    assert again.resumed == 2 and "3 image(s): 1 done, 2 skipped" in str(again)
    assert [o.path for o in again.outcomes if not getattr(o, "resumed", False)] == [
        str(three_photos / "grace_hopper.jpg")
    ]
    pixelated = blur_batch(three_photos, out, detector, method="pixelate")  # changed settings
    assert pixelated.resumed == 0 and pixelated.count("protected") == 3
    assert Counter(r["input"] for r in done_records(out)) == {
        "astronaut.jpg": 2,
        "grace_hopper.jpg": 3,
        "group.jpg": 2,
    }


def test_torn_journal_line_and_lost_output(three_photos, tmp_path, detector):
    out = tmp_path / "out"
    blur_batch(three_photos, out, detector)
    with open(out / JOURNAL_NAME, "ab") as journal:  # a crash in the middle of an append
        journal.write(b'{"event":"done","input":"astro')
    (out / "group_blur.jpg").unlink()  # an output lost since
    (out / ".facecloak-abc123.jpg").write_bytes(b"half an image")  # an interrupted write
    again = blur_batch(three_photos, out, detector)
    assert again.resumed == 2 and again.count("failed") == 0
    assert (out / "group_blur.jpg").is_file() and not (out / ".facecloak-abc123.jpg").exists()
    assert (out / JOURNAL_NAME).read_bytes().endswith(b"\n")


def test_a_file_the_journal_does_not_know_is_not_replaced(three_photos, tmp_path, detector):
    out = tmp_path / "out"
    out.mkdir()
    (out / "group_blur.jpg").write_bytes(b"the user's own file")
    report = blur_batch(three_photos, out, detector)  # skipped, as in a batch without journal
    assert report.count("skipped") == 1 and report.outcomes[2].status == "skipped"
    assert report.count("failed") == 0 and report.exit_code == 0
    assert (out / "group_blur.jpg").read_bytes() == b"the user's own file"
    again = blur_batch(three_photos, out, detector)  # the skipped one was "processed now"
    assert again.resumed == 2 and "skipped; 0 processed now" in str(again)
    (three_photos / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # and so was a failed one
    broken = blur_batch(three_photos, out, detector)
    assert broken.count("failed") == 1 and "skipped; 0 processed now" in str(broken)
    (three_photos / "broken.jpg").unlink()
    # --overwrite replaced it too: a file that is not the photo with its faces changed is refused
    refused = blur_batch(three_photos, out, detector, overwrite=True)
    assert refused.count("protected") == 2 and refused.outcomes[2].status == "failed"
    assert "is not this photo with its faces changed" in refused.outcomes[2].error
    assert (out / "group_blur.jpg").read_bytes() == b"the user's own file" and refused.exit_code == 3
    shutil.copy(three_photos / "group.jpg", out / "group_blur.jpg")  # the photo itself: replaced
    replaced = blur_batch(three_photos, out, detector, overwrite=True)
    assert replaced.count("failed") == 0 and replaced.count("protected") == 3


def test_an_output_changed_since_it_was_written_is_not_replaced(
    three_photos, tmp_path, detector, samples_dir
):
    """The journal owned every output it ever named: a user's edit was replaced by the next run."""
    out = tmp_path / "out"
    blur_batch(three_photos, out, detector)
    edited = (out / "group_blur.jpg").read_bytes() + b"the user's retouch"
    (out / "group_blur.jpg").write_bytes(edited)
    shutil.copy(three_photos / "astronaut.jpg", three_photos / "group.jpg")  # its input changed too
    report = blur_batch(three_photos, out, detector)
    assert report.outcomes[2].status == "skipped" and report.count("failed") == 0
    assert (out / "group_blur.jpg").read_bytes() == edited
    refused = blur_batch(three_photos, out, detector, overwrite=True)  # an edit of another photo's output
    assert refused.outcomes[2].status == "failed" and (out / "group_blur.jpg").read_bytes() == edited
    shutil.copy(samples_dir / "group.jpg", three_photos / "group.jpg")  # its photo back: its edit
    replaced = blur_batch(three_photos, out, detector, overwrite=True)
    assert replaced.outcomes[2].status == "protected" and (out / "group_blur.jpg").read_bytes() != edited


def test_a_photo_of_the_same_name_from_another_folder_does_not_replace_an_output(
    three_photos, tmp_path, detector, samples_dir
):
    """day1/IMG.jpg and day2/IMG.jpg into one folder: the second was taken for the first, changed."""
    out, day2 = tmp_path / "out", tmp_path / "day2"
    blur_batch(three_photos, out, detector)
    written = (out / "group_blur.jpg").read_bytes()
    day2.mkdir()
    shutil.copy(samples_dir / "astronaut.jpg", day2 / "group.jpg")  # another photo, the same name
    report = blur_batch(day2, out, detector)  # was replaced, "1 done", exit code 0; then skipped, exit 0
    assert report.outcomes[0].status == "failed" and report.exit_code == 3
    assert "is the output of another photo (an earlier run's group.jpg" in report.outcomes[0].error
    assert (out / "group_blur.jpg").read_bytes() == written
    moved = tmp_path / "moved"
    shutil.move(three_photos, moved)  # the same photos in another place: still this batch's outputs
    resumed = blur_batch(moved, out, detector)
    assert resumed.resumed == 3 and resumed.count("failed") == 0


def test_one_batch_per_folder(tmp_path):
    with Journal(tmp_path, {"method": "blur"}):
        with pytest.raises(JournalError, match="another facecloak batch"):
            Journal(tmp_path, {"method": "blur"}).open()


def test_a_full_disk_is_a_journal_error_and_leaves_no_torn_line(tmp_path):
    """The journal's own append on a full disk raised a bare OSError: a traceback, no summary.

    The disk is filled with RLIMIT_FSIZE (the file may not grow past its limit: EFBIG, as a full
    disk gives ENOSPC), a few bytes into the next line, so the write fails half way.
    """
    import resource

    with Journal(tmp_path, {"method": "blur"}) as journal:
        journal.record("done", "a.jpg", "00", "a_blur.jpg", status="protected")
    before = (tmp_path / JOURNAL_NAME).read_bytes()
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of a signal
    resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 20, limits[1]))
    try:
        with pytest.raises(JournalError, match="cannot write the journal"):
            Journal(tmp_path, {"method": "pixelate"}).open()  # its settings line does not fit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert (tmp_path / JOURNAL_NAME).read_bytes() == before  # the part written was cut back
    with Journal(tmp_path, {"method": "pixelate"}):  # unlocked, and the next run goes on
        pass
    assert [record["event"] for record in read_journal(tmp_path)] == ["settings", "done", "settings"]


def test_unreadable_inputs_are_reported_not_journaled(tmp_path, detector, samples_dir):
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(samples_dir / "grace_hopper.jpg", folder / "ok.jpg")
    (folder / "broken.jpg").write_bytes(b"not a photo")
    report = blur_batch(folder, tmp_path / "out", detector)
    assert report.count("failed") == 1 and report.exit_code == 3
    assert [r["input"] for r in done_records(tmp_path / "out")] == ["ok.jpg"]
    with pytest.raises(ImageReadError):
        read_image(folder / "broken.jpg")


def test_two_compute_workers_give_the_same_outputs(tmp_path, detector, samples_dir):
    """Two chunks at once (the CPU default) write what one at a time writes, each photo once."""
    import threading

    from conftest import data_root

    lfw = data_root() / "lfw" / "images"
    photo_folder(tmp_path / "photos", lfw if lfw.is_dir() else None, 12, samples_dir)
    threads: set[str] = set()

    class Recording(AnonymizeFaces):
        def for_worker(self):
            return self

        def protect(self, images, faces, **kwargs):
            threads.add(threading.current_thread().name)
            return super().protect(images, faces, **kwargs)

    reports = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        reports[workers] = run_resumable_batch(
            [tmp_path / "photos"],
            Recording(Anonymizer("blur")),
            Options(out_dir=str(out), chunk=2),
            settings={"method": "blur"},
            detector=detector,
            workers=workers,
        )
        done = Counter(record["input"] for record in done_records(out))
        assert len(done) == 12 and set(done.values()) == {1}
    assert len({name for name in threads if name.startswith("facecloak-compute")}) == 2
    one, two = ({o.path: o for o in reports[w].outcomes} for w in (1, 2))
    assert one.keys() == two.keys()
    for path, outcome in one.items():
        assert outcome.status == two[path].status and outcome.error is None
        assert len(outcome.faces) == len(two[path].faces)
        a, b = read_image(outcome.output).pixels, read_image(two[path].output).pixels
        assert float((a - b).abs().max()) <= 2 / 255  # thread counts may round a blur differently
    threads.clear()  # a batch of one chunk keeps every core on it: no worker threads
    run_resumable_batch(
        [tmp_path / "photos"],
        Recording(Anonymizer("blur")),
        Options(out_dir=str(tmp_path / "one_chunk"), chunk=12),
        settings={"method": "blur"},
        detector=detector,
        workers=2,
    )
    assert threads == {threading.main_thread().name}


def test_changed_rotations_redo_a_photo_with_no_face(tmp_path, samples_dir):
    """--rotations was not in the journal's fingerprint: after a run with ``--rotations none``
    found no face in a photo on its side, the run the summary suggests (``--rotations all``)
    resumed it as "done earlier (no_face)" and left the face unprotected."""
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.open(samples_dir / "grace_hopper.jpg").rotate(90, expand=True).save(folder / "side.jpg")
    out = tmp_path / "out"
    upright = blur_batch(folder, out, None, rotations="none")
    assert upright.count("no_face") == 1
    turned = blur_batch(folder, out, None, rotations="all")
    assert turned.resumed == 0 and turned.count("protected") == 1 and turned.exit_code == 0


def _in_thread(function, seconds: float):
    """Run ``function`` on a daemon thread: (finished in time, its exception or None)."""
    import threading

    raised: list[BaseException | None] = [None]

    def target() -> None:
        try:
            function()
        except BaseException as error:  # handed back to the test
            raised[0] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), raised[0]


@pytest.mark.parametrize("rerun", [False, True], ids=["writer", "reader"])
def test_a_failing_progress_callback_stops_the_batch_instead_of_hanging(
    tmp_path, detector, samples_dir, rerun
):
    """``facecloak anonymize DIR -o OUT | head -1``: the printer's BrokenPipeError killed the writer
    thread (or a reader, for files done earlier) and the batch waited on its queue forever.
    It must end, raise the error in the caller, and keep its journal consistent."""
    from conftest import data_root

    lfw = data_root() / "lfw" / "images"
    photo_folder(tmp_path / "photos", lfw if lfw.is_dir() else None, 16, samples_dir)
    out = tmp_path / "out"
    if rerun:
        blur_batch(tmp_path / "photos", out, detector)
    files = []

    def on_progress(event) -> None:
        if event.stage == "file":
            files.append(event.outcome.path)
            raise BrokenPipeError(32, "Broken pipe")

    def run() -> None:
        blur_batch(tmp_path / "photos", out, detector, chunk=2, on_progress=on_progress, workers=1)

    ended, error = _in_thread(run, 120)
    assert ended, "the batch hung after its progress callback raised"
    assert isinstance(error, BrokenPipeError)
    assert not [p for p in out.iterdir() if p.name.startswith(".facecloak-") and p.name != JOURNAL_NAME]
    for record in done_records(out):  # every output the journal calls done is there, whole
        assert (out / record["output"]).stat().st_size == record["output_bytes"]
    with Journal(out, {"method": "blur"}):  # and the folder is free again
        pass


def test_damaged_journal_lines_that_still_parse_are_passed_over(three_photos, tmp_path, detector):
    """A journal line damaged into other JSON (``1``, a list, a record without its output) made the
    next run end in a TypeError or KeyError traceback instead of resuming."""
    out = tmp_path / "out"
    first = blur_batch(three_photos, out, detector)
    group = next(r for r in done_records(out) if r["input"] == "group.jpg")
    damaged = [1, [], "text", None, {"event": "done", "input": ["group.jpg"]}]
    damaged.append({key: value for key, value in group.items() if key != "output"})
    with open(out / JOURNAL_NAME, "a") as journal:
        journal.writelines(json.dumps(line) + "\n" for line in damaged)
    again = blur_batch(three_photos, out, detector)
    assert first.count("protected") == 3
    assert again.count("failed") == 0 and again.count("protected") == 3
    assert again.resumed == 3  # the damaged lines are passed over: the intact ones still hold
    assert all(isinstance(record, dict) for record in read_journal(out))


def test_eta_of_a_resumed_batch_counts_only_the_files_worked_on(tmp_path, detector, samples_dir):
    """Files done by an earlier run finish at once: counted in the ETA's rate they made it say a
    fraction of the time really left (10 of 12 done earlier: a twelfth of it)."""
    from conftest import data_root

    lfw = data_root() / "lfw" / "images"
    photos = photo_folder(tmp_path / "photos", lfw if lfw.is_dir() else None, 12, samples_dir)
    out = tmp_path / "out"
    blur_batch(tmp_path / "photos", out, detector)
    for photo in photos[:2]:  # two changed inputs: redone, the ten others resumed
        photo.write_bytes(photos[-1].read_bytes())
    started = time.perf_counter()
    seen = []

    def on_progress(event) -> None:
        if event.stage == "file" and not getattr(event.outcome, "resumed", False):
            seen.append((event.files_done, event.eta_seconds, time.perf_counter() - started))

    report = blur_batch(tmp_path / "photos", out, detector, chunk=1, on_progress=on_progress, workers=1)
    assert report.resumed == 10 and len(seen) == 2
    done, eta, elapsed = min(seen)
    assert done < 12 and eta is not None
    assert eta >= 0.5 * elapsed  # one file left after one worked on: about the time so far


def test_the_journal_keeps_a_targeted_key_only_behind_a_slow_hash():
    """The journal (beside the photos in the output folder) kept a targeted cloak's identity key as
    16 hex digits of a plain SHA-256: a short key was found by guessing. A changed key still shows."""
    import hashlib

    from facecloak.pipeline import ProtectorSpec

    def kept(key: str) -> str:
        return ProtectorSpec.cloak("targeted", "mid", ["dlib-resnet"], identity_key=key).settings()[
            "identity_key"
        ]

    assert kept("1234").startswith("scrypt:") and "1234" not in kept("1234")
    assert hashlib.sha256(b"1234").hexdigest()[:16] not in kept("1234")
    assert kept("1234") == kept("1234") != kept("1235")


def test_a_journal_that_cannot_be_written_names_each_photo_left_undone(
    three_photos, tmp_path, detector, monkeypatch
):
    """On a full disk every photo failed with the journal's line alone: which were undone, unsaid."""
    record = Journal.record

    def full_disk(self, event, *args, **kwargs):
        if (event == "done") == (args[0] == "group.jpg"):  # group.jpg: written, its "done" line lost
            raise JournalError("cannot write the journal (No space left on device)", self.path)
        return record(self, event, *args, **kwargs)

    monkeypatch.setattr(Journal, "record", full_disk)
    report = blur_batch(three_photos, tmp_path / "out", detector)
    assert report.count("failed") == 3 and report.exit_code == 3
    for outcome, name in zip(report.outcomes, ("astronaut.jpg", "grace_hopper.jpg")):
        assert outcome.error.startswith(f"{three_photos / name}: not written: ")
    written = (
        f"{three_photos / 'group.jpg'}: written to {tmp_path / 'out' / 'group_blur.jpg'} but not journaled"
    )
    assert report.outcomes[2].error.startswith(written)
    assert all(
        o.error.endswith("cannot write the journal (No space left on device)") for o in report.outcomes
    )
    summary = str(report)
    assert all(name in summary for name in ("astronaut.jpg", "grace_hopper.jpg", "group.jpg"))


def test_a_batch_leaves_alone_the_writes_in_progress_of_a_batch_into_a_folder_below(tmp_path):
    """Opening ``-o out`` removed the temporary files of a batch running into ``-o out/b``."""
    with Journal(tmp_path / "out" / "b", {"method": "blur"}):
        in_progress = tmp_path / "out" / "b" / ".facecloak-x1y2.jpg"
        in_progress.write_bytes(b"half of b's output, being written")
        crashed = tmp_path / "out" / "set0" / ".facecloak-z3.jpg"
        crashed.parent.mkdir()
        crashed.write_bytes(b"left by a killed run into out")
        with Journal(tmp_path / "out", {"method": "blur"}):
            pass
        assert in_progress.exists() and not crashed.exists()


def test_a_journal_naming_an_output_outside_its_folder_does_not_pass_a_photo_as_done(
    tmp_path, detector, samples_dir
):
    """A planted ``done`` line naming the input itself as output: reported protected, never written."""
    out, photos = tmp_path / "out", tmp_path / "photos"
    photos.mkdir()
    photo = Path(shutil.copy(samples_dir / "astronaut.jpg", photos))
    blur_batch(photos, out, detector, rotations="none")
    (out / "astronaut_blur.jpg").unlink()
    lines = []
    for line in (out / JOURNAL_NAME).read_text().splitlines():
        record = json.loads(line)
        if record.get("input") == "astronaut.jpg" and record["event"] == "done":
            record.update(output=str(photo), output_bytes=photo.stat().st_size)
        lines.append(json.dumps(record))
    (out / JOURNAL_NAME).write_text("\n".join(lines) + "\n")
    report = blur_batch(photos, out, detector, rotations="none")
    assert (out / "astronaut_blur.jpg").is_file()
    assert str(photo) not in [outcome.output for outcome in report.outcomes]


def test_a_journal_that_is_a_symbolic_link_is_not_followed(tmp_path):
    """A link planted as the journal had its target's unfinished last line cut off and lines appended."""
    notes = tmp_path / "notes.txt"
    notes.write_text("line one\nan unfinished last line")
    out = tmp_path / "out"
    out.mkdir()
    (out / JOURNAL_NAME).symlink_to(notes)
    with pytest.raises(JournalError, match="symbolic link"):
        Journal(out, {"method": "blur"}).open()
    assert notes.read_text() == "line one\nan unfinished last line"


def test_a_photo_whose_name_is_not_utf8_is_protected_not_a_traceback(tmp_path, detector, samples_dir):
    """A Latin-1 name (``caf\\xe9.jpg`` from an old camera card) stopped the whole batch with a
    UnicodeEncodeError when its output was journaled: no photo after it was written."""
    folder = tmp_path / "photos"
    folder.mkdir()
    latin1 = folder / os.fsdecode(b"caf\xe9.jpg")
    shutil.copy(samples_dir / "grace_hopper.jpg", latin1)
    shutil.copy(samples_dir / "astronaut.jpg", folder / "ok.jpg")
    out = tmp_path / "out"
    report = blur_batch(folder, out, detector)
    assert [outcome.status for outcome in report.outcomes] == ["protected", "protected"]
    assert (out / os.fsdecode(b"caf\xe9_blur.jpg")).is_file()
    assert blur_batch(folder, out, detector).resumed == 2  # and it resumes


def test_a_resumed_animation_is_still_reported_as_its_first_frame_only(tmp_path, detector, samples_dir):
    """The run that wrote a GIF's first frame said so; a resumed run reported the file as whole
    (``first_frame_only_files`` 0, nothing in the summary): the journal kept no word of it."""
    from PIL import Image

    face = Image.open(samples_dir / "astronaut.jpg").convert("RGB")
    folder = tmp_path / "photos"
    folder.mkdir()
    face.save(folder / "wave.gif", save_all=True, append_images=[face.rotate(5)], duration=100)
    out = tmp_path / "out"
    assert blur_batch(folder, out, detector).to_dict()["first_frame_only_files"] == 1
    resumed = blur_batch(folder, out, detector)
    assert resumed.resumed == 1
    assert resumed.to_dict()["first_frame_only_files"] == 1
    assert "ONLY THE FIRST frame" in str(resumed)


def test_a_resumed_files_line_says_what_was_done_in_words():
    """It printed the journal's own word: ``a.jpg: done earlier (no_face), skipped``."""
    from facecloak.pipeline import ResumedOutcome

    lines = {
        status: ResumedOutcome("a.jpg", status, output="out/a_blur.jpg").message
        for status in ("protected", "no_face", "unprotected")
    }
    assert lines["no_face"] == "a.jpg: done earlier (no face found), skipped -> out/a_blur.jpg"
    assert "(a face NOT protected)" in lines["unprotected"] and "(protected)" in lines["protected"]


def test_a_journal_of_other_code_is_not_trusted(three_photos, tmp_path, detector, monkeypatch):
    """The fingerprint held the version number, 0.1.0 through hundreds of commits: a batch resumed
    under newer code kept what older code had written (pixelated faces later made coarser because
    they were still recognised) as done. The code's own hash is in the fingerprint now."""
    from facecloak import journal

    out = tmp_path / "out"
    real = journal.code_revision()
    assert len(real) == 16 and real == journal.code_revision()
    monkeypatch.setattr(journal, "code_revision", lambda: "an older facecloak")
    blur_batch(three_photos, out, detector)
    assert blur_batch(three_photos, out, detector).resumed == 3  # the same code resumes
    monkeypatch.setattr(journal, "code_revision", lambda: real)
    redone = blur_batch(three_photos, out, detector)
    assert redone.resumed == 0 and redone.count("protected") == 3


def test_a_model_of_the_same_name_with_another_threshold_or_file_redoes_the_batch(tmp_path, monkeypatch):
    """Models were in the fingerprint by name: one removed and added again under that name, with
    another threshold or another network, kept outputs cloaked against the old one as done."""
    from dataclasses import replace as changed

    from facecloak.models import registry
    from facecloak.pipeline import ProtectorSpec

    weights = tmp_path / "model.onnx"
    weights.write_bytes(b"one network")
    card = changed(registry.get_card("dlib-resnet"), name="copy", weights=str(weights))

    def fingerprint(card) -> str:
        monkeypatch.setitem(
            registry._REGISTRY, "copy", registry._Entry(card, lambda path: None, lambda: weights)
        )
        return settings_fingerprint(ProtectorSpec.cloak("untargeted", "mid", ["copy"]).settings())

    first = fingerprint(card)
    assert fingerprint(card) == first
    assert fingerprint(changed(card, match_threshold=0.5)) != first
    weights.write_bytes(b"another network, same path")
    assert fingerprint(card) != first


def test_a_uri_s_output_is_not_taken_for_another_uri_s(tmp_path):
    """On Ray, a URI's records had no place: an output was anyone's, and a photo from another
    folder with the same name replaced it (``file:///day1/IMG.jpg``, then ``file:///day2/IMG.jpg``)."""
    with Journal(tmp_path, {"method": "blur"}) as journal:
        journal.record("start", "IMG.jpg", "aa", "IMG_blur.jpg", source=source_key("file:///day1/IMG.jpg"))
        (tmp_path / "IMG_blur.jpg").write_bytes(b"day 1's output")
        assert journal.made_from_another("IMG_blur.jpg", "file:///day1/IMG.jpg") is None
        assert journal.owns("IMG_blur.jpg", source="file:///day1/IMG.jpg")
        assert journal.made_from_another("IMG_blur.jpg", "file:///day2/IMG.jpg") == "IMG.jpg"
        assert not journal.owns("IMG_blur.jpg", source="file:///day2/IMG.jpg")


def test_runs_of_two_methods_into_one_folder_each_resume_their_own(three_photos, tmp_path, detector):
    """The journal held one last record per photo: a blur, then a pixelation, then the blur again
    into one folder redid every blur (a cloak's minutes each)."""
    out = tmp_path / "out"
    blur_batch(three_photos, out, detector)
    blur_batch(three_photos, out, detector, method="pixelate")
    again = blur_batch(three_photos, out, detector)
    assert again.resumed == 3 and "0 done, 3 skipped" in str(again)
    assert blur_batch(three_photos, out, detector, method="pixelate").resumed == 3


def test_an_output_written_again_by_other_settings_is_not_taken_as_done(three_photos, tmp_path, detector):
    """Two settings that write one output name: the first's record must not pass the second's file,
    even where both files have the same size."""
    out = tmp_path / "out"
    journal_settings = {"method": "blur", "strength": 1}
    protector = AnonymizeFaces(Anonymizer("blur"))
    for settings in (journal_settings, {"method": "blur", "strength": 2}):
        run_resumable_batch(
            [three_photos], protector, Options(out_dir=str(out)), settings=settings, detector=detector
        )
    # the first settings again: their outputs were written over by the second run's
    first = run_resumable_batch(
        [three_photos], protector, Options(out_dir=str(out)), settings=journal_settings, detector=detector
    )
    assert first.resumed == 0


def test_a_batch_leaves_alone_a_write_in_progress_beside_its_photos_below(tmp_path):
    """Opening ``-o .`` removed the temporary file a run writing beside its photos, in a folder
    below without a journal, was writing at that moment: that photo failed ("could not write")."""
    import fcntl
    import threading

    from facecloak.io.write import write_bytes_atomic

    photos = tmp_path / "photos"
    photos.mkdir()
    writing = photos / ".facecloak-live.jpg"
    with open(writing, "wb") as live:  # a live write holds its temporary file locked
        fcntl.flock(live.fileno(), fcntl.LOCK_EX)
        crashed = photos / ".facecloak-dead.jpg"
        crashed.write_bytes(b"left by a killed run")
        with Journal(tmp_path, {"method": "blur"}):
            pass
        assert writing.exists() and not crashed.exists()
    # and a real write holds its file from creation to rename while journals open beside it
    stop, failures = threading.Event(), []

    def open_journals() -> None:
        while not stop.is_set():
            with Journal(tmp_path, {"method": "blur"}):
                pass

    opener = threading.Thread(target=open_journals)
    opener.start()
    try:
        for k in range(300):
            try:
                write_bytes_atomic(photos / f"out{k}.jpg", b"x" * 20000)
            except Exception as error:  # noqa: BLE001 - counted: the test names them
                failures.append(str(error))
    finally:
        stop.set()
        opener.join()
    assert not failures, failures[:3]
