"""Bad data files and folders (issue #22, round 3): each is a clear Python exception naming the file or
entry, never a crash, a hang or a silently wrong answer; a user's files are never deleted or
overwritten, an output never replaces an input, and a failed write leaves no partial file.

Cases that could hang (a FIFO opened for reading blocks) run in a child process with a timeout."""
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import fgd.data
from fgd.data import CocoDetection, VocDetection, convert_voc, voc_to_coco
from fgd.data.yolo import coco_to_yolo

FGD_PATH = str(Path(fgd.data.__file__).resolve().parents[2])
CHILD_TIMEOUT = 60  # s: importing fgd in a child takes a few; a hang takes forever


def _bad_image_error():
    # (BadImageError is new: an older fgd lacks it, and its tests then fail rather than error)
    return getattr(fgd.data, "BadImageError", None) or type("NoBadImageError", (Exception,), {})


def _child(code: str, **env):
    """Runs ``code`` in a fresh Python; (returncode, stdout + stderr), or pytest.fail on a hang."""
    try:
        # from outside the source tree (`-c` puts the working directory first on sys.path, and the
        # tree's fgd/ has no compiled extension after `pip install .`), importing the fgd this test did
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=CHILD_TIMEOUT, cwd=tempfile.gettempdir(),
                              env={**os.environ, "PYTHONPATH": FGD_PATH, **env})
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung (no answer within {CHILD_TIMEOUT} s)")
    return done.returncode, done.stdout + done.stderr


# ---- small data sets ----------------------------------------------------------------------------

def _img(i, name, w=40, h=30):
    return {"id": i, "file_name": name, "width": w, "height": h}


def _ann(i, image_id, bbox, cat=1, **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "iscrowd": 0, **kw}


def _coco(folder: Path, images, anns, name="ann.json", cats=({"id": 1, "name": "x"},), files=None):
    """Writes the images ``files`` (default: every file_name; (name, (w, h))) and the json."""
    folder.mkdir(parents=True, exist_ok=True)
    for f, size in files if files is not None else [(im["file_name"], (im["width"], im["height"])) for im in images]:
        (folder / f).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (10, 200, 30)).save(folder / f)
    path = folder / name
    path.write_text(json.dumps({"images": list(images), "annotations": list(anns), "categories": list(cats)}))
    return str(path)


def _voc_xml(filename, boxes=((1, 1, 10, 10),), size=(40, 30)):
    objects = "".join(f"<object><name>x</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}"
                      f"</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for b in boxes)
    return (f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            f"</size>{objects}</annotation>")


def _voc_tree(root: Path, stems=("a", "b")):
    """root/Annotations/<stem>.xml, root/JPEGImages/<stem>.png, root/ImageSets/Main/train.txt."""
    for d in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / d).mkdir(parents=True, exist_ok=True)
    for k, stem in enumerate(stems):
        (root / "Annotations" / f"{stem}.xml").write_text(_voc_xml(f"{stem}.png", [(1 + k, 1, 10 + k, 10)]))
        Image.new("RGB", (40, 30)).save(root / "JPEGImages" / f"{stem}.png")
    (root / "ImageSets" / "Main" / "train.txt").write_text("".join(f"{s}\n" for s in stems))
    return root


def _perfect_per_file(ds):
    """What a perfect detector outputs for each image id: every box of the image *file* it reads."""
    by_file = {}
    for i in range(len(ds)):
        by_file.setdefault(os.path.realpath(ds._files[i]), []).append(ds[i][1])
    dets = []
    for targets in by_file.values():
        boxes = torch.cat([t["boxes"] for t in targets])
        labels = torch.cat([t["labels"] for t in targets])
        dets += [{"image_id": t["image_id"], "boxes": boxes, "scores": torch.ones(len(labels)), "labels": labels}
                 for t in targets]
    return dets


# ---- A: silently wrong answers ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["coco same name", "coco ./name", "voc two xml"])
def test_two_entries_naming_one_image_are_refused_or_scored_right(tmp_path, kind):
    """Two entries for one file became two images: perfect detections scored AP 0.752."""
    from fgd.evaluate import coco_map

    if kind == "voc two xml":
        for stem, box in (("a", (1, 1, 10, 10)), ("b", (20, 5, 30, 15))):
            (tmp_path / f"{stem}.xml").write_text(_voc_xml("a.png", [box]))
        Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
        make, names = (lambda: VocDetection(tmp_path, tmp_path)), ("a.xml", "b.xml")
    else:
        second = "a.png" if kind == "coco same name" else "./a.png"
        ann = _coco(tmp_path, [_img(1, "a.png"), _img(2, second)],
                    [_ann(1, 1, [0, 0, 10, 10]), _ann(2, 2, [20, 5, 10, 10])], files=[("a.png", (40, 30))])
        make, names = (lambda: CocoDetection(tmp_path, ann)), ("images[0] (id 1", "images[1] (id 2")
    try:
        ds = make()
    except ValueError as e:  # refused: naming both entries
        assert all(n in str(e) for n in names) and "\n" not in str(e), str(e)
        return
    m = coco_map(ds.coco, _perfect_per_file(ds), ds.label_to_cat_id)
    assert m["AP"] == pytest.approx(1.0), f"perfect detections score AP {m['AP']:.3f}"


@pytest.mark.parametrize("box", [[-20, 5, 30, 10], [25, 20, 40, 40]])
def test_a_box_partly_outside_the_image_is_scored_as_training_sees_it(tmp_path, box):
    """Training clipped the box to the image while COCOeval scored the unclipped one: a perfect
    (clipped) detection of a box mostly outside scored AP 0."""
    from fgd.evaluate import coco_map

    ann = _coco(tmp_path, [_img(1, "a.png")], [_ann(1, 1, box, area=box[2] * box[3])])
    ds = CocoDetection(tmp_path, ann)
    m = coco_map(ds.coco, _perfect_per_file(ds), ds.label_to_cat_id)
    assert m["AP"] == pytest.approx(1.0), f"perfect detections score AP {m['AP']:.3f}"


@pytest.mark.parametrize("names", [("a.png", "a.jpg"), ("x/a.png", "y/a.png")])
def test_export_refuses_two_images_sharing_one_label_file(tmp_path, names):
    """a.png and a.jpg got one labels/a.txt: one image's boxes were lost, exit 0."""
    train = _coco(tmp_path / "train", [_img(1, names[0]), _img(2, names[1])],
                  [_ann(1, 1, [0, 0, 10, 10]), _ann(2, 2, [20, 5, 10, 10])])
    val = _coco(tmp_path / "val", [_img(1, "v.png")], [])
    with pytest.raises(ValueError) as e:
        coco_to_yolo({"train": (train, tmp_path / "train"), "val": (val, tmp_path / "val")}, tmp_path / "out")
    assert all(n in str(e.value) for n in names) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("bad", [
    dict(bbox=[float("nan"), 1, 5, 5]),
    dict(bbox=[1, 1, float("nan"), 5]),
    dict(bbox=[1, 1, float("inf"), 5]),
    dict(bbox=[float("-inf"), 1, 5, 5]),
    dict(bbox=[1, 1, 5, 5], area=float("nan")),
    dict(bbox=[1, 1, -5, 5]),  # (already dropped: a guard)
], ids=["nan x", "nan w", "inf w", "-inf x", "nan area", "negative w"])
def test_export_drops_the_boxes_training_drops(tmp_path, bad):
    """NaN / inf boxes were written as full-width labels; the export keeps what training keeps."""
    anns = [_ann(1, 1, [10, 10, 20, 10]), {**_ann(2, 1, None), **bad}]
    train = _coco(tmp_path / "train", [_img(1, "a.png", 100, 50)], anns)
    val = _coco(tmp_path / "val", [_img(1, "v.png")], [])
    coco_to_yolo({"train": (train, tmp_path / "train"), "val": (val, tmp_path / "val")}, tmp_path / "out")
    lines = (tmp_path / "out" / "labels" / "train" / "a.txt").read_text().splitlines()
    assert lines == ["0 0.200000 0.300000 0.200000 0.200000"]
    assert len(CocoDetection(tmp_path / "train", train)[0][1]["boxes"]) == len(lines)  # as training sees it


@pytest.mark.parametrize("case", ["folder with #", "folder with ': '", "names with quotes, # and :"])
def test_data_yaml_reads_back_exactly(tmp_path, case):
    """data.yaml was written with Python repr names and unquoted paths: YAML read them back wrong."""
    names = ["dog", "cat"]
    out = tmp_path / "out"
    if case == "folder with #":
        out = tmp_path / "my #1 export"
    elif case == "folder with ': '":
        out = tmp_path / "set: v2"
    else:
        names = ['it\'s "quoted"', "a: b", "c #d", "back\\slash", "null", "- dash", "ünï"]
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    train = _coco(tmp_path / "train", [_img(1, "a.png")], [_ann(1, 1, [1, 1, 5, 5])], cats=cats)
    val = _coco(tmp_path / "val", [_img(1, "v.png")], [], cats=cats)
    path = coco_to_yolo({"train": (train, tmp_path / "train"), "val": (val, tmp_path / "val")}, out)
    assert yaml.safe_load(Path(path).read_text(encoding="utf-8")) == {
        "path": str(out.resolve()), "train": "images/train", "val": "images/val", "names": dict(enumerate(names))}


# ---- E: bad images: one line naming the file ---------------------------------------------------

def _truncated_png(path: Path, size=(40, 30)):
    import numpy as np

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the header (the size) reads, the pixels do not


def _assert_one_line(e, path, what):
    msg = str(e)
    assert isinstance(e, ValueError) and type(e).__name__ == "BadImageError", repr(e)
    assert msg.startswith(str(path)) and "\n" not in msg and what in msg and "rerun" in msg, msg


@pytest.mark.parametrize("reader, damage", [
    ("coco", "not an image"), ("coco", "truncated"), ("coco", "other size"),
    ("voc", "truncated"),
    ("export", "not an image"), ("export", "truncated"), ("export", "other size"),
])
def test_a_bad_image_is_one_line_naming_it(tmp_path, reader, damage):
    """The one policy: BadImageError (a ValueError), one line starting with the file's path."""
    BadImageError = _bad_image_error()
    image = tmp_path / "train" / "a.png"
    train = _coco(tmp_path / "train", [_img(1, "a.png")], [_ann(1, 1, [1, 1, 5, 5])])
    if damage == "not an image":
        image.write_bytes(b"not a png")
    elif damage == "truncated":
        _truncated_png(image)
    else:
        Image.new("RGB", (32, 30)).save(image)  # the json says 40x30
    what = {"not an image": "cannot be decoded", "truncated": "cannot be decoded", "other size": "is 32x30"}[damage]
    with pytest.raises(BadImageError) as e:
        if reader == "export":
            val = _coco(tmp_path / "val", [_img(1, "v.png")], [])
            coco_to_yolo({"train": (train, tmp_path / "train"), "val": (val, tmp_path / "val")}, tmp_path / "out")
        elif reader == "voc":
            (tmp_path / "train" / "a.xml").write_text(_voc_xml("a.png"))
            VocDetection(tmp_path / "train", tmp_path / "train")[0]
        else:
            CocoDetection(tmp_path / "train", train)[0]
    _assert_one_line(e.value, image, what)
    assert not (tmp_path / "out" / "images").exists()  # (the export: nothing half-written)


def test_a_bad_image_in_a_dataloader_worker_keeps_its_one_line(tmp_path):
    """A worker re-raises the error with its traceback as text: one_line() gives the line back."""
    BadImageError = _bad_image_error()
    train = _coco(tmp_path, [_img(1, "a.png")], [_ann(1, 1, [1, 1, 5, 5])])
    (tmp_path / "a.png").write_bytes(b"not a png")
    loader = torch.utils.data.DataLoader(CocoDetection(tmp_path, train), num_workers=1,
                                         collate_fn=fgd.data.collate_fn)
    with pytest.raises(BadImageError) as e:
        next(iter(loader))
    assert "\n" in str(e.value)  # (the worker's traceback)
    _assert_one_line(BadImageError(e.value.one_line()), tmp_path / "a.png", "cannot be decoded")


def test_a_fifo_as_an_image_is_one_line_not_a_hang(tmp_path):
    """A FIFO where an image should be: opening it blocked __getitem__ forever."""
    _coco(tmp_path, [_img(1, "a.png")], [_ann(1, 1, [1, 1, 5, 5])], files=[])
    os.mkfifo(tmp_path / "a.png")
    rc, out = _child(f"""
        from fgd.data import CocoDetection
        try:
            CocoDetection({str(tmp_path)!r}, {str(tmp_path / 'ann.json')!r})[0]
        except ValueError as e:
            print("RAISED", type(e).__name__, str(e))
    """)
    assert f"RAISED BadImageError {tmp_path / 'a.png'}: is not a regular file" in out, out


# ---- B: reads outside the input folders --------------------------------------------------------

@pytest.mark.parametrize("name", ["../secret.png", "ABS", "sub/../../secret.png", "", ".", "sub/.."])
def test_a_coco_file_name_outside_the_image_folder_is_refused(tmp_path, name):
    """../x.png or an absolute path was read (and copied into a YOLO export); "" read the folder."""
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "secret.png")
    name = str(tmp_path / "secret.png") if name == "ABS" else name
    ann = _coco(tmp_path, [_img(1, "ok.png"), _img(2, name)], [], files=[("images/ok.png", (40, 30))])
    for call in (lambda: CocoDetection(images, ann),
                 lambda: coco_to_yolo({"train": (ann, images), "val": (ann, images)}, tmp_path / "out")):
        with pytest.raises(ValueError, match=r"images\[1\] \(id 2\): file_name .* is not a file inside") as e:
            call()
        assert str(ann) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "images").exists()


@pytest.mark.parametrize("split_id", ["../outside", "ABS", "sub/../../outside"])
def test_a_voc_split_id_outside_the_annotations_folder_is_refused(tmp_path, split_id):
    """A split id ../x or /abs/x made convert_voc parse an XML outside Annotations/."""
    root = _voc_tree(tmp_path / "VOC")
    (root / "Annotations" / "sub").mkdir()
    (root / "outside.xml").write_text(_voc_xml("a.png"))  # beside Annotations/, valid: the old reader took it
    split_id = str(root / "outside") if split_id == "ABS" else split_id
    split = root / "ImageSets" / "Main" / "train.txt"
    split.write_text(f"a\n{split_id}\n")
    with pytest.raises(ValueError, match="name files outside") as e:
        voc_to_coco(root, root / "JPEGImages", split_file=split)
    assert str(split) in str(e.value) and split_id in str(e.value) and "\n" not in str(e.value)


# ---- C: bad files that ended in a raw traceback or a hang --------------------------------------

@pytest.mark.parametrize("content, why", [
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
    ('{"images": [{"id": ' + "7" * 5000 + '}], "annotations": [], "categories": []}', "digits"),
    ("folder", "is a folder"),  # (was one line already, saying "Is a directory")
], ids=["nested 100000 deep", "a 5000-digit integer", "a folder"])
def test_a_coco_json_python_cannot_read_is_one_line_naming_it(tmp_path, content, why):
    """A deeply nested json (RecursionError) or a 5000-digit integer (ValueError naming no file)."""
    path = tmp_path / "ann.json"
    if content == "folder":
        path.mkdir()
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=why) as e:
        CocoDetection(tmp_path, str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("what", ["coco json", "voc split file", "voc xml"])
def test_a_fifo_given_as_an_annotation_file_is_refused_not_a_hang(tmp_path, what):
    """A FIFO as the json or the split file blocked the read forever (the XML case is a guard)."""
    root = _voc_tree(tmp_path / "VOC")
    fifo = {"coco json": tmp_path / "ann.json", "voc split file": tmp_path / "split.txt",
            "voc xml": root / "Annotations" / "c.xml"}[what]
    os.mkfifo(fifo)
    call = {"coco json": f"CocoDetection({str(tmp_path)!r}, {str(fifo)!r})",
            "voc split file": f"voc_to_coco({str(root)!r}, {str(root / 'JPEGImages')!r}, split_file={str(fifo)!r})",
            "voc xml": f"voc_to_coco({str(root)!r}, {str(root / 'JPEGImages')!r}, split_file={str(root)!r} + "
                       "'/ImageSets/Main/c.txt')"}[what]
    (root / "ImageSets" / "Main" / "c.txt").write_text("a\nc\n")
    rc, out = _child(f"""
        from fgd.data import CocoDetection, voc_to_coco
        try:
            {call}
        except ValueError as e:
            print("RAISED", str(e))
    """)
    expected = ["c.txt", "have no XML file", "(first: c)"] if what == "voc xml" else [str(fifo), "not a regular file"]
    line = next((ln for ln in out.splitlines() if ln.startswith("RAISED")), out)
    assert line.startswith("RAISED") and all(x in line for x in expected), out


# ---- D: an export or a conversion never deletes or overwrites its inputs -----------------------

def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _sixteen(folder: Path, json_at: Path):
    images = [_img(i + 1, f"{i:02d}.png") for i in range(16)]
    folder.mkdir(parents=True, exist_ok=True)
    for im in images:
        Image.new("RGB", (40, 30), (im["id"], 0, 0)).save(folder / im["file_name"])
    json_at.parent.mkdir(parents=True, exist_ok=True)
    json_at.write_text(json.dumps({"images": images, "annotations": [_ann(1, 1, [1, 1, 5, 5])],
                                   "categories": [{"id": 1, "name": "x"}]}))
    return str(json_at), folder


@pytest.mark.parametrize("where", ["images = OUT/images/train", "images = OUT/labels/val", "images = OUT/images",
                                   "images = OUT", "json in OUT/labels/train", "OUT inside the images"])
def test_an_export_never_deletes_or_overwrites_its_inputs(tmp_path, where):
    """--train-images OUT/images/train --out OUT rmtree'd the user's 16 source images, then failed."""
    out = tmp_path / "OUT"
    src = {"images = OUT/images/train": out / "images" / "train", "images = OUT/labels/val": out / "labels" / "val",
           "images = OUT/images": out / "images", "images = OUT": out}.get(where, tmp_path / "src")
    json_at = out / "labels" / "train" / "a.json" if where == "json in OUT/labels/train" else tmp_path / "a.json"
    train = _sixteen(src, json_at)
    if where == "OUT inside the images":
        out = src / "yolo"
    val = _sixteen(tmp_path / "val", tmp_path / "val.json")
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match="overlap") as e:
        coco_to_yolo({"train": train, "val": val}, out)
    assert "\n" not in str(e.value)
    assert _tree(tmp_path) == before  # every input as it was, and nothing written


def _raised_when_full(call: str, imports: str):
    """The line ``call`` raised (OSError / ValueError) in a child that may write no file past 16 kB:
    a full disk, as a file-size limit (SIGXFSZ ignored, so the write fails with EFBIG)."""
    rc, text = _child("\n".join([
        imports, "import resource, signal", "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)",
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))",
        "try:", f"    {call}", "except (OSError, ValueError) as e:", "    print('RAISED', type(e).__name__, str(e))"]))
    return next((ln for ln in text.splitlines() if ln.startswith("RAISED")), text)


@pytest.mark.parametrize("too_large", ["a label file", "data.yaml"])
def test_a_failed_export_keeps_the_previous_one_and_the_users_files(tmp_path, too_large):
    """An export on a full disk deleted the previous complete export first, then failed."""
    out = tmp_path / "out"
    val = _coco(tmp_path / "val", [_img(1, "v.png")], [])
    small = _coco(tmp_path / "small", [_img(1, "a.png")], [_ann(1, 1, [1, 1, 5, 5])])
    coco_to_yolo({"train": (small, tmp_path / "small"), "val": (val, tmp_path / "val")}, out)
    for user in (out / ".keepme.tmpl", out / "images" / ".keepme.tmpl", out / "notes.txt"):
        user.write_text("the user's")
    previous = _tree(out)
    if too_large == "a label file":  # 1000 boxes: a 37 kB label file
        anns, cats = [_ann(i + 1, 1, [1, 1, 5, 5]) for i in range(1000)], ({"id": 1, "name": "x"},)
    else:  # 100 long class names: a 100 kB data.yaml, small labels
        anns, cats = [_ann(1, 1, [1, 1, 5, 5])], [{"id": i + 1, "name": f"{i:03d}" + "n" * 1000} for i in range(100)]
    big = _coco(tmp_path / "big", [_img(1, "a.png"), _img(2, "b.png")], anns, cats=cats)
    val2 = _coco(tmp_path / "val2", [_img(1, "v.png")], [], cats=cats)
    args = {"train": (big, str(tmp_path / "big")), "val": (val2, str(tmp_path / "val2"))}
    line = _raised_when_full(f"coco_to_yolo({args!r}, {str(out)!r})", "from fgd.data.yolo import coco_to_yolo")
    assert line.startswith("RAISED OSError") and str(out) in line and "larger than" in line, line
    assert _tree(out) == previous  # the previous export and the user's files, byte for byte
    assert sorted(p.name for p in out.iterdir()) == [".keepme.tmpl", "data.yaml", "images", "labels", "notes.txt"]
    # and a complete export replaces the previous one, leaving the user's files
    coco_to_yolo({"train": (big, tmp_path / "big"), "val": (val2, tmp_path / "val2")}, out)
    assert sorted(p.name for p in out.iterdir()) == [".keepme.tmpl", "data.yaml", "images", "labels", "notes.txt"]
    assert sorted(p.name for p in (out / "labels" / "train").iterdir()) == ["a.txt", "b.txt"]
    assert all((out / p).read_text() == "the user's" for p in (".keepme.tmpl", "images/.keepme.tmpl", "notes.txt"))


@pytest.mark.parametrize("out", ["Annotations/b.xml", "Annotations/new.json", "split file", "JPEGImages/a.png"])
def test_convert_voc_never_writes_over_an_input(tmp_path, out):
    """convert_voc(..., out=Annotations/b.xml) overwrote an input XML."""
    root = _voc_tree(tmp_path / "VOC")
    split = root / "ImageSets" / "Main" / "train.txt"
    path = split if out == "split file" else root / out
    before = _tree(tmp_path)
    with pytest.raises(ValueError, match="write the json elsewhere") as e:
        convert_voc(root, root / "JPEGImages", path, split_file=split)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert _tree(tmp_path) == before


def test_convert_voc_on_a_full_disk_leaves_the_previous_json_and_no_partial_file(tmp_path):
    """A failed write of the json must leave the previous file whole and name the file in one line."""
    root = _voc_tree(tmp_path / "VOC", stems=[f"{i:03d}" for i in range(200)])  # a ~40 kB json
    out = tmp_path / "json" / "train.json"
    out.parent.mkdir()
    out.write_text('{"previous": true}')
    line = _raised_when_full(f"convert_voc({str(root)!r}, {str(root / 'JPEGImages')!r}, {str(out)!r})",
                             "from fgd.data import convert_voc")
    assert line.startswith("RAISED") and f"could not write {out}" in line and "nothing was replaced" in line, line
    assert [p.name for p in out.parent.iterdir()] == ["train.json"] and out.read_text() == '{"previous": true}'
