"""facenet-pytorch's InceptionResnetV1 (VGGFace2 or CASIA-WebFace weights), from a file the user gives.

facenet-pytorch downloads these weights on first use; facecloak never does. Point the model at
the state-dict file (``20180402-114759-vggface2.pt`` / ``20180408-102900-casia-webface.pt``)
with ``weights=`` or the environment variables below; it loads with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from facecloak.errors import ModelNotFoundError
from facecloak.models.loaders import check_finite_weights
from facecloak.models.registry import Embedder, FaceModelCard, register_embedder
from facecloak.models.templates import FACENET_TEMPLATE_160


class FacenetEmbedder(Embedder):
    """InceptionResnetV1 on 160 px chips; unit-norm 512-d embeddings, compared by cosine distance."""

    def __init__(self, card: FaceModelCard, state_dict: dict[str, Tensor]) -> None:
        super().__init__()
        from facenet_pytorch.models.inception_resnet_v1 import InceptionResnetV1

        self.card = card
        # facenet-pytorch's own files carry the training classifier (``logits.*``, 8631 classes for
        # VGGFace2): not part of the embedding, so dropped. Everything else must fit exactly: with
        # the classifier in the file, a strict load refused facenet-pytorch's own weights, and
        # without it a non-strict load left every layer missing from the file random.
        backbone = {key: value for key, value in state_dict.items() if not key.startswith("logits.")}
        self.net = InceptionResnetV1(pretrained=None, classify=False)
        mismatch = _mismatch(self.net.state_dict(), backbone)
        if mismatch:
            raise ValueError(mismatch)
        self.net.load_state_dict(backbone, strict=True)

    def forward(self, chips: Tensor) -> Tensor:
        """(N, 3, 160, 160) RGB in [0, 1] -> (N, 512) unit-norm embeddings."""
        return self.net((chips * 255.0 - 127.5) / 128.0)


def _mismatch(expected: dict[str, Tensor], given: dict[str, Tensor]) -> str:
    """What keeps ``given`` from loading into a network whose state dict is ``expected`` ("" if nothing).

    torch's own message puts the keys on lines after the first, so the one-line error named none.
    """

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")

    unexpected = sorted(map(str, set(given) - set(expected)))  # str: a key of a foreign file may be none
    missing = sorted(set(expected) - set(given))
    misshapen = sorted(
        key
        for key in set(given) & set(expected)
        if not isinstance(given[key], Tensor) or given[key].shape != expected[key].shape
    )
    found = {"unexpected keys": unexpected, "missing keys": missing, "keys of another shape": misshapen}
    return "; ".join(f"{what} ({len(keys)}): {some(keys)}" for what, keys in found.items() if keys)


def _load(card: FaceModelCard, path: Path) -> FacenetEmbedder:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad file
        raise ModelNotFoundError(f"not a PyTorch state dict ({type(error).__name__})", path) from None
    if not isinstance(state, dict) or "conv2d_1a.conv.weight" not in state:
        raise ModelNotFoundError("not an InceptionResnetV1 state dict", path)
    try:
        return check_finite_weights(FacenetEmbedder(card, state), path)
    except (RuntimeError, ValueError) as error:
        raise ModelNotFoundError(
            f"weights do not fit InceptionResnetV1 ({str(error).splitlines()[0]})", path
        ) from None


def _card(name: str, dataset: str, file: str, env: str) -> FaceModelCard:
    return FaceModelCard(
        name=name,
        input_size=160,
        template=FACENET_TEMPLATE_160,
        embedding_dim=512,
        distance="cosine",
        match_threshold=0.6,
        weights=f"user-supplied {file} (facenet-pytorch's {dataset} weights; never downloaded)",
        license="MIT code (facenet-pytorch); weights under their dataset's terms",
        description=f"InceptionResnetV1 trained on {dataset} (facenet-pytorch)",
        weights_env=env,
    )


VGGFACE2 = _card("facenet-vggface2", "VGGFace2", "20180402-114759-vggface2.pt", "FACECLOAK_FACENET_VGGFACE2")
CASIA = _card("facenet-casia", "CASIA-WebFace", "20180408-102900-casia-webface.pt", "FACECLOAK_FACENET_CASIA")


@register_embedder(VGGFACE2)
def facenet_vggface2(weights: Path | None) -> FacenetEmbedder:
    """InceptionResnetV1 with VGGFace2 weights from the user's file."""
    return _load(VGGFACE2, weights)


@register_embedder(CASIA)
def facenet_casia(weights: Path | None) -> FacenetEmbedder:
    """InceptionResnetV1 with CASIA-WebFace weights from the user's file."""
    return _load(CASIA, weights)
