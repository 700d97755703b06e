"""tools.prepare_data against a local HTTP server on 127.0.0.1 (no internet): generated archives and split
files in the real layout of FGVC-Aircraft (with its data/ move), Oxford Flowers, Caltech101 and ImageNet's
class names, served to the real sources table through the LTPL_DOWNLOAD_MIRROR override."""
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.helpers_data import REAL_SPLIT, require_shared
from tests.helpers_run import REPO, TINY
from tools import prepare_data as pd
from tools.check_data import check

SHARED_SOURCES = REPO.parent / "shared" / "data" / "dataset_sources.tsv"
FLOWERS_NAMES = ["pink primrose", "hard-leaved pocket orchid", "canterbury bells"]
VARIANTS = ["707-320", "727-200", "737-200", "A300B4"]


# --------------------------------------------------------------------------------------------------
# a local server: path -> bytes, with modes that cut, stall or refuse ranges; every request is logged

class LocalServer:
    def __init__(self):
        self.files, self.modes, self.log = {}, {}, []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10

            def log_message(self, *args):
                pass

            def do_GET(self):
                path = self.path.lstrip("/")
                rng = self.headers.get("Range")
                outer.log.append((path, rng))
                if path not in outer.files:
                    self.send_error(404, "Not Found")
                    return
                data, mode = outer.files[path], outer.modes.get(path, set())
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", rng or "")
                if m and "no_range" not in mode:
                    start = int(m.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                ctype = "text/html; charset=utf-8" if data.lstrip().lower().startswith(b"<!doctype html") \
                    else "application/octet-stream"
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                body = data[start:]
                if "cut_once" in mode and start == 0:  # the connection breaks half-way, once
                    mode.discard("cut_once")
                    self.wfile.write(body[: len(body) // 2])
                    return
                if "stall" in mode and start == 0:  # half is sent, then the server waits (the client is killed)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    outer.release.wait(10)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{path}"

    def serve(self, path, data, *modes):
        self.files[path] = data
        self.modes[path] = set(modes)
        return self.url(path)

    def downloads(self):
        return [p for p, _ in self.log]

    def stop(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def server():
    srv = LocalServer()
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv(pd.MIRROR_ENV, raising=False)


def set_mirror(monkeypatch, tmp_path, mapping):
    path = tmp_path / "mirror.tsv"
    path.write_text("# original\treplacement\n" + "".join(f"{k}\t{v}\n" for k, v in mapping.items()))
    monkeypatch.setenv(pd.MIRROR_ENV, str(path))


def row(dataset, file):
    return next(s for s in pd.read_sources() if s.dataset == dataset and s.file == file)


def sha(data):
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------------
# generated files in the real layouts

def jpeg(i):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), ((40 * i) % 256, (90 * i) % 256, (150 * i) % 256)).save(buf, "JPEG")
    return buf.getvalue()


def tar_gz(entries, extra=()):
    """A .tar.gz of {name: bytes} plus raw TarInfo members ``extra`` [(TarInfo, bytes or None)]."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for info, data in extra:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def fgvc_archive():
    """fgvc-aircraft-2013b.tar.gz: data/{images, variants.txt, images_variant_*.txt} + files outside data/."""
    entries, lines = {"fgvc-aircraft-2013b/README.html": b"<p>readme</p>",
                      "fgvc-aircraft-2013b/evaluation.m": b"% not data"}, {"train": [], "val": [], "test": []}
    i = 0
    for variant in VARIANTS:
        for split, n in (("train", 3), ("val", 1), ("test", 2)):
            for _ in range(n):
                i += 1
                image_id = f"{1000000 + i}"
                entries[f"fgvc-aircraft-2013b/data/images/{image_id}.jpg"] = jpeg(i)
                lines[split].append(f"{image_id} {variant}")
    entries["fgvc-aircraft-2013b/data/variants.txt"] = ("\n".join(VARIANTS) + "\n").encode()
    for split, ls in lines.items():
        entries[f"fgvc-aircraft-2013b/data/images_variant_{split}.txt"] = ("\n".join(ls) + "\n").encode()
    return tar_gz(entries)


def flowers_files():
    images, split, i = {}, {"train": [], "val": [], "test": []}, 0
    for label, name in enumerate(FLOWERS_NAMES):
        for key, n in (("train", 2), ("val", 1), ("test", 1)):
            for _ in range(n):
                i += 1
                images[f"jpg/image_{i:05d}.jpg"] = jpeg(i)
                split[key].append([f"image_{i:05d}.jpg", label, name])
    return {"102flowers.tgz": tar_gz(images),
            "imagelabels.mat": b"MATLAB 5.0 MAT-file (generated for the test)" + bytes(range(256)),
            "cat_to_name.json": json.dumps({str(i + 1): n for i, n in enumerate(FLOWERS_NAMES)}).encode(),
            "split_zhou_OxfordFlowers.json": json.dumps(split).encode()}


def serve_flowers_and_fgvc(server):
    """Serve both datasets; return the mirror {table URL or Drive ID: local URL} and the served bytes."""
    served = dict(flowers_files(), **{"fgvc-aircraft-2013b.tar.gz": fgvc_archive()})
    mirror = {}
    for dataset in ("oxford_flowers", "fgvc_aircraft"):
        for src in pd.by_dataset(pd.read_sources())[dataset]:
            local = server.serve(f"{dataset}/{src.file}", served[src.file])
            mirror[src.drive_id or src.url] = local
    return mirror, served


def run(argv, capsys=None):
    rc = pd.main(argv)
    return rc, (capsys.readouterr() if capsys else None)


# --------------------------------------------------------------------------------------------------
# the sources table

def test_sources_table_matches_dataset_layout_and_shared_facts():
    import datasets  # noqa: F401
    from engine.registry import DATASET_REGISTRY

    sources = pd.read_sources()
    groups = pd.by_dataset(sources)
    configs = sorted(p.stem for p in (REPO / "configs/datasets").glob("*.yaml")
                     if p.stem != "synthetic_shapes" and not p.stem.startswith("world_"))  # generated here
    assert sorted(groups) == configs
    for name, rows in groups.items():
        info = pd.dataset_info(name)
        cls = DATASET_REGISTRY.get(info.registered)
        for src in rows:  # every destination lies inside the dataset folder the loader reads
            assert src.dest == info.folder or src.dest.startswith(info.folder + "/"), src
            assert src.drive_id or not src.url.startswith("https://drive.google.com"), src
        assert pd.expected_tree(info.folder), f"{info.folder}/ is not in docs/DATASETS.md's expected tree"
        if cls.split_file:  # the CoOp split file is fetched to exactly where the loader looks for it
            assert any(s.action == "copy" and s.dest == f"{info.folder}/{cls.split_file}" for s in rows), name
    caltech = row("caltech101", "split_zhou_Caltech101.json")
    require_shared(REAL_SPLIT, SHARED_SOURCES)
    assert caltech.sha256 == sha(REAL_SPLIT.read_bytes()) and caltech.size == REAL_SPLIT.stat().st_size
    ours = {(s.dataset, s.file): s.url for s in sources}
    for line in SHARED_SOURCES.read_text().splitlines():
        if line.startswith("#") or line.startswith("dataset\t"):
            continue
        dataset, file, url = line.split("\t")[:3]
        if (dataset, file) == ("food101", "food-101.tar.gz"):  # the shared table names the project page
            assert ours[(dataset, file)] == "http://data.vision.ee.ethz.ch/cvl/food-101.tar.gz"
            assert url in row(dataset, file).note
            continue
        assert ours[(dataset, file)] == url, (dataset, file)


def test_bad_tables_and_mirrors_are_refused(tmp_path):
    text = pd.SOURCES_FILE.read_text()
    bad = tmp_path / "bad.tsv"
    bad.write_text(text.replace("\tcopy\t", "\tdownload\t", 1))
    with pytest.raises(ValueError, match="action 'download'"):
        pd.read_sources(bad)
    bad.write_text(text.replace("caltech-101/split_zhou_Caltech101.json", "../split.json", 1))
    with pytest.raises(ValueError, match="must be a relative path"):
        pd.read_sources(bad)
    lines = text.splitlines(keepends=True)
    bad.write_text("".join(lines) + next(line for line in lines if line.startswith("dtd\t")))
    with pytest.raises(ValueError, match="dtd lists 'dtd-r1.0.1.tar.gz' twice"):
        pd.read_sources(bad)
    mirror = tmp_path / "m.tsv"
    mirror.write_text("only-one-column\n")
    with pytest.raises(ValueError, match="ORIGINAL<TAB>URL"):
        pd.read_mirror({pd.MIRROR_ENV: str(mirror)})


# --------------------------------------------------------------------------------------------------
# a full prepare: tree accepted by tools.check_data, records, second run, --list, one training epoch

@pytest.fixture(scope="module")
def prepared(server, tmp_path_factory):
    base = tmp_path_factory.mktemp("prepared")
    mirror, served = serve_flowers_and_fgvc(server)
    path = base / "mirror.tsv"
    path.write_text("".join(f"{k}\t{v}\n" for k, v in mirror.items()))
    old = os.environ.get(pd.MIRROR_ENV)
    os.environ[pd.MIRROR_ENV] = str(path)
    out = io.StringIO()
    try:
        prep = pd.Preparer(base / "data", pd.read_sources(), quiet=True, out=out)
        verdicts = {name: prep.prepare(name) for name in ("fgvc_aircraft", "oxford_flowers")}
    finally:
        os.environ.pop(pd.MIRROR_ENV)
        if old is not None:
            os.environ[pd.MIRROR_ENV] = old
    return dict(root=base / "data", verdicts=verdicts, served=served, mirror=path, output=out.getvalue(),
                requests=len(server.log))


def test_full_prepare_gives_a_tree_check_data_accepts(prepared):
    root = prepared["root"]
    assert prepared["verdicts"] == {"fgvc_aircraft": "ready", "oxford_flowers": "ready"}
    assert check(str(root), "FGVCAircraft", out=io.StringIO()) == 0
    assert check(str(root), "OxfordFlowers", out=io.StringIO()) == 0
    # FGVC post-step: the archive's data/ folder became fgvc_aircraft/, nothing else of the archive came along
    assert sorted(p.name for p in (root / "fgvc_aircraft").iterdir()) == [
        ".prepared.json", "images", "images_variant_test.txt", "images_variant_train.txt",
        "images_variant_val.txt", "variants.txt"]
    assert not (root / "fgvc-aircraft-2013b").exists() and not (root / "fgvc_aircraft" / "README.html").exists()
    assert sorted(p.name for p in root.iterdir()) == ["fgvc_aircraft", "oxford_flowers"]  # no .downloads left
    assert (root / "oxford_flowers" / "cat_to_name.json").read_bytes() == prepared["served"]["cat_to_name.json"]
    # every downloaded file recorded with its size and SHA-256
    for folder, files in (("fgvc_aircraft", ["fgvc-aircraft-2013b.tar.gz"]),
                          ("oxford_flowers", ["102flowers.tgz", "imagelabels.mat", "cat_to_name.json",
                                              "split_zhou_OxfordFlowers.json"])):
        state = json.loads((root / folder / ".prepared.json").read_text())
        assert state["check"] == "ready"
        for name in files:
            data = prepared["served"][name]
            assert state["files"][name]["size"] == len(data) and state["files"][name]["sha256"] == sha(data)
            assert state["files"][name]["sha256_source"] == "recorded on first download"
    assert f"recorded {sha(prepared['served']['split_zhou_OxfordFlowers.json'])}" in prepared["output"]


def test_second_run_downloads_nothing_and_says_so(prepared, server, monkeypatch, capsys):
    monkeypatch.setenv(pd.MIRROR_ENV, str(prepared["mirror"]))
    before = len(server.log)
    rc, cap = run(["--root", str(prepared["root"]), "fgvc_aircraft", "oxford_flowers", "--quiet"], capsys)
    assert rc == 0 and len(server.log) == before
    assert "fgvc_aircraft: nothing to download (1 file(s) already in place)" in cap.out
    assert "oxford_flowers: nothing to download (4 file(s) already in place)" in cap.out
    assert "[fgvc_aircraft] ready" in cap.out and "[oxford_flowers] ready" in cap.out


def test_list_reports_states(prepared, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(prepared["root"], root)
    (root / "caltech-101").mkdir()                              # started, nothing usable yet
    (root / "imagenet-sketch" / "images" / "n01440764").mkdir(parents=True)  # manual part placed,
    (root / "imagenet-sketch" / "images" / "n01440764" / "a.JPEG").write_bytes(jpeg(1))  # class names missing
    rc, cap = run(["--root", str(root), "--list"], capsys)
    assert rc == 0
    states = dict(re.findall(r"^  (\w+)\s+(ready|partial|missing|manual)\s", cap.out, re.M))
    assert states["fgvc_aircraft"] == "ready" and states["oxford_flowers"] == "ready"
    assert states["caltech101"] == "partial" and states["imagenet_sketch"] == "partial"
    assert states["dtd"] == "missing" and states["imagenet"] == "manual" and states["imagenet_a"] == "manual"
    assert len(states) == len(pd.by_dataset(pd.read_sources()))
    # sizes: the shipped size of the Caltech split, the recorded sizes of what was downloaded
    served = prepared["served"]
    flowers = sum(len(served[k]) for k in ("102flowers.tgz", "imagelabels.mat", "cat_to_name.json",
                                              "split_zhou_OxfordFlowers.json"))
    assert re.search(rf"oxford_flowers\s+ready\s+download {re.escape(pd.human(flowers))}\n", cap.out)
    assert re.search(rf"caltech101\s+partial\s+download {re.escape(pd.human(809185))} \+ 1 file", cap.out)
    # a file of a ready dataset disappears: no longer ready
    (root / "oxford_flowers" / "cat_to_name.json").unlink()
    assert pd.Preparer(root, pd.read_sources(), out=io.StringIO()).state_of("oxford_flowers")[0] == "partial"


def test_prepared_tree_trains_one_tiny_epoch(prepared, tmp_path):
    from tests import cli

    out = tmp_path / "run"
    rc = cli.main(["--root", str(prepared["root"]), "--seed", "1", "--trainer", "CoOp",
                     "--dataset-config-file", str(REPO / "configs/datasets/fgvc_aircraft.yaml"),
                     "--config-file", str(REPO / "configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml"),
                     "--output-dir", str(out), *TINY, "OPTIM.MAX_EPOCH", "1", "OPTIM.WARMUP_EPOCH", "0", "DATASET.NUM_SHOTS", "100",
                     "DATASET.SUBSAMPLE_CLASSES", "base", "DATASET.IMB_FACTOR", "1",
                     "DATALOADER.TRAIN_X.BATCH_SIZE", "4"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    text = json.dumps(results)
    assert '"num_classes": 2' in text and '"num_samples": 4' in text  # base half of 4 variants, 2 test images each
    assert (out / "log.txt").is_file()


# --------------------------------------------------------------------------------------------------
# downloads: killed, cut, resumed, restarted

def imagenet_names_row(server, tmp_path, monkeypatch, data, *modes, path="imagenet/classnames.txt"):
    local = server.serve(path, data, *modes)
    set_mirror(monkeypatch, tmp_path, {row("imagenet", "classnames.txt").drive_id: local})
    return tmp_path / "data"


def big_names(n=10000):  # > 2 of gdown's 512 KB chunks when cut in half
    return "".join(f"n{i:08d} class number {i} {'x' * 300}\n" for i in range(n)).encode()


def test_cut_download_keeps_no_final_file_and_the_rerun_resumes(server, tmp_path, monkeypatch):
    data = big_names()
    root = imagenet_names_row(server, tmp_path, monkeypatch, data, "cut_once", path="cut/classnames.txt")
    final = root / "imagenet" / "classnames.txt"
    with pytest.raises(pd.PrepareError) as err:
        run(["--root", str(root), "imagenet", "--retries", "0", "--quiet"])
    msg = str(err.value)
    assert "classnames.txt" in msg and server.url("cut/classnames.txt") in msg and "rerun to resume" in msg
    assert not final.exists()
    parts = list((root / ".downloads" / "imagenet").glob("classnames.txt*.part"))
    assert len(parts) == 1 and 0 < parts[0].stat().st_size < len(data)
    kept = parts[0].stat().st_size
    rc, _ = run(["--root", str(root), "imagenet", "--retries", "0", "--quiet"])
    assert rc == 1  # ImageNet still waits for the manual image folders
    assert final.read_bytes() == data and not (root / ".downloads").exists()
    assert ("cut/classnames.txt", f"bytes={kept}-") in server.log  # resumed, not restarted


def test_retries_resume_within_one_run(server, tmp_path, monkeypatch):
    data = big_names()
    root = imagenet_names_row(server, tmp_path, monkeypatch, data, "cut_once", path="retry/classnames.txt")
    run(["--root", str(root), "imagenet", "--retries", "1", "--quiet"])
    assert (root / "imagenet" / "classnames.txt").read_bytes() == data
    ranges = [r for p, r in server.log if p == "retry/classnames.txt"]
    assert ranges[0] is None and re.fullmatch(r"bytes=\d+-", ranges[-1] or "")


def test_server_without_ranges_restarts_cleanly(server, tmp_path, monkeypatch, capsys):
    data = big_names()
    root = imagenet_names_row(server, tmp_path, monkeypatch, data, "cut_once", "no_range",
                              path="norange/classnames.txt")
    with pytest.raises(pd.PrepareError):
        run(["--root", str(root), "imagenet", "--retries", "0", "--quiet"])
    run(["--root", str(root), "imagenet", "--retries", "0", "--quiet"])
    assert "does not resume partial downloads; starting classnames.txt again" in capsys.readouterr().err
    assert (root / "imagenet" / "classnames.txt").read_bytes() == data
    assert not (root / ".downloads").exists()


def test_killed_process_leaves_no_final_file_and_the_rerun_resumes(server, tmp_path, monkeypatch):
    data = big_names()
    root = imagenet_names_row(server, tmp_path, monkeypatch, data, "stall", path="kill/classnames.txt")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "tools.prepare_data", "--root", str(root), "imagenet",
                             "--quiet"], cwd=str(REPO), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    staging = root / ".downloads" / "imagenet"
    deadline = time.time() + 20
    try:
        while time.time() < deadline:  # wait until part of the file is on disk
            parts = list(staging.glob("classnames.txt*.part")) if staging.is_dir() else []
            if parts and parts[0].stat().st_size > 0:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the download did not start")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    server.modes["kill/classnames.txt"].discard("stall")
    server.release.set()
    assert not (root / "imagenet" / "classnames.txt").exists()
    kept = parts[0].stat().st_size
    run(["--root", str(root), "imagenet", "--quiet"])
    assert (root / "imagenet" / "classnames.txt").read_bytes() == data
    assert ("kill/classnames.txt", f"bytes={kept}-") in server.log


# --------------------------------------------------------------------------------------------------
# integrity and safety

def caltech_archive():
    return tar_gz({"101_ObjectCategories/accordion/image_0001.jpg": jpeg(1)})


def test_split_with_wrong_sha256_is_refused(server, tmp_path, monkeypatch):
    require_shared(REAL_SPLIT)
    real = REAL_SPLIT.read_bytes()
    src = row("caltech101", "split_zhou_Caltech101.json")
    mirror = {row("caltech101", "101_ObjectCategories.tar.gz").url: server.serve("c1/a.tar.gz", caltech_archive()),
              src.drive_id: server.serve("c1/split.json", real.replace(b"accordion", b"accordeon", 1))}
    set_mirror(monkeypatch, tmp_path, mirror)
    root = tmp_path / "data"
    with pytest.raises(pd.PrepareError) as err:
        run(["--root", str(root), "caltech101", "--quiet"])
    msg = str(err.value)
    assert "split_zhou_Caltech101.json" in msg and src.url in msg and "expected 43ab95e88d2f6a32" in msg
    assert "shipped in configs/data_sources.tsv" in msg and "\n" not in msg
    assert not (root / "caltech-101" / "split_zhou_Caltech101.json").exists()
    assert not (root / ".downloads").exists()
    # the genuine file passes the shipped checksum (the check then finds the images missing)
    server.serve("c1/split.json", real)
    rc, _ = run(["--root", str(root), "caltech101", "--quiet"])
    assert rc == 1 and (root / "caltech-101" / "split_zhou_Caltech101.json").read_bytes() == real
    state = json.loads((root / "caltech-101" / ".prepared.json").read_text())
    assert state["files"]["split_zhou_Caltech101.json"]["sha256_source"] == "repo" and state["check"] == "failed"


def test_changed_file_is_refused_against_the_recorded_sha256(server, tmp_path, monkeypatch):
    root = imagenet_names_row(server, tmp_path, monkeypatch, b"n01440764 tench\n", path="rec/classnames.txt")
    run(["--root", str(root), "imagenet", "--quiet"])
    (root / "imagenet" / "classnames.txt").write_text("n01440764 goldfish\n")
    with pytest.raises(pd.PrepareError, match=r"recorded in \.prepared\.json.*delete it to download it again"):
        run(["--root", str(root), "imagenet", "--quiet"])


def symlink(name, target):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = tarfile.SYMTYPE, target
    return info, None


def zip_bytes(entries):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "zip-parent"])
def test_archive_escaping_the_destination_is_refused(kind, server, tmp_path, monkeypatch):
    good = {"fgvc-aircraft-2013b/data/variants.txt": b"A300B4\n"}
    archive = {
        "parent": lambda: tar_gz(dict(good, **{"fgvc-aircraft-2013b/data/../../../evil.txt": b"x"})),
        "absolute": lambda: tar_gz(dict(good, **{str(tmp_path / "evil.txt"): b"x"})),
        "symlink": lambda: tar_gz(good, [symlink("fgvc-aircraft-2013b/data/images", str(tmp_path))]),
        "zip-parent": lambda: zip_bytes(dict(good, **{"../evil.txt": b"x"})),
    }[kind]()
    local = server.serve(f"escape/{kind}.tar.gz", archive)
    set_mirror(monkeypatch, tmp_path, {row("fgvc_aircraft", "fgvc-aircraft-2013b.tar.gz").url: local})
    root = tmp_path / "data"
    with pytest.raises(pd.PrepareError, match=r"refusing archive fgvc-aircraft-2013b\.tar\.gz.*deleted the download"):
        run(["--root", str(root), "fgvc_aircraft", "--quiet"])
    assert not (tmp_path / "evil.txt").exists() and not (root / "evil.txt").exists()
    assert not (root / "fgvc_aircraft" / "variants.txt").exists()  # refused before anything was written
    assert not (root / ".downloads").exists()


def test_corrupt_archive_is_refused_and_nothing_is_extracted(server, tmp_path, monkeypatch):
    good = fgvc_archive()
    local = server.serve("corrupt/a.tar.gz", good[: len(good) // 2] + b"\0" * 100)
    set_mirror(monkeypatch, tmp_path, {row("fgvc_aircraft", "fgvc-aircraft-2013b.tar.gz").url: local})
    root = tmp_path / "data"
    with pytest.raises(pd.PrepareError, match=r"fgvc-aircraft-2013b\.tar\.gz.*is corrupt.*rerun to fetch it again"):
        run(["--root", str(root), "fgvc_aircraft", "--quiet"])
    leftovers = [p.name for p in root.rglob("*") if p.is_file()]
    assert leftovers == [".prepared.json"] and not (root / "fgvc_aircraft" / "images").exists()
    state = json.loads((root / "fgvc_aircraft" / ".prepared.json").read_text())
    assert state["files"] == {}  # the corrupt file's checksum is not kept to judge the next download


def test_existing_files_are_never_overwritten(server, tmp_path, monkeypatch):
    local = server.serve("clash/a.tar.gz", fgvc_archive())
    set_mirror(monkeypatch, tmp_path, {row("fgvc_aircraft", "fgvc-aircraft-2013b.tar.gz").url: local})
    root = tmp_path / "data"
    (root / "fgvc_aircraft").mkdir(parents=True)
    (root / "fgvc_aircraft" / "variants.txt").write_text("mine\n")
    with pytest.raises(pd.PrepareError, match="would overwrite 1 existing file"):
        run(["--root", str(root), "fgvc_aircraft", "--quiet"])
    assert (root / "fgvc_aircraft" / "variants.txt").read_text() == "mine\n"
    assert not (root / "fgvc_aircraft" / "images").exists()
    # no temporary extraction folder left
    assert sorted(p.name for p in (root / "fgvc_aircraft").iterdir()) == [".prepared.json", "variants.txt"]


def test_interrupted_extraction_is_redone(server, tmp_path, monkeypatch):
    local = server.serve("interrupt/a.tar.gz", fgvc_archive())
    set_mirror(monkeypatch, tmp_path, {row("fgvc_aircraft", "fgvc-aircraft-2013b.tar.gz").url: local})
    root = tmp_path / "data"
    original = pd._move_in

    def killed_after_first_entry(src_dir, dst_dir):
        first = sorted(os.listdir(src_dir))[0]  # "images": what the table says the archive provides
        os.rename(os.path.join(src_dir, first), os.path.join(dst_dir, first))
        raise KeyboardInterrupt

    monkeypatch.setattr(pd, "_move_in", killed_after_first_entry)
    with pytest.raises(KeyboardInterrupt):
        run(["--root", str(root), "fgvc_aircraft", "--quiet"])
    assert (root / "fgvc_aircraft" / "images").is_dir() and not (root / "fgvc_aircraft" / "variants.txt").exists()
    monkeypatch.setattr(pd, "_move_in", original)
    requests = len(server.log)
    rc, _ = run(["--root", str(root), "fgvc_aircraft", "--quiet"])
    assert rc == 0 and len(server.log) == requests  # the kept archive is extracted again, not downloaded
    assert check(str(root), "FGVCAircraft", out=io.StringIO()) == 0
    assert not (root / ".downloads").exists() and not list((root / "fgvc_aircraft").glob(".extract-*"))


def test_one_failing_dataset_does_not_stop_the_others(server, tmp_path, monkeypatch, capsys):
    names = b"n01440764 tench\n"
    set_mirror(monkeypatch, tmp_path, {
        row("oxford_pets", "images.tar.gz").url: server.url("gone/images.tar.gz"),        # 404
        row("imagenet_a", "classnames.txt").drive_id: server.serve("ok/classnames.txt", names),
        row("dtd", "dtd-r1.0.1.tar.gz").url: server.url("gone/dtd.tar.gz")})              # 404
    root = tmp_path / "data"
    with pytest.raises(pd.PrepareError, match="2 datasets could not be prepared: oxford_pets, dtd"):
        run(["--root", str(root), "oxford_pets", "imagenet_a", "dtd", "--quiet"])
    out = capsys.readouterr().out
    assert re.search(r"\[oxford_pets\] ERROR: .*images\.tar\.gz from .*gone/images\.tar\.gz failed: 404", out)
    assert "[imagenet_a] waiting for the manual steps" in out and "[dtd] ERROR: " in out
    assert (root / "imagenet-adversarial" / "classnames.txt").read_bytes() == names


def test_drive_quota_page_is_refused(server, tmp_path, monkeypatch):
    page = (b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded</title></head><body>"
            b"Too many users have viewed or downloaded this file recently.</body></html>")
    root = imagenet_names_row(server, tmp_path, monkeypatch, page, path="quota/uc")
    with pytest.raises(pd.PrepareError, match=r"classnames\.txt from .*quota/uc: got an HTML page"):
        run(["--root", str(root), "imagenet", "--quiet"])
    assert not (root / "imagenet" / "classnames.txt").exists() and not (root / ".downloads").exists()


def test_http_error_and_no_network_are_one_line_errors(server, tmp_path, monkeypatch, capsys):
    from engine.cli import run_cli

    missing = server.url("nothing/here.txt")
    set_mirror(monkeypatch, tmp_path, {row("imagenet", "classnames.txt").drive_id: missing})
    with pytest.raises(SystemExit) as exit_:
        run_cli(pd.main, ["--root", str(tmp_path / "data"), "imagenet", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "404" in err and "classnames.txt" in err and missing in err
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/classnames.txt"
    set_mirror(monkeypatch, tmp_path, {row("imagenet", "classnames.txt").drive_id: closed})
    with pytest.raises(SystemExit) as exit_:
        run_cli(pd.main, ["--root", str(tmp_path / "data"), "imagenet", "--quiet", "--retries", "0"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and closed in err
    assert not (tmp_path / "data" / "imagenet" / "classnames.txt").exists()


def test_full_disk_is_reported_before_the_transfer(server, tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(pd.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    root = imagenet_names_row(server, tmp_path, monkeypatch, big_names(), path="disk/classnames.txt")
    with pytest.raises(pd.PrepareError, match=r"classnames\.txt from .*disk/classnames\.txt failed: .*not enough free"):
        run(["--root", str(root), "imagenet", "--quiet"])
    assert not (root / "imagenet" / "classnames.txt").exists()


# --------------------------------------------------------------------------------------------------
# manual datasets, options, the shell wrapper

def test_manual_dataset_prints_steps_then_verifies(server, tmp_path, monkeypatch, capsys):
    names = b"n01440764 tench\nn01443537 goldfish\n"
    root = imagenet_names_row(server, tmp_path, monkeypatch, names, path="manual/classnames.txt")
    rc, cap = run(["--root", str(root), "imagenet", "--quiet"], capsys)
    assert rc == 1 and "[imagenet] waiting for the manual steps" in cap.out
    assert "Downloading" not in cap.err and "%|" not in cap.err  # --quiet: no gdown messages or bars
    assert "imagenet: manual steps needed" in cap.out and "https://image-net.org/index.php" in cap.out
    assert "train/<wnid>/*.JPEG" in cap.out and "imagenet-sketch" not in cap.out  # its part of the tree only
    for split in ("train", "val"):  # the user places the images
        for wnid in ("n01440764", "n01443537"):
            (root / "imagenet" / "images" / split / wnid).mkdir(parents=True)
            (root / "imagenet" / "images" / split / wnid / "a.JPEG").write_bytes(jpeg(1))
    before = len(server.log)
    rc, cap = run(["--root", str(root), "imagenet", "--quiet"], capsys)
    assert rc == 0 and "[imagenet] ready" in cap.out and len(server.log) == before


def test_sources_option_reads_another_table_with_plain_urls(server, tmp_path, capsys):
    local = server.serve("plain/classnames.txt", b"n01440764 tench\n")
    table = tmp_path / "sources.tsv"
    table.write_text("\t".join(pd.COLUMNS) + "\n" + "\t".join(
        ["imagenetv2", "classnames.txt", local, "imagenetv2/classnames.txt", "copy", "-", "-",
         sha(b"n01440764 tench\n"), "-", "-"]) + "\n")
    rc, cap = run(["--root", str(tmp_path / "data"), "--sources", str(table), "imagenetv2"], capsys)
    assert (tmp_path / "data" / "imagenetv2" / "classnames.txt").read_text() == "n01440764 tench\n"
    assert "Downloading" in cap.err  # gdown's progress output without --quiet
    assert rc == 1  # the image folder is missing: tools.check_data fails
    assert "imagenetv2-matched-frequency-format-val" in cap.out


def test_root_defaults_to_the_DATA_variable(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATA", str(tmp_path / "from_env"))
    rc, cap = run(["--list", "dtd"], capsys)
    assert rc == 0 and f"datasets under {tmp_path / 'from_env'}:" in cap.out
    assert re.search(r"^  dtd\s+missing\s", cap.out, re.M) and "caltech101" not in cap.out


def test_shell_wrapper_and_unknown_dataset(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    res = subprocess.run(["bash", str(REPO / "scripts/prepare_data.sh"), "--root", str(tmp_path), "no_such_set"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "unknown dataset(s) no_such_set" in res.stderr and "caltech101" in res.stderr


# --------------------------------------------------------------------------------------------------
# CLIP weights through the clip package's own downloader

def test_weights_download_with_clip_downloader(server, tmp_path, monkeypatch, capsys):
    from engine.clip_loader import resolve_weights_path
    from engine.compat import import_clip

    weights = tmp_path / "weights"
    monkeypatch.setenv("CLIP_WEIGHTS_DIR", str(weights))
    url = import_clip().clip._MODELS["ViT-B/16"]
    data = os.urandom(50_000)
    # a checksum that does not match the URL: refused, nothing under the final name
    wrong = server.serve(f"{sha(b'other')}/ViT-B-16.pt", data)
    set_mirror(monkeypatch, tmp_path, {url: wrong})
    with pytest.raises(pd.PrepareError, match=r"ViT-B-16\.pt from .*SHA256 checksum does not not match"):
        run(["--weights", "ViT-B/16", "--root", str(tmp_path / "data")])
    assert list(weights.iterdir()) == []
    local = server.serve(f"{sha(data)}/ViT-B-16.pt", data)
    set_mirror(monkeypatch, tmp_path, {url: local})
    capsys.readouterr()
    rc, cap = run(["--weights", "ViT-B/16", "--root", str(tmp_path / "data")], capsys)
    assert rc == 0 and (weights / "ViT-B-16.pt").read_bytes() == data
    assert resolve_weights_path("ViT-B/16") == weights / "ViT-B-16.pt"  # where the loader looks first
    before = len(server.log)
    rc, cap = run(["--weights", "ViT-B/16", "--root", str(tmp_path / "data")], capsys)
    assert len(server.log) == before and f"already at {weights / 'ViT-B-16.pt'}" in cap.out
    with pytest.raises(pd.PrepareError, match="unknown CLIP model 'ViT-X'"):
        run(["--weights", "ViT-X"])


# --------------------------------------------------------------------------------------------------
# issue 18: one run per root; a failed extraction never leaves an archive recorded as verified

def test_a_second_concurrent_run_is_refused_with_one_line(server, tmp_path, monkeypatch, capsys):
    from engine.cli import call_cli

    local = server.serve("lock/a.tar.gz", fgvc_archive())
    set_mirror(monkeypatch, tmp_path, {row("fgvc_aircraft", "fgvc-aircraft-2013b.tar.gz").url: local})
    root = tmp_path / "data"
    requests = len(server.log)
    # the first run is another process holding the lock (fcntl locks are per open file, not per process)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from tools.prepare_data import root_lock\n"
        "with root_lock(sys.argv[2]):\n    print('locked', flush=True); time.sleep(30)"), str(REPO), str(root)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        monkeypatch.delenv("LTPL_DEBUG", raising=False)
        assert call_cli(pd.main, ["--root", str(root), "fgvc_aircraft", "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(root / pd.LOCK_FILE) in err[0] and str(holder.pid) in err[0], err
        assert len(server.log) == requests and not (root / ".downloads").exists()
    finally:
        holder.kill()
        holder.wait()
    rc, _ = run(["--root", str(root), "fgvc_aircraft", "--quiet"])  # the lock died with its holder
    assert rc == 0


def test_failed_extraction_leaves_nothing_recorded_as_verified(server, tmp_path, monkeypatch):
    local = server.serve("full/a.tar.gz", fgvc_archive())
    set_mirror(monkeypatch, tmp_path, {row("fgvc_aircraft", "fgvc-aircraft-2013b.tar.gz").url: local})
    root = tmp_path / "data"
    original = pd._move_in

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd, "_move_in", disk_full)
    with pytest.raises(pd.PrepareError, match="No space left"):
        run(["--root", str(root), "fgvc_aircraft", "--quiet"])
    state = json.loads((root / "fgvc_aircraft" / ".prepared.json").read_text())
    assert state["files"] == {}, state  # no checksum learned from this download vouches for it next time
    staged = root / ".downloads" / "fgvc_aircraft" / "fgvc-aircraft-2013b.tar.gz"
    assert staged.is_file()  # not the archive's fault: kept, and checked again by the next run
    monkeypatch.setattr(pd, "_move_in", original)
    verified = []
    check_file = pd.Preparer.verify
    monkeypatch.setattr(pd.Preparer, "verify",
                        lambda self, src, path, *a, **k: verified.append(path) or check_file(self, src, path, *a, **k))
    requests = len(server.log)
    rc, _ = run(["--root", str(root), "fgvc_aircraft", "--quiet"])
    assert rc == 0 and len(server.log) == requests and str(staged) in verified


def test_archive_without_what_it_provides_is_deleted_not_kept(server, tmp_path, monkeypatch):
    wrong = tar_gz({"fgvc-aircraft-2013b/data/other.txt": b"x"})
    local = server.serve("lacks/a.tar.gz", wrong)
    set_mirror(monkeypatch, tmp_path, {row("fgvc_aircraft", "fgvc-aircraft-2013b.tar.gz").url: local})
    root = tmp_path / "data"
    with pytest.raises(pd.PrepareError, match="does not contain.*deleted the download"):
        run(["--root", str(root), "fgvc_aircraft", "--quiet"])
    assert not (root / ".downloads").exists()
    state = json.loads((root / "fgvc_aircraft" / ".prepared.json").read_text())
    assert state["files"] == {}
    server.serve("lacks/a.tar.gz", fgvc_archive())  # the source is fixed: the rerun fetches it again
    requests = len(server.log)
    rc, _ = run(["--root", str(root), "fgvc_aircraft", "--quiet"])
    assert rc == 0 and len(server.log) > requests
