"""How many faces `--method replace` can replace, and why the others fail: a quick probe on LFW.

    python scripts/probe_replace.py --donors BANK [--min-photos 3] [--people 40] [--photo 0] [--per-person 1]
        [--keep-mouth]

Takes LFW people with at least ``--min-photos`` photos, every n-th of them so that ``--people`` are
spread over the set, and photos ``--photo`` .. ``--photo + --per-person - 1`` of each (sorted by
name); replaces every face found, as `facecloak anonymize --method replace` does, and counts the
faces replaced, those blurred after failed tries, and for those which recogniser still saw the
original face. Use a bank of people disjoint from the ones probed (e.g. LFW people with one or
two photos: `facecloak donors add`). Every registered model checks the new faces.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

from _bench import data_root, write_json
from facecloak.defaults import SCRAPER_ROTATIONS
from facecloak.detect import FaceDetector
from facecloak.donor_bank import load_bank
from facecloak.io import read_image
from facecloak.replace import FaceReplacer
from facecloak.synthesis import SynthesisSettings


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--donors", required=True, help="donor bank (name or folder)")
    parser.add_argument("--min-photos", type=int, default=3)
    parser.add_argument("--people", type=int, default=40)
    parser.add_argument("--photo", type=int, default=0, help="first photo of each person (sorted)")
    parser.add_argument("--per-person", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-finish", action="store_true", help="no away cloak on near misses")
    parser.add_argument("--keep-mouth", action="store_true", help="keep the person's own lips")
    parser.add_argument(
        "--settings", default="{}", help="JSON fields of SynthesisSettings, e.g. '{\"texture\": 0.5}'"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    root = data_root() / "lfw" / "images"
    people = [p for p in sorted(root.iterdir()) if len(list(p.glob("*.jpg"))) >= args.min_photos]
    step = max(1, len(people) // args.people)
    paths: list[Path] = [
        photo
        for person in people[::step][: args.people]
        for photo in sorted(person.glob("*.jpg"))[args.photo : args.photo + args.per_person]
    ]
    detector = FaceDetector(device="cpu", rotations=SCRAPER_ROTATIONS)  # LFW is upright
    replacer = FaceReplacer(
        load_bank(args.donors),
        detector=detector,
        seed=0,
        finish=not args.no_finish,
        keep_mouth=args.keep_mouth,
        settings=SynthesisSettings(**json.loads(args.settings)),
    )
    counts: collections.Counter = collections.Counter()
    started = time.perf_counter()
    for start in range(0, len(paths), args.batch):
        images = [read_image(path).pixels for path in paths[start : start + args.batch]]
        result = replacer(images, detector(images))
        for record in result.records:
            counts["faces"] += 1
            counts["tries"] += record.get("attempts", 0)
            if record.get("replaced", record["method"] == "replace"):
                counts["replaced"] += 1
                counts["of which finished by an away cloak"] += bool(record.get("finished"))
                continue
            reason = record.get("reason", "")
            counts["blurred, too small" if "min_face" in reason else "blurred after failed tries"] += 1
            for name, distance in record.get("distance_to_original", {}).items():
                if distance < record["thresholds"][name]:
                    counts[f"best try still near the original on {name}"] += 1
            if "donor" in reason:
                counts["best try near a donor used"] += 1
    summary = dict(counts, photos=len(paths), seconds=round(time.perf_counter() - started, 1))
    summary["tries_per_face"] = round(counts["tries"] / max(1, counts["faces"]), 2)
    summary.pop("tries")
    print(summary)
    if args.out:
        write_json(Path(args.out), {"settings": vars(args), "summary": summary})


if __name__ == "__main__":
    main()
