"""LFW verification accuracy (the shared folds of View 2, k-fold) of each face-recognition pipeline.

    python scripts/eval_lfw_verification.py [--attackers dlib-resnet,dlib-cpp] [--mobileface]
                                            [--out bench-results/lfw_verification.json]

Pipelines: facecloak's (MTCNN, alignment per the model's card, the model) for registry models;
dlib's own C++ pipeline (``dlib-cpp``, HOG + 5-point predictor + ResNet) when dlib-bin is installed;
with --mobileface, MobileFace V2 imported from ../shared/models (MXNet files, ArcFace template).
Each fold's threshold is chosen on the other folds. Embeddings are cached (--cache).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _bench import REPO, data_root, machine, models_root, write_json
from facecloak.datasets import read_lfw_pairs
from facecloak.defaults import SCRAPER_ROTATIONS
from facecloak.detect import FaceDetector
from facecloak.evaluate import EmbeddingCache, PipelineAttacker, build_attackers, lfw_verification


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attackers", default=None, help="default: every available model + dlib-cpp")
    parser.add_argument("--mobileface", action="store_true", help="add MobileFace V2 from ../shared/models")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "facecloak" / "embeddings")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "lfw_verification.json")
    args = parser.parse_args()
    pairs = read_lfw_pairs(data_root() / "lfw" / "pairs.txt")
    detector = FaceDetector(rotations=SCRAPER_ROTATIONS)  # LFW is upright
    attackers = build_attackers(args.attackers, detector, None)
    if args.mobileface:
        from facecloak.models.plugins import load_model_file

        symbol = models_root() / "mobileface-v2" / "MobileFace_Identification_V2-symbol.json"
        model = load_model_file(
            symbol, name="mobileface-v2", input_size=112, template="arcface", metric="cosine"
        )
        attackers.append(PipelineAttacker(model, detector))

    def progress(stage: str, done: int, total: int) -> None:
        if done == total or done % 640 == 0:
            print(f"{stage}: {done}/{total}", flush=True)

    results = lfw_verification(pairs, attackers, cache=EmbeddingCache(args.cache), on_progress=progress)
    write_json(
        args.out,
        {"machine": machine(), "pairs_file": str(data_root() / "lfw" / "pairs.txt"), "results": results},
    )


if __name__ == "__main__":
    main()
