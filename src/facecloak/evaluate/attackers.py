"""Attackers: a scraper's recognition pipeline, photos in, one embedding per photo's subject out.

Each attacker reads its metric, match threshold and width from a model card
(`facecloak.models.registry.FaceModelCard`): `PipelineAttacker` from the registry model it runs,
`DlibAttacker` from the card of the network dlib's C++ pipeline runs (`DLIB_RESNET_CARD`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from facecloak import io
from facecloak.detect import FaceDetector
from facecloak.embed import embed_faces
from facecloak.evaluate.cache import CACHE_VERSION
from facecloak.faces import Faces
from facecloak.models.dlib_resnet import DLIB_RESNET_CARD, DLIB_RESNET_FILENAME
from facecloak.models.registry import Embedder, FaceModelCard, weights_stamp

DLIB_SHAPE_PREDICTOR_FILENAME = "shape_predictor_5_face_landmarks.dat"
DLIB_UPSAMPLE_TIMES = 1
"""dlib's HOG detector upsamples each photo once, as dlib's own examples do."""
DLIB_MIN_SIDE = 8
"""Photos narrower than this hold no face for dlib (its detector window is 80 px, upsampled once:
faces of 40 px); a 1x1 photo (a tracking pixel in a scraped folder) made dlib raise."""


def centre_face(faces: Faces, width: int, height: int) -> int:
    """Index of the face whose box centre is nearest the image centre (LFW's subject convention)."""
    centres = (faces.boxes[:, :2] + faces.boxes[:, 2:]) / 2
    return int((centres - torch.tensor([width / 2, height / 2])).norm(dim=1).argmin())


class Attacker:
    """A scraper's recognition pipeline: photos in, one embedding per photo (NaN if no face).

    Attributes:
        name: shown in the report.
        card: the model card its metric, threshold and width come from.
    """

    name: str
    card: FaceModelCard

    @property
    def metric(self) -> str:
        """How embeddings are compared ("euclidean" or "cosine"), from the card."""
        return self.card.distance

    @property
    def threshold(self) -> float:
        """Same person below this distance, from the card."""
        return self.card.match_threshold

    @property
    def dim(self) -> int:
        """Embedding width, from the card."""
        return self.card.embedding_dim

    @property
    def fingerprint(self) -> str:
        """Name plus a hash of everything that changes its embeddings (cache key)."""
        return self.name

    def embed(self, images: Sequence[Tensor]) -> Tensor:
        """(n, D) embedding of each photo's subject (the face nearest the centre), NaN if none."""
        raise NotImplementedError


class PipelineAttacker(Attacker):
    """facecloak's own pipeline with one registry model: MTCNN, similarity alignment, embedding."""

    def __init__(self, model: Embedder, detector: FaceDetector) -> None:
        self.model = model
        self.detector = detector
        self.card = model.card
        self.name = model.card.name

    @property
    def fingerprint(self) -> str:
        """Model card (template, alignment, landmarks...) and detector settings, hashed."""
        card = json.dumps(self.model.card.to_dict(), sort_keys=True, default=str)
        settings = f"{card}|{self.detector!r}|{CACHE_VERSION}|{weights_stamp(self.model.card)}"
        return f"{self.name}-{hashlib.sha1(settings.encode()).hexdigest()[:10]}"

    def embed(self, images: Sequence[Tensor]) -> Tensor:
        """Detect in batches of same-size photos, keep the centre face, embed all chips together."""
        out = torch.full((len(images), self.dim), math.nan)
        with torch.no_grad():
            faces = self.detector(list(images))
        chosen = []
        for i, image in enumerate(images):
            mine = (faces.image_index == i).nonzero()[:, 0]
            if len(mine):
                k = centre_face(faces.select(mine), image.shape[-1], image.shape[-2])
                chosen.append(int(mine[k]))
        if chosen:
            picked = faces.select(chosen)
            out[picked.image_index] = embed_faces(list(images), picked, self.model).cpu().float()
        return out


class DlibAttacker(Attacker):
    """dlib's own C++ pipeline (dlib-bin): HOG detector, 5-point predictor, ResNet descriptor.

    An implementation independent of facecloak's: its detector, landmarks, alignment and resampling
    all differ from the ones the cloak optimised through. Its network is the one
    `DLIB_RESNET_CARD` describes, so metric, threshold and width come from that card.
    """

    name = "dlib-cpp"
    card = DLIB_RESNET_CARD

    def __init__(self) -> None:
        import dlib

        from facecloak.models.dlib_format import locate_package_model

        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(locate_package_model(DLIB_SHAPE_PREDICTOR_FILENAME)))
        self._model = dlib.face_recognition_model_v1(str(locate_package_model(DLIB_RESNET_FILENAME)))

    @property
    def fingerprint(self) -> str:
        """Dlib's version, with what facecloak sets around it (upsampling, `CACHE_VERSION`).

        Dlib's version alone: a bump of `CACHE_VERSION` or of the upsampling left dlib-cpp's
        cached probes and distractors from the old pipeline, scored against a new gallery.
        """
        import dlib

        return f"{self.name}-{dlib.__version__}-up{DLIB_UPSAMPLE_TIMES}-v{CACHE_VERSION}"

    @staticmethod
    def available() -> bool:
        """Whether dlib (dlib-bin) can be imported here."""
        return importlib.util.find_spec("dlib") is not None

    def embed(self, images: Sequence[Tensor]) -> Tensor:
        """Descriptor of the face nearest each photo's centre."""
        out = torch.full((len(images), self.dim), math.nan)
        for i, image in enumerate(images):
            if min(image.shape[-2:]) < DLIB_MIN_SIDE:  # no face; and dlib refused a 1x1 array's strides
                continue
            array = io.to_uint8(image)
            found = self._detector(array, DLIB_UPSAMPLE_TIMES)
            if not len(found):
                continue
            centres = torch.tensor([[(r.left() + r.right()) / 2, (r.top() + r.bottom()) / 2] for r in found])
            k = int((centres - torch.tensor([array.shape[1] / 2, array.shape[0] / 2])).norm(dim=1).argmin())
            shape = self._predictor(array, found[k])
            out[i] = torch.tensor(list(self._model.compute_face_descriptor(array, shape, 0)))
        return out


def embed_in_batches(attacker: Attacker, images: list[Tensor], batch: int = 32) -> Tensor:
    """(n, D) embeddings of in-memory photos, ``batch`` photos per attacker call."""
    parts = [attacker.embed(images[i : i + batch]) for i in range(0, len(images), batch)]
    return torch.cat(parts) if parts else torch.zeros(0, attacker.dim)
