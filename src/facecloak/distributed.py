"""The batch on a Ray cluster, for when one machine is not enough.

The same protection as the CLI's batch (the same `ProtectorSpec` -> `Protection`, detector,
decoding and encoding), spread with Ray Data: the inputs become a dataset of file references,
``map_batches`` runs them through a pool of actors, each holding **one copy of the models**
(loaded once, on a GPU when the actor has one), and the driver writes what comes back into the
output folder with the same journal as the local batch (`facecloak.journal`): same outputs, same
names, same resume semantics. Inputs may be local paths (on a shared file system when the
cluster has several machines) or any URI pyarrow reads (``s3://bucket/photos``)::

    facecloak anonymize s3://bucket/photos -o out --ray                # local Ray, or RAY_ADDRESS
    facecloak cloak /shared/photos -o out --ray=ray://head:10001       # a running cluster

A photo whose journal record still holds (same hash, same settings, output intact) is skipped:
local files are hashed on the driver and not sent at all, remote ones are read and hashed by the
actors, which skip them without computing. The driver is the only
writer of the output folder and its journal. Needs ``pip install 'facecloak[ray]'``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path

from facecloak import errors, io
from facecloak._device import in_parts_that_fit
from facecloak.batch import (
    BatchPlan,
    FileOutcome,
    Options,
    ProgressCallback,
    ProgressEvent,
    _measure_written,
    face_status,
    out_of_memory,
    plan_batch,
    replacing_refused,
    seconds_per_photo,
)
from facecloak.errors import FacecloakError, ImageWriteError, InvalidInputError
from facecloak.journal import JOURNAL_NAME, Journal, file_sha256, source_key
from facecloak.pipeline import (
    ProtectorSpec,
    ResumableReport,
    ResumedOutcome,
    _output_options,
    existing_output_decision,
    journal_done,
    journal_start,
    resumed_outcome,
)


def list_inputs(paths: Sequence[str | Path]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(uri, relative output path) of every image under ``paths``, and the files skipped.

    Local paths are walked exactly as the local batch walks them (`facecloak.io.collect_images`),
    URIs through pyarrow's file systems with the same rules (image suffixes, no hidden files,
    one folder mirrored as is, several prefixed by their names).
    """
    local = [p for p in paths if "://" not in str(p)]
    jobs, skipped = io.collect_images(local) if local else ([], [])
    found = [(str(job.path), job.relative.as_posix()) for job in jobs]
    remote, remote_skipped = _list_remote([str(p) for p in paths if "://" in str(p)], several=len(paths) > 1)
    return found + remote, [(str(path), reason) for path, reason in skipped] + remote_skipped


def _list_remote(
    uris: Sequence[str], *, several: bool, out_dir: Path | None = None
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(uri, relative input path) of every image under the URIs, and the files skipped (`list_inputs`).

    A ``file://`` URI's photos under ``out_dir`` are passed over, as the local walk passes them:
    read, the run's own outputs came back as inputs (``out/out/g_blur_blur.jpg``).
    """
    inside = out_dir.resolve() if out_dir is not None else None
    found: list[tuple[str, str]] = []
    skipped: list[tuple[str, str]] = []
    for uri in uris:
        from pyarrow import fs as pafs

        try:
            filesystem, root = pafs.FileSystem.from_uri(uri)
            info = filesystem.get_file_info(root)
        except (ValueError, OSError) as error:  # pyarrow's ArrowInvalid is a ValueError: a traceback
            raise InvalidInputError(f"not a URI that can be read ({error})", uri) from None
        scheme = uri.split("://", 1)[0]
        if info.type in (pafs.FileType.File, pafs.FileType.NotFound):
            # a missing one fails alone with its reason, as a missing local path does (listing it
            # as a folder stopped the batch with a traceback)
            found.append((uri, Path(root).name))
            continue
        selector = pafs.FileSelector(root, recursive=True)
        for entry in sorted(filesystem.get_file_info(selector), key=lambda e: e.path):
            if entry.type != pafs.FileType.File:
                continue
            relative = Path(entry.path).relative_to(root)
            if any(part.startswith(".") for part in relative.parts):
                continue
            if relative.suffix.lower() not in io.IMAGE_SUFFIXES:
                skipped.append((f"{scheme}://{entry.path}", "not an image suffix"))
                continue
            if scheme == "file" and inside is not None and inside in Path(entry.path).resolve().parents:
                skipped.append((f"{scheme}://{entry.path}", io.INSIDE_THE_OUTPUT_FOLDER))
                continue
            mirrored = Path(Path(root).name) / relative if several else relative
            found.append((f"{scheme}://{entry.path}", mirrored.as_posix()))
    return found, skipped


def _read_bytes(uri: str) -> bytes:
    if "://" not in uri:
        return Path(uri).read_bytes()
    from pyarrow import fs as pafs

    filesystem, path = pafs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.readall()


class ProtectActor:
    """One Ray actor: one copy of the detector and the protector's models, used for every batch it gets.

    Called by Ray Data's ``map_batches`` with a batch of columns ``uri``, ``relative``, ``index``
    and optionally ``output`` (the output's relative path when the driver planned it, else empty);
    returns per photo the encoded output (or why not), its suffix, the input's SHA-256, the
    per-face report as JSON (measured on the file as it will be written, as the local batch does),
    how it was encoded (JSON) and the seconds it took.
    """

    def __init__(self, spec: ProtectorSpec, options: Options, done: dict[str, str]) -> None:
        import torch

        from facecloak._allocator import tune_allocator
        from facecloak.detect import detector_for

        tune_allocator()  # a worker process of its own: the command line's setting does not reach it
        self.options = options
        self.done = done
        device = options.device
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.protection = spec.build(device)
        self.detector = detector_for(options, device=device)

    def __call__(self, batch: dict) -> dict:
        """Read, hash, decode, detect, protect and encode one batch of photos."""
        started = time.perf_counter()
        rows = len(batch["uri"])
        # No None in the columns: Arrow would turn it into NaN. Empty means "not there".
        out: dict[str, list] = {key: [""] * rows for key in ("suffix", "error", "sha256")}
        out["data"] = [b""] * rows
        out["faces"] = ["[]"] * rows
        out["written"] = ["{}"] * rows
        out["seconds"] = [0.0] * rows
        out["skipped"] = [False] * rows
        out["index"] = [int(i) for i in batch["index"]]
        planned = [str(name) for name in batch["output"]] if "output" in batch else [""] * rows
        decoded = []
        for r in range(rows):
            uri, relative = str(batch["uri"][r]), str(batch["relative"][r])
            try:
                data = _read_bytes(uri)
            except OSError as error:
                out["error"][r] = f"{uri}: cannot read ({error})"
                continue
            out["sha256"][r] = hashlib.sha256(data).hexdigest()
            if self.done.get(relative) == out["sha256"][r]:
                out["skipped"][r] = True
                continue
            try:
                image = io.read_image_bytes(data, uri, max_pixels=self.options.max_pixels)
                if planned[r]:
                    out["suffix"][r] = Path(planned[r]).suffix
                else:
                    out["suffix"][r] = io.output_suffix(image.format, self.options.format)
                # flattened as the output will be before any face is looked for, as the local batch does
                image = io.for_output(image, format_name=io.IMAGE_SUFFIXES[out["suffix"][r].lower()])
            except FacecloakError as error:
                out["error"][r] = str(error)
                continue
            decoded.append((r, image))
        if decoded:

            def too_large(item: tuple[int, io.LoadedImage], detail: str) -> None:
                out["error"][item[0]] = str(out_of_memory(item[1].path, detail))

            reading = (time.perf_counter() - started) / len(decoded)  # each decoded photo's share
            in_parts_that_fit(decoded, lambda part: self._protect(part, out, reading), too_large)
        return out

    def _protect(
        self, part: Sequence[tuple[int, io.LoadedImage]], out: dict[str, list], reading: float
    ) -> None:
        """Detect, protect and encode decoded rows of a batch together (``out`` filled in place)."""
        pixels = [image.pixels for _, image in part]
        # how each output file will hold its photo: a cloak holds its caps on that, as locally
        storage = [
            io.stored_as(f"output{out['suffix'][r]}", image, self.options.jpeg_quality) for r, image in part
        ]
        tick = time.perf_counter()
        try:
            faces = self.detector(pixels)
            found_at = time.perf_counter()
            result = self.protection.protect(pixels, faces, stored_as=storage)
        except FacecloakError as error:
            for r, _ in part:
                out["error"][r] = str(error)
            return
        per_photo = faces.image_index.bincount(minlength=len(part)).tolist()
        seconds = seconds_per_photo(
            reading * len(part) + found_at - tick, time.perf_counter() - found_at, per_photo
        )
        for k, (r, image) in enumerate(part):
            records = result.records_for(k)
            written: dict = {}
            try:
                out["data"][r] = io.encode_image(
                    result.to_encode(k),
                    io.IMAGE_SUFFIXES[out["suffix"][r].lower()],
                    source=image,
                    keep_metadata=self.options.keep_metadata,
                    jpeg_quality=self.options.jpeg_quality,
                    info=written,
                )
                _measure_encoded(out["data"][r], out["suffix"][r], image, result.images[k], records)
            except FacecloakError as error:
                out["error"][r] = f"{image.path}: {error}"
            out["faces"][r] = json.dumps(records)
            out["written"][r] = json.dumps(written)
            out["seconds"][r] = round(seconds[k], 3)


def _measure_encoded(data: bytes, suffix: str, image: io.LoadedImage, output, records: list[dict]) -> None:
    """The local batch's measure of the file as written (`facecloak.batch._measure_written`), on these bytes.

    The driver writes exactly these bytes, so measuring them here, beside the models, gives the
    records the local batch keeps (``box_dssim_written``, ``linf_written``) without shipping pixels.
    """
    if not any("dssim" in record for record in records):
        return
    with tempfile.TemporaryDirectory(prefix=".facecloak-measure-") as folder:
        encoded = Path(folder) / f"output{suffix}"
        encoded.write_bytes(data)
        _measure_written(encoded, image, output, records)


def run_distributed(
    paths: Sequence[str | Path],
    spec: ProtectorSpec,
    options: Options,
    *,
    address: str | None = None,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    command: str = "",
    on_progress: ProgressCallback | None = None,
) -> ResumableReport:
    """Protect every image under ``paths`` into ``options.out_dir`` on Ray; journaled like the local batch.

    Args:
        paths: local files and folders, or URIs pyarrow reads (``s3://...``).
        spec: the protection, by value (each actor builds it once).
        options: the batch's settings; ``out_dir`` (on the driver's file system) is required,
            ``chunk`` is the batch size per actor call.
        address: the Ray cluster to join; None: the running one in this process, else
            ``RAY_ADDRESS``, else a new local one.
        actors: actor pool size; default one per GPU in the cluster, else one per 2 CPUs.
        gpus_per_actor: GPUs per actor; default 1 when the cluster has GPUs, else 0.
        command: name shown in the summary.
        on_progress: called with a `facecloak.batch.ProgressEvent` (stage "file") as each file finishes.

    Example:
        >>> import ray; ray.init(num_cpus=2)  # doctest: +SKIP
        >>> spec = ProtectorSpec("anonymize", {"method": "blur"})  # doctest: +SKIP
        >>> report = run_distributed(["samples"], spec, Options(out_dir="out"))  # doctest: +SKIP
    """
    try:  # ray.data too: a Ray without it (no pandas) failed only once the photos were planned
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:  # the CLI's guard imports this module, which needs no Ray
        raise InvalidInputError(f"a batch on Ray needs pip install 'facecloak[ray]' ({error})") from None
    if not options.out_dir:
        raise InvalidInputError("a distributed batch needs an output folder (-o)")
    started = time.perf_counter()
    out_dir = Path(options.out_dir)
    tag = spec.build().tag if spec.kind == "anonymize" else "cloaked"
    local = [path for path in paths if "://" not in str(path)]
    # local inputs planned as the local batch plans them: the output folder is not walked, outputs
    # of earlier runs are not inputs, an output that would replace an input or another's is refused
    plan = (
        plan_batch(local, tag, replace(options, overwrite=True), check_overwrites=False)
        if local
        else BatchPlan()
    )
    uris = [str(p) for p in paths if "://" in str(p)]
    remote, remote_skipped = _list_remote(uris, several=len(paths) > 1, out_dir=out_dir)
    skipped = [(str(path), reason) for path, reason in plan.not_images] + remote_skipped
    report = ResumableReport(command or tag, asdict(options), skipped=skipped, inputs=[str(p) for p in paths])
    outcomes: list[FileOutcome] = []
    order = {path: k for k, path in enumerate([*plan.order, *(uri for uri, _ in remote)])}
    total = len(plan.todo) + len(plan.failed) + len(remote)

    def finished(outcome: FileOutcome) -> None:
        outcomes.append(outcome)
        if on_progress is not None:
            on_progress(_file_event(outcome, len(outcomes), total))

    for outcome in plan.failed:
        finished(outcome)
    if (
        not remote
        and not (out_dir / JOURNAL_NAME).exists()
        and not any(options.overwrite or not target.exists() for _, target in plan.todo)
    ):  # nothing to write (no image, or every output exists and is not ours): no journal, no folder
        for job, target in plan.todo:
            finished(FileOutcome(str(job.path), "skipped", output=str(target)))
        return _ended(report, outcomes, order, started)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    with Journal(out_dir, {**spec.settings(), **_output_options(options), "tag": tag}) as journal:
        report.journal = str(journal.path)
        found: list[tuple[str, str]] = []  # (uri, relative input) of every photo, by item index
        targets: list[str] = []  # its planned relative output ("" for a URI: known once decoded)
        for job, target in plan.todo:
            decision, _ = existing_output_decision(journal, job.path, target, out_dir, options)
            if isinstance(decision, FileOutcome):
                finished(decision)
            elif decision == "skip":  # not ours: left alone
                finished(FileOutcome(str(job.path), "skipped", output=str(target)))
            else:
                found.append((str(job.path), job.relative.as_posix()))
                targets.append(target.relative_to(out_dir).as_posix())
        found += remote
        targets += [""] * len(remote)
        done = {} if options.overwrite else _still_done(journal, found)
        items = []
        for i, (uri, relative) in enumerate(found):
            record = journal.last_record(relative) if relative in done and "://" not in uri else None
            if record is not None and file_sha256(uri) == done[relative]:  # local: no need to ship it
                finished(resumed_outcome(uri, record, out_dir))
            else:
                items.append({"index": i, "uri": uri, "relative": relative, "output": targets[i]})
        if items:
            dataset = ray.data.from_items(items).map_batches(
                ProtectActor,
                fn_constructor_kwargs={"spec": spec, "options": options, "done": done},
                batch_size=max(1, options.chunk),
                batch_format="numpy",
                **_pool(ray, actors, gpus_per_actor),
            )
            inputs = io.ProtectedFiles(job.path for job, _ in plan.todo)  # never replaced
            # relative output -> the input it is for: planned here, written by this run, or done
            # earlier (a photo resumed is not written again: two URIs with one output name took
            # turns replacing each other's output, each run reporting both protected)
            claimed: dict[str, str] = {}
            for i, (uri, relative) in enumerate(found):
                record = journal.last_record(relative) if relative in done else None
                for output in (targets[i], record["output"] if record else ""):
                    if output:
                        claimed.setdefault(output, uri)
            with _ray_errors_in_one_line():
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    for r in range(len(batch["index"])):
                        uri, relative = found[int(batch["index"][r])]
                        row = {key: batch[key][r] for key in batch}
                        finished(
                            _finish_row(row, uri, relative, tag, options, journal, out_dir, inputs, claimed)
                        )
    return _ended(report, outcomes, order, started)


@contextlib.contextmanager
def _ray_errors_in_one_line() -> Iterator[None]:
    """A worker's error as facecloak's own one line, unwrapped from Ray's.

    An actor that could not load its model died with a 300-line traceback, exit 1 ("a face NOT
    protected").
    """
    try:
        yield
    except FacecloakError:
        raise
    except Exception as error:  # noqa: BLE001 - Ray's wrappers: RayTaskError, ActorDiedError, ...
        seen, cause = set(), error
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, FacecloakError):
                raise cause from None
            seen.add(id(cause))
            cause = getattr(cause, "cause", None) or cause.__cause__ or cause.__context__
        # an actor that died in its constructor hands back only the text of its traceback
        text = _ANSI_CODE.sub("", str(error))
        named = _FACECLOAK_ERROR_LINE.findall(text)
        if named:
            kind, reason = named[-1]
            cls = getattr(errors, kind, FacecloakError)
            raise (cls if isinstance(cls, type) and issubclass(cls, FacecloakError) else FacecloakError)(
                reason
            ) from None
        first = next((line for line in text.splitlines() if line.strip()), type(error).__name__)
        raise FacecloakError(f"a Ray worker failed: {first.strip()[:300]}") from error


_ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")
_FACECLOAK_ERROR_LINE = re.compile(r"^facecloak\.errors\.(\w+): (.+)$", re.MULTILINE)


def _ended(report: ResumableReport, outcomes: list[FileOutcome], order: dict[str, int], started: float):
    """The report with its outcomes in the order the inputs were found, as the local batch lists them."""
    report.outcomes = sorted(outcomes, key=lambda outcome: order.get(outcome.path, len(order)))
    report.resumed = sum(isinstance(outcome, ResumedOutcome) for outcome in report.outcomes)
    report.seconds = time.perf_counter() - started
    return report


def _file_event(outcome: FileOutcome, done: int, total: int) -> ProgressEvent:
    return ProgressEvent("file", done, total, fraction=done / total if total else 1.0, outcome=outcome)


def _still_done(journal: Journal, found: list[tuple[str, str]]) -> dict[str, str]:
    """Input hash by relative path of the photos whose journal record holds (for the actors).

    An actor compares it with the hash of what it reads: equal means done, and skipped.
    """
    done = {}
    for _, relative in found:
        record = journal.last_record(relative)
        if record is not None and journal.done_record(relative, record.get("sha256", "")) is not None:
            done[relative] = record["sha256"]
    return done


def _pool(ray, actors: int | None, gpus_per_actor: float | None) -> dict:
    """Actor pool options: one actor per GPU, else one per 2 CPUs (each with its model copy)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if gpus_per_actor is None:
        gpus_per_actor = 1 if gpus else 0
    if actors is None:
        actors = max(1, gpus) if gpus_per_actor else max(1, cpus // 2)
    cpus_per_actor = 1 if gpus_per_actor else max(1, cpus // actors)
    pool = ray.data.ActorPoolStrategy(size=actors)
    return {"compute": pool, "num_gpus": gpus_per_actor, "num_cpus": cpus_per_actor}


def _finish_row(
    row,
    uri: str,
    relative: str,
    tag: str,
    options: Options,
    journal: Journal,
    out_dir: Path,
    inputs: io.ProtectedFiles,
    claimed: dict[str, str],
) -> FileOutcome:
    """Write one actor result: journal ``start``, atomic write, journal ``done`` (as the local batch).

    ``claimed``: the outputs this run has written, by input; a URI's output, named only once it
    was decoded, that another photo of this run took is refused, as the local plan refuses it.
    """
    if bool(row["skipped"]):
        return resumed_outcome(uri, journal.last_record(relative), out_dir)
    if str(row["error"]):
        return FileOutcome(uri, "failed", error=str(row["error"]))
    faces = json.loads(str(row["faces"]))
    status = face_status(faces)
    planned = str(row.get("output", ""))
    if planned:
        target = out_dir / planned
    else:
        target = out_dir / Path(relative).with_name(f"{Path(relative).stem}_{tag}{row['suffix']}")
    relative_output = target.relative_to(out_dir).as_posix()
    source = source_key(uri)
    sha256 = str(row["sha256"])
    written = json.loads(str(row.get("written", "{}")))
    try:
        if claimed.get(relative_output, uri) != uri:
            problem = f"its output {target} is also the output of {claimed[relative_output]} (rename one)"
            raise ImageWriteError(problem, uri)
        other = journal.made_from_another(relative_output, uri)
        owned = other is None and journal.owns(relative_output)
        if target.exists() and other is not None:  # a URI's output is named only once it is decoded
            return replacing_refused(uri, target, overwrite=options.overwrite, other_input=other)
        if target.exists() and not (options.overwrite or owned):
            # not this journal's: left alone, as the local batch skips it
            return FileOutcome(uri, "skipped", output=str(target))
        claimed[relative_output] = uri
        journal_start(journal, uri, relative, sha256, relative_output, source)
        io.write_bytes_atomic(target, bytes(row["data"]), protected=inputs, overwrite=True)
        journal_done(
            journal,
            uri,
            target,
            relative,
            sha256,
            relative_output,
            source,
            status=status,
            faces=faces,
            written=written,
        )
    except FacecloakError as error:
        return FileOutcome(uri, "failed", error=str(error), faces=faces)
    except OSError as error:
        return FileOutcome(uri, "failed", error=f"{target}: {error.strerror}", faces=faces)
    seconds = float(row.get("seconds", 0.0))
    return FileOutcome(uri, status, output=str(target), faces=faces, seconds=seconds, written=written)
