"""The command line, driven with click's CliRunner: exit codes, messages, files on disk."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from facecloak.cli import main

GPS_IFD = 0x8825


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture()
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture()
def mixed_batch(tmp_path, samples_dir) -> Path:
    """Good photos, a photo with no face, and every kind of hostile file, in nested folders."""
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(samples_dir / "astronaut.jpg", folder / "astronaut.jpg")
    shutil.copy(samples_dir / "group.jpg", folder / "nested" / "group.jpg")
    Image.new("RGB", (120, 80), (40, 90, 160)).save(folder / "sky.png")
    (folder / "zero.jpg").write_bytes(b"")
    data = (samples_dir / "grace_hopper.jpg").read_bytes()
    (folder / "nested" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "fake.png").write_text("definitely not a png")
    from test_io import png_header_only

    png_header_only(folder / "bomb.png", 60_000, 60_000)
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_batch_goes_on_past_bad_files(runner, mixed_batch, tmp_path):
    before = digest(mixed_batch)
    out = tmp_path / "out"
    result = runner.invoke(main, ["anonymize", str(mixed_batch), "-o", str(out), "-q"])
    assert result.exit_code == 3, result.output
    assert digest(mixed_batch) == before  # no input changed
    assert (out / "astronaut_anonymized.jpg").is_file()
    assert (out / "nested" / "group_anonymized.jpg").is_file()
    assert (out / "sky_anonymized.png").is_file()  # written unchanged, but reported
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 4
    expected = {
        "zero.jpg": "empty file",
        "truncated.jpg": "truncated",
        "fake.png": "not an image",
        "bomb.png": "limit",
    }
    for name, reason in expected.items():
        assert any(name in line and reason in line for line in errors), (name, errors)
    assert "4 file(s) failed" in result.stderr
    assert "NO face found" in result.stderr and "sky.png" in result.stderr
    assert "skipped" in result.stderr
    assert sorted(p.name for p in out.rglob("*")) == sorted(
        ["astronaut_anonymized.jpg", "nested", "group_anonymized.jpg", "sky_anonymized.png"]
    )


def test_json_report(runner, mixed_batch, tmp_path):
    result = runner.invoke(main, ["anonymize", str(mixed_batch), "-o", str(tmp_path / "o"), "--json"])
    report = json.loads(result.stdout)
    assert report["exit_code"] == 3 == result.exit_code
    assert report["images"] == 7 and report["faces"] == 5 and report["failed_files"] == 4
    assert report["no_face_images"] == 1
    statuses = {Path(f["path"]).name: f["status"] for f in report["files"]}
    assert statuses["group.jpg"] == "protected" and statuses["sky.png"] == "no_face"
    assert report["options"]["keep_metadata"] is False


def test_exit_codes_all_good_and_no_face(runner, samples_dir, tmp_path):
    good = runner.invoke(main, ["anonymize", str(samples_dir / "astronaut.jpg"), "-o", str(tmp_path), "-q"])
    assert good.exit_code == 0, good.output
    Image.new("RGB", (64, 64), "white").save(tmp_path / "blank.png")
    none = runner.invoke(main, ["anonymize", str(tmp_path / "blank.png"), "-o", str(tmp_path / "o"), "-q"])
    assert none.exit_code == 1 and "NO face" in none.stderr


def test_usage_errors_exit_2(runner, tmp_path, samples_dir):
    assert runner.invoke(main, ["anonymize", str(tmp_path / "missing.jpg")]).exit_code == 2
    assert (
        runner.invoke(main, ["anonymize", str(samples_dir / "astronaut.jpg"), "--method", "smear"]).exit_code
        == 2
    )
    result = runner.invoke(
        main, ["anonymize", str(samples_dir / "astronaut.jpg"), "--method", "mask", "--blocks", "3"]
    )
    assert result.exit_code == 2


def test_default_output_beside_input_never_overwrites(runner, samples_dir, tmp_path):
    photo = tmp_path / "me.jpg"
    shutil.copy(samples_dir / "astronaut.jpg", photo)
    original = photo.read_bytes()
    assert runner.invoke(main, ["anonymize", str(photo), "-q"]).exit_code == 0
    assert (tmp_path / "me_anonymized.jpg").is_file() and photo.read_bytes() == original
    again = runner.invoke(main, ["anonymize", str(photo), "-q"])
    assert again.exit_code == 3 and "output exists" in again.stderr
    assert runner.invoke(main, ["anonymize", str(photo), "-q", "--overwrite"]).exit_code == 0
    # writing into the input folder itself: outputs get a tag, inputs stay
    assert (
        runner.invoke(main, ["anonymize", str(tmp_path), "-o", str(tmp_path), "-q", "--overwrite"]).exit_code
        == 0
    )
    assert photo.read_bytes() == original


def test_gps_removed_from_output(runner, samples_dir, tmp_path):
    exif = Image.Exif()
    exif[0x010F] = "FaceCam"
    exif[GPS_IFD] = {1: "N", 2: (48.0, 51.0, 24.0), 3: "E", 4: (2.0, 21.0, 3.0)}
    Image.open(samples_dir / "astronaut.jpg").save(tmp_path / "gps.jpg", exif=exif.tobytes(), quality=95)
    for flags, make in (([], None), (["--keep-metadata"], "FaceCam")):
        out = tmp_path / f"out{len(flags)}"
        assert (
            runner.invoke(
                main, ["anonymize", str(tmp_path / "gps.jpg"), "-o", str(out), "-q", *flags]
            ).exit_code
            == 0
        )
        written = Image.open(out / "gps_anonymized.jpg").getexif()
        assert GPS_IFD not in written and written.get(0x010F) == make


def test_format_option(runner, samples_dir, tmp_path):
    result = runner.invoke(
        main, ["anonymize", str(samples_dir / "astronaut.jpg"), "-o", str(tmp_path), "--format", "png", "-q"]
    )
    assert result.exit_code == 0
    assert Image.open(tmp_path / "astronaut_anonymized.png").format == "PNG"


def test_detect_command(runner, samples_dir):
    result = runner.invoke(main, ["detect", str(samples_dir / "group.jpg"), "--json"])
    assert result.exit_code == 0
    faces = json.loads(result.stdout)[0]["faces"]
    assert len(faces) == 4 and set(faces[0]["landmarks"]) == {
        "left_eye",
        "right_eye",
        "nose",
        "mouth_left",
        "mouth_right",
    }
    text = runner.invoke(main, ["detect", str(samples_dir / "astronaut.jpg")])
    assert "1 face(s)" in text.stdout


def test_help_has_examples(runner):
    result = runner.invoke(main, ["anonymize", "--help"])
    assert result.exit_code == 0 and "facecloak anonymize photos/" in result.output
    text = " ".join(result.output.split())
    assert "[default: 1.3; 0.5<=x<=4.0]" in text and "-o, --output" in text


def test_cloak_command_protects_and_reports(runner, samples_dir, tmp_path):
    result = runner.invoke(main, ["cloak", str(samples_dir / "astronaut.jpg"), "-o", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    face = report["files"][0]["faces"][0]
    assert face["protected"] is True and face["found_after_jpeg75"] is True
    assert face["models"]["dlib-resnet"]["distance_after_jpeg75"] > 0.6
    assert face["dssim"] <= 0.012 and report["options"]["level"] == "mid"
    assert (tmp_path / "astronaut_cloaked.jpg").is_file()


def test_cloak_that_falls_short_says_so(runner, samples_dir, tmp_path):
    result = runner.invoke(
        main, ["cloak", str(samples_dir / "astronaut.jpg"), "-o", str(tmp_path), "--steps", "0"]
    )
    assert result.exit_code == 1
    assert "NOT protected" in result.stdout and "1 face(s) NOT protected" in result.stderr


def test_cloak_unknown_model_is_an_error(runner, samples_dir, tmp_path):
    result = runner.invoke(main, ["cloak", str(samples_dir / "astronaut.jpg"), "--models", "nope"])
    assert result.exit_code == 3 and "unknown face model 'nope'" in result.stderr


def test_models_and_verify_commands(runner, samples_dir, tmp_path):
    listed = runner.invoke(main, ["models"])
    assert listed.exit_code == 0 and "dlib-resnet" in listed.stdout and "NOT available" in listed.stdout
    same = runner.invoke(main, ["verify", str(samples_dir / "astronaut.jpg"), str(samples_dir / "group.jpg")])
    assert same.exit_code in (0, 1) and "threshold 0.6" in same.stdout
    other = runner.invoke(
        main, ["verify", str(samples_dir / "astronaut.jpg"), str(samples_dir / "grace_hopper.jpg")]
    )
    assert other.exit_code == 1 and "DIFFERENT people" in other.stdout
    embedded = runner.invoke(main, ["embed", str(samples_dir / "astronaut.jpg"), "--json"])
    assert len(json.loads(embedded.stdout)[0]["faces"][0]["embedding"]) == 128
