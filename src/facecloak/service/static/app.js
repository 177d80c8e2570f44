// facecloak web page: pick or drop photos, send each to the service, show before/after and
// the per-face status, download one or all (zip, built here). No library, no build step.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const form = $("#protect-form");
const fileInput = $("#file-input");
const dropZone = $("#drop-zone");
const button = $("#protect-button");
const results = $("#results");
const statusLine = $("#status");
const downloadAll = $("#download-all");
const PARALLEL = 4; // uploads in flight: the service batches them onto the model together

let chosen = [];
let finished = []; // {filename, blob}
let running = false; // a run in progress: a second one would mix its photos into this one's
let info = { api_key_required: false, max_upload_bytes: Infinity };

// URLs relative to the page (at the service's root, ending in /): behind a proxy's path prefix, or
// mounted in another app, absolute /v1/... URLs went outside the prefix
fetch("v1/info").then((r) => r.json()).then((data) => {
  info = data;
  $("#key-row").hidden = !data.api_key_required;
  $("#replace-choice").hidden = !(data.methods || []).includes("replace");
  $("#mouth-row").hidden = $("#replace-choice").hidden;
  if (!$("#replace-choice").hidden) {
    $("#form-help").textContent = "Cloaking and replacing take a few seconds per photo; blur, pixelate and mask are quick.";
  }
}).catch(() => {});

function isPhoto(file) {
  return file.type.startsWith("image/") || /\.(jpe?g|png|webp|gif|tiff?|bmp|heic)$/i.test(file.name);
}

function choose(files) {
  const all = Array.from(files);
  chosen = all.filter(isPhoto);
  // a file left out is named: a dropped folder lost one silently ("2 photos chosen" of 3)
  const skipped = all.filter((f) => !isPhoto(f)).map((f) => f.name);
  const left = skipped.length
    ? ` Left out, not a photo by its name or type: ${skipped.join(", ")}.`
    : "";
  $("#chosen").textContent = (chosen.length
    ? `${chosen.length} photo${chosen.length > 1 ? "s" : ""} chosen: ${chosen.map((f) => f.name).join(", ")}.`
    : "No photo chosen yet.") + left;
  button.disabled = running || chosen.length === 0;
}

fileInput.addEventListener("change", () => choose(fileInput.files));
["dragenter", "dragover"].forEach((type) => dropZone.addEventListener(type, (event) => {
  event.preventDefault();
  dropZone.classList.add("dragging");
}));
["dragleave", "drop"].forEach((type) => dropZone.addEventListener(type, (event) => {
  event.preventDefault();
  dropZone.classList.remove("dragging");
}));
dropZone.addEventListener("drop", (event) => choose(event.dataTransfer.files));

function syncLevel() {
  const method = form.elements.method.value;
  $("#level").disabled = method !== "cloak";
  $("#escalate").disabled = method !== "cloak";
  $("#keep-mouth").disabled = method !== "replace";
}
form.addEventListener("change", syncLevel);
syncLevel();

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  if (!chosen.length || running) return;
  running = true;
  const files = chosen.slice();
  const settings = {
    method: form.elements.method.value,
    level: $("#level").value,
    escalate: $("#escalate").checked,
    keepMouth: $("#keep-mouth").checked,
    format: $("#format").value,
    key: $("#api-key").value.trim(),
  };
  button.disabled = true;
  downloadAll.disabled = true;
  $("#results-section").hidden = false;
  results.replaceChildren();
  const ready = []; // this run's photos: the zip and the count hold only these
  finished = ready;
  const cards = files.map((file) => addCard(file));
  let done = 0;
  statusLine.textContent = `Protecting ${files.length} photo${files.length > 1 ? "s" : ""}…`;
  let next = 0;
  async function lane() {
    while (next < files.length) {
      const index = next++;
      await protect(files[index], cards[index], settings, ready);
      done += 1;
      statusLine.textContent = `${done} of ${files.length} done.`;
    }
  }
  await Promise.all(Array.from({ length: Math.min(PARALLEL, files.length) }, lane));
  const failed = files.length - ready.length;
  // the summary said "Done: 3 of 3 photos ready." of photos with a face NOT protected or no face
  // found, each told only on its own card, down the list; the zip packs them all the same
  const short = cards.filter((card) => card.dataset.status === "unprotected").length;
  const faceless = cards.filter((card) => card.dataset.status === "no_face").length;
  const warnings = [];
  if (short) warnings.push(`${short} with a face NOT protected`);
  if (faceless) warnings.push(`${faceless} with no face found (left unchanged)`);
  statusLine.textContent = `Done: ${ready.length} of ${files.length} photo${files.length > 1 ? "s" : ""} ready`
    + (failed ? `, ${failed} failed.` : ".")
    + (warnings.length ? ` Of those: ${warnings.join(", ")}.` : "");
  downloadAll.disabled = ready.length === 0;
  running = false;
  button.disabled = chosen.length === 0;
});

function addCard(file) {
  const card = $("#card-template").content.firstElementChild.cloneNode(true);
  $(".name", card).textContent = file.name;
  setBadge(card, "Working…", "");
  card.classList.add("busy");
  const before = $(".before img", card);
  before.addEventListener("error", () => { // not a photo the browser shows (TIFF, HEIC): boxes go on "After"
    $(".before", card).hidden = true;
    card.dataset.noOriginal = "true";
    $(".after .frame", card).append($(".boxes", card));
    $(".toggle", card).disabled = true;
  });
  before.src = URL.createObjectURL(file);
  results.append(card);
  return card;
}

function setBadge(card, text, kind) {
  const badge = $(".badge", card);
  badge.textContent = text;
  badge.className = `badge ${kind}`;
}

async function protect(file, card, settings, ready) {
  if (file.size > info.max_upload_bytes) {
    return fail(card, `the photo is larger than this service's limit of ${Math.round(info.max_upload_bytes / 1048576)} MB`);
  }
  const body = new FormData();
  body.append("image", file, file.name);
  body.append("response", "json");
  if (settings.format) body.append("format", settings.format);
  let url = "v1/anonymize";
  if (settings.method === "cloak") {
    url = "v1/cloak";
    body.append("level", settings.level);
    if (settings.escalate) body.append("escalate", "true");
  } else {
    body.append("method", settings.method);
    if (settings.method === "replace" && settings.keepMouth) body.append("keep_mouth", "true");
  }
  if (/[^\x20-\x7e\xa0-\xff]/.test(settings.key)) { // fetch() throws on it: "could not be reached" misled
    return fail(card, "the API key in the field above holds a character a browser cannot send "
      + "(a curly quote or dash from copying, say): type it again");
  }
  const headers = settings.key ? { Authorization: `Bearer ${settings.key}` } : {};
  for (let attempt = 0; attempt < 5; attempt += 1) {
    let response;
    try {
      response = await fetch(url, { method: "POST", body, headers });
    } catch (error) {
      return fail(card, "the service could not be reached");
    }
    // only a full queue says when to come back; a 503 without Retry-After (no model worker) is
    // final: retried five times, it ended as "the service stayed busy" instead of its reason
    if (response.status === 503 && response.headers.get("Retry-After")) {
      const wait = Number(response.headers.get("Retry-After") || 2);
      setBadge(card, `Busy, retrying in ${wait} s`, "warn");
      await new Promise((resolve) => setTimeout(resolve, wait * 1000));
      continue;
    }
    let data;
    try {
      data = await response.json();
    } catch (error) {
      return fail(card, `unexpected answer (HTTP ${response.status})`);
    }
    // the service's 401/403 speak to API clients ("send 'Authorization: Bearer KEY'"): here, the field
    if (response.status === 401) return fail(card, "this service needs an API key: enter it in the API key field above");
    if (response.status === 403) return fail(card, "the API key in the field above is not accepted");
    if (!response.ok) return fail(card, data.reason || `HTTP ${response.status}`);
    return show(card, data, ready);
  }
  return fail(card, "the service stayed busy; try again later");
}

function fail(card, reason) {
  card.classList.remove("busy");
  setBadge(card, "Error", "bad");
  $(".after", card).hidden = true; // an empty pane labelled "Protected photo" said the opposite
  $(".toggle", card).hidden = true;
  const item = document.createElement("li");
  item.className = "bad";
  item.innerHTML = "<strong>Not processed:</strong> ";
  item.append(reason);
  $(".faces", card).replaceChildren(item);
}

function show(card, data, ready) {
  const bytes = Uint8Array.from(atob(data.image_base64), (c) => c.charCodeAt(0));
  const blob = new Blob([bytes], { type: data.content_type });
  const url = URL.createObjectURL(blob);
  const after = $(".after img", card);
  const before = $(".before img", card);
  after.addEventListener("error", () => { // a TIFF: an empty pane labelled "Protected photo" looked broken
    if (after.src !== url) return;
    const frame = $(".after .frame", card);
    frame.classList.add("unshown");
    frame.replaceChildren(`This browser cannot show ${formatName(data.content_type)} photos: `
      + "download the protected photo to look at it.");
    $(".toggle", card).hidden = true;
  });
  after.src = url;
  card.classList.remove("busy");
  card.dataset.status = data.status;
  ready.push({ filename: data.filename, blob });

  if (data.status === "protected") setBadge(card, `Protected (${data.faces_found} face${data.faces_found > 1 ? "s" : ""})`, "ok");
  else if (data.status === "unprotected") setBadge(card, `${data.unprotected_faces} face${data.unprotected_faces > 1 ? "s" : ""} NOT protected`, "bad");
  else setBadge(card, "No face found", "warn");

  const link = $(".download", card);
  link.href = url;
  link.download = data.filename;
  link.textContent = `Download ${data.filename}`;
  link.hidden = false;

  const toggle = $(".toggle", card);
  toggle.disabled = card.dataset.noOriginal === "true"; // nothing to flip back to
  toggle.addEventListener("click", () => {
    const showing = toggle.getAttribute("aria-pressed") === "true";
    toggle.setAttribute("aria-pressed", String(!showing));
    after.src = showing ? url : before.src;
    after.alt = showing ? "Protected photo" : "Original photo (shown for comparison)";
  });

  const list = $(".faces", card);
  const boxes = $(".boxes", card);
  list.replaceChildren();
  boxes.replaceChildren();
  if (!data.faces.length) {
    const item = document.createElement("li");
    item.className = "note";
    item.textContent = "No face was found, so nothing was changed. Faces turned away, very small or covered may be missed.";
    list.append(item);
  }
  data.faces.forEach((face, index) => {
    const item = document.createElement("li");
    item.className = face.protected ? "ok" : "bad";
    const label = document.createElement("strong");
    label.textContent = `Face ${index + 1}: ${face.protected ? "protected" : "NOT protected"}.`;
    // the service's reason starts "NOT protected:" itself: "NOT protected. NOT protected: ..."
    item.append(label, ` ${face.reason.replace(/^NOT protected:\s*/, "")}`);
    list.append(item);

    const [x1, y1, x2, y2] = face.box;
    const box = document.createElement("div");
    box.className = `box ${face.protected ? "" : "bad"}`;
    Object.assign(box.style, {
      left: `${(100 * x1) / data.width}%`, top: `${(100 * y1) / data.height}%`,
      width: `${(100 * (x2 - x1)) / data.width}%`, height: `${(100 * (y2 - y1)) / data.height}%`,
    });
    const number = document.createElement("span");
    number.textContent = String(index + 1);
    box.append(number);
    boxes.append(box);
  });
  (data.notes || []).forEach((note) => { // what the download lacks: frames past the first, transparency
    const item = document.createElement("li");
    item.className = "note";
    item.textContent = `Note: ${note}.`;
    list.append(item);
  });
}

function formatName(contentType) {
  return (contentType || "").replace(/^image\//, "").toUpperCase() || "these";
}

downloadAll.addEventListener("click", async () => {
  const zip = await makeZip(finished);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(zip);
  link.download = "facecloak-photos.zip";
  document.body.append(link);
  link.click();
  link.remove();
});

// -- a minimal zip writer (stored, no compression: the photos are compressed already) ---------
const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n += 1) {
    let c = n;
    for (let k = 0; k < 8; k += 1) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32(bytes) {
  let crc = 0xffffffff;
  for (let i = 0; i < bytes.length; i += 1) crc = CRC_TABLE[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
  return (crc ^ 0xffffffff) >>> 0;
}

function dosDateTime(date) {
  // a zero date is month 0, day 0: unzip listed "00-00-1980" and Python's datetime() refused it
  const time = (date.getHours() << 11) | (date.getMinutes() << 5) | (date.getSeconds() >> 1);
  const day = ((date.getFullYear() - 1980) << 9) | ((date.getMonth() + 1) << 5) | date.getDate();
  return [time, day];
}

async function makeZip(entries) {
  const encoder = new TextEncoder();
  const [dosTime, dosDate] = dosDateTime(new Date());
  const parts = [];
  const central = [];
  const used = new Set();
  let offset = 0;
  for (const entry of entries) {
    let name = entry.filename;
    for (let k = 2; used.has(name); k += 1) name = entry.filename.replace(/(\.[^.]*)?$/, `_${k}$1`);
    used.add(name);
    const nameBytes = encoder.encode(name);
    const data = new Uint8Array(await entry.blob.arrayBuffer());
    const crc = crc32(data);
    const local = new DataView(new ArrayBuffer(30));
    local.setUint32(0, 0x04034b50, true);
    local.setUint16(4, 20, true);
    local.setUint16(6, 0x0800, true); // UTF-8 names
    local.setUint16(10, dosTime, true);
    local.setUint16(12, dosDate, true);
    local.setUint32(14, crc, true);
    local.setUint32(18, data.length, true);
    local.setUint32(22, data.length, true);
    local.setUint16(26, nameBytes.length, true);
    parts.push(local, nameBytes, data);
    const record = new DataView(new ArrayBuffer(46));
    record.setUint32(0, 0x02014b50, true);
    record.setUint16(4, 20, true);
    record.setUint16(6, 20, true);
    record.setUint16(8, 0x0800, true);
    record.setUint16(12, dosTime, true);
    record.setUint16(14, dosDate, true);
    record.setUint32(16, crc, true);
    record.setUint32(20, data.length, true);
    record.setUint32(24, data.length, true);
    record.setUint16(28, nameBytes.length, true);
    record.setUint32(42, offset, true);
    central.push(record, nameBytes);
    offset += 30 + nameBytes.length + data.length;
  }
  const size = central.reduce((sum, part) => sum + part.byteLength, 0);
  const end = new DataView(new ArrayBuffer(22));
  end.setUint32(0, 0x06054b50, true);
  end.setUint16(8, entries.length, true);
  end.setUint16(10, entries.length, true);
  end.setUint32(12, size, true);
  end.setUint32(16, offset, true);
  return new Blob([...parts, ...central, end], { type: "application/zip" });
}
