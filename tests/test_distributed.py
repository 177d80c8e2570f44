"""The batch on a real local Ray cluster (2 CPUs): same outputs and same journal as the plain batch."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

ray = pytest.importorskip(
    "ray", reason="Ray is not installed: pip install 'facecloak[ray]' (about 500 MB with pyarrow and pandas)"
)
pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'facecloak[ray]'")

from facecloak.batch import Options, run_batch  # noqa: E402
from facecloak.distributed import run_distributed  # noqa: E402
from facecloak.journal import read_journal  # noqa: E402
from facecloak.pipeline import ProtectorSpec  # noqa: E402


@pytest.fixture(scope="module")
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


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
