"""fgd.data.yolo.coco_to_yolo and `fgd export-yolo` (no ultralytics needed)."""
import json
import subprocess
import sys

import pytest
from PIL import Image

from fgd.data.yolo import coco_to_yolo


def _coco(tmp_path, name, anns, images=(("a.png", 100, 50),)):
    folder = tmp_path / f"{name}_images"
    folder.mkdir()
    for file_name, w, h in images:
        Image.new("RGB", (w, h)).save(folder / file_name)
    data = {"images": [{"id": i + 1, "file_name": f, "width": w, "height": h} for i, (f, w, h) in enumerate(images)],
            "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
            "annotations": [dict(id=i + 1, image_id=1, **a) for i, a in enumerate(anns)]}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path), str(folder)


def test_labels_are_normalised_centres_clipped_and_ranked_by_category_id(tmp_path):
    train = _coco(tmp_path, "train", [
        {"category_id": 7, "bbox": [10, 10, 20, 10]},            # cat: rank 1 (ids 3 < 7)
        {"category_id": 3, "bbox": [90, 40, 20, 20]},            # dog, clipped to the image: 90..100, 40..50
        {"category_id": 3, "bbox": [0, 0, 5, 5], "iscrowd": 1},  # crowd: left out
        {"category_id": 7, "bbox": [120, 10, 5, 5]},             # outside the image: dropped
    ])
    val = _coco(tmp_path, "val", [])
    yaml = coco_to_yolo({"train": train, "val": val}, tmp_path / "out")
    lines = (tmp_path / "out" / "labels" / "train" / "a.txt").read_text().splitlines()
    assert lines == ["1 0.200000 0.300000 0.200000 0.200000", "0 0.950000 0.900000 0.100000 0.200000"]
    assert (tmp_path / "out" / "labels" / "val" / "a.txt").read_text() == ""
    assert (tmp_path / "out" / "images" / "train" / "a.png").is_file()
    import yaml as pyyaml

    assert pyyaml.safe_load(yaml.read_text()) == {"path": str((tmp_path / "out").resolve()), "train": "images/train",
                                                   "val": "images/val", "names": {0: "dog", 1: "cat"}}


def test_bad_inputs_name_the_file(tmp_path):
    val = _coco(tmp_path, "val", [])
    with pytest.raises(ValueError, match="needs 'train' and 'val'"):
        coco_to_yolo({"val": val}, tmp_path / "o1")
    js, folder = _coco(tmp_path, "train", [])
    (tmp_path / "train_images" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match="image .*a.png does not exist"):
        coco_to_yolo({"train": (js, folder), "val": val}, tmp_path / "o2")
    twice = _coco(tmp_path, "twice", [], images=(("a.png", 10, 10), ("a.png", 10, 10)))
    with pytest.raises(ValueError, match=r"images\[0\] \(id 1, 'a.png'\) and images\[1\] \(id 2, 'a.png'\) name one file"):
        coco_to_yolo({"train": twice, "val": val}, tmp_path / "o3")


def test_cli_reports_a_bad_file_in_one_line(tmp_path):
    val = _coco(tmp_path, "val", [])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    done = subprocess.run([sys.executable, "-m", "fgd.cli", "export-yolo", "--train-json", str(bad), "--train-images",
                           val[1], "--val-json", val[0], "--val-images", val[1], "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=tmp_path)  # the installed fgd, not a source tree
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip().startswith("fgd export-yolo: COCO annotation file") and "not valid JSON" in done.stderr
