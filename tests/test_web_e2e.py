"""End to end in a real browser: headless Chromium drives the web page of a running `facecloak serve`.

Uses Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/run`` installs them); skips with
the reason when they are missing. Saves the screenshot shown in the README.
"""

from __future__ import annotations

import base64
import datetime
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs pip install 'facecloak[serve]'")
webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from service_helpers import REPO, running_service  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT = REPO / "samples" / "outputs" / "web_page.png"

FETCH_AS_BASE64 = """
const [url, done] = [arguments[0], arguments[arguments.length - 1]];
fetch(url).then((r) => r.blob()).then((blob) => {
  const reader = new FileReader();
  reader.onload = () => done(reader.result.split(",")[1]);
  reader.readAsDataURL(blob);
}).catch((error) => done("ERROR " + error));
"""

ZIP_AS_BASE64 = """
const done = arguments[arguments.length - 1];
makeZip(finished).then((blob) => {
  const reader = new FileReader();
  reader.onload = () => done(reader.result.split(",")[1]);
  reader.readAsDataURL(blob);
});
"""


@pytest.fixture(scope="module")
def browser():
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            f"no Chromium here ({CHROMIUM}, {CHROMEDRIVER}): apt-get install chromium chromium-driver "
            "(.ci/run does it where apt is available)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1100,1400",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def test_page_protects_a_photo(browser, tmp_path, samples_dir):
    original_path = samples_dir / "grace_hopper.jpg"
    with running_service(tmp_path) as (url, temporary, _):
        browser.get(url + "/")
        assert browser.find_element(By.CSS_SELECTOR, "label[for=file-input]").text  # labelled controls
        browser.find_element(By.ID, "file-input").send_keys(str(original_path))
        escalate = browser.find_element(By.ID, "escalate")
        assert escalate.is_selected() and escalate.is_enabled()  # a cloak that falls short goes one level up
        browser.find_element(By.CSS_SELECTOR, "input[name=method][value=blur]").click()
        assert not escalate.is_enabled()  # a cloak's option only
        browser.find_element(By.CSS_SELECTOR, "#format option[value=png]").click()  # lossless: exact check
        browser.find_element(By.ID, "protect-button").click()
        WebDriverWait(browser, 300).until(lambda d: d.find_element(By.ID, "status").text.startswith("Done"))

        card = browser.find_element(By.CSS_SELECTOR, "#results .card")
        assert "Protected (1 face)" in card.find_element(By.CSS_SELECTOR, ".badge").text
        face = card.find_element(By.CSS_SELECTOR, ".faces li").text
        assert face.startswith("Face 1: protected.") and "blurred" in face
        after = card.find_element(By.CSS_SELECTOR, ".after img")
        assert (
            browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", after) == 512
        )
        link = card.find_element(By.CSS_SELECTOR, "a.download")
        assert link.get_attribute("download") == "grace_hopper_anonymized.png" and link.is_displayed()

        downloaded = base64.b64decode(
            browser.execute_async_script(FETCH_AS_BASE64, link.get_attribute("href"))
        )
        before, output = pixels(original_path.read_bytes()), pixels(downloaded)
        assert output.shape == before.shape
        # The face region: the box the service reports, scaled by 1.3 (the anonymiser's region).
        box = browser.execute_script(
            "const b = arguments[0].style; return [b.left, b.top, b.width, b.height].map(parseFloat);",
            card.find_element(By.CSS_SELECTOR, ".before .box"),
        )
        height, width = before.shape[:2]
        x1, y1 = box[0] * width / 100, box[1] * height / 100
        x2, y2 = x1 + box[2] * width / 100, y1 + box[3] * height / 100
        cx, cy, hw, hh = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) * 0.65, (y2 - y1) * 0.65
        inside = np.zeros((height, width), dtype=bool)
        inside[max(0, int(cy - hh) - 1) : int(cy + hh) + 2, max(0, int(cx - hw) - 1) : int(cx + hw) + 2] = (
            True
        )
        changed = (before != output).any(axis=2)
        assert changed[inside].mean() > 0.3  # the face is changed...
        assert not changed[~inside].any()  # ...and not one pixel elsewhere (PNG: exact)

        toggle = card.find_element(By.CSS_SELECTOR, "button.toggle")
        toggle.click()
        assert toggle.get_attribute("aria-pressed") == "true"
        toggle.click()

        archive = zipfile.ZipFile(io.BytesIO(base64.b64decode(browser.execute_async_script(ZIP_AS_BASE64))))
        assert archive.testzip() is None and archive.namelist() == ["grace_hopper_anonymized.png"]
        assert archive.read("grace_hopper_anonymized.png") == downloaded

        height = browser.execute_script(
            "return document.documentElement.scrollHeight + window.outerHeight - window.innerHeight"
        )
        browser.set_window_size(1100, height)
        browser.execute_script("window.scrollTo(0, 0)")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SCREENSHOT))
        assert list(temporary.iterdir()) == []
    assert SCREENSHOT.stat().st_size > 10_000


def test_the_page_works_behind_a_path_prefix(browser, tmp_path, samples_dir):
    """Mounted at ``/fc`` in another app (or behind a proxy's prefix), the page loaded with no
    script and no style: it asked for ``/static/app.js`` and would send photos to ``/v1/...``,
    outside the prefix."""
    with running_service(tmp_path, prefix="/fc") as (url, _, _):
        assert url.endswith("/fc")
        browser.get(url)  # no trailing slash: redirected to /fc/
        WebDriverWait(browser, 30).until(lambda d: d.execute_script("return typeof makeZip") == "function")
        style = "return getComputedStyle(document.querySelector('#protect-form')).borderTopStyle"
        assert browser.execute_script(style) == "solid"  # style.css loaded
        browser.find_element(By.ID, "file-input").send_keys(str(samples_dir / "grace_hopper.jpg"))
        browser.find_element(By.CSS_SELECTOR, "input[name=method][value=blur]").click()
        browser.find_element(By.ID, "protect-button").click()
        WebDriverWait(browser, 120).until(lambda d: d.find_element(By.ID, "status").text.startswith("Done"))
        card = browser.find_element(By.CSS_SELECTOR, "#results .card")
        assert "Protected (1 face)" in card.find_element(By.CSS_SELECTOR, ".badge").text


@pytest.fixture(scope="module")
def page_url(tmp_path_factory):
    with running_service(tmp_path_factory.mktemp("page")) as (url, _, _):
        yield url


def test_photos_chosen_during_a_run_wait_for_it(browser, page_url, samples_dir):
    """Choosing photos while a run is going must not start a second run over the first.

    The button came back on as soon as a photo was chosen; a second run cleared the cards and the
    zip's list while the first was still cloaking, and the first's photo then landed in the
    second's zip ("Done: 3 of 2 photos ready, -1 failed.").
    """
    browser.get(page_url + "/")
    browser.find_element(By.ID, "file-input").send_keys(str(samples_dir / "grace_hopper.jpg"))
    browser.execute_script("document.querySelector('#level').value = 'low'")
    browser.find_element(By.ID, "escalate").click()  # one quick cloak, seconds long
    button = browser.find_element(By.ID, "protect-button")
    button.click()
    browser.find_element(By.ID, "file-input").send_keys(str(samples_dir / "astronaut.jpg"))
    assert browser.find_element(By.ID, "chosen").text.startswith("2 photos chosen")
    assert not button.is_enabled()  # the cloak is still running
    browser.execute_script("document.querySelector('#protect-form').requestSubmit()")  # ignored
    WebDriverWait(browser, 120).until(lambda d: d.find_element(By.ID, "status").text.startswith("Done"))
    # a low cloak may fall short: the summary then goes on to say so
    assert browser.find_element(By.ID, "status").text.startswith("Done: 1 of 1 photo ready.")
    assert browser.execute_script("return finished.map((f) => f.filename)") == ["grace_hopper_cloaked.png"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#results .card")) == 1
    assert button.is_enabled()  # the photos chosen meanwhile can go next


def test_a_photo_that_failed_shows_no_protected_photo_pane(browser, page_url, samples_dir, tmp_path):
    """A failed upload's card showed an empty "After" pane labelled "Protected photo" (its alt text
    beside a broken image) under the "Error" badge; a photo the browser cannot show, a broken one."""
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_bytes(b"not a photo at all " * 50)
    browser.get(page_url + "/")
    browser.find_element(By.ID, "file-input").send_keys(
        "\n".join([str(not_a_photo), str(samples_dir / "grace_hopper.jpg")])
    )
    browser.find_element(By.CSS_SELECTOR, "input[name=method][value=blur]").click()
    browser.find_element(By.ID, "protect-button").click()
    WebDriverWait(browser, 120).until(lambda d: d.find_element(By.ID, "status").text.startswith("Done"))
    failed, done = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    assert failed.find_element(By.CSS_SELECTOR, ".badge").text == "Error"
    assert "not an image" in failed.find_element(By.CSS_SELECTOR, ".faces").text
    assert not failed.find_element(By.CSS_SELECTOR, ".after").is_displayed()
    assert not failed.find_element(By.CSS_SELECTOR, ".before").is_displayed()
    assert not failed.find_element(By.CSS_SELECTOR, "button.toggle").is_displayed()
    assert "Protected photo" not in failed.text
    for pane in (".before", ".after"):  # a photo that went through keeps both panes
        assert done.find_element(By.CSS_SELECTOR, pane).is_displayed()


@pytest.fixture(scope="module")
def keyed_page_url(tmp_path_factory):
    """A service that needs the API key ``secret``."""
    workdir = tmp_path_factory.mktemp("keyed")
    keys = workdir / "keys.txt"
    keys.write_text("secret\n")
    with running_service(workdir, "--api-keys", str(keys)) as (url, _, _):
        yield url


def blur_with_key(browser, url: str, photo: Path, key: str) -> str:
    """Blur one photo on the page with this API key typed in; the card's per-face text."""
    browser.get(url + "/")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "key-row").is_displayed())
    browser.find_element(By.ID, "file-input").send_keys(str(photo))
    browser.find_element(By.CSS_SELECTOR, "input[name=method][value=blur]").click()
    browser.find_element(By.ID, "api-key").send_keys(key)
    browser.find_element(By.ID, "protect-button").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("Done"))
    return browser.find_element(By.CSS_SELECTOR, "#results .card .faces").text


def test_a_page_without_its_api_key_says_to_fill_in_the_field(browser, keyed_page_url, samples_dir):
    """With keys on, a page user who left the key empty read the API's own words, "send
    'Authorization: Bearer KEY'": the page has a field for it."""
    reason = blur_with_key(browser, keyed_page_url, samples_dir / "grace_hopper.jpg", "")
    assert "enter it in the API key field above" in reason and "Bearer" not in reason
    reason = blur_with_key(browser, keyed_page_url, samples_dir / "grace_hopper.jpg", "wrong")
    assert "the API key in the field above is not accepted" in reason


def test_an_api_key_a_browser_cannot_send_is_named_as_the_problem(browser, keyed_page_url, samples_dir):
    """A key pasted with a curly quote made fetch() throw before sending, and the card said
    "the service could not be reached" of a service that was up."""
    reason = blur_with_key(browser, keyed_page_url, samples_dir / "grace_hopper.jpg", "secret\u2019")
    assert "API key" in reason and "could not be reached" not in reason
    reason = blur_with_key(browser, keyed_page_url, samples_dir / "grace_hopper.jpg", "secret")
    assert reason.startswith("Face 1: protected.")  # a key it can send, it still sends


def test_a_photo_the_browser_cannot_show_says_so(browser, page_url, samples_dir, tmp_path):
    """A blurred TIFF comes back as TIFF, which Chromium does not show: the card had no "Before"
    and an "After" pane with a broken image labelled "Protected photo", and its face boxes (drawn
    on "Before") were gone; a TIFF cloaked to PNG showed no face box either."""
    tiff = tmp_path / "grace.tiff"
    Image.open(samples_dir / "grace_hopper.jpg").save(tiff)
    browser.get(page_url + "/")
    browser.find_element(By.ID, "file-input").send_keys(str(tiff))
    browser.find_element(By.CSS_SELECTOR, "input[name=method][value=blur]").click()
    browser.find_element(By.ID, "protect-button").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("Done"))
    card = browser.find_element(By.CSS_SELECTOR, "#results .card")
    assert "Protected (1 face)" in card.find_element(By.CSS_SELECTOR, ".badge").text
    after = card.find_element(By.CSS_SELECTOR, ".after")
    WebDriverWait(browser, 10).until(lambda d: "cannot show TIFF" in after.text)
    assert not card.find_elements(By.CSS_SELECTOR, ".after img")  # no broken image
    assert not card.find_element(By.CSS_SELECTOR, "button.toggle").is_displayed()
    link = card.find_element(By.CSS_SELECTOR, "a.download")
    assert link.get_attribute("download") == "grace_anonymized.tif" and link.is_displayed()

    browser.find_element(By.CSS_SELECTOR, "#format option[value=png]").click()  # shown, the original not
    browser.find_element(By.ID, "protect-button").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("Done"))
    card = browser.find_element(By.CSS_SELECTOR, "#results .card")
    assert card.find_elements(By.CSS_SELECTOR, ".after .box")  # the face's box, on the photo shown
    assert not card.find_element(By.CSS_SELECTOR, "button.toggle").is_enabled()  # no original to flip to


STEPS_ZERO = """
const send = window.fetch;
window.fetch = (url, options) => {
  if (options && options.body instanceof FormData) options.body.append("steps", "0");
  return send(url, options);
};
"""


def test_a_face_not_protected_says_so_once(browser, page_url, samples_dir):
    """The face line read "Face 1: NOT protected. NOT protected: after JPEG 75, ...": the service's
    reason starts with the words the page puts before it. A cloak of 0 steps leaves the face as it
    was, NOT protected whatever the machine."""
    browser.get(page_url + "/")
    browser.execute_script(STEPS_ZERO)
    browser.find_element(By.ID, "file-input").send_keys(str(samples_dir / "grace_hopper.jpg"))
    browser.find_element(By.ID, "escalate").click()  # off: nothing to escalate with 0 steps
    browser.find_element(By.ID, "protect-button").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("Done"))
    card = browser.find_element(By.CSS_SELECTOR, "#results .card")
    assert card.find_element(By.CSS_SELECTOR, ".badge").text == "1 face NOT protected"
    line = card.find_element(By.CSS_SELECTOR, ".faces li.bad").text
    assert line.startswith("Face 1: NOT protected. after JPEG 75") and line.count("NOT protected") == 1
    assert card.find_element(By.CSS_SELECTOR, ".before .box").get_attribute("class").split() == ["box", "bad"]


def test_files_left_out_as_not_photos_are_named(browser, page_url, samples_dir, tmp_path):
    """A dropped folder's text file, or a photo with no extension, was left out without a word:
    "1 photo chosen" of two files."""
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    browser.get(page_url + "/")
    browser.find_element(By.ID, "file-input").send_keys(f"{samples_dir / 'grace_hopper.jpg'}\n{notes}")
    chosen = browser.find_element(By.ID, "chosen").text
    assert chosen.startswith("1 photo chosen: grace_hopper.jpg.") and "notes.txt" in chosen


ZIP_OF_ONE = """
const done = arguments[arguments.length - 1];
makeZip([{ filename: "a.png", blob: new Blob(["x"]) }]).then((blob) => {
  const reader = new FileReader();
  reader.onload = () => done(reader.result.split(",")[1]);
  reader.readAsDataURL(blob);
});
"""


def test_the_zip_dates_its_photos(browser, page_url):
    """The zip's entries had a zero date, month 0 day 0 (unzip listed 00-00-1980; datetime refused it)."""
    browser.get(page_url + "/")
    archive = zipfile.ZipFile(io.BytesIO(base64.b64decode(browser.execute_async_script(ZIP_OF_ONE))))
    (entry,) = archive.infolist()
    assert datetime.datetime(*entry.date_time).year >= 2024 and archive.read("a.png") == b"x"


def test_the_summary_names_photos_not_protected_and_without_a_face(browser, page_url, samples_dir, tmp_path):
    """The last line read "Done: 2 of 2 photos ready." of a photo whose face was NOT protected and
    one with no face at all: each said so only on its own card, and "Download all" packed both."""
    blank = tmp_path / "wall.png"
    Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(blank)
    browser.get(page_url + "/")
    browser.execute_script(STEPS_ZERO)  # a cloak of 0 steps: the face NOT protected
    browser.find_element(By.ID, "file-input").send_keys(f"{samples_dir / 'grace_hopper.jpg'}\n{blank}")
    browser.find_element(By.ID, "escalate").click()
    browser.find_element(By.ID, "protect-button").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("Done"))
    assert browser.find_element(By.ID, "status").text == (
        "Done: 2 of 2 photos ready. Of those: 1 with a face NOT protected, "
        "1 with no face found (left unchanged)."
    )


STUB_NO_WORKER = """
const real = window.fetch;
window.fetch = (url, options) => String(url).includes("v1/")
  ? Promise.resolve(new Response(JSON.stringify({error: "no_model_worker", status: 503,
      reason: "no model worker is running: see GET /healthz"}),
      {status: 503, headers: {"Content-Type": "application/json"}}))
  : real(url, options);
"""


def test_a_503_without_retry_after_is_shown_at_once_not_retried_as_busy(browser, page_url, samples_dir):
    """The page retried every 503 five times, 2 s apart, then said "the service stayed busy", also
    for "no model worker is running", which sends no Retry-After: only a full queue says to wait."""
    browser.get(page_url + "/")
    browser.execute_script(STUB_NO_WORKER)
    browser.find_element(By.ID, "file-input").send_keys(str(samples_dir / "grace_hopper.jpg"))
    browser.find_element(By.CSS_SELECTOR, "input[name=method][value=blur]").click()
    browser.find_element(By.ID, "protect-button").click()
    WebDriverWait(browser, 5).until(lambda d: d.find_element(By.ID, "status").text.startswith("Done"))
    reason = browser.find_element(By.CSS_SELECTOR, "#results .card .faces").text
    assert "no model worker is running" in reason and "stayed busy" not in reason
