"""The HTTP service against a real `facecloak serve` on loopback: protection, bad input, limits, keys."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs pip install 'facecloak[serve]'")
import httpx  # noqa: E402

from service_helpers import running_service, serving_in_thread  # noqa: E402
from test_io import png_header_only  # noqa: E402

MAX_UPLOAD_MB = 20


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("service")
    with running_service(workdir, "--max-upload-mb", str(MAX_UPLOAD_MB), "--timeout", "600") as running:
        yield running


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def changed_only_in_faces(original: np.ndarray, output: np.ndarray, boxes: list[list[float]], scale=1.3):
    """Return (changed pixels inside the face regions, changed pixels outside)."""
    height, width = original.shape[:2]
    inside = np.zeros((height, width), dtype=bool)
    for x1, y1, x2, y2 in boxes:
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2 * scale, (y2 - y1) / 2 * scale
        inside[max(0, int(cy - hh) - 1) : int(cy + hh) + 2, max(0, int(cx - hw) - 1) : int(cx + hw) + 2] = (
            True
        )
    changed = (original != output).any(axis=2)
    return int((changed & inside).sum()), int((changed & ~inside).sum())


def test_anonymize_as_in_the_readme(service, samples_dir):
    url, _, _ = service
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    answer = httpx.post(
        f"{url}/v1/anonymize",
        files={"image": ("grace_hopper.jpg", photo, "image/jpeg")},
        data={"method": "blur", "format": "png"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["x-facecloak-faces"] == "1"
    assert 'filename="grace_hopper_anonymized.png"' in answer.headers["content-disposition"]
    boxes = httpx.post(f"{url}/v1/detect", files={"image": ("g.jpg", photo)}, timeout=120).json()["faces"]
    inside, outside = changed_only_in_faces(decode(photo), decode(answer.content), [f["box"] for f in boxes])
    assert inside > 5000 and outside == 0


def test_an_upside_down_upload_has_every_face_found_and_rotations_none_looks_upright(service, samples_dir):
    """As the CLI's --rotations: the group photo turned upside down gave two of its four faces."""
    import io as bytes_io

    from PIL import Image

    url, _, _ = service
    buffer = bytes_io.BytesIO()
    Image.open(samples_dir / "group.jpg").rotate(180).save(buffer, "JPEG", quality=92)
    photo = buffer.getvalue()
    found = {}
    for rotations in ("all", "none"):
        answer = httpx.post(
            f"{url}/v1/detect", files={"image": ("g.jpg", photo)}, data={"rotations": rotations}, timeout=120
        )
        assert answer.status_code == 200, answer.text
        found[rotations] = len(answer.json()["faces"])
    assert found["all"] == 4 and found["none"] < 4
    default = httpx.post(f"{url}/v1/anonymize", files={"image": ("g.jpg", photo)}, timeout=120)
    assert default.status_code == 200 and default.headers["x-facecloak-faces"] == "4"
    wrong = httpx.post(
        f"{url}/v1/detect", files={"image": ("g.jpg", photo)}, data={"rotations": "x"}, timeout=120
    )
    assert wrong.status_code == 422


def test_a_jpeg_upload_keeps_every_block_away_from_the_faces(service, samples_dir):
    """As the CLI: a JPEG comes back edited block by block, the rest of the photo bit-exact. The
    service re-encoded every JPEG whole at quality 95 (a third of the pixels moved, up to 17 levels)."""
    url, _, _ = service
    photo = (samples_dir / "group.jpg").read_bytes()
    boxes = httpx.post(f"{url}/v1/detect", files={"image": ("g.jpg", photo)}, timeout=120).json()["faces"]
    moved = {}
    for extra in ({}, {"jpeg_quality": "95"}):
        answer = httpx.post(
            f"{url}/v1/anonymize",
            files={"image": ("group.jpg", photo, "image/jpeg")},
            data={"method": "blur", **extra},
            timeout=120,
        )
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg", answer.text
        # the face regions, widened by two 16 px coded units (smooth colour upsampling reaches one)
        inside, outside = changed_only_in_faces(
            decode(photo), decode(answer.content), [f["box"] for f in boxes], scale=2.0
        )
        moved[bool(extra)] = outside
    assert moved[False] == 0 and moved[True] > 10_000


def test_a_name_in_any_script_names_the_download(service, samples_dir):
    """``фото.jpg`` came back as ``jpg_anonymized.jpg``: every letter outside ASCII was cut."""
    url, _, _ = service
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    sent = {"files": {"image": ("фото.jpg", photo, "image/jpeg")}, "timeout": 120}
    report = httpx.post(f"{url}/v1/anonymize", data={"method": "blur", "response": "json"}, **sent).json()
    assert report["filename"] == "фото_anonymized.jpg"
    answer = httpx.post(f"{url}/v1/anonymize", data={"method": "blur"}, **sent)
    disposition = answer.headers["content-disposition"]
    assert "filename*=UTF-8''%D1%84%D0%BE%D1%82%D0%BE_anonymized.jpg" in disposition
    assert 'filename="anonymized.jpg"' in disposition  # for clients that read only ASCII


def test_a_phone_heic_comes_back_as_a_jpeg_a_browser_shows(service, samples_dir):
    """A HEIC upload (an iPhone's photo) is anonymised into a JPEG unless a format is asked for:
    the page shows the result, and browsers other than Safari cannot show HEIC."""
    pillow_heif = pytest.importorskip("pillow_heif", reason="HEIC support (facecloak[heic]) is not installed")
    pillow_heif.register_heif_opener()
    buffer = io.BytesIO()
    Image.open(samples_dir / "grace_hopper.jpg").save(buffer, format="HEIF")
    url, _, _ = service
    for extra, content_type in (({}, "image/jpeg"), ({"format": "input"}, "image/heic")):
        answer = httpx.post(
            f"{url}/v1/anonymize",
            files={"image": ("IMG_0001.HEIC", buffer.getvalue(), "image/heic")},
            data={"method": "blur", **extra},
            timeout=120,
        )
        assert answer.status_code == 200, answer.text
        assert answer.headers["content-type"] == content_type and answer.headers["x-facecloak-faces"] == "1"


def test_json_report_and_exif_dropped(service, samples_dir, tmp_path):
    url, _, _ = service
    photo = tmp_path / "with_gps.jpg"
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (48.0, 51.0, 29.0)}  # GPS
    exif[0x010F] = "camera maker"
    Image.open(samples_dir / "grace_hopper.jpg").save(photo, exif=exif.tobytes())
    answer = httpx.post(
        f"{url}/v1/anonymize",
        files={"image": ("with_gps.jpg", photo.read_bytes(), "image/jpeg")},
        data={"method": "pixelate", "response": "json"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["status"] == "protected" and report["faces_found"] == 1
    assert report["faces"][0]["protected"] is True and "pixelated" in report["faces"][0]["reason"]
    import base64

    with Image.open(io.BytesIO(base64.b64decode(report["image_base64"]))) as output:
        assert output.format == "JPEG" and not output.getexif()


def test_cloak_over_http(service, samples_dir):
    url, _, _ = service
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    answer = httpx.post(
        f"{url}/v1/cloak",
        files={"image": ("grace_hopper.jpg", photo, "image/jpeg")},
        data={"level": "mid", "format": "png", "response": "json"},
        timeout=600,
    )
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["faces_found"] == 1
    face = report["faces"][0]
    assert set(face["models"]) and "dssim" in face and face["reason"]
    assert face["protected"] == (report["status"] == "protected")
    for model in face["models"].values():  # the honest check ran: distances after a real JPEG 75
        assert model["distance_after_jpeg75"] is not None
    import base64

    output = decode(base64.b64decode(report["image_base64"]))
    inside, outside = changed_only_in_faces(decode(photo), output, [face["box"]])
    assert inside > 1000 and outside == 0
    assert face["dssim"] <= 0.012


def test_a_jpeg_response_holds_the_cap_in_the_file_it_returns(service, samples_dir):
    """The response's JPEG (re-encoded whole at quality 95 here) quantises the change again: the
    cap holds on the file as returned, as the CLI's does."""
    import base64

    from facecloak.io import read_image_bytes
    from facecloak.quality import box_dssim

    url, _, _ = service
    photo = (samples_dir / "astronaut.jpg").read_bytes()
    answer = httpx.post(
        f"{url}/v1/cloak", files={"image": ("a.jpg", photo)}, data={"response": "json"}, timeout=600
    )
    assert answer.status_code == 200, answer.text
    report = answer.json()
    (face,) = report["faces"]
    returned = read_image_bytes(base64.b64decode(report["image_base64"])).pixels
    original = read_image_bytes(photo).pixels
    written = float(box_dssim(original[None], returned[None], torch.tensor([face["box"]]))[0])
    assert written <= 0.008 * 1.02 and written == pytest.approx(face["dssim"], abs=6e-4)


def test_escalate_cloaks_a_face_that_falls_short_again_one_level_up(service, samples_dir):
    """``escalate``: a `low` cloak given no steps leaves the face as it was (NOT protected); with
    escalate on, the face is cloaked again at `mid`, with mid's own steps, and its reason says so."""
    url, _, _ = service
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()

    def cloak(**extra: str) -> dict:
        answer = httpx.post(
            f"{url}/v1/cloak",
            files={"image": ("grace_hopper.jpg", photo, "image/jpeg")},
            data={"level": "low", "steps": "0", "response": "json", **extra},
            timeout=600,
        )
        assert answer.status_code == 200, answer.text
        return answer.json()

    short = cloak()["faces"][0]
    assert short["protected"] is False and "one level stronger (escalate)" in short["reason"], short["reason"]
    # a cloak comes back as PNG unless asked (a JPEG's rounding is charged to its cap); "input" keeps JPEG
    for format_name, content_type in ((None, "image/png"), ("input", "image/jpeg")):
        answer = cloak(**({"format": format_name} if format_name else {}))
        assert answer["content_type"] == content_type and answer["filename"].startswith(
            "grace_hopper_cloaked"
        )
    report = cloak(escalate="true")
    face = report["faces"][0]
    assert face["protected"] is True and report["status"] == "protected", face["reason"]
    assert face["escalated_from"] == "low" and face["level"] == "mid"
    assert "cloaked again at mid: low fell short" in face["reason"]
    assert face["dssim"] <= 0.012  # mid's cap, not low's


def raw_upload(url: str, declared: int, send: int, chunk: int = 1 << 20) -> tuple[int, dict]:
    """POST a multipart body of ``send`` bytes declaring ``declared``, as a client that reads early answers.

    Stops sending as soon as the server answers (as curl does); returns (status, JSON body).
    """
    parts = urlparse(url)
    head = (
        f"POST /v1/anonymize HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Content-Type: multipart/form-data; boundary=XyZ\r\n"
        f"Content-Length: {declared}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as connection:
        connection.sendall(head)
        prefix = b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n\xff\xd8'
        sent, block = 0, bytes(chunk)
        connection.setblocking(False)
        answer = b""
        while sent < send:
            try:
                answer += connection.recv(65536)
                if answer:
                    break
            except BlockingIOError:
                pass
            try:
                data = prefix if sent == 0 else block[: min(chunk, send - sent)]
                sent += connection.send(data)
            except BlockingIOError:
                time.sleep(0.001)
            except (BrokenPipeError, ConnectionResetError):
                break
        connection.setblocking(True)
        try:
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                more = connection.recv(65536)
                if not more:
                    break
                answer += more
        except (ConnectionResetError, TimeoutError):
            pass
    head_text, _, body = answer.partition(b"\r\n\r\n")
    return int(head_text.split()[1]), json.loads(body)


def bad_requests(samples_dir: Path, tmp_path: Path) -> dict:
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    png_header_only(tmp_path / "bomb.png", 30_000, 30_000)
    return {
        "empty body": (400, "empty", {"content": b""}),
        "empty file": (400, "empty", {"files": {"image": ("e.jpg", b"", "image/jpeg")}}),
        "truncated JPEG": (
            422,
            "truncated",
            {"files": {"image": ("t.jpg", photo[: len(photo) // 2], "image/jpeg")}},
        ),
        "text renamed .jpg": (
            415,
            "not an image",
            {"files": {"image": ("x.jpg", b"just text\n" * 50, "image/jpeg")}},
        ),
        "30000x30000 PNG bomb": (
            413,
            "900,000,000 pixels",
            {"files": {"image": ("b.png", (tmp_path / "bomb.png").read_bytes())}},
        ),
        "wrong file field": (422, "'image'", {"files": {"photo": ("g.jpg", photo, "image/jpeg")}}),
        "photo sent as a text part": (
            422,
            "must be a file part",
            {"files": {"image": (None, b"just text"), "method": (None, b"blur")}},
        ),
        "wrong option field": (
            422,
            "mask_scale",
            {"files": {"image": ("g.jpg", photo)}, "data": {"mask-scale": "2"}},
        ),
        "bad option value": (
            422,
            "method",
            {"files": {"image": ("g.jpg", photo)}, "data": {"method": "smear"}},
        ),
        "raw body, no multipart": (
            422,
            "multipart",
            {"content": photo, "headers": {"content-type": "image/jpeg"}},
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "empty body",
        "empty file",
        "truncated JPEG",
        "text renamed .jpg",
        "30000x30000 PNG bomb",
        "wrong file field",
        "photo sent as a text part",
        "wrong option field",
        "bad option value",
        "raw body, no multipart",
    ],
)
def test_bad_input_gets_a_4xx_with_a_reason(service, samples_dir, tmp_path, case):
    url, temporary, process = service
    status, words, request = bad_requests(samples_dir, tmp_path)[case]
    answer = httpx.post(f"{url}/v1/anonymize", timeout=60, **request)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["status"] == status and body["error"] and words in body["reason"], body
    assert httpx.get(f"{url}/healthz", timeout=10).json()["status"] == "ok"
    assert process.poll() is None
    assert list(temporary.iterdir()) == []


def test_an_identity_key_without_targeted_mode_is_refused_not_ignored(service, samples_dir):
    """``identity_key`` with the default untargeted mode was ignored: an untargeted cloak where a
    targeted one was meant."""
    url, _, _ = service
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    answer = httpx.post(
        f"{url}/v1/cloak", timeout=60, files={"image": ("g.jpg", photo)}, data={"identity_key": "k"}
    )
    assert answer.status_code == 422 and "identity_key is for mode=targeted" in answer.json()["reason"]


def test_a_seed_beyond_64_bits_is_refused_not_a_500(service, samples_dir):
    url, temporary, process = service
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    answer = httpx.post(
        f"{url}/v1/cloak", timeout=60, files={"image": ("g.jpg", photo)}, data={"seed": str(10**20)}
    )
    assert answer.status_code == 422 and "seed" in answer.json()["reason"], answer.text
    assert process.poll() is None and list(temporary.iterdir()) == []


def test_200_mb_upload_is_refused_early(service):
    url, temporary, _ = service
    # Declared honestly: refused from the header, before the body is read.
    status, body = raw_upload(url, declared=200 * 2**20, send=200 * 2**20)
    assert status == 413 and "larger than this service's limit" in body["reason"]
    # Declared small but sent big: counted while reading, cut at the cap.
    status, body = raw_upload(url, declared=MAX_UPLOAD_MB * 2**20 - 1, send=MAX_UPLOAD_MB * 2**20 - 1)
    assert status in (413, 422), body  # under the cap by a byte: read in full, then refused as not an image
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    assert list(temporary.iterdir()) == []


def test_chunked_upload_over_the_cap(service):
    url, temporary, _ = service

    def body():
        yield b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'
        for _ in range(MAX_UPLOAD_MB + 5):
            yield bytes(2**20)
        yield b"\r\n--XyZ--\r\n"

    headers = {"content-type": "multipart/form-data; boundary=XyZ"}
    try:
        answer = httpx.post(f"{url}/v1/anonymize", content=body(), headers=headers, timeout=60)
    except httpx.HTTPError:  # the server may close before the client finished sending: also a refusal
        answer = None
    if answer is not None:
        assert answer.status_code == 413 and "limit" in answer.json()["reason"]
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    assert list(temporary.iterdir()) == []


def test_metrics_and_docs(service):
    url, _, _ = service
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for name in (
        "facecloak_requests_total",
        "facecloak_request_seconds_bucket",
        "facecloak_faces_total",
        "facecloak_unprotected_faces_total",
        "facecloak_queue_depth",
    ):
        assert name in text
    schema = httpx.get(f"{url}/openapi.json", timeout=10).json()
    assert {"/v1/cloak", "/v1/anonymize", "/v1/detect"} <= set(schema["paths"])
    docs = httpx.get(f"{url}/docs", timeout=10)
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()
    assert httpx.get(f"{url}/docs-assets/swagger-ui-bundle.js", timeout=10).status_code == 200  # offline docs
    page = httpx.get(f"{url}/", timeout=10).text
    assert "static/app.js" in page and "http" not in page.replace("http-equiv", "")


def test_api_keys(tmp_path, samples_dir):
    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app

    keys = tmp_path / "keys.txt"
    keys.write_text("# our clients\nsecret-one\nsecret-two\n")
    app = create_app(ServiceSettings(device="cpu", preload=False, api_keys_file=keys))
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    with TestClient(app) as client:
        missing = client.post("/v1/detect", files={"image": ("g.jpg", photo)})
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        wrong = client.post("/v1/detect", files={"image": ("g.jpg", photo)}, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 403 and wrong.json()["error"] == "api_key_wrong"
        right = client.post(
            "/v1/detect", files={"image": ("g.jpg", photo)}, headers={"Authorization": "Bearer secret-two"}
        )
        assert right.status_code == 200 and len(right.json()["faces"]) == 1
        assert client.get("/healthz").status_code == 200  # health and the page stay open
        assert client.get("/v1/info").json()["api_key_required"] is True
        assert (
            "access-control-allow-origin"
            not in client.get("/healthz", headers={"Origin": "http://x"}).headers
        )


def test_a_keys_file_saved_with_a_byte_order_mark_keeps_its_first_key(tmp_path):
    """Notepad's BOM stayed on the first key: that client was refused (403) with the right key."""
    from facecloak.service import ServiceSettings

    keys = tmp_path / "keys.txt"
    keys.write_bytes(b"\xef\xbb\xbfk1\r\nk2\r\n")
    assert ServiceSettings(api_keys_file=keys).api_keys() == {"k1", "k2"}


def test_every_answer_carries_the_privacy_headers(tmp_path, samples_dir):
    """A returned photo could be type-sniffed, kept by a shared cache, and the page framed by another
    site: no answer said otherwise. Refusals get the headers too; the page is cacheable."""
    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app

    keys = tmp_path / "keys.txt"
    keys.write_text("secret\n")
    app = create_app(ServiceSettings(device="cpu", preload=False, api_keys_file=keys))
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    with TestClient(app) as client:
        answers = {
            "photo": client.post(
                "/v1/anonymize", files={"image": ("g.jpg", photo)}, headers={"X-API-Key": "secret"}
            ),
            "refusal": client.post("/v1/detect", files={"image": ("g.jpg", photo)}),
            "page": client.get("/"),
            "uptime check": client.head("/"),  # was 405: uptime checkers that send HEAD saw it down
        }
    assert [answers[k].status_code for k in answers] == [200, 401, 200, 200]
    for kind, answer in answers.items():
        assert answer.headers["x-content-type-options"] == "nosniff", kind
        assert answer.headers["referrer-policy"] == "no-referrer", kind
        assert answer.headers["x-frame-options"] == "DENY", kind
        assert answer.headers["content-security-policy"] == "frame-ancestors 'none'", kind
    assert answers["photo"].headers["cache-control"] == "no-store"
    assert answers["refusal"].headers["cache-control"] == "no-store"
    assert "no-store" not in answers["page"].headers.get("cache-control", "")


def test_metrics_need_the_api_key_when_keys_are_configured(tmp_path):
    """With keys, /metrics (how much the service is used, by whom refused) needs a key as /v1/
    does; health, the page, the docs and /v1/info stay open. Without keys it stays open."""
    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app

    keys = tmp_path / "keys.txt"
    keys.write_text("secret-one\n")
    with TestClient(create_app(ServiceSettings(device="cpu", preload=False, api_keys_file=keys))) as client:
        missing = client.get("/metrics")
        assert missing.status_code == 401 and missing.json()["error"] == "api_key_missing"
        assert client.get("/metrics", headers={"X-API-Key": "nope"}).status_code == 403
        scraped = client.get("/metrics", headers={"Authorization": "Bearer secret-one"})
        assert scraped.status_code == 200 and "facecloak_requests_total" in scraped.text
        for path in ("/healthz", "/", "/v1/info", "/openapi.json", "/static/app.js"):
            assert client.get(path).status_code == 200, path
    with TestClient(create_app(ServiceSettings(device="cpu", preload=False))) as client:
        assert client.get("/metrics").status_code == 200


@pytest.mark.parametrize(
    ("endpoint", "field", "data", "photos"),
    [
        ("/v1/cloak", "level", {"level": ["low", "high"], "steps": "0"}, 1),
        ("/v1/anonymize", "method", {"method": ["mask", "replace"]}, 1),
        ("/v1/detect", "threshold", {"threshold": ["0.5", "0.9"]}, 1),
        ("/v1/anonymize", "image", {"method": "mask"}, 2),
    ],
)
def test_a_repeated_field_is_refused_naming_it(service, samples_dir, endpoint, field, data, photos):
    """``level=low`` and ``level=high`` (or two photos) in one request: which one counts is
    unclear, so neither does (it was the last one, the others silently dropped)."""
    url, _, _ = service
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    files = [("image", (f"g{k}.jpg", photo)) for k in range(photos)]
    answer = httpx.post(f"{url}{endpoint}", files=files, data=data, timeout=120)
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert body["error"] == "repeated_field" and f"more than once: {field};" in body["reason"], body


@pytest.mark.parametrize(
    ("endpoint", "data"),
    [
        ("/v1/cloak", {"level": "", "steps": "0"}),
        ("/v1/cloak", {"models": " "}),
        ("/v1/anonymize", {"method": ""}),
    ],
)
def test_an_empty_field_is_refused_not_read_as_its_default(service, samples_dir, endpoint, data):
    """``-F level=$LEVEL`` with LEVEL unset was answered at mid, ``models=`` with every model."""
    url, _, _ = service
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    answer = httpx.post(f"{url}{endpoint}", files={"image": ("g.jpg", photo)}, data=data, timeout=120)
    assert answer.status_code == 422, answer.text
    assert f"sent empty: {next(iter(data))};" in answer.json()["reason"]


def test_a_face_short_at_the_strongest_level_is_not_told_to_go_higher(service, samples_dir):
    """At ``high`` (with escalate on, as the page sends it) there is no higher level to try and
    nothing to escalate to: the reason said "try a higher level, or escalate" all the same."""
    url, _, _ = service
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    for extra in ({}, {"escalate": "true"}):
        answer = httpx.post(
            f"{url}/v1/cloak",
            files={"image": ("g.jpg", photo)},
            data={"level": "high", "steps": "0", "response": "json", **extra},
            timeout=600,
        )
        assert answer.status_code == 200, answer.text
        (face,) = answer.json()["faces"]
        assert face["protected"] is False
        assert "higher level" not in face["reason"] and "high is the strongest level" in face["reason"]


def test_refusals_by_the_middleware_are_counted_by_reason(tmp_path, samples_dir):
    """A missing or wrong key and a body over the cap are refused before the app's error handlers:
    ``facecloak_rejected_total`` counted none of them (only ``facecloak_requests_total`` did)."""
    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app

    keys = tmp_path / "keys.txt"
    keys.write_text("secret-one\n")
    settings = ServiceSettings(device="cpu", preload=False, api_keys_file=keys, max_upload_bytes=1000)
    key = {"X-API-Key": "secret-one"}
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/detect", files={"image": ("g.jpg", photo)}).status_code == 401
        assert client.get("/metrics", headers={"X-API-Key": "nope"}).status_code == 403
        assert client.post("/v1/detect", files={"image": ("g.jpg", photo)}, headers=key).status_code == 413
        chunked = client.post(  # no Content-Length: cut at the cap while the form is read
            "/v1/detect",
            content=iter(
                [b'--XyZ\r\nContent-Disposition: form-data; name="image"; filename="g.jpg"\r\n\r\n', photo]
            ),
            headers={"content-type": "multipart/form-data; boundary=XyZ", **key},
        )
        assert chunked.status_code == 413, chunked.text
        text = client.get("/metrics", headers=key).text
    for reason, count in (("api_key_missing", 1), ("api_key_wrong", 1), ("upload_too_large", 2)):
        assert f'facecloak_rejected_total{{reason="{reason}"}} {count}.0' in text, reason
    assert "bad_request" not in text  # the 400 the app had begun for the cut body was never sent


def test_a_page_on_an_allowed_origin_can_read_the_protection_headers(samples_dir):
    """With ``--cors-origin``, a browser on that origin reads only the headers CORS exposes: the
    faces and unprotected faces of the photo it got back (and Retry-After) were hidden from it."""
    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app

    settings = ServiceSettings(device="cpu", preload=False, cors_origins=("https://photos.example",))
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    with TestClient(create_app(settings)) as client:
        answer = client.post(
            "/v1/anonymize",
            files={"image": ("g.jpg", photo)},
            data={"method": "mask"},
            headers={"Origin": "https://photos.example"},
        )
        assert answer.status_code == 200 and answer.headers["x-facecloak-unprotected-faces"] == "0"
        assert answer.headers["access-control-allow-origin"] == "https://photos.example"
        exposed = {
            name.strip().lower() for name in answer.headers["access-control-expose-headers"].split(",")
        }
        for header in (
            "X-Facecloak-Faces",
            "X-Facecloak-Unprotected-Faces",
            "Content-Disposition",
            "Retry-After",
        ):
            assert header.lower() in exposed, header


def test_a_new_detection_setting_costs_no_new_model(samples_dir):
    """Every ``threshold``/``min_face`` a client sends shares the worker's one MTCNN: a detector
    built and kept per setting loaded its nets again (2 MB), so the server grew with each new value."""
    from facecloak.defaults import MIN_FACE_PX, MIN_FACE_SCORE
    from facecloak.io import read_image_bytes
    from facecloak.service.batcher import Engine
    from facecloak.service.settings import ServiceSettings

    engine = Engine(ServiceSettings(device="cpu", preload=False), "cpu")
    default = engine.detector(MIN_FACE_SCORE, MIN_FACE_PX)
    settings = [(0.5 + k / 1000, 20 + k) for k in range(8)]
    detectors = [engine.detector(score, size) for score, size in settings]
    assert all(detector.nets is default.nets for detector in detectors)
    assert [(d.min_score, d.min_size) for d in detectors] == settings
    assert (default.min_score, default.min_size) == (MIN_FACE_SCORE, MIN_FACE_PX)
    photo = read_image_bytes((samples_dir / "grace_hopper.jpg").read_bytes()).pixels
    assert len(engine.detector(0.5, 20)([photo])) == 1 and len(engine.detector(0.5, 2000)([photo])) == 0


def test_cloaks_built_for_clients_settings_are_bounded(dlib_resnet):
    """Seeds and identity keys come from clients: the worker keeps the last few cloaks it built,
    not one per value ever sent (that grew without bound and kept every secret key)."""
    from facecloak.service.batcher import MAX_CACHED_CLOAKS, Engine
    from facecloak.service.settings import ServiceSettings

    engine = Engine(ServiceSettings(device="cpu", preload=False), "cpu")
    engine._embedders = [dlib_resnet]

    def cloak(seed: int):
        params = {"mode": "targeted", "level": "mid", "identity_key": f"secret-{seed}", "seed": seed}
        return engine.protection("cloak", params)

    first = cloak(0)
    assert cloak(0) is first  # reused while recent
    for seed in range(1, 3 * MAX_CACHED_CLOAKS):
        cloak(seed)
        assert cloak(0) is first  # used again: kept
    assert len(engine._cloaks) == MAX_CACHED_CLOAKS
    assert "secret-1" not in {dict(key).get("identity_key") for key in engine._cloaks}


def test_micro_batching_and_full_queue():
    """Concurrent jobs share one model call; past the queue bound, submit refuses (the 503)."""
    import torch

    from facecloak.io import LoadedImage
    from facecloak.service.batcher import Job, JobResult, MicroBatcher, QueueFull
    from facecloak.service.settings import ServiceSettings

    calls: list[int] = []
    gate = threading.Event()

    class SlowEngine:
        def run(self, jobs):
            gate.wait(10)
            calls.append(len(jobs))
            return [JobResult(None, [], len(jobs), 0.0) for _ in jobs]

    settings = ServiceSettings(max_batch=8, batch_wait_ms=200, queue_size=6)
    batcher = MicroBatcher(settings, engine_factory=lambda device: SlowEngine())
    batcher.start()
    try:
        # Same name, other pixels: jobs must not be compared by their fields (that compared tensors).
        images = [LoadedImage(Path("photo.jpg"), torch.rand(3, 8, 8)) for _ in range(7)]
        futures = [batcher.submit(Job("detect", {}, (0.9, 20), image)) for image in images[:6]]
        with pytest.raises(QueueFull) as full:
            batcher.submit(Job("detect", {}, (0.9, 20), images[6]))
        assert full.value.retry_after_s >= 1
        gate.set()
        results = [future.result(timeout=10) for future in futures]
        assert calls == [6] and all(result.batch_images == 6 for result in results)
        assert batcher.depth == 0 and batcher.alive == 1
    finally:
        gate.set()
        batcher.stop()


def test_timeout_504_and_full_queue_503_over_http(monkeypatch, samples_dir):
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app
    from facecloak.service.batcher import Engine

    real_run = Engine.run

    def slow_run(self, jobs):
        time.sleep(1.5)
        return real_run(self, jobs)

    monkeypatch.setattr(Engine, "run", slow_run)
    settings = ServiceSettings(device="cpu", preload=False, queue_size=1, max_batch=1, request_timeout_s=0.5)
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    with TestClient(create_app(settings)) as client:

        def post(_):
            return client.post("/v1/detect", files={"image": ("g.jpg", photo)})

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(post, range(4)))
        statuses = sorted(answer.status_code for answer in answers)
        assert 503 in statuses and 504 in statuses and set(statuses) <= {503, 504}
        busy = next(answer for answer in answers if answer.status_code == 503)
        assert int(busy.headers["retry-after"]) >= 1 and busy.json()["error"] == "queue_full"
        late = next(answer for answer in answers if answer.status_code == 504)
        assert "limit of 0.5 s" in late.json()["reason"]
        deadline = time.monotonic() + 60  # the job that timed out still runs to its end, then is released
        while client.get("/healthz").json()["queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get("/healthz").json()["queue_depth"] == 0
        assert 'facecloak_rejected_total{reason="queue_full"}' in client.get("/metrics").text


@pytest.fixture(scope="module")
def donor_bank(lfw_dir, detector, tmp_path_factory) -> Path:
    """24 LFW people with one or two photos (first by name), embedded by dlib-resnet."""
    from facecloak.donors import add_donors
    from facecloak.models import create_embedder

    people = [p for p in sorted((lfw_dir / "images").iterdir()) if len(list(p.glob("*.jpg"))) <= 2]
    photos = [sorted(person.glob("*.jpg"))[0] for person in people[:24]]
    folder = tmp_path_factory.mktemp("bank") / "lfw-donors"
    model = create_embedder("dlib-resnet", device="cpu")
    add_donors(photos, [model], bank=str(folder), licence="LFW, research use", detector=detector)
    return folder


def test_replace_over_http_with_a_donor_bank(donor_bank, lfw_dir):
    """`facecloak serve --donors BANK` offers method=replace: the face becomes a verified donor mix,
    reported per face like the CLI's; only the face region changes. Without a bank the method is
    refused with the fix in one line, and the web page does not offer it."""
    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app

    photo_path = sorted((lfw_dir / "images" / "Colin_Powell").glob("*.jpg"))[3]
    photo = photo_path.read_bytes()
    settings = ServiceSettings(device="cpu", models=("dlib-resnet",), donors=str(donor_bank))
    with TestClient(create_app(settings)) as client:
        assert "replace" in client.get("/v1/info").json()["methods"]
        answer = client.post(
            "/v1/anonymize",
            files={"image": (photo_path.name, photo)},
            data={"method": "replace", "response": "json", "format": "png"},
        )
        assert answer.status_code == 200, answer.text
        report = answer.json()
        subject = min(
            report["faces"],
            key=lambda f: (
                abs((f["box"][0] + f["box"][2]) / 2 - 125) + abs((f["box"][1] + f["box"][3]) / 2 - 125)
            ),
        )
        assert subject["method"] == "replace" and subject["protected"], subject
        assert subject["reason"].startswith("replaced by a mix of 3 donors; after JPEG 75: dlib-resnet")
        assert len(subject["donors"]) == 3 and subject["redetected"]
        output = decode(base64.b64decode(report["image_base64"]))
        inside, outside = changed_only_in_faces(
            decode(photo), output, [f["box"] for f in report["faces"]], scale=1.6
        )
        assert inside > 1000 and outside == 0, (inside, outside)
        refused = client.post(
            "/v1/anonymize",
            files={"image": (photo_path.name, photo)},
            data={"method": "replace", "blocks": "8"},
        )
        assert refused.status_code == 422 and "takes no" in refused.json()["reason"]
        for name, value in (("shape", "box"), ("mask_scale", "2")):  # were silently ignored
            refused = client.post(
                "/v1/anonymize",
                files={"image": (photo_path.name, photo)},
                data={"method": "replace", name: value},
            )
            assert refused.status_code == 422 and name in refused.json()["reason"], name
        kept = client.post(
            "/v1/anonymize",
            files={"image": (photo_path.name, photo)},
            data={"method": "replace", "keep_mouth": "true", "response": "json", "format": "png"},
        ).json()
        face = min(kept["faces"], key=lambda f: abs(f["box"][0] - subject["box"][0]))
        assert face["method"] == "replace" and face["protected"], face
        corners = [face["landmarks"]["mouth_left"], face["landmarks"]["mouth_right"]]
        x, y = (int(v) for v in torch.tensor(corners).mean(0))
        lips = decode(base64.b64decode(kept["image_base64"]))[y, x]
        assert (lips == decode(photo)[y, x]).all()  # the person's own lips
        assert (output[y, x] != decode(photo)[y, x]).any()  # replaced without keep_mouth
        mouth_on_blur = client.post(
            "/v1/anonymize", files={"image": (photo_path.name, photo)}, data={"keep_mouth": "true"}
        )
        assert mouth_on_blur.status_code == 422 and "method=replace" in mouth_on_blur.json()["reason"]
    bare = create_app(ServiceSettings(device="cpu", preload=False))
    with TestClient(bare) as client:
        assert "replace" not in client.get("/v1/info").json()["methods"]
        refused = client.post(
            "/v1/anonymize", files={"image": (photo_path.name, photo)}, data={"method": "replace"}
        )
        assert refused.status_code == 422
        assert "facecloak serve --donors BANK" in refused.json()["reason"]


def test_serve_with_a_missing_bank_is_a_one_line_usage_error(tmp_path):
    from click.testing import CliRunner

    from facecloak.cli import main

    result = CliRunner().invoke(main, ["serve", "--donors", str(tmp_path / "no-bank")])
    assert result.exit_code == 2
    assert "no donor bank 'no-bank'" in result.output and "facecloak donors add" in result.output


def test_serve_refuses_in_one_line_a_bank_replace_refuses(donor_bank, tmp_path):
    """A bank of a changed card, or with fewer donors than a face mixes, passed `serve`'s checks,
    and the start-up stopped with a traceback (exit 3) where `anonymize` says one line (exit 2)."""
    import json
    import shutil

    from click.testing import CliRunner

    from facecloak.cli import main
    from facecloak.donor_bank import load_bank
    from facecloak.donors import remove_donors

    changed = tmp_path / "changed"
    shutil.copytree(donor_bank, changed)
    manifest = json.loads((changed / "bank.json").read_text())
    manifest["models"]["dlib-resnet"]["fingerprint"] = "another card"
    (changed / "bank.json").write_text(json.dumps(manifest))
    few = tmp_path / "few"
    shutil.copytree(donor_bank, few)
    remove_donors(few, load_bank(few).ids[2:])
    for bank, said in ((changed, "donors refresh"), (few, "holds 2 usable donor(s), fewer than the 3 a new")):
        result = CliRunner().invoke(main, ["serve", "--donors", str(bank), "--port", "0", "--device", "cpu"])
        assert result.exit_code == 2 and said in result.output, result.output
        assert "Traceback" not in result.output and "--donors-per-face" not in result.output


def test_serve_with_an_unknown_model_is_a_one_line_usage_error():
    """``--models nosuch`` started the server, whose workers failed to load it: a 40-line traceback
    from the start-up (exit 3) where every other command says one line (exit 2)."""
    from click.testing import CliRunner

    from facecloak.cli import main

    result = CliRunner().invoke(main, ["serve", "--models", "nosuch", "--port", "0", "--device", "cpu"])
    assert result.exit_code == 2 and "unknown face model 'nosuch'" in result.output, result.output
    assert "Traceback" not in result.output


def test_a_proxy_may_strip_its_path_prefix_or_keep_it(monkeypatch):
    """``--root-path /fc`` went to uvicorn, which puts it in front of every path: a proxy that kept
    the prefix sent ``/fc/v1/info``, the app saw ``/fc/fc/v1/info``, and every request got 404.
    Now the prefix is the app's (`PathPrefix`): a real server answers both ways, and the API
    description names the prefix as its server (for /docs' "Try it out")."""
    import uvicorn
    from click.testing import CliRunner

    from facecloak.cli import main
    from facecloak.service import ServiceSettings, create_app
    from facecloak.service.proxy import PathPrefix

    given = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: given.update(options, app=app))
    result = CliRunner().invoke(main, ["serve", "--root-path", "/fc", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "root_path" not in given and isinstance(given["app"], PathPrefix) and given["app"].prefix == "/fc"
    result = CliRunner().invoke(main, ["serve", "--root-path", "fc/", "--device", "cpu"])
    assert result.exit_code == 2 and "--root-path 'fc/'" in result.output
    with serving_in_thread(
        PathPrefix(create_app(ServiceSettings(device="cpu", preload=False)), "/fc")
    ) as url:
        for path in ("/fc/v1/info", "/v1/info", "/fc/", "/", "/fc/static/app.js"):  # kept, stripped
            assert httpx.get(url + path, timeout=30).status_code == 200, path
        assert httpx.get(f"{url}/fc/openapi.json", timeout=30).json()["servers"] == [{"url": "/fc"}]
        assert httpx.get(f"{url}/fcx/v1/info", timeout=30).status_code == 404  # not under /fc


def test_a_loopback_service_answers_to_loopback_names_only(monkeypatch):
    """A service on 127.0.0.1 answered any ``Host``: a site that pointed its own name at 127.0.0.1
    (DNS rebinding) could have its page read every answer and /metrics. ``--allowed-host`` adds a
    name (a proxy's), ``*`` any; on a public address every name is served, as before."""
    import uvicorn
    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from facecloak.cli import main
    from facecloak.service import ServiceSettings, create_app

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: apps.append(app))

    def allowed(*args: str):
        result = CliRunner().invoke(main, ["serve", "--device", "cpu", *args])
        assert result.exit_code == 0, result.output
        return apps[-1].state.settings.allowed_hosts

    assert set(allowed()) == {"127.0.0.1", "localhost", "::1"}
    assert "facecloak.example.org" in allowed("--allowed-host", "facecloak.example.org")
    assert allowed("--allowed-host", "*") is None
    assert allowed("--host", "0.0.0.0", "--api-keys", __file__) is None
    settings = ServiceSettings(device="cpu", preload=False, allowed_hosts=allowed())
    with TestClient(create_app(settings)) as client:
        refused = client.get("/v1/info", headers={"Host": "rebound.example:8000"})
        assert refused.status_code == 400 and refused.json()["error"] == "host_not_allowed"
        assert "--allowed-host rebound.example" in refused.json()["reason"]
        for host in ("127.0.0.1:8000", "localhost", "LOCALHOST.", "[::1]:8000"):
            assert client.get("/v1/info", headers={"Host": host}).status_code == 200, host
        metrics = client.get("/metrics", headers={"Host": "localhost"}).text
        assert 'facecloak_rejected_total{reason="host_not_allowed"} 1.0' in metrics


def test_another_sites_page_cannot_post_photos_to_the_service(samples_dir):
    """CORS off did not stop another site's page from POSTing a form to a service on the user's
    machine (a browser sends it without asking, and the service computed it). A browser marks such
    a request ``Sec-Fetch-Site: cross-site``: refused unless its origin is a ``--cors-origin``;
    the service's own page and clients that are not browsers go on as before."""
    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app

    photo = {"image": ("g.jpg", (samples_dir / "grace_hopper.jpg").read_bytes())}
    data = {"rotations": "none"}
    evil = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    settings = ServiceSettings(device="cpu", preload=False, cors_origins=("https://app.example",))
    with TestClient(create_app(settings)) as client:
        refused = client.post("/v1/detect", files=photo, data=data, headers=evil)
        assert refused.status_code == 403 and refused.json()["error"] == "cross_site_request"
        assert client.get("/v1/info", headers=evil).status_code == 200  # reading needs CORS anyway
        own_page = {"Origin": "http://testserver", "Sec-Fetch-Site": "same-origin"}
        allowed = {"Origin": "https://app.example", "Sec-Fetch-Site": "cross-site"}
        for headers in (own_page, allowed, {}):
            answer = client.post("/v1/detect", files=photo, data=data, headers=headers)
            assert answer.status_code == 200 and answer.json()["faces_found"] == 1, headers


def test_a_client_that_hangs_up_mid_upload_is_counted_as_gone_not_as_a_bad_request():
    """A client that closed its connection halfway through its upload was counted as a 400
    ``bad_request`` (FastAPI's words for a body it could not parse), not ``client_disconnected``."""
    from facecloak.service import ServiceSettings, create_app

    with serving_in_thread(create_app(ServiceSettings(device="cpu", preload=False))) as url:
        parts = urlparse(url)
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as connection:
            head = (
                f"POST /v1/anonymize HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: 100000\r\n"
                "Content-Type: multipart/form-data; boundary=XyZ\r\n\r\n"
            )
            part = '--XyZ\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
            connection.sendall(head.encode() + part.encode() + b"\xff\xd8")
            time.sleep(0.5)  # the app is reading the form when the client goes
        counted, deadline = "", time.monotonic() + 10
        while 'reason="client_disconnected"} 1.0' not in counted and time.monotonic() < deadline:
            time.sleep(0.1)
            counted = httpx.get(f"{url}/metrics", timeout=5).text
        assert 'facecloak_rejected_total{reason="client_disconnected"} 1.0' in counted
        assert 'reason="bad_request"' not in counted


def test_pixel_limit_above_the_default_admits_uploads_under_it(tmp_path):
    """A service set to 300 MP refused a 250 MP upload: the header probe kept PIL's guard at twice
    the default 120 MP (240 MP) instead of raising it to the service's own limit."""
    from facecloak.service.limits import UploadRejected, check_upload

    png_header_only(tmp_path / "big.png", 20_000, 12_500)  # 250,000,000 pixels
    data = (tmp_path / "big.png").read_bytes()
    assert check_upload(data, max_pixels=300_000_000) == ("PNG", 20_000, 12_500)
    with pytest.raises(UploadRejected) as refused:
        check_upload(data, max_pixels=200_000_000)
    assert refused.value.status == 413 and "200,000,000" in refused.value.reason


@pytest.fixture(scope="module")
def in_process():
    """The app in this process (no models but the detector): for checks that need no real server."""
    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app

    with TestClient(create_app(ServiceSettings(device="cpu", preload=False))) as client:
        yield client


def test_a_face_drawn_by_the_alpha_is_found_when_the_output_has_none(in_process, samples_dir):
    """A transparent PNG asked back as JPEG is flattened onto white before faces are looked for, as
    the CLI does: its face, black under an alpha that draws it, was not found and came back bare."""
    grey = np.asarray(Image.open(samples_dir / "grace_hopper.jpg").convert("L"))
    rgba = np.zeros((*grey.shape, 4), dtype=np.uint8)
    rgba[..., 3] = 255 - grey  # on white, a viewer sees the grey face
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, "PNG")
    answer = in_process.post(
        "/v1/anonymize",
        files={"image": ("logo.png", buffer.getvalue())},
        data={"format": "jpeg", "rotations": "none", "response": "json"},
    )
    report = answer.json()
    assert answer.status_code == 200 and report["faces_found"] == 1, report.get("reason")
    assert report["status"] == "protected"
    assert report["notes"] == ["transparency composited onto white: JPEG has none"]


def test_the_frames_an_output_lacks_are_reported(in_process, samples_dir):
    """A 2-frame GIF comes back as its first frame only: the CLI says so, the service said nothing."""
    first = Image.open(samples_dir / "grace_hopper.jpg").convert("RGB")
    buffer = io.BytesIO()
    first.save(buffer, "GIF", save_all=True, append_images=[Image.new("RGB", first.size, "red")])
    upload = {"image": ("moving.gif", buffer.getvalue())}
    data = {"method": "mask", "rotations": "none"}
    report = in_process.post("/v1/anonymize", files=upload, data={**data, "response": "json"}).json()
    assert any("only the first of 2 frames" in note for note in report["notes"]), report
    answer = in_process.post("/v1/anonymize", files=upload, data=data)
    assert "only the first of 2 frames" in answer.headers["x-facecloak-notes"]
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    plain = in_process.post("/v1/anonymize", files={"image": ("g.jpg", photo)}, data=data)
    assert plain.status_code == 200 and "x-facecloak-notes" not in plain.headers


@pytest.mark.parametrize(("asked", "content_type"), [("jpg", "image/jpeg"), ("tif", "image/tiff")])
def test_format_takes_the_suffix_names_the_cli_takes(in_process, samples_dir, asked, content_type):
    """``format=jpg`` was refused (422) while ``--format jpg`` works in the CLI."""
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    answer = in_process.post(
        "/v1/anonymize",
        files={"image": ("g.png", photo)},
        data={"method": "mask", "format": asked, "rotations": "none"},
    )
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == content_type
    assert answer.headers["content-disposition"].endswith(f'_anonymized.{asked}"')


def test_an_empty_x_api_key_header_does_not_hide_the_bearer_key():
    """A client sending an empty ``X-API-Key`` (an unset variable) beside a right bearer key was
    told its key was missing (401)."""
    from fastapi.testclient import TestClient
    from starlette.responses import PlainTextResponse

    from facecloak.service.security import ApiKeyAuth

    async def ok(scope, receive, send) -> None:
        await PlainTextResponse("ok")(scope, receive, send)

    client = TestClient(ApiKeyAuth(ok, keys=frozenset({"secret-one"})))  # no lifespan: an app of one answer
    both = client.get("/v1/detect", headers={"X-API-Key": "", "Authorization": "Bearer secret-one"})
    assert both.status_code == 200, both.text
    assert client.get("/v1/detect", headers={"X-API-Key": ""}).status_code == 401
    assert client.get("/v1/detect", headers={"X-API-Key": "nope"}).status_code == 403


def test_a_service_behind_a_path_prefix_still_needs_the_key(tmp_path, samples_dir):
    """Served under a prefix (``uvicorn --root-path /fc`` behind a proxy, or mounted in another
    app), the path the middleware saw was ``/fc/v1/detect``: it did not start with ``/v1/``, so every
    endpoint and /metrics answered with no API key, and photos lost their ``no-store``."""
    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app

    keys = tmp_path / "keys.txt"
    keys.write_text("secret\n")
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    settings = ServiceSettings(device="cpu", preload=False, api_keys_file=keys)
    with TestClient(create_app(settings), root_path="/fc") as client:
        upload = {"files": {"image": ("g.jpg", photo)}, "data": {"rotations": "none"}}
        assert client.post("/fc/v1/detect", **upload).status_code == 401
        assert client.get("/fc/metrics").status_code == 401
        assert client.get("/fc/v1/info").status_code == 200  # open, as without a prefix
        answer = client.post("/fc/v1/detect", headers={"Authorization": "Bearer secret"}, **upload)
        assert answer.status_code == 200 and answer.json()["faces_found"] == 1
        assert answer.headers["cache-control"] == "no-store"
        text = client.get("/fc/metrics", headers={"Authorization": "Bearer secret"}).text
        assert 'facecloak_requests_total{endpoint="/v1/detect",status="401"} 1.0' in text


def page_urls(page: str) -> list[str]:
    """The URLs a page names in ``href`` and ``src`` attributes."""
    from html.parser import HTMLParser

    found: list[str] = []

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs) -> None:
            for name, value in attrs:
                if name in ("href", "src") and value is not None:
                    found.append(value)

    Links().feed(page)
    return found


def test_the_page_and_the_docs_call_the_service_under_its_path_prefix(samples_dir):
    """Behind a proxy prefix or mounted in another app, the API answered at ``/fc/v1/...`` but the
    page loaded ``/static/app.js`` and sent its photos to ``/v1/cloak``, and the docs read
    ``/openapi.json``: paths outside the prefix, which the proxy does not pass to this service."""
    import re
    from urllib.parse import urljoin

    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app

    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    with TestClient(create_app(ServiceSettings(device="cpu", preload=False)), root_path="/fc") as client:
        answer = client.get("/fc/")
        assert answer.status_code == 200
        bare = client.get("/fc", follow_redirects=False)  # the relative URLs need the page's slash
        assert bare.status_code in (307, 308) and bare.headers["location"].endswith("/fc/")
        base = str(answer.url)
        assets = [urljoin(base, url) for url in page_urls(answer.text)]
        assert any(url.endswith("/app.js") for url in assets), assets
        for url in assets:
            assert urlparse(url).path.startswith("/fc/"), url
            assert client.get(url).status_code == 200, url
        script = client.get(next(url for url in assets if url.endswith("/app.js"))).text
        called = set(re.findall(r"""["'`](/?v1/[a-z]+)["'`]""", script))
        assert {"v1/info", "v1/cloak", "v1/anonymize"} <= {url.lstrip("/") for url in called}
        for url in called:
            assert urlparse(urljoin(base, url)).path == "/fc/" + url.lstrip("/"), url
        blurred = client.post(
            urljoin(base, "v1/anonymize"),
            files={"image": ("g.jpg", photo)},
            data={"rotations": "none", "response": "json"},
        )
        assert blurred.status_code == 200 and blurred.json()["status"] == "protected"

        docs = client.get("/fc/docs").text
        named = page_urls(docs) + re.findall(r"url: '([^']+)'", docs)
        assert any(url.endswith("openapi.json") for url in named), named
        for url in named:
            assert urlparse(urljoin("http://testserver/fc/docs", url)).path.startswith("/fc/"), url
            assert client.get(urljoin("http://testserver/fc/docs", url)).status_code == 200, url
    with TestClient(create_app(ServiceSettings(device="cpu", preload=False))) as client:
        # behind a proxy that strips its prefix the service knows of none: only relative URLs work
        for page in (client.get("/").text, client.get("/docs").text):
            named = page_urls(page) + re.findall(r"url: '([^']+)'", page)
            assert named and not [url for url in named if url.startswith("/") or "//" in url], named
            assert all(client.get(url).status_code == 200 for url in named), named


@pytest.mark.parametrize(
    ("endpoint", "query"),
    [
        ("/v1/cloak", {"level": "high"}),
        ("/v1/anonymize", {"method": "mask"}),
        ("/v1/detect", {"threshold": "0.5"}),
    ],
)
def test_an_option_sent_in_the_url_is_refused_not_ignored(in_process, samples_dir, endpoint, query):
    """``curl -F image=@p.jpg '.../v1/anonymize?method=mask'``: no endpoint reads the query string,
    so the photo came back blurred (a cloak at mid, not high) with a 200, the option dropped."""
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    answer = in_process.post(endpoint, params=query, files={"image": ("g.jpg", photo)})
    assert answer.status_code == 422, answer.headers
    body = answer.json()
    assert body["error"] == "unknown_field" and f"not in the URL: {next(iter(query))}" in body["reason"]


def test_the_json_report_does_not_echo_the_identity_key(in_process, samples_dir):
    """A targeted cloak's ``identity_key`` is a per-person secret (the CLI's report and journal never
    hold it in clear); the service's JSON report gave it back under ``settings``."""
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    data = {"mode": "targeted", "identity_key": "alice-secret-2026", "steps": "0", "rotations": "none"}
    answer = in_process.post(
        "/v1/cloak", files={"image": ("g.jpg", photo)}, data={**data, "response": "json"}
    )
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["settings"]["mode"] == "targeted" and "alice-secret-2026" not in answer.text


def test_response_image_wins_over_an_accept_header_naming_json(in_process, samples_dir):
    """axios sends ``Accept: application/json, text/plain, */*`` with every request: its clients
    got the JSON report where they asked for the photo with ``response=image``."""
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    accept = {"Accept": "application/json, text/plain, */*"}
    upload = {"files": {"image": ("g.jpg", photo)}, "headers": accept}
    data = {"method": "mask", "rotations": "none"}
    asked = in_process.post("/v1/anonymize", data={**data, "response": "image"}, **upload)
    assert asked.status_code == 200 and asked.headers["content-type"] == "image/jpeg"
    assert asked.headers["x-facecloak-status"] == "protected"
    unsaid = in_process.post("/v1/anonymize", data=data, **upload)  # no response field: the header decides
    assert unsaid.headers["content-type"] == "application/json" and unsaid.json()["faces_found"] == 1


def test_a_request_that_timed_out_frees_its_place_in_the_queue():
    """A job cancelled while waiting (its request got 504) no longer counts as queued: it held its
    place until a worker reached it, and new uploads got 503 for work nobody waited for."""
    from facecloak.io import LoadedImage
    from facecloak.service.batcher import Job, JobResult, MicroBatcher
    from facecloak.service.settings import ServiceSettings

    started, gate = threading.Event(), threading.Event()

    class BlockingEngine:
        def run(self, jobs):
            started.set()
            gate.wait(10)
            return [JobResult(None, [], len(jobs), 0.0) for _ in jobs]

    settings = ServiceSettings(max_batch=1, batch_wait_ms=0, queue_size=2, max_queued_pixels=2 * 64)
    batcher = MicroBatcher(settings, engine_factory=lambda device: BlockingEngine())
    batcher.start()

    def job() -> Job:
        return Job("detect", {}, (0.9, 20, "none"), LoadedImage(Path("p.png"), torch.rand(3, 8, 8)))

    try:
        running = batcher.submit(job())
        assert started.wait(10)
        waiting = batcher.submit(job())
        assert waiting.cancel()  # what the request's timeout does to it
        assert batcher.depth == 1
        later = batcher.submit(job())  # no QueueFull: one place (and 64 pixels) is free again
        gate.set()
        assert running.result(10).batch_images == 1 and later.result(10).batch_images == 1
        deadline = time.monotonic() + 10
        while batcher.depth and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.depth == 0 and batcher._pending_pixels == 0  # released once, not twice
    finally:
        gate.set()
        batcher.stop()


def test_one_photo_that_breaks_the_model_fails_only_its_own_request():
    """Photos of several clients share one model call: one that made the call raise failed every
    request of the micro-batch; each is now run alone, and only the bad one fails."""
    from facecloak.io import LoadedImage
    from facecloak.service.batcher import Job, JobResult, MicroBatcher
    from facecloak.service.settings import ServiceSettings

    calls: list[int] = []

    class FragileEngine:
        def run(self, jobs):
            calls.append(len(jobs))
            if any(job.image.path.name == "bad.png" for job in jobs):
                raise RuntimeError("the model choked on bad.png")
            return [JobResult(None, [], len(jobs), 0.0) for _ in jobs]

    settings = ServiceSettings(max_batch=8, batch_wait_ms=300)
    batcher = MicroBatcher(settings, engine_factory=lambda device: FragileEngine())
    batcher.start()
    try:
        names = ["a.png", "bad.png", "c.png"]
        jobs = [
            Job("detect", {}, (0.9, 20, "none"), LoadedImage(Path(n), torch.rand(3, 8, 8))) for n in names
        ]
        futures = [batcher.submit(job) for job in jobs]
        assert futures[0].result(10).faces == [] and futures[2].result(10).faces == []
        with pytest.raises(RuntimeError, match="bad.png"):
            futures[1].result(10)
        assert calls == [3, 1, 1, 1] and batcher.depth == 0 and batcher.alive == 1
    finally:
        batcher.stop()


def test_a_model_failure_is_a_json_refusal_with_the_privacy_headers(samples_dir):
    """A photo the model failed on (out of memory on a large photo, say) came back as a plain-text
    "Internal Server Error" with none of the privacy headers (``no-store`` included), past the
    service's JSON error body; the page could only say "unexpected answer (HTTP 500)"."""
    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app

    class FailingEngine:
        def run(self, jobs):
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    app = create_app(ServiceSettings(device="cpu", preload=False))
    app.state.batcher._engine_factory = lambda device: FailingEngine()
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.post("/v1/anonymize", files={"image": ("g.jpg", photo)}, data={"rotations": "none"})
        assert answer.status_code == 500 and answer.headers["content-type"] == "application/json"
        body = answer.json()
        assert body["error"] == "internal_error" and body["status"] == 500, body
        assert "\n" not in body["reason"] and "Traceback" not in body["reason"]
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert client.get("/healthz").status_code == 200  # the service goes on


def test_a_service_with_no_model_worker_says_so_at_once(samples_dir):
    """Mounted in another app whose lifespan does not run the service's (Starlette's ``Mount``
    does not), no model worker was started: every photo waited in the queue for the full request
    timeout (5 minutes) and got "not finished within this service's limit"."""
    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app

    app = create_app(ServiceSettings(device="cpu", preload=False, request_timeout_s=30))
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()
    client = TestClient(app)  # not entered: no lifespan, as under a Mount
    started = time.monotonic()
    answer = client.post("/v1/anonymize", files={"image": ("g.jpg", photo)}, data={"rotations": "none"})
    assert time.monotonic() - started < 10
    assert answer.status_code == 503 and answer.json()["error"] == "no_model_worker", answer.text
    assert "lifespan" in answer.json()["reason"]


def test_another_clients_photo_of_the_same_person_does_not_change_a_cloak(dlib_resnet, lfw_dir):
    """A person-level cloak groups the call's faces into people; a micro-batch holds other clients'
    uploads, so a stranger's photo of the same person became part of this client's reference
    (``reference_photos`` 2, distances measured from a mean holding the other client's face)."""
    from facecloak.io import read_image_bytes
    from facecloak.service.batcher import Engine, Job
    from facecloak.service.settings import ServiceSettings

    engine = Engine(ServiceSettings(device="cpu", preload=False), "cpu")
    engine._embedders = [dlib_resnet]
    photos = sorted((lfw_dir / "images" / "Abdullah_Gul").glob("*.jpg"))[:2]
    params = {"mode": "untargeted", "level": "low", "steps": 0, "seed": 0}

    def job(photo: Path) -> Job:
        return Job("cloak", dict(params), (0.9, 20, "none"), read_image_bytes(photo.read_bytes(), photo.name))

    alone = engine.run([job(photos[1])])[0].faces
    shared = engine.run([job(photos[0]), job(photos[1])])
    assert [len(result.faces) for result in shared] == [1, 1] and len(alone) == 1
    assert [result.faces[0]["reference_photos"] for result in shared] == [1, 1]
    mine = shared[1].faces[0]["models"]["dlib-resnet"]
    assert mine["distance"] == pytest.approx(alone[0]["models"]["dlib-resnet"]["distance"], abs=1e-3)


def test_a_client_that_disconnects_while_its_photo_waits_frees_its_place(samples_dir):
    """A client that gave up (closed its connection) kept its photo in the queue until a worker
    reached it and computed it for nobody: new uploads got 503 for work no one waited for."""
    from facecloak.service import ServiceSettings, create_app
    from facecloak.service.batcher import JobResult

    gate = threading.Event()

    class BlockingEngine:
        def run(self, jobs):
            gate.wait(30)
            return [JobResult(None, [], len(jobs), 0.0) for _ in jobs]

    settings = ServiceSettings(device="cpu", preload=False, queue_size=2, max_batch=1, batch_wait_ms=0)
    app = create_app(settings)
    app.state.batcher._engine_factory = lambda device: BlockingEngine()
    photo = (samples_dir / "grace_hopper.jpg").read_bytes()

    def give_up(url) -> None:  # waits a second for its answer, then closes the connection
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/detect", files={"image": ("g.jpg", photo)}, timeout=httpx.Timeout(1.0))

    with serving_in_thread(app) as url, contextlib.ExitStack() as release:
        release.callback(gate.set)  # before the server stops: its worker waits on the gate
        clients = [threading.Thread(target=give_up, args=(url,)) for _ in range(2)]
        for client in clients:  # one photo runs (blocked), the other waits in the queue
            client.start()
            time.sleep(0.3)
        for client in clients:
            client.join(30)
        depth = None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            depth = httpx.get(f"{url}/healthz", timeout=5).json()["queue_depth"]
            if depth == 1:
                break
            time.sleep(0.1)
        assert depth == 1  # the running photo finishes; the waiting one is gone with its client
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        assert 'facecloak_rejected_total{reason="client_disconnected"} 2.0' in metrics


def test_the_service_hands_the_allocator_s_free_memory_back_while_it_runs(monkeypatch):
    """Its threads' malloc arenas kept their peaks: 766 -> 1,697 MB over 6,000 blur requests while
    malloc had 160-500 MB in use (README, "Service")."""
    import time

    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, app, create_app

    calls: list[float] = []
    limited: list[int] = []
    monkeypatch.setattr(app, "RELEASE_MEMORY_EVERY_S", 0.05)
    monkeypatch.setattr(app, "release_free_memory", lambda: calls.append(time.monotonic()) or True)
    monkeypatch.setattr(app, "limit_arenas", lambda: limited.append(1) or True)
    monkeypatch.setattr(app, "limit_compiled_kernels", lambda: limited.append(2) or True)
    with TestClient(create_app(ServiceSettings(device="cpu", preload=False))) as client:
        assert limited == [1, 2]  # at start, before its threads allocate and its models run
        assert client.get("/healthz").status_code == 200
        time.sleep(0.6)
    count = len(calls)
    assert count >= 4
    time.sleep(0.2)
    assert len(calls) == count  # stopped with the service


def test_an_answered_photo_is_freed_at_once_not_at_pythons_next_full_collection(samples_dir):
    """Each job made a reference cycle with its future (through the future's done callback), so its
    photo and result waited for Python's rare full collection: 149 MB after 400 LFW blur requests."""
    import gc

    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app
    from facecloak.service.batcher import Job

    def jobs() -> set[int]:
        return {id(held) for held in gc.get_objects() if type(held) is Job}

    sent = {"files": {"image": ("g.jpg", (samples_dir / "grace_hopper.jpg").read_bytes())}}
    gc.collect()
    gc.disable()
    try:
        with TestClient(create_app(ServiceSettings(device="cpu", preload=False))) as client:
            for _ in range(3):
                answer = client.post("/v1/anonymize", data={"method": "blur"}, **sent)
                assert answer.status_code == 200
            alive = jobs()
            assert gc.collect() >= 0
            freed_only_by_the_collector = alive - jobs()
    finally:
        gc.enable()
    assert not freed_only_by_the_collector


def test_garbage_in_a_reference_cycle_lives_at_most_one_release_period(monkeypatch):
    """A photo caught in a cycle waited for Python's rare full collection (a job and its future
    held 149 MB after 400 requests): the service collects every `RELEASE_MEMORY_EVERY_S`."""
    import gc
    import time
    import weakref

    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, app, create_app

    class Held:  # stands for a photo: weakly referenceable, kept only by its cycle
        pass

    monkeypatch.setattr(app, "RELEASE_MEMORY_EVERY_S", 0.05)
    gc.disable()  # only the service's own collection may free it
    try:
        with TestClient(create_app(ServiceSettings(device="cpu", preload=False))) as client:
            assert client.get("/healthz").status_code == 200
            held = Held()
            held.cycle = [held]
            marker = weakref.ref(held)
            del held
            time.sleep(0.5)
            collected = marker() is None
    finally:
        gc.enable()
    assert collected


def test_models_a_first_request_loads_are_frozen_out_of_the_periodic_collections(samples_dir):
    """Start-up's objects are frozen so the service's collection every `RELEASE_MEMORY_EVERY_S`
    walks only what requests made. Without preloading, the models a first request loaded were
    not: each collection walked them again (about 200 ms instead of 0.1)."""
    import gc

    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app

    photo = (samples_dir / "astronaut.jpg").read_bytes()
    settings = ServiceSettings(device="cpu", preload=False, models=("dlib-resnet",))
    with TestClient(create_app(settings)) as client:
        before = gc.get_freeze_count()
        assert before > 1000  # the detector, torch and the app: frozen when the detector loaded
        answer = client.post(
            "/v1/cloak", files={"image": ("a.jpg", photo)}, data={"steps": "1", "response": "json"}
        )
        assert answer.status_code == 200, answer.text
        loaded = gc.get_freeze_count() - before
    assert gc.get_freeze_count() == 0  # the service unfreezes what it froze when it stops
    assert loaded > 1000  # the model's modules and parameters, at least


def test_a_client_that_refuses_json_gets_the_photo(in_process, samples_dir):
    """``Accept: image/jpeg, application/json;q=0`` (JSON not acceptable) got JSON: any Accept
    header that named JSON did. JSON comes only where it ranks at least as high as an image."""
    photo = {"image": ("g.jpg", (samples_dir / "grace_hopper.jpg").read_bytes())}
    data = {"method": "blur", "rotations": "none"}
    for accept, kind in (
        ("image/jpeg, application/json;q=0", "image/jpeg"),
        ("image/*;q=1, application/json;q=0.5", "image/jpeg"),
        ("application/json, text/plain, */*", "application/json"),  # axios: asks for JSON
    ):
        answer = in_process.post("/v1/anonymize", files=photo, data=data, headers={"Accept": accept})
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(kind), accept


def test_a_reports_settings_can_be_sent_back_as_they_are(in_process, samples_dir):
    """The report named ``mask_scale`` ``scale`` (the anonymiser's own name), which the API then
    refused as an unknown field: a client could not repeat a request from its report."""
    photo = {"image": ("g.jpg", (samples_dir / "grace_hopper.jpg").read_bytes())}
    data = {"method": "pixelate", "mask_scale": "1.5", "rotations": "none", "response": "json"}
    data |= {"format": "webp", "jpeg_quality": "50", "threshold": "0.95", "min_face": "30"}
    settings = in_process.post("/v1/anonymize", files=photo, data=data).json()["settings"]
    assert settings["mask_scale"] == 1.5 and "scale" not in settings
    # the photo's own fields too: a repeat gave a JPEG and looked for faces otherwise
    assert settings["format"] == "webp" and settings["jpeg_quality"] == 50 and settings["min_face"] == 30
    assert settings["rotations"] == "none" and settings["threshold"] == 0.95
    again = {
        key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in settings.items()
    }
    answer = in_process.post("/v1/anonymize", files=photo, data=again | {"response": "json"})
    assert answer.status_code == 200 and answer.json()["settings"] == settings
    assert answer.json()["content_type"] == "image/webp"


@pytest.mark.parametrize(
    ("endpoint", "data"),
    [
        ("/v1/anonymize", {"method": "mask", "mask_scale": "nan"}),
        ("/v1/anonymize", {"method": "blur", "threshold": "nan"}),
        ("/v1/anonymize", {"method": "blur", "strength": "inf"}),
        ("/v1/cloak", {"max_dssim": "nan", "steps": "0"}),
    ],
)
def test_a_nan_option_is_refused_as_not_a_number(in_process, samples_dir, endpoint, data):
    """``mask_scale=nan`` was refused as "should be less than or equal to 4", a range it did not break."""
    photo = {"image": ("g.jpg", (samples_dir / "grace_hopper.jpg").read_bytes())}
    answer = in_process.post(endpoint, files=photo, data=data)
    assert answer.status_code == 422 and "should be a finite number" in answer.json()["reason"], answer.text


def test_face_records_carry_no_image_index(in_process, samples_dir):
    """Every face of every answer said ``"image_index": 0``: one photo a request (the CLI's JSON
    dropped the field)."""
    photo = {"image": ("g.jpg", (samples_dir / "group.jpg").read_bytes())}
    for endpoint, data in (("/v1/detect", {}), ("/v1/anonymize", {"method": "blur", "response": "json"})):
        faces = in_process.post(endpoint, files=photo, data=data).json()["faces"]
        assert len(faces) == 4 and all("image_index" not in face for face in faces), endpoint


def test_a_keyed_services_api_description_names_the_key(tmp_path):
    """With --api-keys, /docs had no field for the key: every "Try it out" got 401."""
    from fastapi.testclient import TestClient

    from facecloak.service import ServiceSettings, create_app

    keys = tmp_path / "keys.txt"
    keys.write_text("secret\n")
    with TestClient(
        create_app(ServiceSettings(device="cpu", preload=False, api_keys_file=str(keys)))
    ) as client:
        schema = client.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert schema["paths"]["/v1/cloak"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
    assert "security" not in schema["paths"]["/v1/info"]["get"]
    with TestClient(create_app(ServiceSettings(device="cpu", preload=False))) as client:
        assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})


def test_health_and_docs_answer_head_as_the_page_does(in_process):
    """``HEAD /healthz`` (a load balancer's check) and ``HEAD /docs`` answered 405; only ``/`` took HEAD."""
    for path in ("/", "/healthz", "/docs"):
        answer = in_process.head(path)
        assert answer.status_code == 200, (path, answer.status_code)


def test_debug_log_level_keeps_other_libraries_from_logging_an_uploads_metadata(tmp_path):
    """``serve --log-level debug`` set the root logger, so Pillow's TIFF reader logged every EXIF
    tag of each upload: the camera owner's name, the serial number, comments."""
    import subprocess
    import sys

    from PIL import Image

    exif = Image.Exif()
    exif[0x013B] = "OWNER_SECRET"  # Artist
    photo = tmp_path / "meta.jpg"
    Image.new("RGB", (64, 64), (120, 90, 80)).save(photo, exif=exif)
    script = (
        "import logging, sys\n"
        "from facecloak.cli.serve import _configure_logging\n"
        "from facecloak.io import encode_image, read_image_bytes\n"
        "_configure_logging('debug')\n"
        "logging.getLogger('facecloak.service').debug('our own debug line')\n"
        "upload = read_image_bytes(open(sys.argv[1], 'rb').read(), 'meta.jpg')\n"
        "encode_image(upload.pixels, 'JPEG', source=upload)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(photo)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert "our own debug line" in run.stderr
    assert "OWNER_SECRET" not in run.stderr
