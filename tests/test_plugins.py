"""Plug-in face models: ONNX (exported from our own model) and MXNet (MobileFace from ../shared)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

from facecloak.cli import main
from facecloak.datasets import read_lfw_pairs
from facecloak.errors import InvalidInputError, ModelNotFoundError
from facecloak.evaluate import PipelineAttacker, lfw_verification
from facecloak.models import create_embedder, get_card, list_embedders
from facecloak.models.plugins import load_model_file
from facecloak.models.registry import _REGISTRY, Embedder, FaceModelCard
from facecloak.models.templates import template_for
from facecloak.models.user_models import BROKEN_CARDS, add_user_model, register_user_models, remove_user_model

MOBILEFACE_SYMBOL = "MobileFace_Identification_V2-symbol.json"


@pytest.fixture()
def config_home(tmp_path, monkeypatch):
    """A private XDG_CONFIG_HOME, so tests never touch the user's added models."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    yield tmp_path / "config"
    for name in [n for n in _REGISTRY if n.startswith("test-")]:
        _REGISTRY.pop(name)


@pytest.fixture(scope="module")
def onnx_dlib(tmp_path_factory):
    """Our dlib-resnet exported to ONNX with torch.onnx."""
    pytest.importorskip("onnx2torch")
    model = create_embedder("dlib-resnet", device="cpu")
    path = tmp_path_factory.mktemp("onnx") / "dlib.onnx"
    chips = torch.rand(2, 3, 150, 150)

    class Raw(torch.nn.Module):  # the file takes 0..255 RGB, as most published models do
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model(x / 255.0)

    torch.onnx.export(
        Raw(),
        (chips * 255,),
        str(path),
        input_names=["data"],
        output_names=["embedding"],
        dynamic_axes={"data": {0: "n"}, "embedding": {0: "n"}},
        opset_version=13,
        dynamo=False,
    )
    return path, model


def test_onnx_export_roundtrip_matches_and_is_differentiable(onnx_dlib, config_home):
    path, original = onnx_dlib
    card = add_user_model(
        "test-dlib-onnx", path, input_size=150, template="dlib", metric="euclidean", threshold=0.6
    )
    assert (
        card.embedding_dim == 128 and (config_home / "facecloak" / "models" / "test-dlib-onnx.json").is_file()
    )
    assert "test-dlib-onnx" in list_embedders()
    imported = create_embedder("test-dlib-onnx", device="cpu")
    chips = torch.rand(3, 3, 150, 150, requires_grad=True)
    ours = imported(chips)
    assert torch.allclose(ours, original(chips), atol=1e-4)
    ours.square().sum().backward()
    assert chips.grad is not None and torch.isfinite(chips.grad).all() and chips.grad.abs().sum() > 0
    # Without gradients the plug-in runs a channels-last copy: same numbers, and it follows the
    # weights when they change in place (the adaptive evaluator fine-tunes them).
    with torch.no_grad():
        assert torch.allclose(imported(chips), ours, atol=1e-5)
        next(imported.network.parameters()).mul_(1.5)
        changed = imported(chips)
    assert not torch.allclose(changed, ours, atol=1e-3)
    assert torch.allclose(changed, imported(chips).detach(), atol=1e-5)
    remove_user_model("test-dlib-onnx")
    assert "test-dlib-onnx" not in list_embedders()


def test_bad_model_files_are_one_line_errors(tmp_path, config_home):
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x01garbage")
    for file, match in (
        (tmp_path / "missing.onnx", "not found"),
        (tmp_path / "broken.onnx", "ONNX"),
        (tmp_path / "weights.bin", "unsupported"),
    ):
        if file.suffix == ".bin":
            file.write_bytes(b"x")
        with pytest.raises(ModelNotFoundError, match=match) as info:
            add_user_model("test-bad", file)
        assert str(file) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InvalidInputError):
        add_user_model("Bad Name!", tmp_path / "broken.onnx")
    with pytest.raises(InvalidInputError, match="built-in"):
        add_user_model("dlib-resnet", tmp_path / "broken.onnx")
    with pytest.raises(ModelNotFoundError):
        remove_user_model("test-never-added")


def test_templates():
    arcface = template_for("arcface", 112)
    assert arcface[0] == pytest.approx((38.2946, 51.6963))
    assert template_for("arcface", 224)[0] == pytest.approx((76.5892, 103.3926))
    assert len(template_for("dlib", 150)) == 5


def test_cli_add_list_remove(mobileface_dir, config_home, samples_dir):
    runner = CliRunner()
    symbol = mobileface_dir / MOBILEFACE_SYMBOL
    added = runner.invoke(main, ["models", "add", "test-mobileface", str(symbol), "--threshold", "0.65"])
    assert added.exit_code == 0, added.output
    assert "256-d" in added.output
    card = json.loads((config_home / "facecloak" / "models" / "test-mobileface.json").read_text())
    assert card["weights"] == os.path.abspath(symbol) and card["embedding_dim"] == 256
    listed = runner.invoke(main, ["models"])
    assert "test-mobileface" in listed.output and "dlib-resnet" in listed.output
    missing = runner.invoke(main, ["models", "add", "test-x", str(mobileface_dir / "nope-symbol.json")])
    assert missing.exit_code == 3 and "not found" in missing.stderr
    # a threshold that is no distance is refused (NaN blacked out the cloaked face, a negative one
    # called an untouched face protected); the card added before stays as it was
    for bad in ("nan", "-1", "0", "2.5", "inf"):
        refused = runner.invoke(main, ["models", "add", "test-mobileface", str(symbol), "--threshold", bad])
        assert refused.exit_code == 2 and "match threshold" in refused.stderr, bad
    assert json.loads((config_home / "facecloak" / "models" / "test-mobileface.json").read_text()) == card
    # adding the same name again says what it replaced (a calibrated threshold is not lost silently)
    again = runner.invoke(main, ["models", "add", "test-mobileface", str(symbol), "--threshold", "0.7"])
    assert (
        again.exit_code == 0
        and "replaced the earlier card of test-mobileface (threshold 0.65" in again.stderr
    )
    # a card edited by hand into nonsense is listed as broken, not used
    path = config_home / "facecloak" / "models" / "test-mobileface.json"
    path.write_text(json.dumps({**card, "match_threshold": -0.5}))
    register_user_models()  # as every command does at start-up
    # asked for by name, it is that card's error: it was "unknown face model 'test-mobileface'"
    photo = str(samples_dir / "astronaut.jpg")
    embedded = runner.invoke(main, ["embed", photo, "--model", "test-mobileface"])
    assert embedded.exit_code == 2 and f"{path}: unreadable model card" in embedded.output, embedded.output
    assert [reason for broken, reason in BROKEN_CARDS if broken == path] == [
        "unreadable model card (InvalidInputError: model 'test-mobileface': match threshold -0.5 must be "
        "between 0 and 2 (a cosine distance)); fix it, or remove it: facecloak models remove test-mobileface"
    ]
    path.write_text(json.dumps(card))
    register_user_models()
    assert runner.invoke(main, ["models", "remove", "test-mobileface"]).exit_code == 0
    assert "test-mobileface" not in runner.invoke(main, ["models"]).output


def test_mobileface_lfw_accuracy(mobileface_dir, lfw_dir, remembering_detector):
    """MobileFace imported from MXNet, aligned on the ArcFace template, on a 5-fold subset of the pairs."""
    model = load_model_file(
        mobileface_dir / MOBILEFACE_SYMBOL,
        name="mobileface-v2",
        input_size=112,
        template="arcface",
        metric="cosine",
    )
    assert get_card("dlib-resnet").embedding_dim == 128 and model.card.embedding_dim == 256
    pairs = read_lfw_pairs(lfw_dir / "pairs.txt")
    subset = [pair for i, pair in enumerate(pairs) if (i % 300) < 40]
    result = lfw_verification(subset, [PipelineAttacker(model, remembering_detector)])["mobileface-v2"]
    # 98.77% on all 3,000 pairs: python scripts/eval_lfw_verification.py --mobileface
    assert result["accuracy"] >= 0.97, result


HSE_ONNX = "hse_mobilenet_vggface2.onnx"


@pytest.fixture(scope="session")
def hse_dir():
    """The shared HSE MobileNet (VGGFace2) ONNX model folder."""
    from conftest import models_root

    path = models_root() / "hse-mobilenet-vggface2"
    if not (path / HSE_ONNX).is_file():
        pytest.skip(f"shared HSE MobileNet model not found at {path} (set FACECLOAK_MODELS)")
    return path


def test_an_input_size_or_layout_unlike_the_onnx_files_declared_input_is_refused_when_added(
    hse_dir, config_home
):
    """The HSE MobileNet declares (N, 224, 224, 3). Added as 112 px NHWC it ran (its pooling takes
    any size) and was saved as a card that embedded garbage; as NCHW it was refused with torch's
    channel message. Each is now a one-line error naming the file and what it declares."""
    pytest.importorskip("onnx2torch")
    onnx_file = hse_dir / HSE_ONNX
    for options in ({"input_size": 112, "layout": "nhwc"}, {"input_size": 224, "layout": "nchw"}):
        with pytest.raises(ModelNotFoundError) as info:
            add_user_model("test-hse-wrong", onnx_file, crop="box", **options)
        message = str(info.value)
        assert str(onnx_file) in message and "\n" not in message, options
        assert "(N, 224, 224, 3)" in message and "--input-size 224 --layout nhwc" in message, message
    assert "test-hse-wrong" not in list_embedders()
    assert not (config_home / "facecloak" / "models" / "test-hse-wrong.json").exists()


def test_box_crop_alignment_maps_the_widened_box_onto_the_chip():
    from facecloak.align import box_chip_from_image, transform_points

    boxes = torch.tensor([[50.0, 40.0, 150.0, 180.0], [-5.0, 10.0, 60.0, 70.0]])
    sizes = torch.tensor([[250.0, 250.0], [100.0, 80.0]])
    matrix = box_chip_from_image(boxes, sizes, 224, margin=10.0)
    # pixel edges of the widened box (clipped to the photo) land on the chip's edges
    corners = torch.tensor([[[39.5, 29.5], [159.5, 189.5]], [[-0.5, -0.5], [69.5, 79.5]]])
    assert torch.allclose(
        transform_points(matrix, corners),
        torch.tensor([[-0.5, -0.5], [223.5, 223.5]]).expand(2, 2, 2),
        atol=1e-4,
    )
    image = torch.rand(1, 3, 100, 80)
    from facecloak.align import align_faces

    whole = box_chip_from_image(
        torch.tensor([[0.0, 0.0, 80.0, 100.0]]), torch.tensor([[80.0, 100.0]]), 40, 0.0
    )
    chip = align_faces(image, whole, torch.tensor([0]), 40, antialias=False)
    assert chip.shape == (1, 3, 40, 40)


def test_hse_box_crop_nhwc_bgr_plugin_and_calibration(hse_dir, lfw_dir, config_home):
    """The exact commands of the README: add the NHWC BGR box-crop ONNX model, then calibrate it."""
    runner = CliRunner()
    onnx_file = hse_dir / HSE_ONNX
    added = runner.invoke(
        main,
        [
            "models",
            "add",
            "test-hse",
            str(onnx_file),
            "--crop",
            "box",
            "--margin",
            "10",
            "--input-size",
            "224",
            "--layout",
            "nhwc",
            "--bgr",
            "--mean",
            "103.939",
            "116.779",
            "123.68",
        ],
    )
    assert added.exit_code == 0, added.output
    assert "1024-d" in added.output and "calibrate" in added.stderr
    card = get_card("test-hse")
    assert card.alignment == "box" and card.extra["margin"] == 10.0 and card.extra["layout"] == "nhwc"
    model = create_embedder("test-hse", device="cpu")
    # BGR order: the first mean (103.939) is subtracted from the blue channel
    probe = torch.zeros(1, 3, 224, 224)
    probe[:, 2] = 103.939 / 255
    seen = {}

    def grab(module, args):
        seen["x"] = args[0]

    handle = model._network_for_pass(probe).register_forward_pre_hook(grab)  # the network this pass runs
    model(probe)
    handle.remove()
    assert seen["x"].shape == (1, 224, 224, 3) and float(seen["x"][..., 0].abs().max()) < 1e-3
    calibrated = runner.invoke(
        main,
        ["models", "calibrate", "test-hse", str(lfw_dir / "images"), "--max-photos", "80", "--device", "cpu"],
    )
    assert calibrated.exit_code == 0, calibrated.output
    threshold = get_card("test-hse").match_threshold
    assert 0.15 < threshold < 0.6 and threshold != 0.6  # set from the data, not the default guess
    saved = json.loads((config_home / "facecloak" / "models" / "test-hse.json").read_text())
    assert saved["match_threshold"] == pytest.approx(threshold)
    builtin = runner.invoke(main, ["models", "calibrate", "dlib-resnet", str(lfw_dir / "images")])
    assert builtin.exit_code == 2 and "built-in" in builtin.stderr


def test_relu6_fusion_is_the_same_function(hse_dir):
    """TensorFlow's ReLU6 (Relu, Min 6, Max 0) becomes one hardtanh: same outputs and gradients."""
    import onnx
    from onnx2torch import convert

    from facecloak.models.loaders import _fast_elementwise, load_network

    path = next(hse_dir.glob("*.onnx"))
    plain = _fast_elementwise(convert(onnx.load(str(path)))).eval()
    fused = load_network(path).eval()
    assert sum(node.target is torch.nn.functional.hardtanh for node in fused.graph.nodes) > 0
    assert not any("clip_by_value" in str(node.target) for node in fused.graph.nodes)
    x = (torch.rand(2, 224, 224, 3, generator=torch.Generator().manual_seed(0)) * 255 - 120).requires_grad_(
        True
    )
    a, b = plain(x), fused(x)
    assert torch.allclose(a, b, atol=1e-4)
    (grad_a,) = torch.autograd.grad(a.sum(), x)
    (grad_b,) = torch.autograd.grad(b.sum(), x)
    assert torch.allclose(grad_a, grad_b, rtol=1e-3, atol=1e-3 * float(grad_a.abs().max()))


def _hse_plugin(hse_dir, name: str):
    """The HSE MobileNet loaded as its README says: a 224 px NHWC BGR box crop, its own means."""
    return load_model_file(
        hse_dir / HSE_ONNX,
        name=name,
        input_size=224,
        crop="box",
        margin=10,
        layout="nhwc",
        bgr=True,
        mean=(103.939, 116.779, 123.68),
    )


def test_gradient_passes_run_the_channels_last_copy_until_the_weights_take_gradients(hse_dir):
    """The cloak's gradient passes on the CPU use the channels-last copy, with the original's
    gradients; once the weights take gradients (fine-tuning) the original runs, and a change of
    its weights is seen by the next copy."""
    model = _hse_plugin(hse_dir, "hse-grad")
    chips = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    weights = torch.linspace(-1, 1, 1024)  # any fixed direction: the embedding is unit-norm

    def gradient(original: bool = False) -> torch.Tensor:
        """Through the copy, or through the original (as when its weights take gradients)."""
        model.network.requires_grad_(original)
        assert (model._network_for_pass(chips) is model.network) is original
        return torch.autograd.grad((model(chips) * weights).sum(), chips)[0]

    through_copy = gradient()
    assert _relative_difference(through_copy, gradient(original=True)) < 1e-3  # the same sums, reordered
    with torch.no_grad():  # as a fine-tuning step would
        next(p for p in model.network.parameters() if p.ndim == 4).mul_(0.5)
    after = gradient(original=True)
    assert _relative_difference(gradient(), after) < 0.05  # 0.003 here: a few ReLU6 edges flip
    assert _relative_difference(through_copy, after) > 0.3  # what a stale copy would give


def _relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_a_feature_tap_and_dropout_reach_plug_ins_that_already_run_their_channels_last_copy(
    mobileface_dir, hse_dir
):
    """Plug-ins run a channels-last copy of their network on the CPU, built on the first pass. The
    intermediate-feature loss and feature dropout hook the original's layers: once the copy exists
    (a cloak embeds the clean faces first), passes under a hook must run the original, and no hook
    may live on in the copy. Before, a cloak with ``feature_weight`` found no features on MobileFace
    and the HSE MobileNet, and dropout changed nothing."""
    from facecloak.cloak.dropout import feature_dropout
    from facecloak.cloak.features import FeatureTap

    mobileface = load_model_file(mobileface_dir / "MobileFace_Identification_V2-symbol.json")
    hse = _hse_plugin(hse_dir, "hse-hooks")
    generator = torch.Generator().manual_seed(0)
    for model in (mobileface, hse):
        chips = torch.rand(2, 3, model.card.input_size, model.card.input_size, generator=generator)
        with torch.no_grad():
            plain = model(chips)  # builds the copy, as the cloak's clean embeddings do
        assert model._network_for_pass(chips) is not model.network
        with FeatureTap(model, 0.5) as tap:
            with torch.no_grad():
                model(chips)
            assert tap.value is not None and tap.value.ndim == 4
            tap.value = None
            model(chips.clone().requires_grad_(True))  # a cloak step's pass
            assert tap.value is not None and tap.value.requires_grad
        with torch.no_grad():
            with feature_dropout([model], 0.05, torch.Generator().manual_seed(1)):
                dropped = model(chips)
            after = model(chips)
        assert float(model.distance(plain, dropped).min()) > 0.01
        assert torch.equal(plain, after)
        assert model._network_for_pass(chips) is not model.network  # back on the copy
        # a copy rebuilt while a hook is on (new weights) carries none of it
        with torch.no_grad():
            next(p for p in model.network.parameters() if p.ndim == 4).mul_(1.0001)
        with feature_dropout([model], 0.05, torch.Generator().manual_seed(1)):
            copy = model._inference_network()
        assert not any(m._forward_hooks or getattr(m, "feature_hook", None) for m in copy.modules())


def _export_onnx(module: torch.nn.Module, path, *, batch: int = 2, dynamic: bool = True) -> None:
    """A small model of our own as an ONNX file (112 px RGB input)."""
    axes = {"data": {0: "n"}, "out": {0: "n"}} if dynamic else None
    torch.onnx.export(
        module.eval(),
        (torch.rand(batch, 3, 112, 112),),
        str(path),
        input_names=["data"],
        output_names=["out"],
        dynamic_axes=axes,
        opset_version=13,
        dynamo=False,
    )


class _Tiny(torch.nn.Module):
    """A stride-8 convolution, then one of several output shapes."""

    def __init__(self, output: str) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 8, stride=8)  # 112 px -> (4, 14, 14)
        self.fc = torch.nn.Linear(4 * 14 * 14, 8)
        self.output = output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.output == "map":  # a feature map, no embedding
            return y
        if self.output == "scalar":  # one number per face
            return self.fc(y.flatten(1)).sum(1)
        if self.output == "batch-one":  # written for one face at a time
            return self.fc(y.reshape(1, -1))
        if self.output == "nchw-pooled":  # (N, D, 1, 1), as a global pooling leaves it
            return y.mean((2, 3), keepdim=True)
        if self.output == "nhwc-pooled":  # (N, 1, 1, D), as TensorFlow's keepdims leaves it
            return y.mean((2, 3), keepdim=True).permute(0, 2, 3, 1)
        return self.fc(y.flatten(1))


def test_a_model_that_gives_no_embedding_per_face_is_refused_when_added(tmp_path, config_home):
    """``models add`` runs the file: an output that is not one vector per chip, or a wrong input
    size or layout is a one-line error naming the file. Before, a feature map was added as a 784-d
    "embedding", one number per face crashed with an IndexError, and a wrong input size was a
    RuntimeError traceback."""
    pytest.importorskip("onnx2torch")
    for output in ("map", "scalar", "nchw-pooled", "nhwc-pooled", "vector"):
        _export_onnx(_Tiny(output), tmp_path / f"{output}.onnx", batch=1)
    for output in ("map", "scalar"):
        with pytest.raises(ModelNotFoundError) as info:
            add_user_model("test-tiny", tmp_path / f"{output}.onnx")
        assert str(tmp_path / f"{output}.onnx") in str(info.value) and "\n" not in str(info.value), output
    for options, words in (({"input_size": 150}, "150x150"), ({"layout": "nhwc"}, "nhwc")):
        with pytest.raises(ModelNotFoundError, match=words):
            add_user_model("test-tiny", tmp_path / "vector.onnx", **options)
    assert "test-tiny" not in list_embedders()
    for output in ("nchw-pooled", "nhwc-pooled", "vector"):  # pooled outputs are embeddings
        card = add_user_model(f"test-{output}", tmp_path / f"{output}.onnx")
        assert card.embedding_dim == (8 if output == "vector" else 4)
        assert create_embedder(f"test-{output}", device="cpu")(torch.rand(3, 3, 112, 112)).shape == (
            3,
            card.embedding_dim,
        )


def test_a_file_fixed_to_one_face_at_a_time_runs_chip_by_chip(tmp_path, config_home):
    """A file exported with its batch fixed to 1 (as many ArcFace exports are) was refused ("takes a
    batch of any size"); it is now added to run one chip at a time, with the same embeddings."""
    pytest.importorskip("onnx2torch")
    tiny = _Tiny("batch-one").eval()
    _export_onnx(tiny, tmp_path / "one.onnx", batch=1, dynamic=False)
    card = add_user_model("test-one", tmp_path / "one.onnx", metric="euclidean")
    assert card.extra["batch"] == 1 and card.embedding_dim == 8
    model = create_embedder("test-one", device="cpu")
    chips = torch.rand(3, 3, 112, 112, requires_grad=True)
    embeddings = model(chips)
    expected = torch.cat([tiny(chip[None] * 255.0) for chip in chips])  # the file takes 0..255
    assert torch.allclose(embeddings, expected, atol=1e-4)
    embeddings.sum().backward()  # the cloak's gradient reaches every chip
    assert all(float(chips.grad[i].abs().sum()) > 0 for i in range(3))
    _export_onnx(_Tiny("vector"), tmp_path / "any.onnx", batch=1)
    assert "batch" not in add_user_model("test-any", tmp_path / "any.onnx").extra  # batched as before


def test_a_model_added_through_links_still_loads(mobileface_dir, tmp_path, config_home):
    """Download caches (Hugging Face's among them) hold each file as ``blobs/<hash>`` and link to it
    under its real name. The card saved the link's target: a file with no ``.onnx`` or
    ``-symbol.json`` name and no params beside it, so the model was added, listed as available,
    and failed on every use."""
    pytest.importorskip("onnx2torch")
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"
    blobs.mkdir()
    snapshot.mkdir()
    (blobs / "3f2a").write_bytes((mobileface_dir / MOBILEFACE_SYMBOL).read_bytes())
    (blobs / "9c1d").write_bytes((mobileface_dir / "MobileFace_Identification_V2-0000.params").read_bytes())
    _export_onnx(_Tiny("vector"), blobs / "77e0")
    (snapshot / "mf-symbol.json").symlink_to(blobs / "3f2a")
    (snapshot / "mf-0000.params").symlink_to(blobs / "9c1d")
    (snapshot / "tiny.onnx").symlink_to(blobs / "77e0")
    for name, file in (("test-linked-mf", "mf-symbol.json"), ("test-linked-onnx", "tiny.onnx")):
        card = add_user_model(name, snapshot / file)
        assert card.weights == str(snapshot / file)
        _REGISTRY.pop(name)
        register_user_models()  # a later command reads the card back
        model = create_embedder(name, device="cpu")
        assert model(torch.rand(2, 3, 112, 112)).shape == (2, card.embedding_dim)


def test_a_card_edited_to_a_size_or_layout_its_file_cannot_take_is_a_one_line_error(tmp_path, config_home):
    """``models add`` checks the input size and layout by running the file, but a card edited by
    hand afterwards is read back unchecked: its first use was torch's RuntimeError traceback."""
    pytest.importorskip("onnx2torch")
    _export_onnx(_Tiny("vector"), tmp_path / "vector.onnx")
    card = add_user_model("test-edited", tmp_path / "vector.onnx").to_dict()
    path = config_home / "facecloak" / "models" / "test-edited.json"
    for edit, chips in (
        ({"input_size": 150}, (2, 3, 150, 150)),
        ({"extra": {**card["extra"], "layout": "nhwc"}}, (2, 3, 112, 112)),
    ):
        path.write_text(json.dumps({**card, **edit}))
        register_user_models()
        model = create_embedder("test-edited", device="cpu")
        for grad in (False, True):
            with torch.set_grad_enabled(grad), pytest.raises(ModelNotFoundError) as info:
                model(torch.rand(chips))
            assert str(tmp_path / "vector.onnx") in str(info.value) and "\n" not in str(info.value)
            assert "does not run on 2" in str(info.value)


def _tiny_card(name: str, file) -> dict:
    """The JSON of a valid added card (the file need not exist to be listed)."""
    from facecloak.models.plugins import make_card

    return {**make_card(name, file).to_dict(), "embedding_dim": 8}


def test_hand_edited_cards_are_one_line_errors_and_never_replace_a_built_in(tmp_path, config_home):
    """A card edited by hand into something invalid is listed as broken, naming its file, and the
    other models still load. Before, a card naming ``dlib-resnet`` replaced the built-in model, a
    name that was no string broke every listing (TypeError in `list_embedders`), and a mean of two
    numbers, an unknown metric or a chip size of "big" were registered as available models."""
    from facecloak.models.dlib_resnet import DLIB_RESNET_CARD

    folder = config_home / "facecloak" / "models"
    folder.mkdir(parents=True)
    good = _tiny_card("test-good", tmp_path / "x.onnx")
    edits = {
        "dlib-resnet": {**good, "name": "dlib-resnet"},
        "test-int-name": {**good, "name": 5},
        "test-other-name": {**good, "name": "test-good"},
        "test-mean": {**good, "name": "test-mean", "extra": {**good["extra"], "mean": [1, 2]}},
        "test-layout": {**good, "name": "test-layout", "extra": {**good["extra"], "layout": "hwc"}},
        "test-metric": {**good, "name": "test-metric", "distance": "manhattan"},
        "test-size": {**good, "name": "test-size", "input_size": "big"},
        "test-extra": {**good, "name": "test-extra", "extra": []},
        "test-width": {**good, "name": "test-width", "embedding_dim": 0},
    }
    for name, card in {**edits, "test-good": good}.items():
        (folder / f"{name}.json").write_text(json.dumps(card))
    builtin = _REGISTRY["dlib-resnet"]
    try:
        register_user_models()
        broken = dict(BROKEN_CARDS)
        assert set(broken) == {folder / f"{name}.json" for name in edits}
        assert all("\n" not in reason for reason in broken.values())
        names = list_embedders()  # every listing still works
        assert "test-good" in names and not set(edits) - {"dlib-resnet"} & set(names)
        assert get_card("dlib-resnet") == DLIB_RESNET_CARD
    finally:
        _REGISTRY["dlib-resnet"] = builtin


def test_remove_touches_only_added_cards(tmp_path, config_home):
    """``models remove`` deletes a card in the config folder and nothing else: ``../x`` once deleted
    ``x.json`` beside it, and a stray ``dlib-resnet.json`` made the built-in removable."""
    from facecloak.models.user_models import config_dir, is_user_model

    folder = config_dir()
    folder.mkdir(parents=True)
    outside = folder.parent / "precious.json"
    outside.write_text("{}")
    (folder / "dlib-resnet.json").write_text(json.dumps(_tiny_card("test-good", tmp_path / "x.onnx")))
    register_user_models()
    assert not is_user_model("dlib-resnet")
    remove_user_model("dlib-resnet")  # the stray card, listed as broken, goes; the built-in stays
    assert not (folder / "dlib-resnet.json").exists() and "dlib-resnet" in list_embedders()
    register_user_models()
    with pytest.raises(InvalidInputError, match="built-in"):
        remove_user_model("dlib-resnet")
    with pytest.raises(ModelNotFoundError):
        remove_user_model("../precious")
    assert outside.is_file() and "dlib-resnet" in list_embedders()


def test_card_options_that_cannot_be_saved_are_refused(tmp_path):
    """A name with a trailing newline (``$`` matched before it) and a margin of NaN (saved as a card
    that no longer loaded) are refused when the card is made."""
    from facecloak.models.plugins import make_card

    with pytest.raises(InvalidInputError, match="model name"):
        make_card("test-x\n", tmp_path / "x.onnx")
    with pytest.raises(InvalidInputError, match="margin"):
        make_card("test-x", tmp_path / "x.onnx", crop="box", margin=float("nan"))
    with pytest.raises(InvalidInputError, match="std"):
        make_card("test-x", tmp_path / "x.onnx", std=(0.0, 1.0, 1.0))


def test_a_template_file_of_anything_but_five_points_is_a_one_line_error(tmp_path):
    """Five numbers, strings or NaN in a ``--template`` file were a TypeError or ValueError
    traceback (or a NaN chip), not the one-line error."""
    for text in ("[1, 2, 3, 4, 5]", '[[1, "a"]' + ", [1, 2]" * 4 + "]", "[[1, NaN]" + ", [1, 2]" * 4 + "]"):
        path = tmp_path / "points.json"
        path.write_text(text)
        with pytest.raises(InvalidInputError, match="5 \\[x, y\\] points"):
            template_for(str(path), 112)
    path.write_text("[[1, 2]" + ", [3, 4.5]" * 4 + "]")
    assert template_for(str(path), 112)[1] == (3.0, 4.5)


class _PixelEmbedder(Embedder):
    """A stand-in face model: a 4x4 colour thumbnail of the chip, or the same vector for every face."""

    def __init__(self, constant: bool = False) -> None:
        super().__init__()
        self.card = FaceModelCard(
            name="test-pixels",
            input_size=112,
            template=template_for("arcface", 112),
            embedding_dim=48,
            distance="cosine",
            match_threshold=0.6,
            weights="none",
            license="none",
        )
        self.constant = constant
        self.anchor = torch.nn.Parameter(torch.ones(48), requires_grad=False)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        thumbnail = torch.nn.functional.adaptive_avg_pool2d(chips, 4).flatten(1)
        vector = self.anchor.expand_as(thumbnail) if self.constant else thumbnail
        return torch.nn.functional.normalize(vector, dim=1)


@pytest.fixture(scope="module")
def three_people(lfw_dir, tmp_path_factory):
    """Three LFW people with three photos each."""
    import shutil

    folder = tmp_path_factory.mktemp("people")
    people = [p for p in sorted((lfw_dir / "images").iterdir()) if len(list(p.glob("*.jpg"))) >= 3][:3]
    for person in people:
        (folder / person.name).mkdir()
        for photo in sorted(person.glob("*.jpg"))[:3]:
            shutil.copy(photo, folder / person.name)
    return folder


def test_calibration_refuses_a_threshold_of_zero(three_people, remembering_detector):
    """A model that puts different people at distance 0 gave threshold 0, which `models calibrate`
    then failed to save with a traceback; now it is a one-line error."""
    from facecloak.calibrate import calibrate_threshold

    constant = _PixelEmbedder(constant=True)
    with pytest.raises(InvalidInputError, match="distance 0"):
        calibrate_threshold(constant, three_people, far=0.1, detector=remembering_detector)
    result = calibrate_threshold(_PixelEmbedder(), three_people, far=0.1, detector=remembering_detector)
    assert 0 < result.threshold < 2 and result.impostor_pairs == 27


def test_calibration_counts_and_names_the_photos_it_could_not_read(
    three_people, tmp_path, remembering_detector
):
    """Unreadable photos were left out of a calibration silently: its line said nothing of them."""
    import shutil

    from facecloak.calibrate import calibrate_threshold

    people = tmp_path / "people"
    shutil.copytree(three_people, people)
    broken = sorted(next(people.iterdir()).glob("*.jpg"))[0]
    broken.write_bytes(b"not a photo")
    result = calibrate_threshold(_PixelEmbedder(), people, far=0.1, detector=remembering_detector)
    assert result.photos == 8 and len(result.unreadable) == 1 and str(broken) in result.unreadable[0]
    assert f"1 photo(s) left out, unreadable, the first: {broken}" in result.summary()


def test_calibration_detects_on_the_models_device(three_people, monkeypatch):
    """The detector calibration builds runs where the model is: with CUDA present and the model on
    the CPU (``--device cpu``) it was built on CUDA. Here CUDA is only claimed, so a detector put
    there fails."""
    from facecloak.calibrate import calibrate_threshold

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    result = calibrate_threshold(_PixelEmbedder(), three_people, far=0.1)
    assert result.photos == 9


def test_cli_calibrate_on_photos_without_faces_says_so(mobileface_dir, config_home, tmp_path):
    """Two people of faceless photos were "too few pairs (0 genuine, 0 impostor): give more people
    with two or more photos", though they had two each; now the error says no face was found, and
    the card keeps its threshold."""
    import numpy as np
    from PIL import Image

    runner = CliRunner()
    symbol = mobileface_dir / MOBILEFACE_SYMBOL
    added = runner.invoke(main, ["models", "add", "test-mobileface", str(symbol), "--threshold", "0.65"])
    assert added.exit_code == 0, added.output
    people = tmp_path / "people"
    noise = np.random.default_rng(0)
    for person in ("a", "b"):
        (people / person).mkdir(parents=True)
        for k in range(2):
            pixels = (noise.random((120, 120, 3)) * 255).astype("uint8")
            Image.fromarray(pixels).save(people / person / f"{k}.png")
    result = runner.invoke(main, ["models", "calibrate", "test-mobileface", str(people), "--device", "cpu"])
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0, result.output
    assert str(people) in result.stderr and "no face found in any of the 4 photos" in result.stderr
    card = json.loads((config_home / "facecloak" / "models" / "test-mobileface.json").read_text())
    assert card["match_threshold"] == 0.65


def test_cli_calibrate_saves_a_tiny_threshold_as_cut_never_rounded_up(
    mobileface_dir, config_home, tmp_path, monkeypatch
):
    """`models calibrate` rounded the calibrated threshold again to 4 decimals: 5.678e-05, already
    cut to 4 significant digits, was saved as 0.0001, which admits more than ``--far``."""
    import facecloak.calibrate
    from facecloak.calibrate import Calibration

    runner = CliRunner()
    added = runner.invoke(main, ["models", "add", "test-mobileface", str(mobileface_dir / MOBILEFACE_SYMBOL)])
    assert added.exit_code == 0, added.output
    measured = Calibration(
        model="test-mobileface", threshold=5.678e-05, far=1e-3, tar=0.5, genuine_pairs=10,
        impostor_pairs=1000, photos=20, photos_without_face=0, people=10,
    )  # fmt: skip
    monkeypatch.setattr(facecloak.calibrate, "calibrate_threshold", lambda *args, **kwargs: measured)
    result = runner.invoke(main, ["models", "calibrate", "test-mobileface", str(tmp_path), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    card = json.loads((config_home / "facecloak" / "models" / "test-mobileface.json").read_text())
    assert card["match_threshold"] == 5.678e-05 and "below 5.678e-05" in result.stdout


def test_cli_add_a_folder_says_it_is_a_folder(mobileface_dir, config_home):
    """`models add NAME FOLDER` said "model file not found" of a folder that is there."""
    result = CliRunner().invoke(main, ["models", "add", "test-mobileface", str(mobileface_dir)])
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0, result.output
    assert f"{mobileface_dir}: a folder, not a model file" in result.stderr
    assert not (config_home / "facecloak" / "models" / "test-mobileface.json").exists()


def test_the_model_listing_exits_3_when_an_added_card_is_broken(config_home):
    """``facecloak models`` printed the broken card's error line and exited 0: a script saw no fault."""
    from click.testing import CliRunner

    from facecloak.cli import main

    folder = config_home / "facecloak" / "models"
    folder.mkdir(parents=True)
    (folder / "test-broken.json").write_text("{not json")
    register_user_models()  # as a new process does on import
    result = CliRunner().invoke(main, ["models"])
    assert result.exit_code == 3
    assert f"error: {folder / 'test-broken.json'}: unreadable model card" in result.stderr
    assert "dlib-resnet" in result.stdout and "To add a face model" in result.stdout  # still listed
    (folder / "test-broken.json").unlink()
    register_user_models()
    assert CliRunner().invoke(main, ["models"]).exit_code == 0


def test_an_mxnet_model_whose_params_were_moved_is_not_available(mobileface_dir, tmp_path, config_home):
    """Only the graph was looked for: with its ``-0000.params`` moved away the model was listed as
    available, so every command run with all available models (``cloak`` without ``--models``)
    failed on it instead of leaving it out; the "why" of a missing file named it without a word."""
    from facecloak.models import available_embedders, embedder_status

    for suffix in ("-symbol.json", "-0000.params"):
        (tmp_path / f"mf{suffix}").symlink_to(mobileface_dir / f"MobileFace_Identification_V2{suffix}")
    add_user_model("test-moved", tmp_path / "mf-symbol.json")
    assert "test-moved" in available_embedders()
    (tmp_path / "mf-0000.params").unlink()
    ok, why = embedder_status("test-moved")
    assert not ok and "test-moved" not in available_embedders()
    assert str(tmp_path / "mf-0000.params") in why and "moved or deleted" in why
    (tmp_path / "mf-symbol.json").unlink()
    assert str(tmp_path / "mf-symbol.json") in embedder_status("test-moved")[1]


def test_a_graph_not_named_symbol_json_says_how_to_name_it(mobileface_dir, tmp_path, config_home):
    """A ``.json`` graph named otherwise was told to "pass params=", an option ``models add`` lacks."""
    (tmp_path / "graph.json").symlink_to(mobileface_dir / MOBILEFACE_SYMBOL)
    result = CliRunner().invoke(main, ["models", "add", "test-graph", str(tmp_path / "graph.json")])
    assert result.exit_code == 3
    assert "params=" not in result.stderr and "NAME-symbol.json" in result.stderr


def test_an_mxnet_card_edited_to_a_size_its_graph_cannot_take_names_the_file(mobileface_dir, config_home):
    """The ONNX case above was a one-line error naming the file; an MXNet graph's own error passed
    through as it was: "MXNet node fc5+fc5_bn ... failed", naming no file (a cloak's batch listed
    failed photos by that line alone), exiting 2 as if the command had been mistyped."""
    card = add_user_model("test-mf-edited", mobileface_dir / MOBILEFACE_SYMBOL).to_dict()
    path = config_home / "facecloak" / "models" / "test-mf-edited.json"
    path.write_text(json.dumps({**card, "input_size": 224}))
    register_user_models()
    model = create_embedder("test-mf-edited", device="cpu")
    with pytest.raises(ModelNotFoundError) as info:
        model(torch.rand(2, 3, 224, 224))
    message = str(info.value)
    assert str(mobileface_dir / MOBILEFACE_SYMBOL) in message and "\n" not in message
    assert "does not run on 2 224x224" in message and "was its card edited?" in message


def test_a_card_edited_to_another_embedding_width_names_the_file(tmp_path, config_home):
    """A card whose width was edited by hand (or whose file was swapped for another model) was
    refused on first use as "model X: output (2, 8) ... is not one 99-d embedding per chip",
    naming no file: a batch listed every failed photo by that line alone."""
    pytest.importorskip("onnx2torch")
    _export_onnx(_Tiny("vector"), tmp_path / "vector.onnx")
    card = add_user_model("test-width", tmp_path / "vector.onnx").to_dict()
    path = config_home / "facecloak" / "models" / "test-width.json"
    path.write_text(json.dumps({**card, "embedding_dim": 99}))
    register_user_models()
    with pytest.raises(InvalidInputError) as info:
        create_embedder("test-width", device="cpu")(torch.rand(2, 3, 112, 112))
    assert str(info.value).startswith(f"{tmp_path / 'vector.onnx'}: model test-width: output (2, 8)")


def test_a_broken_card_with_a_name_no_model_can_have_is_listed_with_how_to_remove_it(config_home):
    """``My Model.json`` was listed as unreadable, and ``models remove "My Model"`` refused it (no
    model may be named so): the only way out was to find the config folder and delete the file."""
    from click.testing import CliRunner

    from facecloak.cli import main

    folder = config_home / "facecloak" / "models"
    folder.mkdir(parents=True)
    (folder / "My Model.json").write_text(json.dumps({"name": "x"}))
    (folder / "other.json").write_text("{}")  # not a broken card of that name: left alone
    register_user_models()
    listing = CliRunner().invoke(main, ["models"])
    assert "fix it, or remove it: facecloak models remove 'My Model'" in listing.stderr
    removed = CliRunner().invoke(main, ["models", "remove", "My Model"])
    assert removed.exit_code == 0, removed.output
    assert not (folder / "My Model.json").exists() and (folder / "other.json").is_file()
    with pytest.raises(ModelNotFoundError):
        remove_user_model("My Model")  # gone, and never a path: "../x" stays refused


def test_a_template_in_one_spot_or_outside_its_chip_is_refused(tmp_path, config_home):
    """Five points in one spot were accepted (``models add ... --template``): every face was aligned
    onto one pixel, and the model called any two people the same person (distance 0)."""
    from dataclasses import replace

    from conftest import models_root

    card = _PixelEmbedder().card
    one_spot, one_line = [(56.0, 56.0)] * 5, [(10.0 * k, 56.0) for k in range(5)]
    for points in (one_spot, one_line, [*card.template[:4], (900.0, 50.0)]):
        with pytest.raises(InvalidInputError, match="spread over it"):
            replace(card, template=tuple(points))
    path = tmp_path / "same.json"
    path.write_text(json.dumps([[56, 56]] * 5))
    symbol = models_root() / "mobileface-v2" / "MobileFace_Identification_V2-symbol.json"
    if symbol.is_file():
        added = CliRunner().invoke(main, ["models", "add", "test-spot", str(symbol), "--template", str(path)])
        assert added.exit_code == 2 and "spread over it" in added.output, added.output
        assert "Traceback" not in added.output


def test_an_added_model_whose_file_is_gone_fails_the_listing(mobileface_dir, config_home, tmp_path):
    """``facecloak models`` exited 0 when a model the user added had lost its file (listed NOT
    available): a script checking the listing could not tell. Removing a name never added was
    exit 3 (a file failed), not a usage error."""
    runner = CliRunner()
    copy = tmp_path / "gone"
    copy.mkdir()
    for file in mobileface_dir.glob("MobileFace_Identification_V2*"):
        shutil.copy(file, copy / file.name)
    added = runner.invoke(
        main, ["models", "add", "test-gone", str(copy / MOBILEFACE_SYMBOL), "--threshold", "0.7"]
    )
    assert added.exit_code == 0, added.output
    shutil.rmtree(copy)
    listed = runner.invoke(main, ["models"])
    assert listed.exit_code == 3 and "error: model test-gone was added but cannot be used" in listed.stderr
    assert runner.invoke(main, ["models", "remove", "test-gone"]).exit_code == 0
    assert "test-gone" not in runner.invoke(main, ["models"]).output
    unknown = runner.invoke(main, ["models", "remove", "test-never-added"])
    assert unknown.exit_code == 2 and "no added model named 'test-never-added'" in unknown.stderr


def test_an_option_of_the_other_crop_is_refused_not_dropped(config_home, tmp_path):
    """``models add ... --margin 25`` without ``--crop box`` was added with no margin, without a word."""
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read: refused before")
    runner = CliRunner()
    margin = runner.invoke(main, ["models", "add", "test-m", str(model), "--margin", "25"])
    assert margin.exit_code == 2 and "--margin is for --crop box" in margin.output
    template = runner.invoke(
        main, ["models", "add", "test-m", str(model), "--crop", "box", "--template", "dlib"]
    )
    assert template.exit_code == 2 and "--template is for --crop landmarks" in template.output


def test_an_added_model_left_out_of_a_default_run_is_named(
    mobileface_dir, tmp_path, config_home, samples_dir
):
    """A cloak without ``--models`` attacks every available model: an added one whose file was
    moved was left out without a word, so the cloak attacked fewer models than were added."""
    for suffix in ("-symbol.json", "-0000.params"):
        (tmp_path / f"mf{suffix}").symlink_to(mobileface_dir / f"MobileFace_Identification_V2{suffix}")
    add_user_model("test-gone", tmp_path / "mf-symbol.json")
    (tmp_path / "mf-0000.params").unlink()
    args = ["cloak", str(samples_dir / "astronaut.jpg"), "--steps", "0", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args)
    assert "note: added model test-gone is left out of this run" in result.stderr, result.stderr
    assert "moved or deleted" in result.stderr
    named = CliRunner().invoke(main, [*args, "--models", "dlib-resnet", "--overwrite"])
    assert "test-gone" not in named.stderr  # the models chosen: nothing left out unsaid


def test_a_calibration_does_not_write_back_a_card_changed_or_removed_while_it_ran(
    mobileface_dir, config_home
):
    """``models calibrate`` read the card at its start and wrote that copy back minutes later: a
    ``models add`` of another file under the same name, or a ``models remove``, made meanwhile
    was undone without a word."""
    from dataclasses import replace

    from facecloak.models.user_models import save_user_card

    started = add_user_model("test-cal", mobileface_dir / MOBILEFACE_SYMBOL, threshold=0.73)
    add_user_model("test-cal", mobileface_dir / MOBILEFACE_SYMBOL, threshold=0.5)  # added again meanwhile
    with pytest.raises(InvalidInputError, match="changed"):
        save_user_card(replace(started, match_threshold=0.64), replacing=started)
    assert get_card("test-cal").match_threshold == 0.5
    now = get_card("test-cal")
    save_user_card(replace(now, match_threshold=0.64), replacing=now)  # unchanged: saved
    assert get_card("test-cal").match_threshold == 0.64
    remove_user_model("test-cal")
    with pytest.raises(InvalidInputError, match="removed"):
        save_user_card(replace(now, match_threshold=0.6), replacing=now)
    assert not (config_home / "facecloak" / "models" / "test-cal.json").exists()


def test_the_remedy_named_for_a_broken_card_works_for_one_named_like_a_built_in(config_home):
    """A broken ``dlib-resnet.json`` in the config folder was to be removed with `facecloak models
    remove dlib-resnet`, which refused a built-in's name; a folder named like a card was to be
    removed the same way, which found no card."""
    folder = config_home / "facecloak" / "models"
    folder.mkdir(parents=True)
    (folder / "dlib-resnet.json").write_text('{"name": "dlib-resnet"}')
    (folder / "odd.json").mkdir()
    register_user_models()
    listing = CliRunner().invoke(main, ["models"])
    assert listing.exit_code == 3 and "it is not a file: move it out of the folder" in listing.stderr
    removed = CliRunner().invoke(main, ["models", "remove", "dlib-resnet"])
    assert removed.exit_code == 0, removed.output
    assert not (folder / "dlib-resnet.json").exists() and "dlib-resnet" in list_embedders()
    (folder / "odd.json").rmdir()
    register_user_models()
    assert CliRunner().invoke(main, ["models"]).exit_code == 0
    assert CliRunner().invoke(main, ["models", "remove", "dlib-resnet"]).exit_code == 2  # the built-in stays


def test_an_added_model_keeps_its_params_epoch_and_notices_its_file_replaced(
    mobileface_dir, tmp_path, config_home
):
    """An MXNet graph read the highest ``-NNNN.params`` beside it: another epoch dropped there was
    used with the old threshold without a word, as was a params file replaced by other weights."""
    import shutil

    from facecloak.models import embedder_status

    (tmp_path / "mf-symbol.json").symlink_to(mobileface_dir / MOBILEFACE_SYMBOL)
    shutil.copy(mobileface_dir / "MobileFace_Identification_V2-0000.params", tmp_path / "mf-0000.params")
    card = add_user_model("test-pinned", tmp_path / "mf-symbol.json")
    assert card.extra["params"] == "mf-0000.params" and card.extra["fingerprint"]
    (tmp_path / "mf-0013.params").write_bytes(b"not this model's weights")  # a later epoch beside it
    register_user_models()  # as a new process does
    assert embedder_status("test-pinned")[0]
    assert create_embedder("test-pinned", device="cpu").card.embedding_dim == card.embedding_dim
    params = tmp_path / "mf-0000.params"
    data = bytearray(params.read_bytes())
    data[-1] ^= 0xFF  # other weights at the same path
    params.write_bytes(bytes(data))
    register_user_models()
    usable, why = embedder_status("test-pinned")
    assert not usable and "changed since it was added" in why and "calibrate" in why
