"""Chips per second of each face model, forward and forward+backward, by batch size and device.

    python scripts/bench_models.py [--device cpu|cuda] [--batches 1,8,32,128]
                                   [--out bench-results/models.json]

Measures every registry model available here (dlib-resnet always; MobileFace from
../shared/models when present, imported from its MXNet files).
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

import torch

from _bench import REPO, devices, machine, models_root, timed, write_json
from facecloak.models import available_embedders, create_embedder


def models_to_measure(device: str) -> dict:
    found = {name: create_embedder(name, device=device) for name in available_embedders()}
    mobileface = models_root() / "mobileface-v2" / "MobileFace_Identification_V2-symbol.json"
    if mobileface.is_file() and not any(m.card.input_size == 112 for m in found.values()):
        from facecloak.models.plugins import load_model_file

        found["mobileface-v2 (shared)"] = load_model_file(
            mobileface, input_size=112, template="arcface", metric="cosine", name="mobileface-v2"
        ).to(device)
    return found


def forward(model, chips: torch.Tensor) -> None:
    with torch.no_grad():
        model(chips)


def forward_backward(model, chips: torch.Tensor) -> None:
    x = chips.clone().requires_grad_(True)
    model(x).square().sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--out", type=Path, default=REPO / "bench-results" / "models.json")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    results = {"machine": machine(), "results": []}
    for device in devices(args.device):
        for name, model in models_to_measure(device).items():
            size = model.card.input_size
            for batch in batches:
                chips = torch.rand(batch, 3, size, size, device=device)
                repeats = 3 if batch <= 32 else 2

                seconds_forward = timed(partial(forward, model, chips), device, repeats)
                seconds_both = timed(partial(forward_backward, model, chips), device, repeats)
                row = {
                    "model": name,
                    "device": device,
                    "batch": batch,
                    "forward_chips_per_s": round(batch / seconds_forward, 1),
                    "forward_backward_chips_per_s": round(batch / seconds_both, 1),
                    "forward_ms_per_batch": round(seconds_forward * 1000, 2),
                    "forward_backward_ms_per_batch": round(seconds_both * 1000, 2),
                }
                results["results"].append(row)
                print(row, flush=True)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
