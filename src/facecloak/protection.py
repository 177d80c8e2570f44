"""The one contract for "a protection": photos and their faces in, protected photos and per-face records out.

Batch, pipeline, service, distributed workers and the evaluator all run a protection through
`Protection.protect`; the three kinds (`AnonymizeFaces`, `CloakFaces`, `ReplaceFaces`) wrap the
library's tensor-level classes (`facecloak.anonymize.Anonymizer`, `facecloak.cloak.Cloak`,
`facecloak.replace.FaceReplacer`). Per-person state is an argument: ``identity`` is the key of the
person the photos show (a targeted cloak pulls every photo of one key the same way), never set
on the object from outside.

A protection may also offer ``for_worker()``: a copy that can run beside the original on another
thread (the models shared, the per-call state its own), or None where it cannot. The pipeline
runs chunks concurrently on a CPU only for protections that offer one.

Example:
    >>> protection = AnonymizeFaces(Anonymizer("blur"))  # doctest: +SKIP
    >>> result = protection.protect([photo], detector([photo]))  # doctest: +SKIP
    >>> result.images[0].shape, result.records_for(0)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from facecloak._checks import check_faces, check_image_list
from facecloak.anonymize import Anonymizer
from facecloak.cloak import Cloak, create_cloak
from facecloak.cloak.base import PersonReferences, StepCallback, StoredAs
from facecloak.cloak.budget import LEVELS, STRONGER_LEVEL
from facecloak.faces import Faces, boxes_overlap, face_regions, pixel_bounds
from facecloak.models.registry import Embedder


@dataclass(frozen=True)
class ProtectionResult:
    """What a protection did to a chunk of photos.

    Attributes:
        images: one protected (3, H_i, W_i) image per input, on the CPU, in [0, 1].
        records: one JSON-ready dict per face, in ``faces`` order, each with a bool ``protected``.
        image_index: (N,) which input image each record's face belongs to.
        to_write: where a cloak held its photos to a lossy ``stored_as``, one (3, H_i, W_i) per
            input to hand to its writer, whose file then decodes to ``images`` (what the records
            measure); None: ``images`` are what to write (`to_encode`).
    """

    images: list[Tensor]
    records: list[dict]
    image_index: tuple[int, ...]
    to_write: list[Tensor] | None = None

    def records_for(self, k: int) -> list[dict]:
        """The records of image ``k``'s faces, for its own file's report.

        Without ``image_index``: it is the photo's place in the chunk, which a file's report
        showed as if it meant something there (a batch's second photo read ``"image_index": 1``).
        """
        return [
            {key: value for key, value in record.items() if key != "image_index"}
            for record, index in zip(self.records, self.image_index)
            if index == k
        ]

    def to_encode(self, k: int) -> Tensor:
        """The pixels to hand image ``k``'s writer so that its file holds what the records measured.

        A cloak held to a JPEG measures the photo as that file decodes (``images``); encoding
        that decoded photo again quantises its change a second time (`CloakResult.to_write`).
        """
        return self.images[k] if self.to_write is None else self.to_write[k]


class Protection(Protocol):
    """Anything that protects the faces of a chunk of photos.

    Attributes:
        kind: "anonymize", "cloak" or "replace" (as `facecloak.pipeline.ProtectorSpec.kind`).
        tag: output name suffix, e.g. "cloaked", "blur".
        steps: most optimisation steps per face (0 for a protection that does not optimise).
        aim: the multiple of a model's match threshold an optimising protection aims at, else None.
    """

    kind: str
    tag: str
    steps: int
    aim: float | None

    def protect(
        self,
        images: Tensor | Sequence[Tensor],
        faces: Faces,
        *,
        identity: str | None = None,
        on_step: StepCallback | None = None,
        stored_as: Sequence[StoredAs | None] | None = None,
    ) -> ProtectionResult:
        """Protect every face; ``on_step`` is called after each optimisation step (if any).

        ``stored_as``: per photo, how its output file will hold it (`facecloak.io.as_written`);
        a cloak holds its caps and runs its check on that, an anonymiser needs none of it.
        """
        ...


def _result(
    images: list[Tensor], records: list[dict], faces: Faces, to_write: list[Tensor] | None = None
) -> ProtectionResult:
    return ProtectionResult(
        [image.cpu() for image in images],
        records,
        tuple(faces.image_index.tolist()),
        None if to_write is None else [image.cpu() for image in to_write],
    )


class AnonymizeFaces:
    """Anonymise every face (see `facecloak.anonymize`); every face found counts as protected.

    Except with method "replace": there each face's record is the replacer's own, and one whose
    every donor mix failed a check may be NOT protected (`facecloak.replace.replace_faces`).

    Its outputs are tagged by method (``photo_blur.jpg``, ``photo_pixelate.jpg``,
    ``photo_mask.jpg``), so runs of different methods into one folder do not collide.
    """

    kind = "anonymize"
    steps = 0
    aim = None

    def __init__(self, anonymizer: Anonymizer) -> None:
        self.anonymizer = anonymizer
        self.tag = anonymizer.method

    def __repr__(self) -> str:
        return f"AnonymizeFaces({self.anonymizer!r})"

    def for_worker(self) -> AnonymizeFaces | None:
        """Itself: anonymising keeps no state between calls; None for method "replace".

        The replacer `replace_faces` shares from its cache keeps each call's state: `ReplaceFaces`
        runs on workers, each with its own copy.
        """
        return None if self.anonymizer.method == "replace" else self

    def protect(
        self,
        images: Tensor | Sequence[Tensor],
        faces: Faces,
        *,
        identity: str | None = None,
        on_step: StepCallback | None = None,
        stored_as: Sequence[StoredAs | None] | None = None,
    ) -> ProtectionResult:
        """Anonymise each image's faces (images of any sizes: one anonymiser call per image)."""
        photos = check_image_list(images)
        check_faces(faces, len(photos))
        if self.anonymizer.method == "replace":
            # its own records: a face whose every donor mix failed (``fallback="keep"``) is NOT
            # protected, yet was reported protected like a blurred one
            from facecloak.replace import replace_faces

            replaced = replace_faces(photos, faces, **self.anonymizer.params)
            return _result(replaced.images, replaced.records, faces)
        outputs = []
        for k, image in enumerate(photos):
            mine = faces.for_image(k)
            outputs.append(self.anonymizer(image[None], mine.to(image.device))[0] if len(mine) else image)
        records = [
            dict(record, protected=True, method=self.anonymizer.method) for record in faces.to_records()
        ]
        return _result(outputs, records, faces)


_BUDGET_OVERRIDES = ("budget", "steps", "max_dssim", "max_linf", "aim")
"""`Cloak` keywords that change a level's budget: an escalation's stronger level keeps its own."""
_LARGER_KEPT = ("steps", "max_dssim", "max_linf", "aim")
"""Those of them an escalation keeps where they exceed the stronger level's own."""


class CloakFaces:
    """Cloak every face of a chunk of photos in one optimisation (see `facecloak.cloak`).

    A face is protected when every model's distance after a JPEG 75 re-encode passes its threshold.
    """

    kind = "cloak"
    tag = "cloaked"

    def __init__(self, cloak: Cloak, escalate_to: Cloak | None = None) -> None:
        """``escalate_to``: a stronger cloak (the next level) for the faces that fall short.

        They are cloaked again with it from their original pixels (`escalate`); None: they are
        reported as they are.
        """
        self.cloak = cloak
        self.escalate_to = escalate_to
        self.steps = cloak.budget.steps
        self.aim = cloak.budget.aim

    def __repr__(self) -> str:
        return f"CloakFaces({self.cloak!r}, escalate_to={self.escalate_to!r})"

    @classmethod
    def create(
        cls, mode: str, models: Sequence[Embedder], level: str, *, escalate: bool = False, **options
    ) -> CloakFaces:
        """`create_cloak`'s cloak, and with ``escalate`` the next level's for faces that fall short.

        The stronger cloak (`STRONGER_LEVEL`) takes the same options and its own level's budget,
        except where the first level's ``steps``, ``max_dssim``, ``max_linf`` or ``aim`` were
        given larger: those stay, so escalating never spends less (``--level low --max-dssim
        0.02 --escalate`` went on at mid's cap of 0.008).
        """
        stronger = None
        if escalate and level in STRONGER_LEVEL:
            own = {key: value for key, value in options.items() if key not in _BUDGET_OVERRIDES}
            budget = LEVELS[STRONGER_LEVEL[level]]
            larger = {
                key: value
                for key in _LARGER_KEPT
                if (value := options.get(key)) is not None and value > getattr(budget, key)
            }
            stronger = create_cloak(mode, models, STRONGER_LEVEL[level], **own, **larger)
        return cls(create_cloak(mode, models, level, **options), stronger)

    def for_worker(self) -> CloakFaces | None:
        """A copy with its own per-call state (references, targets), sharing the models.

        None for a cloak that hooks into the shared models while it runs (feature dropout, skip
        gradients, feature losses).
        """
        cloak = self.cloak
        if cloak.dropout > 0 or cloak.skip_gradient < 1 or cloak.feature_weight > 0:
            return None
        stronger = None if self.escalate_to is None else copy.copy(self.escalate_to)
        return CloakFaces(copy.copy(cloak), stronger)

    def protect(
        self,
        images: Tensor | Sequence[Tensor],
        faces: Faces,
        *,
        identity: str | None = None,
        on_step: StepCallback | None = None,
        stored_as: Sequence[StoredAs | None] | None = None,
    ) -> ProtectionResult:
        """Cloak the faces; ``identity`` keys a targeted cloak's direction for this person."""
        result = self.cloak(images, faces, on_step=on_step, identity=identity, stored_as=stored_as)
        outputs, records, to_write = list(result.images), result.records(faces), result.to_write
        if self.escalate_to is not None:
            originals = check_image_list(images)
            person = getattr(self.cloak, "person_references", None)
            outputs, records, to_write = escalate(
                self.escalate_to,
                originals,
                faces,
                outputs,
                records,
                self.cloak.level,
                identity,
                stored_as,
                to_write=to_write,
                references=person() if person is not None else None,
            )
        return _result(outputs, records, faces, to_write)


def escalate(
    stronger: Cloak,
    originals: list[Tensor],
    faces: Faces,
    outputs: list[Tensor],
    records: list[dict],
    level: str,
    identity: str | None = None,
    stored_as: Sequence[StoredAs | None] | None = None,
    *,
    to_write: list[Tensor] | None = None,
    references: PersonReferences | None = None,
) -> tuple[list[Tensor], list[dict], list[Tensor] | None]:
    """Cloak the faces that fell short again with ``stronger``; keep those that then pass.

    The stronger cloak starts from the original pixels (its budget and its check measure from the
    clean face, as the first cloak's did). Faces whose regions overlap go together, a *cluster*
    (pasting one face's region alone would undo part of its neighbour's cloak): a cluster holding
    a face that fell short is cloaked again whole, and taken from the stronger result, region by
    region, only if every face of it then passes; the rest of the photo stays ``outputs``'. A face
    not helped keeps its first, less visible, result (``escalation`` in its record says so).
    ``level``: the first cloak's, recorded as ``escalated_from`` beside the new ``level``.
    ``to_write``: the first cloak's photos for a lossy writer (`CloakResult.to_write`), which
    take the stronger cloak's regions as ``outputs`` do. ``references``: the first cloak's per-face
    person references and photo counts (`UntargetedCloak.person_references`): the faces cloaked
    again are pushed from their person's mean over the whole call, as the first time, not from a
    mean over the few that fell short (a face alone among them would lose it). Returns new
    outputs, records and ``to_write`` (None if neither cloak had any); those given are not changed.
    """
    regions = face_regions(faces, stronger.region_scale)
    clusters = _overlap_clusters(faces, regions)
    retry = [cluster for cluster in clusters if any(not records[n].get("protected") for n in cluster)]
    if not retry:
        return outputs, records, to_write
    rows = sorted(n for cluster in retry for n in cluster)
    if references is not None:  # the rows' own: the call's person means, not those of these few
        index = torch.tensor(rows, dtype=torch.long)
        references = ([table[index.to(table.device)] for table in references[0]], references[1][index])
    retried = stronger(
        originals, faces.select(rows), identity=identity, stored_as=stored_as, references=references
    )
    again = dict(zip(rows, retried.records(faces.select(rows))))
    outputs, records = [image.clone() for image in outputs], [dict(record) for record in records]
    if to_write is not None or retried.to_write is not None:
        to_write = [image.clone() for image in (outputs if to_write is None else to_write)]
    sources = retried.images if retried.to_write is None else retried.to_write
    pasted = set()
    for cluster in retry:
        if not all(again[n].get("protected") for n in cluster):
            for n in cluster:
                if not records[n].get("protected"):
                    records[n]["escalation"] = f"{stronger.level} fell short too"
            continue
        for n in cluster:
            i = int(faces.image_index[n])
            x0, y0, x1, y1 = pixel_bounds(regions[n].tolist(), *outputs[i].shape[-2:])
            outputs[i][:, y0:y1, x0:x1] = retried.images[i][:, y0:y1, x0:x1].to(outputs[i])
            if to_write is not None:
                to_write[i][:, y0:y1, x0:x1] = sources[i][:, y0:y1, x0:x1].to(to_write[i])
                pasted.add(i)
            records[n] = {**again[n], "escalated_from": level, "level": stronger.level}
    for i in pasted:  # a lossy file's blocks reach past a region: the photo as its file decodes
        if stored_as is not None and stored_as[i] is not None:
            outputs[i] = stored_as[i](to_write[i]).to(outputs[i])
    return outputs, records, to_write


def _overlap_clusters(faces: Faces, regions: Tensor) -> list[list[int]]:
    """The faces grouped by overlapping regions in the same photo (connected components)."""
    unassigned, clusters = set(range(len(faces))), []
    while unassigned:
        stack, cluster = [min(unassigned)], []
        unassigned.discard(stack[0])
        while stack:
            n = stack.pop()
            cluster.append(n)
            touching = (faces.image_index == faces.image_index[n]) & boxes_overlap(regions[n], regions)
            for m in touching.nonzero()[:, 0].tolist():
                if m in unassigned:
                    unassigned.discard(m)
                    stack.append(m)
        clusters.append(sorted(cluster))
    return clusters


class ReplaceFaces:
    """Replace every face with a verified donor mix (see `facecloak.replace`).

    A face is protected when it passed every check; one too small to replace is blurred.
    """

    kind = "replace"
    tag = "replace"
    steps = 0
    aim = None

    def __init__(self, replacer) -> None:
        self.replacer = replacer

    def __repr__(self) -> str:
        return f"ReplaceFaces({self.replacer!r})"

    def for_worker(self) -> ReplaceFaces:
        """A copy sharing the models and the donor bank (whose chip cache only grows)."""
        return ReplaceFaces(copy.copy(self.replacer))

    def protect(
        self,
        images: Tensor | Sequence[Tensor],
        faces: Faces,
        *,
        identity: str | None = None,
        on_step: StepCallback | None = None,
        stored_as: Sequence[StoredAs | None] | None = None,
    ) -> ProtectionResult:
        """Replace the faces (the donors are drawn per face; ``identity`` is not used)."""
        result = self.replacer(images, faces)
        return _result(result.images, result.records, faces)


__all__ = ["AnonymizeFaces", "CloakFaces", "Protection", "ProtectionResult", "ReplaceFaces", "escalate"]
