"""Pascal VOC XML -> COCO (fgd.data.voc), VOC's `difficult` in evaluation, and the tree tiles made
from deepforest's example data (fgd.data.trees)."""
import contextlib
import importlib.util
import io
import json
import logging
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fgd.data import (CocoDetection, VocDetection, convert_voc, find_deepforest_data, make_tree_tiles,
                      voc_to_coco, write_coco_json)
from fgd.evaluate import coco_map


def xml(filename, objects=(), size=(40, 30), root="annotation"):
    """A VOC XML text; objects: (name, (xmin, ymin, xmax, ymax) or None, difficult)."""
    parts = [f"<{root}><folder>ignored</folder><filename>{filename}</filename>"]
    if size is not None:
        parts.append(f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>")
    for name, box, difficult in objects:
        bnd = "" if box is None else "<bndbox>" + "".join(
            f"<{k}>{v}</{k}>" for k, v in zip(("xmin", "ymin", "xmax", "ymax"), box)) + "</bndbox>"
        parts.append(f"<object><name>{name}</name><difficult>{difficult}</difficult>{bnd}</object>")
    return "".join(parts) + f"</{root}>"


def put(folder, stem, objects=(), size=(40, 30), image=True, xml_size=None, ext=".png"):
    """Writes stem.xml (and the image stem+ext of ``size``) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.xml").write_text(xml(f"{stem}{ext}", objects, xml_size or size))
    if image:
        Image.new("RGB", size, (10, 200, 30)).save(folder / f"{stem}{ext}")


def boxes_by_image(coco):
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    out = {}
    for a in coco["annotations"]:
        out.setdefault(files[a["image_id"]], []).append((names[a["category_id"]], a["bbox"], a["difficult"]))
    return out


# ---- reading ----------------------------------------------------------------------------------

def test_flat_folder_with_xml_beside_images(tmp_path, caplog):
    put(tmp_path, "b", [("dog", (5, 6, 15, 16), 0)], size=(50, 60))
    put(tmp_path, "a", [("cat", (1, 2, 10, 20), 0), ("dog", (3, 3, 4, 4), 0)])
    (tmp_path / "notes.txt").write_text("not an annotation")
    with caplog.at_level(logging.INFO, logger="fgd.data"):
        coco, skipped = voc_to_coco(tmp_path, tmp_path)
    assert skipped == {}
    # sorted by XML name; sizes from the files
    assert coco["images"] == [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
                              {"id": 2, "file_name": "b.png", "width": 50, "height": 60}]
    assert coco["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    # 1-based inclusive -> continuous: x1 = xmin - 1, y1 = ymin - 1, x2 = xmax, y2 = ymax
    assert coco["annotations"] == [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [0.0, 1.0, 10.0, 19.0], "area": 190.0,
         "iscrowd": 0, "difficult": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [2.0, 2.0, 2.0, 2.0], "area": 4.0,
         "iscrowd": 0, "difficult": 0},
        {"id": 3, "image_id": 2, "category_id": 2, "bbox": [4.0, 5.0, 11.0, 11.0], "area": 121.0,
         "iscrowd": 0, "difficult": 0}]
    assert "2 images, 3 boxes (0 difficult), 2 classes (cat, dog); skipped: none" in caplog.text

    ds = VocDetection(tmp_path, tmp_path)
    assert ds.class_names == ["__background__", "cat", "dog"] and len(ds) == 2
    assert ds[0][1]["boxes"].tolist() == [[0, 1, 10, 20], [2, 2, 4, 4]] and ds[0][1]["labels"].tolist() == [1, 2]


def test_voc_tree_with_a_split_file(tmp_path):
    root = tmp_path / "VOC2007"
    (root / "JPEGImages").mkdir(parents=True)
    for i in (1, 2, 3):
        put(root / "Annotations", f"00000{i}", [("car", (i, i, 10 + i, 10 + i), 0)], image=False, ext=".jpg")
        Image.new("RGB", (40, 30)).save(root / "JPEGImages" / f"00000{i}.jpg")
    split = root / "ImageSets" / "Main" / "car_train.txt"
    split.parent.mkdir(parents=True)
    split.write_text("000002 1\n\n000001 -1\n000002  1\n")  # VOC's per-class format; 2 listed twice
    coco, skipped = voc_to_coco(root, root / "JPEGImages", split_file=split)
    assert [im["file_name"] for im in coco["images"]] == ["000002.jpg", "000001.jpg"]  # the list's order
    assert [a["bbox"][0] for a in coco["annotations"]] == [1.0, 0.0] and skipped == {}

    ds = VocDetection(root, root / "JPEGImages", split_file=split)
    assert ds.ids == [1, 2] and str(split) in ds.ann_file

    split.write_text("000001\n000009\n")
    with pytest.raises(ValueError, match=r"car_train.txt: 1 listed ids have no XML file .*000009") as e:
        voc_to_coco(root, root / "JPEGImages", split_file=split)
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        voc_to_coco(root, root / "JPEGImages", split_file=root / "nope.txt")


def test_difficult_objects_are_ignored_crowd_boxes(tmp_path):
    put(tmp_path, "a", [("cat", (1, 1, 10, 10), 0), ("cat", (20, 5, 30, 15), 1)])
    coco, _ = voc_to_coco(tmp_path, tmp_path)
    assert [(a["iscrowd"], a["difficult"]) for a in coco["annotations"]] == [(0, 0), (1, 1)]
    ds = VocDetection(tmp_path, tmp_path)
    assert ds[0][1]["boxes"].tolist() == [[0, 0, 10, 10]]  # training leaves the difficult one out
    assert sorted(ds.coco.anns) == [1, 2]  # evaluation keeps it (to ignore it)


def _det(boxes_xyxy, scores, label=1):
    return {"image_id": 1, "boxes": torch.tensor(boxes_xyxy, dtype=torch.float32),
            "scores": torch.tensor(scores), "labels": torch.full((len(scores),), label)}


@pytest.mark.parametrize("difficult, ap50", [(1, 1.0), (0, None)])
def test_difficult_in_evaluation_is_neither_hit_nor_miss(tmp_path, difficult, ap50):
    # A ordinary; B and C difficult (or not): B is detected first (and twice), C is missed
    put(tmp_path, "a", [("cat", (11, 11, 30, 30), 0), ("cat", (51, 51, 70, 70), difficult),
                        ("cat", (11, 61, 30, 80), difficult)], size=(100, 100))
    ds = VocDetection(tmp_path, tmp_path)
    det = _det([[50, 50, 70, 70], [51, 50, 70, 70], [10, 10, 30, 30]], [0.9, 0.8, 0.5])
    m = coco_map(ds.coco, [det], ds.label_to_cat_id)
    if ap50 is not None:
        assert m["AP50"] == pytest.approx(ap50) and m["AR100"] == pytest.approx(1.0)
    else:  # counted: B's duplicate a false positive at rank 2, C missed: precision 1, 1/2, 2/3 at
        # recall 1/3, 1/3, 2/3 -> COCO's 101-point AP (34 * 1 + 33 * 2/3) / 101
        assert m["AP50"] == pytest.approx(56 / 101) and m["AR100"] == pytest.approx(2 / 3)


def test_difficult_boxes_use_the_ordinary_iou_and_crowd_regions_keep_theirs(tmp_path):
    from pycocotools.cocoeval import COCOeval

    put(tmp_path, "a", [("cat", (11, 11, 30, 30), 0), ("cat", (51, 51, 100, 100), 1)], size=(100, 100))
    ds = VocDetection(tmp_path, tmp_path)
    # a small detection inside the large difficult box, ranked first: VOC counts it as a false positive
    det = _det([[60, 60, 70, 70], [10, 10, 30, 30]], [0.9, 0.5])
    assert coco_map(ds.coco, [det], ds.label_to_cat_id)["AP50"] == pytest.approx(0.5, abs=0.02)
    # stock COCOeval (crowd IoU = intersection / detection area) would have ignored it
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        with_crowd_iou = COCOeval(ds.coco, ds.coco.loadRes([
            {"image_id": 1, "category_id": 1, "bbox": [60, 60, 10, 10], "score": 0.9},
            {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.5}]), "bbox")
        with_crowd_iou.evaluate(), with_crowd_iou.accumulate(), with_crowd_iou.summarize()
    assert with_crowd_iou.stats[1] == pytest.approx(1.0)
    # a real crowd region (no `difficult`) keeps the crowd IoU: the same detection is ignored
    coco = json.loads(json.dumps(ds.coco.dataset))
    for a in coco["annotations"]:
        a.pop("difficult")
    crowd = CocoDetection(tmp_path, coco, name="crowd")
    assert coco_map(crowd.coco, [det], crowd.label_to_cat_id)["AP50"] == pytest.approx(1.0)


@pytest.mark.parametrize("text, why", [
    ("<annotation><filename>a.png</filename>", "no element found"),
    ("<annotation><filename>a.png</filename><object></annotation>", "mismatched tag"),
    ("<foo><filename>a.png</filename></foo>", "root element is <foo>"),
    (xml("", []), "no <filename>"),
    (xml("/etc/passwd", []), "not a name under the image folder"),
    (xml("a.png", [("", (1, 1, 5, 5), 0)]), "<object> 0 has no <name>"),
    (xml("a.png", [("cat", (1, 1, 5, 5), 0), ("cat", (1, 1, 5, 5), "yes")]),
     r"<object> 1 \(cat\): <difficult> must be 0 or 1, got 'yes'"),
], ids=["unclosed", "mismatched-tag", "root-element", "no-filename", "absolute-filename", "no-name",
         "bad-difficult"])
def test_malformed_xml_is_one_line_naming_the_file(tmp_path, text, why):
    put(tmp_path, "a", [("cat", (1, 1, 5, 5), 0)])
    (tmp_path / "b.xml").write_text(text)
    with pytest.raises(ValueError, match=why) as e:
        voc_to_coco(tmp_path, tmp_path)
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'b.xml'}: not valid Pascal VOC XML (") and "\n" not in msg


def test_folders_without_xml(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match=f"no .xml files in {re.escape(str(tmp_path))}$"):
        voc_to_coco(tmp_path, tmp_path)
    with pytest.raises(FileNotFoundError, match="annotations folder .*gone"):
        voc_to_coco(tmp_path / "gone", tmp_path)
    put(tmp_path, "a")
    with pytest.raises(FileNotFoundError, match="images folder .*gone"):
        voc_to_coco(tmp_path, tmp_path / "gone")


def test_missing_and_unreadable_images_are_skipped_and_counted(tmp_path, caplog):
    put(tmp_path, "a", [("cat", (1, 1, 5, 5), 0)])
    put(tmp_path, "b", [("cat", (1, 1, 5, 5), 0)], image=False)
    put(tmp_path, "c", [("dog", (1, 1, 5, 5), 0)], image=False)
    put(tmp_path, "d", [("cat", (1, 1, 5, 5), 0)], image=False)
    (tmp_path / "d.png").write_bytes(b"not an image")
    with caplog.at_level(logging.WARNING, logger="fgd.data"):
        coco, skipped = voc_to_coco(tmp_path, tmp_path)
    assert skipped == {"missing_image": 2, "unreadable_image": 1}
    assert [im["file_name"] for im in coco["images"]] == ["a.png"] and len(coco["annotations"]) == 1
    assert "2 of 4 XML files name an image that is not under" in caplog.text and "b.png, c.png" in caplog.text
    assert "d.png cannot be read" in caplog.text and len(caplog.records) == 2
    # the classes are those of the files read, whether or not their image is there
    assert [c["name"] for c in coco["categories"]] == ["cat", "dog"]
    assert VocDetection(tmp_path, tmp_path).skipped == {"missing_image": 2, "unreadable_image": 1}


def test_classes_fix_the_categories_and_skip_other_names(tmp_path, caplog):
    put(tmp_path, "a", [("cat", (1, 1, 5, 5), 0), ("bird", (2, 2, 6, 6), 0), ("dog", (3, 3, 7, 7), 0),
                        ("bird", (1, 1, 3, 3), 0)])
    with caplog.at_level(logging.WARNING, logger="fgd.data"):
        coco, skipped = voc_to_coco(tmp_path, tmp_path, classes=["dog", "cat", "fish"])
    assert coco["categories"] == [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 3, "name": "fish"}]
    assert [a["category_id"] for a in coco["annotations"]] == [2, 1]
    assert skipped == {"unknown_class": 2} and "2 objects of classes not in `classes` are skipped ('bird': 2)" \
        in caplog.text
    for bad in ("cat", ["cat", "cat"], [], ["cat", ""], [" cat"], [3]):
        with pytest.raises(ValueError, match="classes"):
            voc_to_coco(tmp_path, tmp_path, classes=bad)


def test_classes_found_are_sorted_names_of_all_files(tmp_path):
    put(tmp_path, "a", [("b", (1, 1, 5, 5), 0), ("Tree", (1, 1, 5, 5), 0)])
    put(tmp_path, "c", [("a", (1, 1, 5, 5), 0)])
    coco, _ = voc_to_coco(tmp_path, tmp_path)
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(1, "Tree"), (2, "a"), (3, "b")]
    assert [a["category_id"] for a in coco["annotations"]] == [3, 1, 2]


def test_boxes_outside_partly_outside_inverted_and_not_numeric(tmp_path, caplog):
    put(tmp_path, "a", [
        ("cat", (30, 20, 50, 40), 0),   # partly outside: clipped to (29, 19, 40, 30)
        ("cat", (0, -3, 5, 5), 0),      # 0-based / negative values: clipped at 0
        ("cat", (45, 5, 50, 10), 0),    # wholly outside (x1 = 44 > 40)
        ("cat", (10, 5, 5, 10), 0),     # inverted
        ("cat", (10, 5, 10, 10), 0),    # xmax == xmin
        ("cat", (3, 9, 6, 9), 0),       # ymax == ymin
        ("cat", (3, "abc", 6, 9), 0),   # not a number
        ("cat", (3, "", 6, 9), 0),      # empty
        ("cat", (3, 4, 6, "nan"), 0),   # not finite
        ("cat", None, 0),               # no <bndbox>
    ])
    with caplog.at_level(logging.WARNING, logger="fgd.data"):
        coco, skipped = voc_to_coco(tmp_path, tmp_path)
    assert [a["bbox"] for a in coco["annotations"]] == [[29.0, 19.0, 11.0, 11.0], [0.0, 0.0, 5.0, 5.0]]
    assert skipped == {"bad_box": 7, "box_outside_image": 1}
    assert "8 boxes skipped (bad_box: 7, box_outside_image: 1)" in caplog.text


def test_size_mismatch_uses_the_file(tmp_path, caplog):
    put(tmp_path, "a", [("cat", (30, 20, 50, 40), 0)], size=(40, 30), xml_size=(50, 50))
    put(tmp_path, "b", [], size=(40, 30), xml_size=("forty", 30))
    put(tmp_path, "c", [], size=(40, 30), xml_size=(40.0, 30))
    with caplog.at_level(logging.WARNING, logger="fgd.data"):
        coco, skipped = voc_to_coco(tmp_path, tmp_path)
    assert skipped == {"size_mismatch": 2} and [(im["width"], im["height"]) for im in coco["images"]] == [(40, 30)] * 3
    assert coco["annotations"][0]["bbox"] == [29.0, 19.0, 11.0, 11.0]  # clipped to the file's size
    assert "a.png (50x50 in the XML, 40x30 in the file)" in caplog.text


# ---- conversion and the COCO reader -----------------------------------------------------------

def test_convert_voc_round_trip_through_json(tmp_path):
    src = tmp_path / "src"
    put(src, "a", [("cat", (1, 2, 10, 20), 0), ("dog", (30, 20, 50, 40), 0), ("cat", (5, 5, 9, 9), 1)])
    put(src, "b", [("dog", (5, 6, 15, 16), 0)], size=(50, 60))
    out = tmp_path / "json" / "train.json"
    summary = convert_voc(src, src, out)
    assert summary == {"out": str(out), "images": 2, "boxes": 4, "difficult": 1, "classes": ["cat", "dog"],
                       "skipped": {}}
    assert sorted(p.name for p in out.parent.iterdir()) == ["train.json"]  # no temporary file left
    from_json, from_voc = CocoDetection(src, str(out)), VocDetection(src, src)
    for i in range(2):
        a, b = from_json[i][1], from_voc[i][1]
        assert a["boxes"].tolist() == b["boxes"].tolist() and a["labels"].tolist() == b["labels"].tolist()
    assert from_json[0][1]["boxes"].tolist() == [[0, 1, 10, 20], [29, 19, 40, 30]]
    assert from_json.coco.dataset == from_voc.coco.dataset
    assert from_json.class_names == from_voc.class_names == ["__background__", "cat", "dog"]


def test_write_coco_json_replaces_whole_files_only(tmp_path):
    path = tmp_path / "a.json"
    write_coco_json({"images": [1]}, path)
    with pytest.raises(ValueError):  # NaN is not JSON: refused, the old file stays
        write_coco_json({"images": [float("nan")]}, path)
    assert json.loads(path.read_text()) == {"images": [1]} and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_coco_detection_takes_a_dict_checked_like_a_file(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 30}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5]},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 1, 5, 5]}],
            "categories": [{"id": 1, "name": "x"}]}
    before = json.dumps(data)
    ds = CocoDetection(tmp_path, data, name="my set")
    assert ds.ann_file == "my set" and ds.skipped == {"box_outside_image": 1} and sorted(ds.coco.anns) == [1]
    assert json.dumps(data) == before  # the caller's dict is left as it was
    with pytest.raises(ValueError, match=r"^my set: missing key\(s\) 'categories'$"):
        CocoDetection(tmp_path, {"images": [], "annotations": []}, name="my set")
    with pytest.raises(ValueError, match=r"^COCO annotations: annotations\[0\] has id 0"):
        CocoDetection(tmp_path, {**data, "annotations": [{**data["annotations"][0], "id": 0}]})


# ---- tree tiles -------------------------------------------------------------------------------

def _files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _tiles(out):
    """{split: [(tile png, source image, (x, y, w, h), [VOC (xmin, ymin, xmax, ymax)])]} from the tiles' XML."""
    found = {}
    for split in ("train", "val"):
        for path in sorted((Path(out) / split).glob("*.xml")):
            root = ET.parse(path).getroot()
            crop = tuple(int(root.findtext(f"source/crop/{k}")) for k in ("x", "y", "width", "height"))
            boxes = [tuple(float(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax"))
                     for o in root.findall("object")]
            found.setdefault(split, []).append((path.with_suffix(".png"), root.findtext("source/image"), crop, boxes))
    return found


def _check_tiles(out, summary):
    """No source pixel in both splits, every tile's pixels and boxes inside it, counts as reported."""
    tiles = _tiles(out)
    rects = {split: [(src, c) for _, src, c, _ in tiles[split]] for split in tiles}
    for src, (x, y, w, h) in rects["train"]:
        for vsrc, (vx, vy, vw, vh) in rects["val"]:
            assert src != vsrc or x + w <= vx or vx + vw <= x or y + h <= vy or vy + vh <= y, (src, x, y, vx, vy)
    for split in ("train", "val"):
        ds = VocDetection(out / split, out / split)
        assert ds.skipped == {} and len(ds) == summary[split]["tiles"] == len(tiles[split]) > 0
        n = 0
        for (png, _, (x, y, w, h), voc), i in zip(tiles[split], range(len(ds))):
            # as written (the reader would clip): 1-based inclusive, inside the tile, at least 2 px
            assert all(1 <= x1 < x2 <= w and 1 <= y1 < y2 <= h for x1, y1, x2, y2 in voc), (png, voc)
            image, target = ds[i]
            assert image.shape == (3, h, w) and Path(ds._files[i]) == png
            b = target["boxes"]
            assert bool(((b[:, :2] >= 0) & (b[:, 2:] <= torch.tensor([w, h])) & (b[:, 2:] > b[:, :2])).all())
            n += len(b)
        assert n == summary[split]["boxes"] > 0


def _source(folder):
    """A source image 250 x 130 of noise with boxes (continuous xyxy) given as VOC XML."""
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (130, 250, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "s.png")
    boxes = [("Tree", (10, 10, 30, 30)),
             ("Tree", (190, 10, 230, 40)),  # 3/4 right of x = 200: in the val tile only
             ("Dead", (40, 40, 60, 70)),    # a quarter in each of 4 tiles: in none
             ("Dead", (40, 55, 60, 75)),    # exactly half in each of 2 tiles: in both
             ("Tree", (120, 110, 130, 130))]  # in the last row, shifted back to y = 80
    (folder / "s.xml").write_text(xml("s.png", [(n, (x1 + 1, y1 + 1, x2, y2), 0) for n, (x1, y1, x2, y2) in boxes],
                                      size=(250, 130)))
    return pixels


def test_tiles_of_a_hand_made_source(tmp_path):
    pixels = _source(tmp_path / "src")
    s = make_tree_tiles(tmp_path / "a", tile=50, val_fraction=0.25, source=tmp_path / "src")
    # val band: 0.25 * 250 = 62.5 px -> one whole tile -> from x = 200; rows 0, 50 and 80 (shifted)
    assert s["sources"] == [{"image": "s.png", "width": 250, "height": 130, "val_from_x": 200}]
    tiles = _tiles(tmp_path / "a")
    assert sorted(c for _, _, c, _ in tiles["train"]) == sorted((x, y, 50, 50) for x in (0, 50, 100, 150)
                                                             for y in (0, 50, 80))
    assert sorted(c for _, _, c, _ in tiles["val"]) == [(200, y, 50, 50) for y in (0, 50, 80)]
    for split in tiles:  # the pixels are the source's
        for png, _, (x, y, w, h), _ in tiles[split]:
            assert np.array_equal(np.asarray(Image.open(png)), pixels[y:y + h, x:x + w])
    _check_tiles(tmp_path / "a", s)
    boxes = {}
    for split in ("train", "val"):
        coco, _ = voc_to_coco(tmp_path / "a" / split, tmp_path / "a" / split)
        for f, objs in boxes_by_image(coco).items():
            boxes[f] = [(n, b) for n, b, _ in objs]
    # clipped to their tile, in its coordinates, where at least half the box lies
    assert boxes == {"s_x00000_y00000.png": [("Tree", [10.0, 10.0, 20.0, 20.0])],
                     "s_x00200_y00000.png": [("Tree", [0.0, 10.0, 30.0, 30.0])],
                     "s_x00000_y00050.png": [("Dead", [40.0, 5.0, 10.0, 20.0])],
                     "s_x00050_y00050.png": [("Dead", [0.0, 5.0, 10.0, 20.0])],
                     "s_x00100_y00080.png": [("Tree", [20.0, 30.0, 10.0, 20.0])]}
    assert s["train"]["classes"] == {"Dead": 2, "Tree": 2} and s["val"]["classes"] == {"Tree": 1}
    truncated = [ET.parse(tmp_path / "a" / split / f"s_x{x}_y00000.xml").getroot().findtext("object/truncated")
                 for split, x in (("train", "00000"), ("val", "00200"))]
    assert truncated == ["0", "1"]

    # deterministic, cached, and other arguments replace the old tiles
    make_tree_tiles(tmp_path / "b", tile=50, val_fraction=0.25, source=tmp_path / "src")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    marker = tmp_path / "a" / "train" / "s_x00000_y00000.xml"
    marker.write_text(marker.read_text() + " ")
    assert make_tree_tiles(tmp_path / "a", tile=50, val_fraction=0.25, source=tmp_path / "src") == s
    assert marker.read_text().endswith(" ")  # reused, not rewritten
    s2 = make_tree_tiles(tmp_path / "a", tile=60, val_fraction=0.25, source=tmp_path / "src")
    assert s2["sources"][0]["val_from_x"] == 190
    pngs = sorted((tmp_path / "a").rglob("*.png"))
    assert len(pngs) == s2["train"]["tiles"] + s2["val"]["tiles"] == 15  # no stale 50 px tiles left
    assert all(Image.open(p).size == (60, 60) for p in pngs)
    _check_tiles(tmp_path / "a", s2)


def test_tiles_refuse_foreign_files_and_bad_arguments(tmp_path):
    _source(tmp_path / "src")
    (tmp_path / "out" / "val").mkdir(parents=True)
    (tmp_path / "out" / "val" / "mine.png").write_bytes(b"")
    with pytest.raises(ValueError, match="did not write .*mine.png"):
        make_tree_tiles(tmp_path / "out", tile=50, source=tmp_path / "src")
    for kw, name in (({"tile": 4}, "tile"), ({"tile": 50.0}, "tile"), ({"val_fraction": 0}, "val_fraction"),
                     ({"val_fraction": 1.0}, "val_fraction"), ({"val_fraction": True}, "val_fraction")):
        with pytest.raises(ValueError, match=name):
            make_tree_tiles(tmp_path / "x", source=tmp_path / "src", **kw)


def test_find_deepforest_data_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps deepforest"):
        find_deepforest_data()


def _deepforest_data():
    spec = importlib.util.find_spec("deepforest")  # importing deepforest would fail: it lacks its deps
    data = Path(spec.origin).parent / "data" if spec and spec.origin else None
    return data if data is not None and any(data.glob("*.xml")) else None


@pytest.mark.skipif(_deepforest_data() is None, reason="deepforest's example data is not installed")
def test_tree_tiles_from_deepforest(tmp_path):
    start = time.perf_counter()
    s = make_tree_tiles(tmp_path / "a", tile=200, val_fraction=0.25)
    seconds = time.perf_counter() - start
    make_tree_tiles(tmp_path / "b", tile=200, val_fraction=0.25)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    bands = {src["image"]: (src["width"], src["val_from_x"]) for src in s["sources"]}
    # val bands of whole 200 px tiles: 575 px -> 600, 312 -> 400, 100 -> 200
    assert bands["2019_YELL_2_528000_4978000_image_crop2.png"] == (2299, 1699)
    assert bands["2019_YELL_2_541000_4977000_image_crop.png"] == (1249, 849)
    assert bands["SOAP_061.png"] == (400, 200)
    _check_tiles(tmp_path / "a", s)
    print(f"\ntree tiles in {seconds:.1f} s: {json.dumps({k: s[k] for k in ('train', 'val', 'skipped')})}")
