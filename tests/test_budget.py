"""The cloak's perceptual budget (JND map, change limits), CIEDE2000, DSSIM, the EOT sampler and JPEG."""

from __future__ import annotations

import math

import pytest
import torch

from facecloak import quality, transforms
from facecloak.cloak.budget import RGB_TO_YCBCR, enforce_dssim, jnd_map, limit_change, luminance_adaptation
from facecloak.cloak.eot import UploadSimulator

# Sharma, Wu & Dalal (2005), table 1: (L, a, b) pairs and their CIEDE2000 difference.
SHARMA_PAIRS = [
    ((50.0, 2.6772, -79.7751), (50.0, 0.0, -82.7485), 2.0425),
    ((50.0, -1.3802, -84.2814), (50.0, 0.0, -82.7485), 1.0000),
    ((50.0, 2.5, 0.0), (50.0, 0.0, -2.5), 4.3065),
    ((50.0, 2.5, 0.0), (56.0, -27.0, -3.0), 31.9030),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373),
    ((90.9257, -0.5406, -0.9208), (88.6381, -0.8985, -0.7239), 1.5381),
]


@pytest.mark.parametrize("lab1,lab2,expected", SHARMA_PAIRS)
def test_ciede2000_matches_published_pairs(monkeypatch, lab1, lab2, expected):
    monkeypatch.setattr(quality, "rgb_to_lab", lambda x: x)  # feed Lab directly
    a = torch.tensor(lab1, dtype=torch.float64).view(1, 3, 1, 1)
    b = torch.tensor(lab2, dtype=torch.float64).view(1, 3, 1, 1)
    assert float(quality.ciede2000_map(a, b)) == pytest.approx(expected, abs=1e-4)


def test_rgb_to_lab_white_and_red():
    white = quality.rgb_to_lab(torch.ones(1, 3, 1, 1)).flatten()
    red = quality.rgb_to_lab(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)).flatten()
    assert torch.allclose(white, torch.tensor([100.0, 0.0, 0.0]), atol=1e-3)
    assert torch.allclose(red, torch.tensor([53.24, 80.09, 67.20]), atol=0.02)


def test_ciede2000_stats_zero_for_identical_and_grows_with_change():
    image = torch.rand(3, 20, 20)
    assert quality.ciede2000_stats(image, image) == (0.0, 0.0)
    small = quality.ciede2000_stats(image, (image + 2 / 255).clamp(0, 1))
    large = quality.ciede2000_stats(image, (image + 8 / 255).clamp(0, 1))
    assert 0 < small[0] < large[0] and small[1] <= large[1]


def test_luminance_adaptation_curve():
    levels = torch.tensor([0.0, 127.0, 255.0]) / 255
    assert torch.allclose(luminance_adaptation(levels) * 255, torch.tensor([20.0, 3.0, 6.0]), atol=1e-4)


def test_jnd_map_more_allowance_in_texture_and_dark_than_on_smooth_midtones():
    smooth = torch.full((1, 3, 32, 32), 0.6)
    textured = smooth + 0.15 * (torch.arange(32) % 2).float().view(1, 1, 1, 32)
    dark = torch.full((1, 3, 32, 32), 0.08)
    flat, busy, shadow = (float(jnd_map(x).mean()) for x in (smooth, textured, dark))
    assert jnd_map(smooth).shape == (1, 1, 32, 32)
    assert busy > 2 * flat and shadow > 2 * flat
    assert 2.5 / 255 < flat < 5 / 255  # a smooth mid-tone allows a few grey levels, no more


def test_limit_change_respects_per_pixel_luma_and_chroma_caps():
    torch.manual_seed(0)
    delta = torch.randn(2, 3, 8, 8) * 0.1
    allowance = torch.rand(2, 1, 8, 8) * 0.05
    limited = limit_change(delta, allowance, chroma_share=0.1)
    ycbcr = torch.einsum("ij,njhw->nihw", RGB_TO_YCBCR, limited)
    assert bool((ycbcr[:, :1].abs() <= allowance + 1e-6).all())
    assert bool((ycbcr[:, 1:].abs() <= 0.1 * allowance + 1e-6).all())
    assert bool((limited.abs() <= allowance + 1e-6).all())
    # a change already inside every cap is left alone
    tiny = torch.full((1, 3, 4, 4), 0.001)
    assert torch.allclose(limit_change(tiny, 0.01, 0.35), tiny, atol=1e-7)


def test_dssim_zero_for_identical_and_box_dssim_equals_cropped_dssim():
    torch.manual_seed(1)
    a = torch.rand(2, 3, 40, 48)
    b = (a + 0.05 * torch.randn_like(a)).clamp(0, 1)
    assert torch.allclose(quality.dssim(a, a), torch.zeros(2), atol=1e-6)
    boxes = torch.tensor([[3, 5, 30, 35], [10, 0, 48, 40]])
    direct = torch.stack(
        [
            quality.dssim(a[i : i + 1, :, y0:y1, x0:x1], b[i : i + 1, :, y0:y1, x0:x1])[0]
            for i, (x0, y0, x1, y1) in enumerate(boxes.tolist())
        ]
    )
    assert torch.allclose(quality.box_dssim(a, b, boxes), direct, atol=1e-5)
    assert bool((direct > 0.003).all())
    # the clean image's local means computed once (as the cloak's loop does) give the same values,
    # also where a box is smaller than the window (then they are not used)
    means = quality.reference_means(a)
    assert torch.allclose(quality.box_dssim(a, b, boxes, means), direct, atol=1e-6)
    tiny = torch.tensor([[3, 5, 12, 14], [20, 10, 28, 19]])
    assert torch.equal(quality.box_dssim(a, b, tiny, means), quality.box_dssim(a, b, tiny))


def test_box_dssim_of_a_box_thinner_than_the_window_is_its_crops_dssim(samples_dir):
    """A face cut off by the photo's edge leaves a box under 11 px on a side: no SSIM window fit
    inside it, and it read DSSIM 0.5 (also unchanged), so the cap scaled its cloak to nothing."""
    from facecloak import io

    photo = io.read_image(samples_dir / "grace_hopper.jpg").pixels[None, :, 60:160, 150:250]
    noise = torch.randn(photo.shape, generator=torch.Generator().manual_seed(0))
    changed = (photo + 4 / 255 * noise).clamp(0, 1)
    # per crop: a thin face box at the edge, inside a region wide enough for the full window
    boxes = torch.tensor([[[0, 10, 8, 60], [0, 0, 40, 80]], [[30, 92, 90, 100], [20, 50, 100, 100]]])
    a, b = photo.expand(2, -1, -1, -1), changed.expand(2, -1, -1, -1)
    direct = torch.tensor(
        [
            [
                float(quality.dssim(a[:1, :, y0:y1, x0:x1], b[:1, :, y0:y1, x0:x1])[0])
                for x0, y0, x1, y1 in row
            ]
            for row in boxes.tolist()
        ]
    )
    assert torch.allclose(quality.box_dssims(a, b, boxes), direct, atol=1e-5)
    assert torch.allclose(quality.box_dssims(a, b, boxes, quality.reference_means(a)), direct, atol=1e-5)
    assert float(quality.box_dssims(a, a, boxes).abs().max()) < 1e-5  # unchanged: 0, not 0.5
    assert float(direct.max()) < 0.1
    # a change already within the cap is kept whole, not scaled to zero
    delta = b - a
    masks = torch.ones_like(a[:, :1])
    kept = enforce_dssim(a, masks, delta, boxes, 0.1)
    assert torch.equal(kept, delta)


def test_limit_change_with_one_flat_allowance_and_a_share_per_face():
    """A flat budget (no JND map: ``jnd_scale`` None, the legacy levels) gives one number for the
    allowance beside each face's colour share: two faces in a bucket crashed the concatenation."""
    torch.manual_seed(0)
    delta = torch.randn(2, 3, 8, 8) * 0.1
    shares = torch.tensor([0.35, 0.0]).view(-1, 1, 1, 1)  # a colour face and a grey one
    limited = limit_change(delta, torch.tensor(0.05), shares)
    ycbcr = torch.einsum("ij,njhw->nihw", RGB_TO_YCBCR, limited)
    assert limited.shape == delta.shape
    assert bool((limited.abs() <= 0.05 + 1e-6).all())
    assert bool((ycbcr[0, 1:].abs() <= 0.35 * 0.05 + 1e-6).all())
    assert float(ycbcr[1, 1:].abs().max()) < 1e-6  # the grey face gets no colour
    for row in range(2):
        assert torch.allclose(
            limited[row : row + 1], limit_change(delta[row : row + 1], 0.05, float(shares[row]))
        )


def test_differentiable_jpeg_close_to_real_jpeg_and_passes_gradients(samples_dir):
    from facecloak import io

    image = io.read_image(samples_dir / "grace_hopper.jpg").pixels[:, :128, :128][None]
    for quality_level in (50, 75, 95):
        ours = transforms.jpeg_compress(image, float(quality_level))
        real = io.jpeg_roundtrip(image[0], quality_level)[None]
        error = (ours - real).abs().mean() * 255
        assert error < 1.5, (quality_level, float(error))  # the codec modelled, not a blur
        assert (ours - image).abs().mean() * 255 > 0.2  # and it does change the image
    x = image.clone().requires_grad_(True)
    transforms.jpeg_compress(x, 75.0).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_upload_simulator_is_seeded_and_input_diversity_moves_alignments():
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]).repeat(64, 1, 1)
    plain = UploadSimulator(robust_to=("jpeg",))
    assert torch.equal(plain.jitter_alignment(identity, 112, torch.Generator().manual_seed(0)), identity)
    diverse = UploadSimulator(robust_to=("jpeg",), diversity=1.0)
    moved = diverse.jitter_alignment(identity, 112, torch.Generator().manual_seed(0))
    again = diverse.jitter_alignment(identity, 112, torch.Generator().manual_seed(0))
    assert torch.equal(moved, again)
    zoom = torch.linalg.det(moved[:, :, :2]).sqrt()
    assert 0.9 - 1e-6 <= float(zoom.min()) and float(zoom.max()) <= 1.1 + 1e-6
    assert float(zoom.std()) > 0.02
    assert (
        float(moved[:, :, 2].abs().max()) <= 0.05 * 112 + 0.1 * 111 / 2 + 1e-6
    )  # shift + zoom about the centre
    crops = torch.rand(4, 3, 32, 32)
    first = plain.transform_pixels(crops, torch.Generator().manual_seed(3))
    second = plain.transform_pixels(crops, torch.Generator().manual_seed(3))
    assert torch.equal(first, second) and first.shape == crops.shape
    assert not math.isnan(float(first.sum()))


def test_stacked_copies_of_a_face_go_through_the_same_upload():
    """The intermediate-feature loss compares a face with its clean original "through the same random
    upload": each face's copies must get the same JPEG quality, not one drawn per row."""
    simulator = UploadSimulator(robust_to=("jpeg",), jpeg_probability=1.0, jpeg_quality=(20.0, 95.0))
    faces = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    stacked = torch.cat([faces, faces])
    together = simulator.transform_pixels(stacked, torch.Generator().manual_seed(5), copies=2)
    assert torch.equal(together[:3], together[3:])
    apart = simulator.transform_pixels(stacked, torch.Generator().manual_seed(5))
    assert not torch.equal(apart[:3], apart[3:])  # one quality per row: the copies differ
    with pytest.raises(ValueError, match="stacked copies"):
        simulator.transform_pixels(faces, torch.Generator(), copies=2)


def test_feature_dropout_perturbs_inside_the_block_and_restores_the_exact_model():
    """Feature dropout (a transfer option) must change every kind of model while on, and nothing after."""
    from facecloak.cloak.dropout import feature_dropout
    from facecloak.models import create_embedder

    model = create_embedder("dlib-resnet", device="cpu")
    chips = torch.rand(2, 3, 150, 150, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(chips)
        with feature_dropout([model], 0.05, torch.Generator().manual_seed(1)):
            dropped = model(chips)
        after = model(chips)
    assert float(model.distance(before, dropped).min()) > 0.01
    assert torch.equal(before, after)
    with pytest.raises(ValueError):
        with feature_dropout([model], 1.0, torch.Generator()):
            pass


def test_skip_gradient_keeps_the_forward_pass_and_bends_only_the_gradient():
    """The skip gradient method must leave embeddings exact and change the input gradient, then undo."""
    from facecloak.cloak.skip_gradient import skip_gradient
    from facecloak.models import create_embedder

    model = create_embedder("dlib-resnet", device="cpu")
    chips = torch.rand(1, 3, 150, 150, generator=torch.Generator().manual_seed(0))

    def forward_and_gradient() -> tuple[torch.Tensor, torch.Tensor]:
        x = chips.clone().requires_grad_(True)
        embedding = model(x)
        (gradient,) = torch.autograd.grad(embedding.square().sum(), x)
        return embedding.detach(), gradient

    plain_embedding, plain_gradient = forward_and_gradient()
    with skip_gradient([model], 0.3):
        skip_embedding, skip_gradient_ = forward_and_gradient()
    again_embedding, again_gradient = forward_and_gradient()
    assert torch.allclose(plain_embedding, skip_embedding, atol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(plain_gradient.flatten(), skip_gradient_.flatten(), dim=0)
    assert float(cosine) < 0.99  # a different direction, not only a different length
    assert torch.equal(plain_gradient, again_gradient) and torch.equal(plain_embedding, again_embedding)
    with pytest.raises(ValueError):
        with skip_gradient([model], 0.0):
            pass


def test_feature_tap_reads_the_middle_layer_of_a_port_and_of_an_imported_graph(mobileface_dir):
    """The intermediate-feature loss needs one middle layer per model, and nothing left behind after."""
    from facecloak.cloak.features import FeatureTap, feature_displacement
    from facecloak.models import create_embedder
    from facecloak.models.plugins import load_model_file

    dlib = create_embedder("dlib-resnet", device="cpu")
    mobileface = load_model_file(mobileface_dir / "MobileFace_Identification_V2-symbol.json")
    generator = torch.Generator().manual_seed(0)
    for model, size in ((dlib, 150), (mobileface, 112)):
        chips = torch.rand(2, 3, size, size, generator=generator)
        nudged = (chips + 0.03 * torch.randn(chips.shape, generator=generator)).clamp(0, 1)
        with torch.enable_grad(), FeatureTap(model, 0.5) as tap:
            model(chips)
            clean = tap.value.detach()
            model(nudged)
            moved = feature_displacement(tap.value, clean)
            model(chips)
            again = feature_displacement(tap.value, clean)
        assert clean.ndim == 4 and clean.shape[0] == 2
        assert clean.shape[-1] < size  # a middle layer: downsampled, not the input
        assert bool((moved > 0.01).all()) and float(again.max()) < 1e-5
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert all(getattr(m, "feature_hook", None) is None for m in model.modules())


def test_separable_filter_gives_the_grouped_convolution_values_and_gradients():
    """The channels-last fast path computes exactly what the plain grouped convolution computes."""
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(3)
    images = torch.rand(2, 9, 37, 41, generator=generator, requires_grad=True)
    kernel = torch.rand(7, generator=generator)
    flat = images.shape[1]
    plain = F.conv2d(
        F.conv2d(images, kernel.view(1, 1, 1, 7).expand(flat, 1, 1, 7), groups=flat),
        kernel.view(1, 1, 7, 1).expand(flat, 1, 7, 1),
        groups=flat,
    )
    fast = transforms.separable_filter(images, kernel)
    assert fast.shape == plain.shape == (2, 9, 31, 35) and fast.is_contiguous()
    assert torch.allclose(fast, plain, atol=1e-6)
    (grad_plain,) = torch.autograd.grad(plain.square().sum(), images)
    (grad_fast,) = torch.autograd.grad(fast.square().sum(), images)
    assert torch.allclose(grad_fast, grad_plain, atol=1e-5)
    # with padding the size is kept, and a normalised kernel leaves a flat image flat
    flat_image = torch.full((1, 3, 20, 20), 0.4)
    same = transforms.separable_filter(flat_image, kernel / kernel.sum(), "reflect")
    assert same.shape == flat_image.shape and torch.allclose(same, flat_image, atol=1e-6)
    # without a graph to record, the CPU takes shifted sums: the same values, padded or not
    for pad_mode in (None, "reflect", "replicate"):
        recorded = transforms.separable_filter(images, kernel, pad_mode)
        with torch.no_grad():
            summed = transforms.separable_filter(images, kernel, pad_mode)
        assert summed.shape == recorded.shape and summed.is_contiguous()
        assert torch.allclose(summed, recorded, atol=1e-6)


def test_box_dssim_gradient_in_closed_form_is_the_recorded_one():
    """With the clean image's means given, box_dssim's gradient is written out; it must be autograd's."""
    generator = torch.Generator().manual_seed(4)
    a = torch.rand(2, 3, 40, 48, generator=generator, dtype=torch.float64)
    noise = 0.05 * torch.randn(a.shape, generator=generator, dtype=torch.float64)
    b = (a + noise).clamp(0, 1).requires_grad_(True)
    boxes = torch.tensor([[3, 5, 30, 35], [10, 0, 48, 40]])
    written = quality.box_dssim(a, b, boxes, quality.reference_means(a))
    recorded = quality.box_dssim(a, b, boxes)  # no means: autograd through the SSIM map
    assert torch.allclose(written, recorded, atol=1e-12)
    weights = torch.tensor([1.0, -2.0], dtype=torch.float64)
    (grad_written,) = torch.autograd.grad((written * weights).sum(), b)
    (grad_recorded,) = torch.autograd.grad((recorded * weights).sum(), b)
    assert float(grad_recorded.abs().max()) > 1e-5
    assert torch.allclose(grad_written, grad_recorded, atol=1e-12, rtol=1e-9)
    # outside each box nothing counts
    outside = torch.ones_like(grad_written, dtype=torch.bool)
    outside[0, :, 5:35, 3:30] = False
    outside[1, :, 0:40, 10:48] = False
    assert float(grad_written[outside].abs().max()) == 0.0


def test_block_dct_is_the_two_sided_8x8_transform():
    """One 64x64 product per block (`_block_dct`) equals D x D^T on the 8x8 block."""
    generator = torch.Generator().manual_seed(4)
    blocks = torch.rand(5, 8, 8, generator=generator, dtype=torch.float64)
    d = transforms._dct_matrix(blocks)
    two_sided = d @ blocks @ d.T
    one_product = (blocks.reshape(5, 64) @ transforms._block_dct(blocks).T).reshape(5, 8, 8)
    assert torch.allclose(one_product, two_sided, atol=1e-12)
    # a flat block has only its DC coefficient, 8 x its value
    flat = (torch.full((1, 64), 0.5, dtype=torch.float64) @ transforms._block_dct(blocks).T)[0]
    assert abs(float(flat[0]) - 4.0) < 1e-12 and float(flat[1:].abs().max()) < 1e-12


def test_the_written_out_jpeg_backward_is_the_straight_through_gradient(samples_dir):
    """`_JpegRoundTrip.backward` equals autograd through every block product of `jpeg_decoded`.

    Odd sizes (padding), both chroma layouts, per-image qualities, pixels clipped at 0 and 1.
    """
    from facecloak import io

    photo = io.read_image(samples_dir / "grace_hopper.jpg").pixels
    for (height, width), subsample in (((75, 61), True), ((64, 48), True), ((70, 41), False)):
        images = torch.stack([photo[:, :height, :width], photo[:, 100 : 100 + height, 50 : 50 + width]])
        images[0, :, :8, :8] = 1.0  # saturated: the clip's gradient is 0 where the decoded value is past 1
        qualities = torch.tensor([55.0, 90.0])
        weights = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height))
        fast = images.clone().requires_grad_(True)
        (transforms.jpeg_compress(fast, qualities, subsample_chroma=subsample) * weights).sum().backward()
        traced = images.clone().requires_grad_(True)
        reference = transforms.jpeg_decoded(traced, qualities, subsample).clamp(0, 1)
        (reference * weights).sum().backward()
        assert torch.equal(transforms.jpeg_compress(images, qualities, subsample_chroma=subsample), reference)
        assert torch.allclose(fast.grad, traced.grad, atol=1e-5), float((fast.grad - traced.grad).abs().max())
        assert float(fast.grad.abs().max()) > 0.5  # a real gradient, not zeros on both sides


def test_largest_factor_under_cap_fits_nearly_the_whole_cap_in_few_measures():
    from facecloak.cloak.budget import CAP_SLACK, largest_factor_under_cap

    calls = []
    scale = torch.tensor([0.002, 0.012, 0.03, 0.5, 0.02])

    def dssim_like(factor: torch.Tensor) -> torch.Tensor:  # about quadratic, a little less for large factors
        calls.append(1)
        return scale * factor**2 / (1 + 0.3 * factor)

    cap = 0.008
    low = torch.zeros(5)
    high = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])  # the last row: nothing to search
    at_high = dssim_like(high)
    calls.clear()
    factor = largest_factor_under_cap(
        dssim_like, cap, low, high, low_values=torch.zeros(5), high_values=at_high
    )
    values = scale * factor**2 / (1 + 0.3 * factor)
    assert factor[0] == 1 and factor[4] == 0  # fits already / an empty bracket
    assert (values <= cap).all()
    assert (values[1:4] >= (1 - 2 * CAP_SLACK) * cap).all()  # the cap is nearly reached
    assert len(calls) <= 4  # a bisection to 1/256: 8

    # a measure that is not a power of the factor (colour over a fixed brightness change)
    def colour_like(factor: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(0.8**2 + (1.9 * factor) ** 2)

    f = largest_factor_under_cap(
        colour_like,
        1.4,
        torch.zeros(1),
        torch.ones(1),
        low_values=colour_like(torch.zeros(1)),
        high_values=colour_like(torch.ones(1)),
    )
    exact = math.sqrt(1.4**2 - 0.8**2) / 1.9
    assert exact * 0.98 <= float(f) <= exact

    # a measure that flattens out (a change clipped to its allowance past factor 1.3): regula falsi
    # alone would keep closing in from above; the Illinois form reaches the cap from below too
    calls.clear()

    def clipped(factor: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return torch.where(factor < 1.3, 0.8 * factor**2, 0.8 * 1.69 + 0.01 * (factor - 1.3))

    one, two = torch.ones(1), torch.full((1,), 2.0)
    f = largest_factor_under_cap(clipped, 1.0, one, two, low_values=clipped(one), high_values=clipped(two))
    assert (1 / 0.8) ** 0.5 * 0.995 <= float(f) <= (1 / 0.8) ** 0.5
    assert len(calls) <= 2 + 5
