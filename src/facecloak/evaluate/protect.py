"""The evaluator's protect phase: run a `facecloak.protection.Protection` on each person's photos.

The protection itself is the one the batch and the service run; what is added here is what the
evaluation records per photo besides the per-face records: the realism of the protected subject
(`realism_records`) and, for face replacement, whether the replaced face still matches a donor
(`PersonProtector`). Photos protected elsewhere are read from a folder instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from facecloak import io, quality
from facecloak._checks import check_choice
from facecloak.detect import FaceDetector
from facecloak.errors import InvalidInputError
from facecloak.evaluate.attackers import Attacker, centre_face
from facecloak.faces import Faces, box_iou
from facecloak.models.registry import embedding_distance
from facecloak.protection import Protection

OPTIMISED_CHUNK_PHOTOS = 8
"""Photos an optimising protection (a cloak) works on together; others take a person's photos at once."""

REALISM_JPEG_QUALITY = 75
"""Realism and donor matches are measured after this re-encode, as a site stores the photo."""

REDETECT_MIN_IOU = 0.3
"""A face found again after protection is the subject when its box overlaps the original this much."""


def realism_records(
    detector: FaceDetector, photos: list[Tensor], outputs: list[Tensor], faces: Faces
) -> list[dict]:
    """How much each protected photo still looks like a photo of a face: the realism beside protection.

    Per photo, for its subject (the face nearest the centre): whether a detector still finds it after
    JPEG 75 and with what confidence, against the original's, and `facecloak.quality.face_detail`
    (no reference needed) of the original and of the protected face. A blurred face is found less
    and has little detail; a replaced one should be found as surely and be as detailed as before.
    """
    uploaded = [io.jpeg_roundtrip(output, REALISM_JPEG_QUALITY) for output in outputs]
    with torch.no_grad():
        found = detector(uploaded)
    records = []
    for i, (photo, after) in enumerate(zip(photos, uploaded)):
        mine = faces.for_image(i)
        if not len(mine):
            records.append({})
            continue
        k = centre_face(mine, photo.shape[-1], photo.shape[-2])
        box = mine.boxes[k]
        again = found.for_image(i)
        score = 0.0
        if len(again):
            overlaps = box_iou(box, again.boxes)
            if float(overlaps.max()) >= REDETECT_MIN_IOU:
                score = float(again.scores[int(overlaps.argmax())])
        records.append(
            {
                "face": k,  # the subject's place among the photo's faces (its protection record)
                "found": score > 0,
                "score_original": float(mine.scores[k]),
                "score_protected": score,
                "detail_original": quality.face_detail(photo, box),
                "detail_protected": quality.face_detail(after, box),
            }
        )
    return records


def _named_after(stem: str, originals: set[str]) -> str | None:
    """The original photo a protected file's ``stem`` names (None if none).

    The longest original stem it equals or starts with followed by "_" (``<stem>_<tag>``).
    """
    owners = [original for original in originals if stem == original or stem.startswith(original + "_")]
    return max(owners, key=len, default=None)


WRITTEN_AS = ("pixels", "jpeg")
"""How a cloak's output is kept before the uploads: as cloaked (PNG), or as the JPEG the CLI writes."""


class PersonProtector:
    """Protects one person's photos for the evaluation and records each photo.

    Args:
        protection: the protection under test; None leaves the photos as they are.
        detector: finds the faces it protects (and measures realism).
        attackers: a replacement's donor matches are checked against each attacker's pipeline.
        protected_dir: read ``protected_dir/<person>/<photo stem>[_tag].<ext>`` instead of
            protecting (photos protected by another tool).
        written_as: "pixels" (a cloak as cloaked: a PNG output) or "jpeg" (a cloak held to its
            cap in the JPEG the command line writes from each photo, `facecloak.io.stored_as`).

    Records per photo: ``faces`` (count), a cloak's per-face records under ``cloak``, a
    replacement's under ``replace`` with ``donor_match`` (attacker -> the replaced subject, after
    JPEG 75, still matches a donor used); anonymisers and replacements add ``realism``.
    """

    def __init__(
        self,
        protection: Protection | None,
        detector: FaceDetector,
        attackers: Sequence[Attacker] = (),
        *,
        protected_dir: Path | None = None,
        written_as: str = "pixels",
    ) -> None:
        self.protection = protection
        self.detector = detector
        self.attackers = list(attackers)
        self.written_as = check_choice(written_as, WRITTEN_AS, "written_as")
        self.protected_dir = protected_dir
        self._donor_embeddings: dict[tuple[str, str], Tensor] = {}

    def __call__(
        self, photos: list[Tensor], paths: list[Path], person: str
    ) -> tuple[list[Tensor], list[dict]]:
        """(protected photos, one record per photo) for ``person``'s ``photos``."""
        if self.protected_dir is not None:
            return self._from_folder(paths, person), [{"source": "folder"} for _ in paths]
        if self.protection is None:
            return photos, [{"faces": None} for _ in photos]
        kind = self.protection.kind
        chunk = OPTIMISED_CHUNK_PHOTOS if self.protection.steps else max(1, len(photos))
        outputs: list[Tensor] = []
        records: list[dict] = []
        found: list[Faces] = []
        for start in range(0, len(photos), chunk):
            part = photos[start : start + chunk]
            faces = self.detector(part)
            storage = None
            if self.written_as == "jpeg" and kind == "cloak":
                sources = [io.read_image(path) for path in paths[start : start + chunk]]
                storage = [
                    io.stored_as(Path(path.name).with_suffix(".jpg"), image, None)
                    for path, image in zip(paths[start : start + chunk], sources)
                ]
            written = {} if storage is None else {"stored_as": storage}  # a protection may not take it
            result = self.protection.protect(part, faces, identity=f"evaluation:{person}", **written)
            outputs += result.images
            for k in range(len(part)):
                mine = result.records_for(k)
                record: dict = {"faces": len(mine)}
                if kind in ("cloak", "replace"):
                    record[kind] = mine
                records.append(record)
            found.append(faces.shifted(start))
        if kind == "cloak":
            return outputs, records
        faces = Faces.cat(found) if found else Faces.empty()
        for record, realism in zip(records, realism_records(self.detector, photos, outputs, faces)):
            record["realism"] = realism
        if kind == "replace":
            self._donor_matches(photos, paths, outputs, faces, records)
        return outputs, records

    def _from_folder(self, paths: list[Path], person: str) -> list[Tensor]:
        """Each photo's protected version: ``<stem>.<ext>``, else ``<stem>_<tag>.<ext>``.

        A file is taken as the version of the photo with the longest stem it is named after, so
        ``a_b_cloaked.png`` (of ``a_b.jpg``) is never taken for ``a.jpg``: that would put one
        photo in the gallery twice and leave another out.
        """
        outputs = []
        folder = self.protected_dir / person
        images = sorted(
            file
            for file in (folder.iterdir() if folder.is_dir() else ())
            if file.suffix.lower() in io.IMAGE_SUFFIXES and not file.name.startswith(".")
        )
        originals = {p.stem for p in paths} | {
            p.stem
            for path in paths[:1]
            for p in path.parent.iterdir()
            if p.suffix.lower() in io.IMAGE_SUFFIXES
        }
        for path in paths:
            mine = [file for file in images if _named_after(file.stem, originals) == path.stem]
            candidates = [f for f in mine if f.stem == path.stem] + [f for f in mine if f.stem != path.stem]
            if not candidates:
                raise InvalidInputError(f"no protected version of {path.name}", folder)
            outputs.append(io.read_image(candidates[0]).pixels)
        return outputs

    def _donor_matches(
        self,
        photos: list[Tensor],
        paths: list[Path],
        outputs: list[Tensor],
        faces: Faces,
        records: list[dict],
    ) -> None:
        """Per photo, whether each attacker still matches the replaced subject to a donor used.

        Also records the nearest donor's distance in the attacker's thresholds (``donor_distance``),
        and the photo's name where one matched, so a match can be looked at.
        """
        uploaded = [io.jpeg_roundtrip(output, REALISM_JPEG_QUALITY) for output in outputs]
        embedded = {attacker.name: attacker.embed(uploaded) for attacker in self.attackers}
        for i, (photo, record) in enumerate(zip(photos, records)):
            rows = (faces.image_index == i).nonzero()[:, 0].tolist()
            if not rows:
                continue
            subject = record["replace"][centre_face(faces.select(rows), photo.shape[-1], photo.shape[-2])]
            matches, nearest = {}, {}
            for attacker in self.attackers:
                embedding = embedded[attacker.name][i]
                if subject.get("method") != "replace" or bool(torch.isnan(embedding).any()):
                    continue
                donors = torch.stack([self._donor_embedding(attacker, d) for d in subject["donors"]])
                distances = embedding_distance(donors, embedding[None], attacker.metric)
                matches[attacker.name] = bool((distances < attacker.threshold).any())
                nearest[attacker.name] = round(float(distances.min()) / attacker.threshold, 4)
            record["donor_match"], record["donor_distance"] = matches, nearest
            if any(matches.values()):
                # person/name: two people's 1.jpg were one key, and one match was lost from the report
                record["photo"] = f"{paths[i].parent.name}/{paths[i].name}"

    def _donor_embedding(self, attacker: Attacker, donor_id: str) -> Tensor:
        key = (attacker.name, donor_id)
        if key not in self._donor_embeddings:
            bank = self.protection.replacer.bank
            chip = io.read_image(bank.folder / "chips" / f"{donor_id}.png").pixels
            self._donor_embeddings[key] = attacker.embed([chip])[0]
        return self._donor_embeddings[key]
