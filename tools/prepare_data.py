"""Download, verify and unpack the datasets (and CLIP weights) in one explicit command.

    bash scripts/prepare_data.sh [--root $DATA] DATASET... | all
    bash scripts/prepare_data.sh --list
    bash scripts/prepare_data.sh --weights ViT-B/16

Sources (URL or Google Drive ID, destination, action, expected SHA-256) come from
``configs/data_sources.tsv``. Per dataset: every missing file is downloaded with gdown (Google Drive by ID,
plain HTTP(S) otherwise; progress bar; partial files ``<name>XXXXXXXX.part`` in ``$DATA/.downloads/`` are
resumed with a Range request on the next run, or restarted when the server ignores ranges), checked
(not an HTML page, size and SHA-256 against the table or, where the table has none, against the value
recorded on first download), then copied into place or extracted safely (members checked first: no
absolute paths, no ``..``, no links, devices or FIFOs; extracted into a temporary folder inside the
destination, then moved in without overwriting anything). ``$DATA/<dataset folder>/.prepared.json``
records the size and SHA-256 of every file, and ``tools.check_data`` gives the verdict. A second run
downloads nothing. Manual datasets (ImageNet, and the project-page ImageNet variants) get their steps
and expected tree printed, and are verified once the files are in place.

Override for mirrors and tests: ``LTPL_DOWNLOAD_MIRROR=/path/mirror.tsv``, lines ``ORIGINAL<TAB>URL``,
where ORIGINAL is a source URL of the table, a Google Drive ID, or a CLIP weights URL (``clip.clip._MODELS``;
its replacement must end in ``<sha256>/<file name>`` as the clip downloader reads the checksum there).
The replacement is fetched by the same code (gdown / the clip downloader) as the original.
Nothing else in the project downloads anything.
"""
import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python tools/prepare_data.py` as well as `python -m tools.prepare_data`
    sys.path.insert(0, str(REPO))

from engine.cli import UserError, run_cli  # noqa: E402

SOURCES_FILE = REPO / "configs" / "data_sources.tsv"
DATASETS_DOC = REPO / "docs" / "DATASETS.md"
MIRROR_ENV = "LTPL_DOWNLOAD_MIRROR"
STATE_FILE = ".prepared.json"
DOWNLOAD_DIR = ".downloads"        # under $DATA: downloads in progress (removed when empty)
LOCK_FILE = ".prepare_data.lock"   # under $DATA: held (fcntl) by the one run preparing that root
EXTRACT_PREFIX = ".extract-"       # temporary extraction folders inside a destination
ACTIONS = ("copy", "extract", "manual")
COLUMNS = ("dataset", "file", "url", "dest", "action", "strip", "provides", "sha256", "size", "note")
DRIVE_ID = re.compile(r"^https://drive\.google\.com/file/d/([\w-]+)/view$")
HTML_START = (b"<!doctype html", b"<html")
TIMEOUT = (30, 120)                # seconds: connect, between bytes


class PrepareError(UserError):
    """A download, check or extraction that failed; the message is one line naming the file and URL."""


@dataclass(frozen=True)
class Source:
    dataset: str
    file: str
    url: str
    dest: str
    action: str
    strip: str
    provides: str
    sha256: str
    size: int | None
    note: str

    @property
    def drive_id(self):
        m = DRIVE_ID.match(self.url)
        return m.group(1) if m else ""

    @property
    def key(self):
        """Name of the file in .prepared.json (unique within a dataset)."""
        return self.file


# --------------------------------------------------------------------------------------------------
# the sources table, the mirror override, the dataset layout

def read_sources(path=SOURCES_FILE):
    """The rows of the sources table, checked (actions, relative destinations, SHA-256 format)."""
    path = Path(path)
    rows, header = [], None
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            fields = line.split("\t")
            if header is None:
                if tuple(fields) != COLUMNS:
                    raise ValueError(f"{path}:{lineno}: header must be the columns {' '.join(COLUMNS)}")
                header = fields
                continue
            if len(fields) != len(COLUMNS):
                raise ValueError(f"{path}:{lineno}: {len(fields)} columns, expected {len(COLUMNS)}")
            values = {k: ("" if v == "-" else v.strip()) for k, v in zip(COLUMNS, fields)}
            where = f"{path}:{lineno}"
            if values["action"] not in ACTIONS:
                raise ValueError(f"{where}: action {values['action']!r} is not one of {', '.join(ACTIONS)}")
            dest = PurePosixPath(values["dest"])
            if not values["dest"] or dest.is_absolute() or ".." in dest.parts:
                raise ValueError(f"{where}: dest {values['dest']!r} must be a relative path inside $DATA")
            if values["sha256"] and not re.fullmatch(r"[0-9a-f]{64}", values["sha256"]):
                raise ValueError(f"{where}: sha256 {values['sha256']!r} is not 64 lowercase hex digits")
            if values["size"] and not values["size"].isdigit():
                raise ValueError(f"{where}: size {values['size']!r} is not a number of bytes")
            values["size"] = int(values["size"]) if values["size"] else None
            if any(r.dataset == values["dataset"] and r.file == values["file"] for r in rows):
                raise ValueError(f"{where}: {values['dataset']} lists {values['file']!r} twice")
            rows.append(Source(**values))
    if header is None:
        raise ValueError(f"{path}: no header line")
    return rows


def read_mirror(environ=None):
    """{original URL or Drive ID: replacement URL} from the file named by LTPL_DOWNLOAD_MIRROR."""
    environ = os.environ if environ is None else environ
    path = environ.get(MIRROR_ENV, "")
    if not path:
        return {}
    mirror = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or not parts[1].strip():
                raise ValueError(f"{path}:{lineno} ({MIRROR_ENV}): expected 'ORIGINAL<TAB>URL'")
            mirror[parts[0].strip()] = parts[1].strip()
    return mirror


def by_dataset(sources):
    out = {}
    for src in sources:
        out.setdefault(src.dataset, []).append(src)
    return out


@dataclass(frozen=True)
class DatasetInfo:
    name: str           # config name, e.g. caltech101
    registered: str     # DATASET.NAME, e.g. Caltech101
    folder: str         # dataset folder under $DATA (datasets/<name>.py: dataset_dir)


def dataset_info(name):
    """Registered name (configs/datasets/<name>.yaml) and folder (the dataset class) of a config name."""
    from engine.config import load_yaml

    import datasets  # noqa: F401  (registers the datasets)
    from engine.registry import DATASET_REGISTRY

    cfg_path = REPO / "configs" / "datasets" / f"{name}.yaml"
    if not cfg_path.is_file():
        raise PrepareError(f"no dataset config {cfg_path.relative_to(REPO)} for {name!r}")
    registered = ((load_yaml(cfg_path, "dataset config") or {}).get("DATASET") or {}).get("NAME")
    if not registered:
        raise PrepareError(f"dataset config {cfg_path} sets no DATASET.NAME")
    return DatasetInfo(name, registered, DATASET_REGISTRY.get(registered).dataset_dir)


# --------------------------------------------------------------------------------------------------
# small file helpers

def human(n):
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def file_digest(path, progress=False):
    """(size, sha256 hex) of a file (with a progress bar for large files when ``progress``)."""
    from tqdm import tqdm

    h, size, total = hashlib.sha256(), 0, os.path.getsize(path)
    with open(path, "rb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=f"sha256 {os.path.basename(path)}",
                                     disable=not progress or total < (64 << 20)) as bar:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
            bar.update(len(block))
    return size, h.hexdigest()


def same_content(a, b):
    return os.path.getsize(a) == os.path.getsize(b) and file_digest(a)[1] == file_digest(b)[1]


def load_state(folder):
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return {"files": {}}
    try:
        state = json.loads(path.read_text())
    except ValueError as err:
        raise PrepareError(f"{path} is not valid JSON ({err}); delete it to rebuild it") from None
    state.setdefault("files", {})
    return state


def save_state(folder, state):
    from engine.checkpoint import atomic_write_json

    os.makedirs(folder, exist_ok=True)
    atomic_write_json(state, str(Path(folder) / STATE_FILE))


def partial_files(target):
    """gdown's partial downloads of ``target``: ``<name>`` + 8 random characters + ``.part``."""
    folder, name = os.path.split(target)
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, f) for f in os.listdir(folder)
            if f.startswith(name) and f.endswith(".part") and len(f) == len(name) + 8 + len(".part")]


@contextlib.contextmanager
def root_lock(root):
    """Hold an exclusive ``fcntl`` lock on ``<root>/.prepare_data.lock`` while preparing ``root``; a second
    run on the same root (which would share the partial downloads and extraction folders) is refused with a
    one-line ``PrepareError`` naming the lock file and the holder's process id. The file is removed on release
    (a run that locked a file already unlinked by its previous holder retries on the new one)."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise PrepareError(f"another prepare_data run (process {holder}) is preparing {root} (it holds {path}); "
                               "wait for it to finish, then rerun") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)  # releases the lock


# --------------------------------------------------------------------------------------------------
# download

def _space_guard(folder):
    """gdown progress callback: stop early when the remaining bytes do not fit on the disk."""
    checked = []

    def progress(done, total):
        if checked or total is None:
            return
        checked.append(True)
        free = shutil.disk_usage(folder).free
        if total - done > free:
            raise OSError(errno.ENOSPC, f"not enough free space: {human(total - done)} still to download, "
                                        f"{human(free)} free on {folder}")
    return progress


def download(src, target, mirror, retries=3, quiet=False):
    """Fetch ``src`` to ``target`` (absent) with gdown; return the URL used. Partial data stays in
    ``<target>XXXXXXXX.part`` (resumed next time); ``target`` only appears once the transfer is complete."""
    import gdown
    import requests
    from gdown.exceptions import DownloadError, FileURLRetrievalError

    url = mirror.get(src.url) or (mirror.get(src.drive_id) if src.drive_id else None)
    if url:
        kwargs, shown = {"url": url}, url
    elif src.drive_id:
        kwargs, shown = {"id": src.drive_id}, src.url
    else:
        kwargs, shown = {"url": src.url}, src.url
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    common = dict(output=target, quiet=quiet, use_cookies=False, retries=retries, timeout=TIMEOUT,
                  progress=_space_guard(folder))
    what = f"{src.dataset}: downloading {src.file} from {shown}"
    try:
        try:
            gdown.download(resume=True, **kwargs, **common)
        except DownloadError as err:
            if "did not honor the requested byte range" not in str(err):
                raise
            print(f"{src.dataset}: {shown} does not resume partial downloads; starting {src.file} again",
                  file=sys.stderr)
            for part in partial_files(target):
                os.remove(part)
            gdown.download(resume=False, **kwargs, **common)
    except FileURLRetrievalError as err:
        raise PrepareError(f"{what} failed: Google Drive did not hand out the file (download quota exceeded "
                           f"or not shared publicly; try again later or fetch it in a browser): "
                           f"{' '.join(str(err).split())[:300]}") from None
    except (DownloadError, requests.RequestException, OSError) as err:
        raise PrepareError(f"{what} failed: {' '.join(str(err).split())[:300]}"
                           + (" (partial data kept; rerun to resume)" if partial_files(target) else "")) from None
    if not os.path.isfile(target):
        raise PrepareError(f"{what} failed: nothing was written")
    with open(target, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith(HTML_START):
        os.remove(target)
        raise PrepareError(f"{what}: got an HTML page instead of the file (a Google Drive quota or confirmation "
                           f"page, or an error page); deleted it. Try again later, or download it in a "
                           f"browser and place it at $DATA/{src.dest}")
    return shown


# --------------------------------------------------------------------------------------------------
# safe extraction

def _check_name(name, archive):
    posix = name.replace("\\", "/")
    parts = PurePosixPath(posix).parts
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix) or ".." in parts:
        raise PrepareError(f"refusing archive {archive}: member {name!r} would land outside the destination")
    return PurePosixPath(*[p for p in parts if p not in ("", ".")])


def list_members(path):
    """[(member, relative path, size, is_dir)] of a tar or zip archive, every member checked first."""
    archive = os.path.basename(path)
    out = []
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                rel = _check_name(info.filename, archive)
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise PrepareError(f"refusing archive {archive}: member {info.filename!r} is a link")
                out.append((info, rel, info.file_size, info.is_dir()))
        return out
    with tarfile.open(path, "r:*") as tf:
        members = tf.getmembers()
        # tarfile stops quietly at a damaged header: read the (decompressed) stream to its end, which
        # raises on a truncated or damaged gzip/bz2/xz layer, and check that every member's data is there
        while tf.fileobj.read(1 << 20):
            pass
        end = tf.fileobj.tell()
        for m in members:
            if m.isfile() and m.offset_data + m.size > end:
                raise tarfile.ReadError(f"member {m.name!r} is cut off (archive truncated)")
        for m in members:
            rel = _check_name(m.name, archive)
            if m.issym() or m.islnk():
                raise PrepareError(f"refusing archive {archive}: member {m.name!r} is a link (to {m.linkname!r})")
            if not (m.isfile() or m.isdir()):
                raise PrepareError(f"refusing archive {archive}: member {m.name!r} is not a file or folder")
            out.append((m, rel, m.size, m.isdir()))
    return out


def _extract_members(path, members, tmp, quiet):
    from tqdm import tqdm

    bar = tqdm(total=len(members), unit="file", desc=f"extract {os.path.basename(path)}", disable=quiet)
    with bar:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info, rel, _, _ in members:
                    zf.extract(info, tmp)
                    bar.update()
            return
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        with tarfile.open(path, "r:*") as tf:
            for m, rel, _, _ in members:
                tf.extract(m, tmp, **extra)
                bar.update()


def _conflicts(src_dir, dst_dir):
    """Paths under ``dst_dir`` that moving ``src_dir`` in would overwrite (identical files are fine)."""
    found = []
    for entry in os.scandir(src_dir):
        target = os.path.join(dst_dir, entry.name)
        if not os.path.lexists(target):
            continue
        if entry.is_dir(follow_symlinks=False) and os.path.isdir(target) and not os.path.islink(target):
            found += _conflicts(entry.path, target)
        elif not (entry.is_file(follow_symlinks=False) and os.path.isfile(target)
                  and same_content(entry.path, target)):
            found.append(target)
    return found


def _move_in(src_dir, dst_dir):
    for entry in os.scandir(src_dir):
        target = os.path.join(dst_dir, entry.name)
        if not os.path.lexists(target):
            os.rename(entry.path, target)
        elif entry.is_dir(follow_symlinks=False):
            _move_in(entry.path, target)


def safe_extract(archive, dest, src, quiet=False):
    """Extract ``archive`` (the ``src.strip`` folder of it) into ``dest`` without escaping it or overwriting
    anything; the archive is checked completely before anything is written."""
    name = os.path.basename(archive)
    where = f"{src.dataset}: archive {src.file} (from {src.url})"
    try:
        members = list_members(archive)
        strip = PurePosixPath(src.strip) if src.strip else None
        if strip is not None:
            members = [m for m in members if m[1] == strip or strip in m[1].parents]
            if not members:
                raise PrepareError(f"{where} holds no folder {src.strip}/")
        os.makedirs(dest, exist_ok=True)
        need = sum(m[2] for m in members)
        free = shutil.disk_usage(dest).free
        if need > free:
            raise OSError(errno.ENOSPC, f"not enough free space to extract {name}: {human(need)} needed, "
                                        f"{human(free)} free on {dest}")
        tmp = tempfile.mkdtemp(prefix=f"{EXTRACT_PREFIX}{name}-", dir=dest)
        try:
            _extract_members(archive, members, tmp, quiet)
            root = os.path.join(tmp, *strip.parts) if strip is not None else tmp
            if src.provides and not os.path.exists(os.path.join(root, src.provides)):
                raise PrepareError(f"{where} does not contain {src.provides} (expected "
                                   f"{(src.strip + '/') if src.strip else ''}{src.provides})")
            clash = _conflicts(root, dest)
            if clash:
                raise PrepareError(f"{where}: extracting would overwrite {len(clash)} existing file(s), e.g. "
                                   f"{clash[0]}; move them away and rerun")
            _move_in(root, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise PrepareError(f"{where} is corrupt ({' '.join(str(err).split()) or type(err).__name__})") from None
    except PrepareError:
        raise
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise PrepareError(f"{where}: {err.strerror or err}") from None
        # gzip's "not a gzipped file" and friends are OSErrors too
        raise PrepareError(f"{where} could not be extracted: {' '.join(str(err).split())}") from None


def remove_stale_extractions(folder):
    if os.path.isdir(folder):
        for entry in os.scandir(folder):
            if entry.name.startswith(EXTRACT_PREFIX) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)


# --------------------------------------------------------------------------------------------------
# one dataset

def expected_tree(folder, doc=DATASETS_DOC):
    """The lines of docs/DATASETS.md's expected tree that describe ``$DATA/<folder>/``."""
    lines, inside = [], False
    if not Path(doc).is_file():
        return lines
    for line in Path(doc).read_text(encoding="utf-8").splitlines():
        top = re.match(r"^[├└]── (\S+?)/?(\s|$)", line)
        if top:
            inside = top.group(1) == folder
        elif not line.startswith(("│", " ")):
            inside = False
        if inside:
            lines.append(line)
    return lines


class Preparer:
    def __init__(self, root, sources, mirror=None, retries=3, quiet=False, out=None):
        self.root = os.path.abspath(os.path.expanduser(root))
        self.sources = by_dataset(sources)
        self.mirror = read_mirror() if mirror is None else mirror
        self.retries = retries
        self.quiet = quiet
        self.out = out

    def say(self, text):
        print(text, file=self.out or sys.stdout, flush=True)

    def path(self, rel):
        return os.path.join(self.root, *PurePosixPath(rel).parts)

    def expected_sha(self, src, state):
        """(sha256, where it comes from) or ("", "")."""
        if src.sha256:
            return src.sha256, "repo"
        rec = state["files"].get(src.key, {})
        return rec.get("sha256", ""), rec.get("sha256_source", "")

    def verify(self, src, path, state, origin, record_as="recorded on first download"):
        """Size and SHA-256 of ``path`` checked against the table / the recorded value; returns the record."""
        size, sha = file_digest(path, progress=not self.quiet)
        want, source = self.expected_sha(src, state)
        if want and sha != want:
            label = "shipped in configs/data_sources.tsv" if source == "repo" else f"recorded in {STATE_FILE}"
            raise PrepareError(f"{src.dataset}: {src.file} (from {src.url}) has SHA-256 {sha[:16]}..., expected "
                               f"{want[:16]}... ({label}); {origin}")
        if src.size is not None and size != src.size:
            raise PrepareError(f"{src.dataset}: {src.file} (from {src.url}) has {size} bytes, expected "
                               f"{src.size}; {origin}")
        if not want:
            source = record_as
            self.say(f"{src.dataset}: no SHA-256 shipped for {src.file}; recorded {sha} in {STATE_FILE} "
                     "(later runs check the file against it)")
        return {"url": src.url, "size": size, "sha256": sha, "sha256_source": source}

    def row_in_place(self, src, state):
        """Whether a row's file (copy) or archive contents (extract) are there, without reading them."""
        if src.action == "copy":
            return os.path.isfile(self.path(src.dest))
        done = state["files"].get(src.key, {}).get("done")
        if done in ("extracted", "extracting"):
            return done == "extracted"
        return bool(src.provides) and os.path.exists(os.path.join(self.path(src.dest), src.provides))

    def is_in_place(self, src, state):
        """True when the row needs no download (checking a copied file's checksum on the way)."""
        if src.action == "copy":
            path = self.path(src.dest)
            if not os.path.isfile(path):
                return False
            origin = ("it is the file already in place: delete it to download it again")
            if src.key not in state["files"] or not state["files"][src.key].get("sha256"):
                rec = self.verify(src, path, state, origin, record_as="recorded from the file found in place")
                state["files"][src.key] = dict(rec, done="found in place")
            else:
                self.verify(src, path, state, origin)
            return True
        rec = state["files"].get(src.key, {})
        if rec.get("done") in ("extracted", "extracting"):  # "extracting": interrupted, extract again
            return rec["done"] == "extracted"
        if src.provides and os.path.exists(os.path.join(self.path(src.dest), src.provides)):
            state["files"][src.key] = {"url": src.url, "done": "found in place"}
            return True
        return False

    def fetch(self, src, state, folder):
        staging = os.path.join(self.root, DOWNLOAD_DIR, src.dataset)
        target = os.path.join(staging, src.file)
        try:
            if not os.path.isfile(target):
                download(src, target, self.mirror, self.retries, self.quiet)
            try:
                rec = self.verify(src, target, state, "the download was deleted (nothing was installed)")
            except PrepareError:
                os.remove(target)
                raise
            if src.action == "copy":
                dest = self.path(src.dest)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.replace(target, dest)
                rec["done"] = "copied"
            else:
                state["files"][src.key] = dict(rec, done="extracting")  # an interrupted move-in is redone
                save_state(folder, state)
                try:
                    safe_extract(target, self.path(src.dest), src, self.quiet)
                except Exception as err:
                    # whatever failed, the archive is not recorded as verified: its checksum (learned from this
                    # download) must not vouch for it on the next run, which re-verifies or redownloads it
                    state["files"].pop(src.key, None)
                    save_state(folder, state)
                    bad_archive = ("corrupt", "refusing", "does not contain", "holds no folder")
                    if isinstance(err, PrepareError) and any(word in str(err) for word in bad_archive):
                        os.remove(target)
                        raise PrepareError(f"{err}; deleted the download (rerun to fetch it again)") from None
                    raise
                rec["done"] = "extracted"
            rec["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            state["files"][src.key] = rec
            save_state(folder, state)
            if os.path.exists(target):  # the archive, once its contents are in place
                os.remove(target)
        finally:
            for d in (staging, os.path.dirname(staging)):
                if os.path.isdir(d) and not os.listdir(d):
                    os.rmdir(d)

    def manual_missing(self, rows):
        return [s for s in rows if s.action == "manual"
                and not (os.path.isdir(self.path(s.dest)) and os.listdir(self.path(s.dest)))]

    def prepare(self, name):
        """Prepare one dataset; return its verdict: "ready", "manual" or "failed"."""
        rows = self.sources[name]
        info = dataset_info(name)
        folder = os.path.join(self.root, info.folder)
        state = load_state(folder)
        remove_stale_extractions(folder)
        for src in rows:
            if src.action != "manual":
                remove_stale_extractions(self.path(src.dest))
        fetched, in_place = 0, 0
        for src in rows:
            if src.action == "manual":
                continue
            if self.is_in_place(src, state):
                in_place += 1
                continue
            self.fetch(src, state, folder)
            fetched += 1
        if fetched == 0:
            self.say(f"{name}: nothing to download ({in_place} file(s) already in place)")
        missing = self.manual_missing(rows)
        if missing:
            self.print_manual(info, missing)
            verdict = "manual"
        else:
            verdict = self.check(info)
        state.update(dataset=name, registered=info.registered, check=verdict,
                     checked=time.strftime("%Y-%m-%dT%H:%M:%S"))
        if os.path.isdir(folder):
            save_state(folder, state)
        return verdict

    def print_manual(self, info, missing):
        self.say(f"{info.name}: manual steps needed (these files cannot be downloaded by this tool):")
        for i, src in enumerate(missing, 1):
            self.say(f"  {i}. {src.note or 'get ' + src.file} -- from {src.url}; "
                     f"expected at {os.path.join(self.root, *PurePosixPath(src.dest).parts)}")
        tree = expected_tree(info.folder)
        if tree:
            self.say(f"  expected tree under {self.root}:")
            for line in tree:
                self.say(f"    {line}")
        self.say("  then run this command again to verify.")

    def check(self, info):
        """tools.check_data's check; returns "ready" or "failed" (its report is printed when it fails)."""
        import io

        from tools.check_data import check

        buf = io.StringIO()
        status = check(self.root, info.registered, out=buf)
        if status != 0:
            for line in buf.getvalue().splitlines():
                self.say(f"  {line}")
        return "ready" if status == 0 else "failed"

    def state_of(self, name):
        """("ready" | "partial" | "missing" | "manual", known bytes, files of unknown size) for --list."""
        import io

        from tools.check_data import check

        rows = self.sources[name]
        info = dataset_info(name)
        folder = os.path.join(self.root, info.folder)
        state = load_state(folder)
        known, unknown = 0, 0
        for src in rows:
            if src.action == "manual":
                continue
            size = src.size or state["files"].get(src.key, {}).get("size")
            if size:
                known += size
            else:
                unknown += 1
        staging = os.path.join(self.root, DOWNLOAD_DIR, name)
        present = os.path.isdir(folder) or os.path.isdir(staging)
        files_in_place = all(self.row_in_place(s, state) for s in rows if s.action != "manual")
        if self.manual_missing(rows):
            status = "manual"
        elif files_in_place and (state.get("check") == "ready"
                                 or check(self.root, info.registered, out=io.StringIO()) == 0):
            status = "ready"
        else:
            status = "partial" if present else "missing"
        return status, known, unknown


# --------------------------------------------------------------------------------------------------
# CLIP weights

def prepare_weights(name, mirror=None, out=None):
    """Download the OpenAI checkpoint ``name`` with the clip package's downloader (its SHA-256 check) into
    the first folder engine.clip_loader searches; return its path (or where it already is)."""
    import urllib.error

    from engine.clip_loader import default_weight_dirs, resolve_weights_path
    from engine.compat import import_clip

    out = out or sys.stdout
    clip = import_clip()
    models = clip.clip._MODELS
    if name not in models:
        raise PrepareError(f"unknown CLIP model {name!r}; known: {', '.join(models)}")
    try:
        path = resolve_weights_path(name)
        print(f"{name}: already at {path}; nothing to download", file=out)
        return str(path)
    except FileNotFoundError:
        pass
    mirror = read_mirror() if mirror is None else mirror
    url = mirror.get(models[name], models[name])
    filename = os.path.basename(models[name])
    if os.path.basename(url) != filename:
        raise PrepareError(f"{MIRROR_ENV}: the replacement for {models[name]} must end in /<sha256>/{filename}")
    folder = default_weight_dirs()[0]
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=folder)
    try:
        got = clip.clip._download(url, tmp)
        final = os.path.join(folder, filename)
        os.replace(got, final)
    except (urllib.error.URLError, OSError, RuntimeError) as err:
        raise PrepareError(f"CLIP weights {name}: downloading {filename} from {url} failed: "
                           f"{' '.join(str(err).split())}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{name}: downloaded to {final} (SHA-256 checked by the clip downloader)", file=out)
    return final


# --------------------------------------------------------------------------------------------------
# command line

def list_datasets(prep, names, out):
    total_known, total_unknown = 0, 0
    print(f"datasets under {prep.root}:", file=out)
    for name in names:
        status, known, unknown = prep.state_of(name)
        total_known += known
        total_unknown += unknown
        size = human(known) if known else "-"
        extra = f" + {unknown} file(s) of unknown size" if unknown else ""
        manual = " (has manual steps)" if any(s.action == "manual" for s in prep.sources[name]) else ""
        print(f"  {name:16s} {status:8s} download {size}{extra}{manual}", file=out)
    extra = f" + {total_unknown} file(s) of unknown size" if total_unknown else ""
    print(f"total download size known: {human(total_known)}{extra}", file=out)
    try:
        from engine.clip_loader import default_weight_dirs, resolve_weights_path
        from engine.compat import import_clip

        print(f"CLIP weights (searched in {', '.join(str(d) for d in default_weight_dirs())}):", file=out)
        for model in import_clip().clip._MODELS:
            try:
                where = str(resolve_weights_path(model))
            except FileNotFoundError:
                where = "not downloaded"
            print(f"  {model:16s} {where}", file=out)
    except ImportError as err:
        print(f"CLIP weights: cannot import clip ({err})", file=out)


def default_root():
    return os.environ.get("DATA") or str(REPO / "data")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="bash scripts/prepare_data.sh",
        description="Download, verify and unpack datasets (and CLIP weights) under $DATA.",
        epilog=f"Mirrors / tests: {MIRROR_ENV}=FILE with lines 'ORIGINAL<TAB>URL'. See docs/DATASETS.md.")
    parser.add_argument("datasets", nargs="*", metavar="DATASET",
                        help="dataset config names (configs/datasets/*.yaml), or 'all'")
    parser.add_argument("--root", default=default_root(),
                        help="the datasets folder $DATA (default: $DATA or <repo>/data)")
    parser.add_argument("--list", action="store_true", help="show every dataset's state and download size")
    parser.add_argument("--weights", action="append", default=[], metavar="MODEL",
                        help="also download these OpenAI CLIP checkpoints, e.g. ViT-B/16 (repeatable)")
    parser.add_argument("--sources", default=str(SOURCES_FILE), help="the sources table (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=3,
                        help="extra attempts per file after a network failure, resuming the transfer (default 3)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.retries < 0:
        raise ValueError(f"--retries must be >= 0, got {args.retries}")
    sources = read_sources(args.sources)
    known = list(by_dataset(sources))
    names = known if args.datasets == ["all"] else args.datasets
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PrepareError(f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(known)} or 'all'")
    if not (names or args.list or args.weights):
        parser.error("name at least one DATASET (or 'all'), --list or --weights MODEL")
    prep = Preparer(args.root, sources, retries=args.retries, quiet=args.quiet)
    if args.list:
        list_datasets(prep, names or known, sys.stdout)
        return 0
    if not names:  # --weights only: nothing is written under the root
        return _prepare_all(prep, names, args.weights)
    with root_lock(prep.root):
        return _prepare_all(prep, names, args.weights)


def _prepare_all(prep, names, weights):
    for model in weights:
        prepare_weights(model, prep.mirror)
    verdicts, errors = {}, {}
    for name in names:  # one dataset's failure does not stop the others
        try:
            verdicts[name] = prep.prepare(name)
        except PrepareError as err:
            verdicts[name], errors[name] = "error", err
    for name, verdict in verdicts.items():
        text = {"ready": "ready (tools.check_data: OK)", "manual": "waiting for the manual steps above",
                "failed": "FAILED: tools.check_data found problems (see above)",
                "error": f"ERROR: {errors.get(name)}"}[verdict]
        print(f"[{name}] {text}")
    if len(errors) == 1:
        raise next(iter(errors.values()))
    if errors:
        raise PrepareError(f"{len(errors)} datasets could not be prepared: {', '.join(errors)} (see the ERROR "
                           "lines above); rerun to resume")
    return 0 if all(v == "ready" for v in verdicts.values()) else 1


if __name__ == "__main__":
    run_cli(main)
