"""Shared fixtures: real data from ../shared (via FACECLOAK_DATA / FACECLOAK_MODELS), samples, models.

Tests that need the shared LFW faces or the MobileFace model skip with a reason when they are
absent, so a user's fresh clone still runs its own tests.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Tests never see (or change) the models the person running them added with `facecloak models add`.
_TEST_CONFIG = tempfile.mkdtemp(prefix="facecloak-test-config-")
os.environ["XDG_CONFIG_HOME"] = _TEST_CONFIG
atexit.register(shutil.rmtree, _TEST_CONFIG, ignore_errors=True)
# Nor the settings that change what runs: a pixel cap, or FaceNet weights that join the default models.
for _setting in ("FACECLOAK_MAX_PIXELS", "FACECLOAK_FACENET_VGGFACE2", "FACECLOAK_FACENET_CASIA"):
    os.environ.pop(_setting, None)


def data_root() -> Path:
    """FACECLOAK_DATA, default ../shared/data beside the checkout."""
    return Path(os.environ.get("FACECLOAK_DATA", REPO.parent / "shared" / "data"))


def models_root() -> Path:
    """FACECLOAK_MODELS, default ../shared/models beside the checkout."""
    return Path(os.environ.get("FACECLOAK_MODELS", REPO.parent / "shared" / "models"))


@pytest.fixture(scope="session")
def lfw_dir() -> Path:
    """The shared LFW folder (images/ and pairs.txt)."""
    path = data_root() / "lfw"
    if not (path / "images").is_dir():
        pytest.skip(f"shared LFW data not found at {path} (set FACECLOAK_DATA)")
    return path


@pytest.fixture(scope="session")
def mobileface_dir() -> Path:
    """The shared MobileFace V2 MXNet model folder."""
    path = models_root() / "mobileface-v2"
    if not (path / "MobileFace_Identification_V2-symbol.json").is_file():
        pytest.skip(f"shared MobileFace model not found at {path} (set FACECLOAK_MODELS)")
    return path


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The bundled sample photos."""
    return SAMPLES


@pytest.fixture(scope="session")
def detector():
    """One CPU MTCNN detector for the whole session, upright only.

    The tests' photos are upright, and the quarter turns (`facecloak.turns`, the default
    ``rotations="all"``) would cost four detections each: about two minutes of the suite. The
    turns are tested in test_turns.py, and through the CLI and the service, which keep the default.
    """
    from facecloak.detect import FaceDetector

    return FaceDetector(device="cpu", rotations="none")


@pytest.fixture(scope="session")
def dlib_resnet():
    """dlib's ResNet on the CPU, built once for the whole session (tests must not change it)."""
    from facecloak.models import create_embedder

    return create_embedder("dlib-resnet", device="cpu")


@pytest.fixture(scope="session")
def remembering_detector():
    """A CPU MTCNN detector that detects each distinct photo once per session.

    For tests that measure recognition models on the same LFW photos (dlib-resnet, MobileFace):
    detection is not what they test, and doing it once keeps the suite inside CI's time.
    """
    import hashlib

    from facecloak.detect import FaceDetector
    from facecloak.faces import Faces

    class RememberingDetector(FaceDetector):
        def __init__(self) -> None:
            super().__init__(device="cpu", rotations="none")  # LFW is upright
            self.seen: dict[str, Faces] = {}

        def __call__(self, images) -> Faces:
            batch = list(images)
            keys = [hashlib.sha1(image.contiguous().cpu().numpy().tobytes()).hexdigest() for image in batch]
            new = [i for i, key in enumerate(keys) if key not in self.seen]
            if new:
                found = super().__call__([batch[i] for i in new])
                for j, i in enumerate(new):
                    self.seen[keys[i]] = found.for_image(j)
            return Faces.cat([self.seen[key].shifted(i) for i, key in enumerate(keys)])

    return RememberingDetector()
