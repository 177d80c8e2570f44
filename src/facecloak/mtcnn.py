"""MTCNN (Zhang et al., 2016) batched across photos, on facenet-pytorch 2.5.3's weights.

facenet-pytorch's ``detect_face`` runs P-Net once per pyramid scale for a batch of same-size
photos, but then cuts every candidate box out of its photo and resamples it with one
``F.interpolate(..., mode="area")`` call per box, some 60 calls per 250 px photo, before R-Net
and again before O-Net. Here every stage is one call per batch:

- P-Net: one call per pyramid scale for all photos of one size (stacked).
- R-Net and O-Net: one call over all candidate boxes of all photos, whatever their sizes. The
  crops are read from a summed-area table of each photo by `area_crops`: each output pixel is the
  mean of its input rectangle, which is what ``mode="area"`` (adaptive average pooling) computes,
  for every box at once.
- The nets run channels-last (the layout the CPU's pooling and convolution kernels are fastest
  in; about twice as fast for O-Net on a CPU), but for P-Net's first convolution, PReLU and
  pooling, faster on plain maps with its 10 channels.

Everything else (pyramid scales, thresholds, box regression, squaring, NMS and its order) follows
facenet-pytorch's ``detect_face`` step by step, so the faces, boxes and landmarks agree with it
to float rounding (tests/test_detect_batched.py). Two places depart from it, on purpose:

- A candidate box wholly outside its photo has no crop; facenet-pytorch skips the crop but not
  the box, which misaligns every later box with its scores. Here the box is dropped.
- The last NMS ("Min" overlap) runs per photo. facenet-pytorch runs it once for the batch with
  each photo's boxes shifted by ``index * (max coordinate + 1)``, which lets boxes with negative
  coordinates reach into the previous photo's range and suppress its faces.

Example:
    >>> nets = load_mtcnn_nets("cpu")  # doctest: +SKIP
    >>> found = detect_mtcnn([pixels * 255], [20.0], nets)  # doctest: +SKIP
    >>> boxes, points = found[0]  # (n, 5) x1, y1, x2, y2, score; (n, 5, 2)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from facecloak.errors import ModelNotFoundError

MTCNN_STAGE_THRESHOLDS = (0.6, 0.7, 0.7)
"""facenet-pytorch's score thresholds of P-Net, R-Net and O-Net."""

PYRAMID_FACTOR = 0.709
"""Ratio between successive scales of P-Net's image pyramid (facenet-pytorch's default)."""

PNET_WINDOW_PX = 12
"""Side of P-Net's window: a face of this many pixels at some pyramid scale is found there."""

PNET_STRIDE_PX = 2
"""Step of P-Net's window, in pixels of the scaled image."""

MTCNN_PIXEL_MEAN = 127.5
MTCNN_PIXEL_SCALE = 0.0078125
"""MTCNN's nets read ``(pixel - 127.5) * 0.0078125`` (pixels 0..255)."""

RNET_INPUT_PX = 24
ONET_INPUT_PX = 48

CPU_CHUNK_CROPS = {RNET_INPUT_PX: (32, 128), ONET_INPUT_PX: (32, 32)}
"""Crops per R-Net / O-Net call on a CPU, with one intra-op thread and with more: activations
that stay in cache. Measured on 2 cores, 512 R-Net and 128 O-Net crops: one thread (the CLI's
workers) 70 -> 39 ms and 93 -> 51 ms against 256 and 64 per call; two threads, R-Net 19.4 ms at
256 and 19.7 at 128 (20.8 at 64), O-Net 58 -> 33 ms against 64."""

CPU_PNET_TILE_PX = 1 << 18
"""Largest pyramid level, in pixels, one P-Net call takes on a CPU (`run_pnet`): larger ones go in
groups of photos or strips of rows that fit the caches."""

CPU_PNET_CHUNK_PX = 1 << 20
"""Photo pixels per P-Net call on a CPU (sixteen 250 px photos). Since the pyramid is resized with
``F.interpolate`` rather than from the summed-area table, larger chunks pay: on 200 LFW photos,
4 / 16 / 32 photos per call gave 65-68 / 70-72 / 66-67 images/s (alternating runs)."""

CPU_CROP_CHUNK_PX = 1 << 15
"""Crop pixels cut per `area_crops` call on a CPU (56 crops for R-Net): its temporaries (four
corner sums per pixel) stay in cache."""

GPU_CHUNK_CROPS = 4096
"""Crops per R-Net / O-Net call on a GPU (bounds memory on big group photos)."""

PAIR_POOL_MIN_PX = 32 * 32
"""P-Net maps at least this large are pooled by `_PairMaxPool`'s strided maximums."""

NMS_IOU_PNET_SCALE = 0.5
NMS_IOU_PNET_IMAGE = 0.7
NMS_IOU_RNET = 0.7
NMS_MIN_ONET = 0.7


def mtcnn_weights_dir() -> Path:
    """The folder of facenet-pytorch's ``pnet.pt``, ``rnet.pt`` and ``onet.pt`` (never downloaded)."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or spec.origin is None:
        raise ModelNotFoundError("facenet-pytorch is not installed (pip install facenet-pytorch==2.5.3)")
    folder = Path(spec.origin).parent / "data"
    if not (folder / "pnet.pt").is_file():
        raise ModelNotFoundError("facenet-pytorch's MTCNN weights (data/pnet.pt) are missing", folder)
    return folder


def load_mtcnn_nets(
    device: str | torch.device, *, raw_pixels: bool = True
) -> tuple[nn.Module, nn.Module, nn.Module]:
    """P-Net, R-Net and O-Net with facenet-pytorch's weights, in eval mode on ``device``.

    Args:
        device: where the nets run.
        raw_pixels: the nets `detect_mtcnn` runs: they take pixels 0..255 as they are (MTCNN's
            normalisation ``(x - 127.5) / 128`` folded into each first convolution, exact but for
            float rounding, as no convolution pads), run channels-last (P-Net's first layers
            excepted, `_PNetHeads`), and P-Net's two 1x1 heads are one matrix product returning
            ``(offsets, face probability)``. False:
            facenet-pytorch's modules unchanged (what its ``detect_face`` expects).
    """
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet

    folder = mtcnn_weights_dir()
    nets = []
    for net_class, file in ((PNet, "pnet.pt"), (RNet, "rnet.pt"), (ONet, "onet.pt")):
        net = net_class(pretrained=False)
        net.load_state_dict(torch.load(folder / file, map_location="cpu", weights_only=True))
        if raw_pixels:
            net.conv1 = _fold_normalisation(net.conv1)
            if net_class is PNet:
                net = _PNetHeads(net)  # its own layout
            else:
                net = net.to(memory_format=torch.channels_last)
        nets.append(net.eval().requires_grad_(False).to(device))
    return nets[0], nets[1], nets[2]


def _fold_normalisation(conv: nn.Conv2d) -> nn.Conv2d:
    """``conv`` applied to ``(x - 127.5) / 128`` as one convolution of ``x`` (it must not pad)."""
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride)
    with torch.no_grad():
        folded.weight.copy_(conv.weight * MTCNN_PIXEL_SCALE)
        shift = (conv.weight * MTCNN_PIXEL_SCALE * MTCNN_PIXEL_MEAN).sum(dim=(1, 2, 3))
        folded.bias.copy_(conv.bias - shift)
    return folded


class _PNetHeads(nn.Module):
    """facenet-pytorch's P-Net, laid out for the CPU, its two 1x1 heads as one matrix product.

    The first convolution, its PReLU and the pooling run on plain (NCHW) maps: channels-last
    memory with P-Net's 10 channels makes the PReLU 7x slower (32 photos' 149 px level: 2.2 ->
    0.3 ms per 8 photos). The rest runs channels-last, where the later convolutions are faster,
    so the heads read each cell's 32 features contiguously. The face probability, a softmax over
    two scores, is computed as the sigmoid of their difference: the same value (within 6e-8)
    without a softmax over a strided pair. ``forward`` returns ``(B, 4, h, w)`` box offsets and
    the ``(B, h, w)`` face probability.
    """

    def __init__(self, pnet: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(pnet.conv1, pnet.prelu1, _PairMaxPool())
        self.body = nn.Sequential(pnet.conv2, pnet.prelu2, pnet.conv3, pnet.prelu3)
        self.heads = nn.Linear(32, 6)
        with torch.no_grad():
            self.heads.weight.copy_(torch.cat([pnet.conv4_1.weight, pnet.conv4_2.weight]).flatten(1))
            self.heads.bias.copy_(torch.cat([pnet.conv4_1.bias, pnet.conv4_2.bias]))
        self.body.to(memory_format=torch.channels_last)

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor]:
        stem = self.stem(pixels.contiguous()).contiguous(memory_format=torch.channels_last)
        features = self.body(stem).permute(0, 2, 3, 1)  # (B, h, w, 32), contiguous
        heads = self.heads(features)
        probability = torch.sigmoid(heads[..., 1] - heads[..., 0])
        return heads[..., 2:].permute(0, 3, 1, 2), probability


class _PairMaxPool(nn.Module):
    """P-Net's 2x2, stride 2, ``ceil_mode`` max pooling as two element-wise maximums of strided views.

    The same values as `nn.MaxPool2d(2, 2, ceil_mode=True)` (an odd last row or column is a window
    of its own, as with ``ceil_mode``), written straight into the output: no padded copy. On the
    CPU the pooling kernel is several times slower on P-Net's large maps (32 photos' 148 px level:
    8.6 -> 1.3 ms); on small maps it is the faster one, and is kept.
    """

    def forward(self, features: Tensor) -> Tensor:
        batch, channels, height, width = features.shape
        if height * width < PAIR_POOL_MIN_PX:
            return F.max_pool2d(features, 2, 2, ceil_mode=True)
        pairs_y, pairs_x = height // 2, width // 2
        last = features.is_contiguous(memory_format=torch.channels_last)
        layout = torch.channels_last if last else torch.contiguous_format
        like = {"dtype": features.dtype, "device": features.device, "memory_format": layout}
        rows = torch.empty((batch, channels, -(-height // 2), width), **like)
        even, odd = features[..., 0 : 2 * pairs_y : 2, :], features[..., 1 : 2 * pairs_y : 2, :]
        torch.maximum(even, odd, out=rows[..., :pairs_y, :])
        if height % 2:  # ceil_mode: the last row is a window of its own
            rows[..., pairs_y, :] = features[..., height - 1, :]
        out = torch.empty((batch, channels, rows.shape[2], -(-width // 2)), **like)
        torch.maximum(rows[..., 0 : 2 * pairs_x : 2], rows[..., 1 : 2 * pairs_x : 2], out=out[..., :pairs_x])
        if width % 2:
            out[..., pairs_x] = rows[..., width - 1]
        return out


def pyramid_scales(
    height: int, width: int, min_face_px: float, factor: float = PYRAMID_FACTOR
) -> list[float]:
    """P-Net's scales for a ``height`` x ``width`` photo: the first maps ``min_face_px`` to 12 px.

    Computed with facenet-pytorch's float operations, so the scaled sizes match to the pixel.

    Example:
        >>> [round(s, 3) for s in pyramid_scales(250, 250, 20.0)][:3]
        [0.6, 0.425, 0.302]
    """
    scale = PNET_WINDOW_PX / min_face_px
    side = min(height, width) * scale
    scales = []
    while side >= PNET_WINDOW_PX:
        scales.append(scale)
        scale = scale * factor
        side = side * factor
    return scales


def summed_area_table(images: Tensor) -> Tensor:
    """``(B, H + 1, W + 1, 3)`` int32 sums of ``images`` ``(B, 3, H, W)`` above and left of each point.

    ``table[b, y, x]`` is the sum of ``images[b, :, :y, :x]`` per channel, the pixels taken as
    whole grey levels (0..255): a photo's are, and rounding removes only the float noise of the
    scaling to 0..1 and back (a 16-bit photo would lose under half a level). Integer sums are
    exact, and (int32, up to 8 MP) half the size of float64 ones: building the table and reading
    crops from it move half the memory. Channels last, so that one
    look-up reads a pixel's three channels. On a CPU the sums run photo by photo (a 250 px
    photo's fit in cache).

    Example:
        >>> summed_area_table(torch.ones(1, 3, 2, 2))[0, :, :, 0].tolist()
        [[0, 0, 0], [0, 1, 2], [0, 2, 4]]
    """
    batch, _, height, width = images.shape
    exact = torch.int32 if height * width * 255 < 2**31 else torch.int64  # photos over 8 MP: int64
    table = images.new_empty((batch, height + 1, width + 1, 3), dtype=exact)
    table[:, 0] = 0
    table[:, 1:, 0] = 0
    table[:, 1:, 1:] = images.permute(0, 2, 3, 1) + 0.5  # to the nearest level (the copy truncates)
    for photo in [table] if images.is_cuda else table.split(1):
        photo.cumsum_(1).cumsum_(2)  # in place: no second table-sized buffer
    return table


def _area_bins(start: Tensor, stop: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """First and last (exclusive) input index of each of ``size`` adaptive-average-pooling bins.

    For ``n = stop - start`` inputs, output ``i`` averages ``floor(i n / size)`` to
    ``ceil((i + 1) n / size)``, PyTorch's ``adaptive_avg_pool2d`` (``mode="area"``) rule.
    ``start`` and ``stop`` are ``(K,)``; the result is two ``(K, size)`` tensors.
    """
    steps = torch.arange(size + 1, device=start.device)
    count = (stop - start)[:, None]
    first = start[:, None] + (steps[None, :-1] * count) // size
    last = start[:, None] + (steps[None, 1:] * count + size - 1) // size
    return first, last


def area_resize(table: Tensor, size: tuple[int, int]) -> Tensor:
    """Whole photos resized to ``size`` (rows, columns) as ``F.interpolate(mode="area")`` does.

    Each output pixel is the mean of its adaptive-average-pooling bin (`_area_bins`), read from
    the `summed_area_table` ``(B, H + 1, W + 1, 3)``: the rows that bound the bins first, then the
    columns. The same values as ``F.interpolate`` to float rounding (whole-level sums, one
    division); on a CPU half the time for a pyramid of 250 px photos (20.3 -> 9.5 ms for eight
    photos' eight levels, one thread). Returns ``(B, 3, rows, columns)`` float32 on the table's
    device.
    """
    _, table_height, table_width, _ = table.shape
    zero = torch.zeros(1, dtype=torch.long, device=table.device)
    row0, row1 = (bins[0] for bins in _area_bins(zero, zero + table_height - 1, size[0]))
    col0, col1 = (bins[0] for bins in _area_bins(zero, zero + table_width - 1, size[1]))
    rows = table.index_select(1, row1) - table.index_select(1, row0)  # (B, rows, W + 1, 3)
    sums = (rows.index_select(2, col1) - rows.index_select(2, col0)).float()
    area = ((row1 - row0)[:, None] * (col1 - col0)[None, :]).float()
    return (sums / area[None, :, :, None]).permute(0, 3, 1, 2).contiguous()


def area_crops(
    table: Tensor, image_index: Tensor, top: Tensor, bottom: Tensor, left: Tensor, right: Tensor, size: int
) -> Tensor:
    """Crops resampled to ``size`` x ``size`` the way ``F.interpolate(mode="area")`` does, all at once.

    Crop ``k`` is rows ``[top[k], bottom[k])`` and columns ``[left[k], right[k])`` of photo
    ``image_index[k]``; each output pixel is the mean of its bin (`_area_bins`), summed from the
    summed-area table with four look-ups.

    Args:
        table: `summed_area_table` of the photos, ``(B, H + 1, W + 1, 3)``.
        image_index: ``(K,)`` long, which photo each crop comes from.
        top: ``(K,)`` long, first row of each crop.
        bottom: ``(K,)`` long, the row after its last (every crop holds at least one row).
        left: ``(K,)`` long, first column.
        right: ``(K,)`` long, the column after its last.
        size: output side.

    Returns:
        ``(K, 3, size, size)`` float32 in channels-last memory format.

    Example:
        >>> image = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4)
        >>> one = torch.tensor([0])
        >>> crop = area_crops(summed_area_table(image), one, one, one + 4, one, one + 4, 2)
        >>> crop[0, 0].tolist()
        [[2.5, 4.5], [10.5, 12.5]]
    """
    _, table_height, table_width, _ = table.shape
    row0, row1 = _area_bins(top, bottom, size)  # (K, size)
    col0, col1 = _area_bins(left, right, size)
    area = ((row1 - row0)[:, :, None] * (col1 - col0)[:, None, :])[..., None]
    base = (image_index * table_height)[None, :, None, None]
    rows = torch.stack([row1, row0, row1, row0])[:, :, :, None] + base  # (4, K, size, 1)
    cols = torch.stack([col1, col1, col0, col0])[:, :, None, :]  # (4, K, 1, size)
    flat = (rows * table_width + cols).reshape(-1)
    corners = table.reshape(-1, 3).index_select(0, flat).view(4, len(top), size, size, 3)
    sums = (corners[0] - corners[1] - corners[2] + corners[3]).float()
    return (sums / area).permute(0, 3, 1, 2)


def detect_mtcnn(
    groups: Sequence[Tensor],
    min_face_px: Sequence[float],
    nets: tuple[nn.Module, nn.Module, nn.Module],
    *,
    thresholds: tuple[float, float, float] = MTCNN_STAGE_THRESHOLDS,
    factor: float = PYRAMID_FACTOR,
) -> list[tuple[Tensor, Tensor]]:
    """Run MTCNN over groups of same-size photos; R-Net and O-Net see every group's boxes at once.

    Args:
        groups: stacks ``(B_g, 3, H_g, W_g)`` of photos, pixel values 0..255 (MTCNN's scale), all
            on the nets' device.
        min_face_px: per group, the smallest face side looked for, in that group's pixels
            (under 12, P-Net's window, the pyramid's first level enlarges the photos).
        nets: `load_mtcnn_nets`'s P-Net, R-Net and O-Net.
        thresholds: score thresholds of the three stages.
        factor: pyramid scale ratio.

    Returns:
        For every photo, groups in order: ``(n, 5)`` boxes ``x1, y1, x2, y2, score`` and
        ``(n, 5, 2)`` landmarks ``(x, y)``, best score first, float32 on the CPU.
    """
    pnet, rnet, onet = nets
    with torch.no_grad():
        tables, boxes, image_index, first = [], [], [], 0
        for stack, min_face in zip(groups, min_face_px):
            height, width = stack.shape[2:]
            chunk = len(stack) if stack.is_cuda else max(1, CPU_PNET_CHUNK_PX // (height * width))
            found, index, group_tables = _pnet_candidates(
                pnet, stack.split(chunk), min_face, thresholds[0], factor
            )
            boxes.append(found)
            image_index.append(index + first)
            tables += group_tables
            first += len(stack)
        if first == 0:
            return []
        crops = _Cropper(tables)
        boxes, image_index = torch.cat(boxes), torch.cat(image_index)
        boxes, image_index = _rnet_refine(rnet, crops, boxes, image_index, thresholds[1])
        boxes, points, image_index = _onet_output(onet, crops, boxes, image_index, thresholds[2])

    boxes, points, image_index = boxes.cpu(), points.cpu(), image_index.cpu()
    order = torch.argsort(image_index, stable=True)  # per photo, keeping the NMS (score) order
    counts = torch.bincount(image_index, minlength=first).tolist()
    return list(zip(boxes[order].split(counts), points[order].split(counts)))


class _Cropper:
    """Cuts candidate boxes out of photos of several sizes, as facenet-pytorch does (its ``pad``)."""

    def __init__(self, tables: list[Tensor]) -> None:
        self.tables = tables
        device = tables[0].device
        self.group_of = torch.cat([torch.full((len(t),), g, device=device) for g, t in enumerate(tables)])
        self.local_of = torch.cat([torch.arange(len(t), device=device) for t in tables])
        self.heights = torch.cat([torch.full((len(t),), t.shape[1] - 1, device=device) for t in tables])
        self.widths = torch.cat([torch.full((len(t),), t.shape[2] - 1, device=device) for t in tables])

    def __call__(self, boxes: Tensor, image_index: Tensor, size: int) -> tuple[Tensor, Tensor]:
        """Normalised ``(K, 3, size, size)`` crops of ``boxes`` and a ``(K,)`` mask of boxes that have one.

        The box is truncated to integers, clipped to 1..W and 1..H, and rows ``y1 - 1`` to ``y2``
        (exclusive) and the like columns are cut out (not padded), then resampled to ``size``.
        """
        corners = boxes[:, :4].trunc().int().long()
        left = corners[:, 0].clamp(min=1) - 1
        top = corners[:, 1].clamp(min=1) - 1
        right = torch.minimum(corners[:, 2], self.widths[image_index])
        bottom = torch.minimum(corners[:, 3], self.heights[image_index])
        valid = (right > left) & (bottom > top)
        out = boxes.new_zeros(len(boxes), 3, size, size).contiguous(memory_format=torch.channels_last)
        chosen = valid.nonzero()[:, 0]
        chosen = chosen[torch.argsort(image_index[chosen], stable=True)]  # photo by photo: cache-friendly
        groups = self.group_of[image_index[chosen]]
        step = len(chosen) if boxes.is_cuda else max(1, CPU_CROP_CHUNK_PX // size**2)
        for g, table in enumerate(self.tables):
            for mine in chosen[groups == g].split(step):
                local = self.local_of[image_index[mine]]
                out[mine] = area_crops(table, local, top[mine], bottom[mine], left[mine], right[mine], size)
        return out, valid


def _square(boxes: Tensor) -> Tensor:
    """facenet-pytorch's ``rerec``: the square of the longer side about the same centre (in place)."""
    height = boxes[:, 3] - boxes[:, 1]
    width = boxes[:, 2] - boxes[:, 0]
    side = torch.max(width, height)
    boxes[:, 0] = boxes[:, 0] + width * 0.5 - side * 0.5
    boxes[:, 1] = boxes[:, 1] + height * 0.5 - side * 0.5
    boxes[:, 2:4] = boxes[:, :2] + side[:, None]
    return boxes


def _regress(boxes: Tensor, offsets: Tensor) -> Tensor:
    """facenet-pytorch's ``bbreg``: move each side by ``offsets`` times the (inclusive) box size."""
    width = boxes[:, 2] - boxes[:, 0] + 1
    height = boxes[:, 3] - boxes[:, 1] + 1
    moved = torch.stack(
        [
            boxes[:, 0] + offsets[:, 0] * width,
            boxes[:, 1] + offsets[:, 1] * height,
            boxes[:, 2] + offsets[:, 2] * width,
            boxes[:, 3] + offsets[:, 3] * height,
        ],
        dim=1,
    )
    return torch.cat([moved, boxes[:, 4:]], dim=1)


def _pnet_candidates(
    pnet: nn.Module, chunks: Sequence[Tensor], min_face_px: float, threshold: float, factor: float
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Stage 1 on one size group, given in chunks of photos (pixels 0..255).

    Returns ``(K, 5)`` squared boxes with P-Net's score, the photo of each (index in the group),
    and the chunks' summed-area tables (for R-Net's and O-Net's crops). The pyramid is read from
    the same tables (`area_resize`): facenet-pytorch's ``F.interpolate(mode="area")`` values, at
    half the cost on a CPU.
    """
    height, width = chunks[0].shape[2:]
    scales = pyramid_scales(height, width, min_face_px, factor)
    tables, outputs = [], [[] for _ in scales]
    for chunk in chunks:
        pixels = chunk.float()
        tables.append(summed_area_table(pixels))
        for scale, parts in zip(scales, outputs):
            size = (int(height * scale + 1), int(width * scale + 1))
            parts.append(run_pnet(pnet, area_resize(tables[-1], size)))
    found = [torch.zeros(0, 9, device=chunks[0].device)]
    index = [torch.zeros(0, dtype=torch.long, device=chunks[0].device)]
    for scale, parts in zip(scales, outputs):
        offsets, probability = (torch.cat(output) for output in zip(*parts))
        boxes, image_index = _pnet_boxes(offsets, probability, scale, threshold)
        pick = batched_nms(boxes[:, :4], boxes[:, 4], image_index, NMS_IOU_PNET_SCALE)
        found.append(boxes[pick])
        index.append(image_index[pick])
    boxes, image_index = torch.cat(found), torch.cat(index)
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_index, NMS_IOU_PNET_IMAGE)
    boxes, image_index = boxes[pick], image_index[pick]
    width_reg = boxes[:, 2] - boxes[:, 0]
    height_reg = boxes[:, 3] - boxes[:, 1]
    moved = torch.stack(
        [
            boxes[:, 0] + boxes[:, 5] * width_reg,
            boxes[:, 1] + boxes[:, 6] * height_reg,
            boxes[:, 2] + boxes[:, 7] * width_reg,
            boxes[:, 3] + boxes[:, 8] * height_reg,
            boxes[:, 4],
        ],
        dim=1,
    )
    return _square(moved), image_index, tables


def run_pnet(pnet: nn.Module, pixels: Tensor, tile_px: int = CPU_PNET_TILE_PX) -> tuple[Tensor, Tensor]:
    """`_PNetHeads` over (B, 3, H, W) ``pixels`` in pieces of about ``tile_px`` pixels, on a CPU.

    A pyramid level larger than the CPU's caches runs several times slower per pixel (P-Net's
    first convolution: 12 MP photo's 1201x1601 level 157 ms in one call). P-Net has no padding,
    a 12-pixel window and a stride of 2, so photos can go in groups and a large photo in strips of
    rows, each strip ``2 (k - 1) + 12`` rows tall for ``k`` output rows (the last runs to the
    bottom, as the whole level would): the same outputs, to float rounding. On a GPU, one call.
    """
    batch, _, height, width = pixels.shape
    if pixels.is_cuda or batch * height * width <= tile_px:
        return pnet(pixels)
    per_call = max(1, tile_px // (height * width))
    if per_call > 1 or batch > 1:
        parts = [run_pnet(pnet, group, tile_px) for group in pixels.split(per_call)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    out_rows = -(-(height - 2) // 2) - 4  # conv 3x3, pool 2x2 (ceil), conv 3x3, conv 3x3
    rows = max(1, (tile_px // width - PNET_WINDOW_PX + PNET_STRIDE_PX) // PNET_STRIDE_PX)
    if out_rows <= rows:
        return pnet(pixels)
    offsets, probability = [], []
    for first in range(0, out_rows, rows):
        top = PNET_STRIDE_PX * first
        bottom = height if first + rows >= out_rows else top + PNET_STRIDE_PX * (rows - 1) + PNET_WINDOW_PX
        strip_offsets, strip_probability = pnet(pixels[:, :, top:bottom])
        offsets.append(strip_offsets)
        probability.append(strip_probability)
    return torch.cat(offsets, dim=2), torch.cat(probability, dim=1)


def _pnet_boxes(offsets: Tensor, scores: Tensor, scale: float, threshold: float) -> tuple[Tensor, Tensor]:
    """facenet-pytorch's ``generateBoundingBox``: one box per P-Net cell scoring at least ``threshold``.

    Returns ``(K, 9)`` rows ``x1, y1, x2, y2, score, 4 offsets`` in photo pixels, and each box's photo.
    """
    mask = scores >= threshold
    cells = mask.nonzero()  # (K, 3): photo, row, column, in row-major order
    corner = cells[:, 1:].to(offsets.dtype).flip(1)  # (x, y) of the cell
    first = ((PNET_STRIDE_PX * corner + 1) / scale).floor()
    last = ((PNET_STRIDE_PX * corner + PNET_WINDOW_PX - 1 + 1) / scale).floor()
    moves = offsets.permute(1, 0, 2, 3)[:, mask].permute(1, 0)
    return torch.cat([first, last, scores[mask][:, None], moves], dim=1), cells[:, 0]


def _run_chunked(net: nn.Module, crops: Tensor) -> tuple[Tensor, ...]:
    """``net`` over ``crops`` in chunks (see `CPU_CHUNK_CROPS`), outputs concatenated."""
    one_thread, more_threads = CPU_CHUNK_CROPS.get(crops.shape[-1], (32, 128))
    chunk = GPU_CHUNK_CROPS if crops.is_cuda else one_thread if torch.get_num_threads() == 1 else more_threads
    parts = [_run_padded(net, crops[start : start + chunk], chunk) for start in range(0, len(crops), chunk)]
    return tuple(torch.cat(outputs) for outputs in zip(*parts))


def _run_padded(net: nn.Module, crops: Tensor, chunk: int) -> tuple[Tensor, ...]:
    """``net`` over ``crops`` padded to a power of two (at most ``chunk``), on a CPU; outputs cut back."""
    count = len(crops)
    size = min(chunk, 1 << max(0, count - 1).bit_length())
    if crops.is_cuda or size == count:
        return net(crops)
    padded = torch.cat([crops, crops.new_zeros(size - count, *crops.shape[1:])])
    return tuple(output[:count] for output in net(padded.contiguous(memory_format=torch.channels_last)))


def _rnet_refine(
    rnet: nn.Module, crops: _Cropper, boxes: Tensor, image_index: Tensor, threshold: float
) -> tuple[Tensor, Tensor]:
    """Stage 2: R-Net's score on every candidate, NMS per photo, regression, squaring."""
    if len(boxes) == 0:
        return boxes[:, :5], image_index
    chips, valid = crops(boxes, image_index, RNET_INPUT_PX)
    offsets, probs = _run_chunked(rnet, chips)
    score = probs[:, 1]
    keep = valid & (score > threshold)
    boxes = torch.cat([boxes[keep, :4], score[keep, None]], dim=1)
    image_index, offsets = image_index[keep], offsets[keep]
    pick = batched_nms(boxes[:, :4], boxes[:, 4], image_index, NMS_IOU_RNET)
    boxes, image_index, offsets = boxes[pick], image_index[pick], offsets[pick]
    return _square(_regress(boxes, offsets)), image_index


def _onet_output(
    onet: nn.Module, crops: _Cropper, boxes: Tensor, image_index: Tensor, threshold: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Stage 3: O-Net's score, landmarks and regression, then "Min" NMS per photo."""
    if len(boxes) == 0:
        return boxes, boxes.new_zeros(0, 5, 2), image_index
    chips, valid = crops(boxes, image_index, ONET_INPUT_PX)
    offsets, landmarks, probs = _run_chunked(onet, chips)
    score = probs[:, 1]
    keep = valid & (score > threshold)
    boxes = torch.cat([boxes[keep, :4], score[keep, None]], dim=1)
    image_index, offsets, landmarks = image_index[keep], offsets[keep], landmarks[keep]
    width = (boxes[:, 2] - boxes[:, 0] + 1)[:, None]
    height = (boxes[:, 3] - boxes[:, 1] + 1)[:, None]
    points_x = width * landmarks[:, :5] + boxes[:, 0, None] - 1
    points_y = height * landmarks[:, 5:] + boxes[:, 1, None] - 1
    points = torch.stack([points_x, points_y], dim=2)
    boxes = _regress(boxes, offsets)
    pick = torch.from_numpy(
        nms_min_overlap(
            boxes[:, :4].cpu().numpy(), boxes[:, 4].cpu().numpy(), image_index.cpu().numpy(), NMS_MIN_ONET
        )
    ).to(boxes.device)
    return boxes[pick], points[pick], image_index[pick]


def nms_min_overlap(
    boxes: np.ndarray, scores: np.ndarray, image_index: np.ndarray, threshold: float
) -> np.ndarray:
    """Greedy NMS per photo with MTCNN's "Min" overlap: intersection over the smaller box's area.

    Areas count pixels inclusively (``x2 - x1 + 1``), as facenet-pytorch's ``nms_numpy``. Returns
    the kept indices, photo by photo, best score first.

    Example:
        >>> boxes = np.array([[0, 0, 9, 9], [2, 2, 7, 7], [20, 20, 29, 29]], np.float32)
        >>> nms_min_overlap(boxes, np.array([0.9, 0.95, 0.8]), np.zeros(3, int), 0.7).tolist()
        [1, 2]
    """
    kept = []
    areas = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    for photo in np.unique(image_index):
        mine = np.nonzero(image_index == photo)[0]
        order = mine[np.argsort(-scores[mine], kind="stable")]
        while order.size:
            best, rest = order[0], order[1:]
            kept.append(best)
            width = np.maximum(
                0.0,
                np.minimum(boxes[best, 2], boxes[rest, 2]) - np.maximum(boxes[best, 0], boxes[rest, 0]) + 1,
            )
            height = np.maximum(
                0.0,
                np.minimum(boxes[best, 3], boxes[rest, 3]) - np.maximum(boxes[best, 1], boxes[rest, 1]) + 1,
            )
            overlap = width * height / np.minimum(areas[best], areas[rest])
            order = rest[overlap <= threshold]
    return np.asarray(kept, dtype=np.int64)
