"""Summaries of the protect phase: image change, cloak outcomes, realism, replacement, examples."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import Tensor

from facecloak import quality
from facecloak.datasets import Person

REALISM_KEYS = ("score_original", "score_protected", "detail_original", "detail_protected")


@dataclass
class Photos:
    """Photos of a group of people: pixels, identity label and path, in a fixed order."""

    images: list[Tensor] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)

    def add(self, image: Tensor, label: int, path: Path) -> None:
        """Append one photo."""
        self.images.append(image)
        self.labels.append(label)
        self.paths.append(path)


def _stats(values: list[float]) -> dict:
    """Mean and max of the finite values (PSNR is infinite for an untouched photo), NaN if none."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "max": math.nan}
    return {"mean": float(np.mean(finite)), "max": float(np.max(finite))}


def quality_summary(clean: list[Tensor], protected: list[Tensor], records: list[dict]) -> dict:
    """Image change (whole photo and each face), cloak outcomes, realism and replacement figures.

    ``face_dssim`` and ``face_ciede2000_*`` are the cloak's own figures per face, over the box its
    caps hold on (the detection box by default; the region around it for ``measured_on="region"``).
    """
    values = {"dssim": [], "psnr": [], "linf": []}
    for a, b in zip(clean, protected):
        if a.shape != b.shape:
            continue
        report = quality.quality_report(a, b)
        for key in values:
            values[key].append(report[key])
    face_dssim = [face["dssim"] for r in records for face in r.get("cloak", [])]
    summary = {key: _stats(vals) for key, vals in values.items()}
    summary["photos"] = len(values["dssim"])
    # said, not left out without a word: the figures were read as those of every protected photo
    summary["photos_of_another_size"] = len(clean) - summary["photos"]
    summary["per_photo"] = values
    if face_dssim:
        summary["face_dssim"] = _stats(face_dssim)
        cloaked = [face for r in records for face in r.get("cloak", []) if "ciede2000_mean" in face]
        if cloaked:
            summary["face_ciede2000_mean"] = _stats([face["ciede2000_mean"] for face in cloaked])
            summary["face_ciede2000_p99"] = _stats([face["ciede2000_p99"] for face in cloaked])
        cloak_faces = [face for r in records for face in r.get("cloak", [])]
        summary["cloak_faces"] = len(cloak_faces)
        summary["cloak_faces_protected"] = sum(face["protected"] for face in cloak_faces)
        summary["cloak_faces_escalated"] = sum(bool(face.get("escalated_from")) for face in cloak_faces)
        summary["cloak_steps_mean"] = float(np.mean([face["steps"] for face in cloak_faces]))
    summary["photos_without_face"] = sum(1 for r in records if r.get("faces", 1) == 0)
    realism = [r["realism"] for r in records if r.get("realism")]
    if realism:
        summary["realism"] = {
            "subjects": len(realism),
            "redetected": float(np.mean([r["found"] for r in realism])),
            **{key: _stats([r[key] for r in realism])["mean"] for key in REALISM_KEYS},
        }
        # replaced subjects apart: a blurred fallback is, by design, no longer found as a face
        replaced_found = [
            r["realism"]["found"]
            for r in records
            if r.get("realism")
            and r.get("replace")
            and "face" in r["realism"]
            and r["replace"][r["realism"]["face"]].get("method") == "replace"
        ]
        if replaced_found:
            summary["realism"]["replaced_subjects"] = len(replaced_found)
            summary["realism"]["redetected_replaced"] = float(np.mean(replaced_found))
    replaced = [face for r in records for face in r.get("replace", [])]
    if replaced:
        matches: dict[str, list[bool]] = {}
        for r in records:
            for name, matched in r.get("donor_match", {}).items():
                matches.setdefault(name, []).append(matched)
        summary["replace"] = {
            "faces": len(replaced),
            "replaced": sum(face.get("method") == "replace" for face in replaced),
            "protected": sum(
                face.get("method") == "replace" and bool(face.get("protected")) for face in replaced
            ),
            "blurred_small": sum(
                face.get("method") == "blur" and face.get("replaced") is not False for face in replaced
            ),
            "finished": sum(
                face.get("method") == "replace" and bool(face.get("finished")) for face in replaced
            ),
            "finished_at_mid": sum(
                face.get("method") == "replace" and face.get("finish_level") == "mid" for face in replaced
            ),
            "blurred_after_failed_tries": sum(face.get("replaced") is False for face in replaced),
            "not_protected": sum(not face.get("protected") for face in replaced),
            "attempts_mean": float(np.mean([face.get("attempts", 1) for face in replaced])),
            "subjects_matching_a_donor": {name: float(np.mean(v)) for name, v in matches.items()},
            "photos_matching_a_donor": {
                r["photo"]: {name: r["donor_distance"][name] for name, hit in r["donor_match"].items() if hit}
                for r in records
                if any(r.get("donor_match", {}).values())
            },
        }
    return summary


def examples(clean: Photos, protected: Photos, everyone: list[Person], count: int) -> list[dict]:
    """``count`` (clean, protected) pairs spread over the protected photos, for the HTML report."""
    names = {index: person.name for index, person in enumerate(everyone)}
    step = max(1, len(clean.images) // max(1, count))
    examples = []
    for i in range(0, len(clean.images), step)[:count]:
        examples.append(
            {
                "person": names[clean.labels[i]],
                "photo": clean.paths[i].name,
                "original": clean.images[i],
                "protected": protected.images[i],
            }
        )
    return examples
