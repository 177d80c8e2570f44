"""The Ray actor's per-batch work, run in this process: it needs no Ray (tests/test_distributed.py does)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from facecloak.batch import Options
from facecloak.distributed import ProtectActor, _list_remote
from facecloak.errors import InvalidInputError
from facecloak.pipeline import ProtectorSpec


def test_a_transparent_face_bound_for_jpeg_is_looked_for_as_the_viewer_will_see_it(tmp_path, samples_dir):
    """The actor detected on a PNG's raw colours, then the JPEG was flattened onto white.

    Here the face's pixels are fully transparent: the written JPEG shows white there, yet the
    report said one face found and blurred. The local batch flattens before detecting.
    """
    pixels = np.asarray(Image.open(samples_dir / "astronaut.jpg").convert("RGB"))
    alpha = np.full(pixels.shape[:2], 255, np.uint8)
    alpha[40:220, 150:330] = 0
    source = tmp_path / "face_hidden.png"
    Image.fromarray(np.dstack([pixels, alpha])).save(source)
    options = Options(out_dir=str(tmp_path / "out"), format="jpeg", rotations="none")
    actor = ProtectActor(ProtectorSpec("anonymize", {"method": "blur"}), options, {})
    out = actor({"uri": [str(source)], "relative": ["face_hidden.png"], "index": [0]})
    assert out["error"] == [""] and out["suffix"] == [".jpg"]
    assert json.loads(out["faces"][0]) == []  # one face "blurred" before

    opaque = tmp_path / "opaque.png"
    alpha[:] = 255
    Image.fromarray(np.dstack([pixels, alpha])).save(opaque)
    out = actor({"uri": [str(opaque)], "relative": ["opaque.png"], "index": [0]})
    assert len(json.loads(out["faces"][0])) == 1  # the same face, seen, is found


def test_a_missing_or_unknown_uri_is_one_line_not_a_traceback(tmp_path):
    """A URI that is not there was listed as a folder, an unknown scheme parsed: both a traceback.

    A missing one fails alone with its reason (as a missing local path does); a scheme nothing
    reads is the command's usage error, one line.
    """
    pytest.importorskip("pyarrow")
    missing = (tmp_path / "typo").as_uri()
    found, skipped = _list_remote([missing], several=False)
    assert found == [(missing, "typo")] and skipped == []
    actor = ProtectActor(ProtectorSpec("anonymize", {"method": "blur"}), Options(rotations="none"), {})
    out = actor({"uri": [missing], "relative": ["typo"], "index": [0]})
    assert out["error"][0].startswith(f"{missing}: cannot read") and "\n" not in out["error"][0]
    with pytest.raises(InvalidInputError, match=r"^nosuch://bucket/photos: not a URI that can be read"):
        _list_remote(["nosuch://bucket/photos"], several=False)


def test_a_ray_batch_that_runs_out_of_memory_is_protected_in_parts(tmp_path, samples_dir):
    """The actor's batch that did not fit in memory failed every photo of it."""
    import torch

    calls: list[int] = []

    class NeedsRoom:
        def protect(self, images, faces, *, stored_as=None):
            calls.append(len(images))
            if len(images) > 1 or images[0].shape[-1] == 1100:  # the group photo never fits
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return blur.protect(images, faces)

    options = Options(out_dir=str(tmp_path / "out"), rotations="none")
    actor = ProtectActor(ProtectorSpec("anonymize", {"method": "blur"}), options, {})
    blur, actor.protection = actor.protection, NeedsRoom()
    names = ["astronaut.jpg", "grace_hopper.jpg", "group.jpg"]
    out = actor({"uri": [str(samples_dir / n) for n in names], "relative": names, "index": [0, 1, 2]})
    assert out["error"][:2] == ["", ""] and all(out["data"][:2])
    assert [len(json.loads(faces)) for faces in out["faces"][:2]] == [1, 1]
    assert out["error"][2].startswith(f"{samples_dir / 'group.jpg'}: out of memory even alone (")
    assert calls == [3, 2, 1, 1, 1]
