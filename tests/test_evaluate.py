import csv
import json

import pytest
import torch

from fgd.evaluate import coco_map, format_table, write_table

# Non-contiguous COCO ids on purpose: label 1 -> cat id 3, label 2 -> cat id 7.
LABEL_TO_CAT = {1: 3, 2: 7}
# xywh, all 40x40 = 1600 px^2: "medium" for COCO, so APs and APl have no GT.
GT = {
    1: [(3, [10, 10, 40, 40]), (7, [50, 50, 40, 40])],
    2: [(3, [5, 5, 40, 40]), (7, [55, 20, 40, 40])],
    3: [],  # an image with no GT
}


@pytest.fixture(scope="module")
def coco_gt(tmp_path_factory):
    from pycocotools.coco import COCO

    anns = [{"id": i + 1, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for i, (img, cat, box) in enumerate((img, c, b) for img, objs in GT.items() for c, b in objs)]
    data = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in GT],
            "annotations": anns,
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    path = tmp_path_factory.mktemp("coco") / "gt.json"
    path.write_text(json.dumps(data))
    return COCO(str(path))


def det(image_id, objs, score=1.0):
    """objs: (label, xywh) -> a detection dict in xyxy with contiguous labels."""
    boxes = torch.tensor([[x, y, x + w, y + h] for _, (x, y, w, h) in objs], dtype=torch.float32).reshape(-1, 4)
    return {"image_id": image_id, "boxes": boxes, "scores": torch.full((len(objs),), score),
            "labels": torch.tensor([lab for lab, _ in objs], dtype=torch.int64)}


CAT_TO_LABEL = {c: lab for lab, c in LABEL_TO_CAT.items()}


def perfect():
    return [det(img, [(CAT_TO_LABEL[c], b) for c, b in objs]) for img, objs in GT.items()]


def test_perfect_detections_score_one(coco_gt):
    m = coco_map(coco_gt, perfect(), LABEL_TO_CAT)
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    assert m["APm"] == pytest.approx(1.0) and m["AR100"] == pytest.approx(1.0)
    assert set(m) == {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "summary"}
    assert all(isinstance(m[k], float) for k in m if k != "summary")
    assert len(m["summary"].splitlines()) == 12 and "Average Precision" in m["summary"]


def test_size_without_gt_is_minus_one(coco_gt):
    m = coco_map(coco_gt, perfect(), LABEL_TO_CAT)
    assert m["APs"] == -1.0 and m["APl"] == -1.0


def test_no_detections_gives_zeros(coco_gt):
    for dets in ([], [det(img, []) for img in GT]):
        m = coco_map(coco_gt, dets, LABEL_TO_CAT)
        assert all(m[k] == 0.0 for k in m if k != "summary")
        assert "no detections" in m["summary"]


def test_wrong_class_scores_zero(coco_gt):
    swapped = [det(img, [(3 - CAT_TO_LABEL[c], b) for c, b in objs]) for img, objs in GT.items()]
    assert coco_map(coco_gt, swapped, LABEL_TO_CAT)["AP"] == 0.0


def test_label_mapping_is_honoured(coco_gt):
    # Perfect boxes and labels, but a mapping that sends each label to the other category.
    assert coco_map(coco_gt, perfect(), {1: 7, 2: 3})["AP"] == 0.0
    with pytest.raises(ValueError, match="label_to_cat_id"):
        coco_map(coco_gt, perfect(), {1: 3})


def test_half_found_is_between(coco_gt):
    half = [det(1, [(CAT_TO_LABEL[c], b) for c, b in GT[1]]), det(2, []),
            det(3, [(1, [60, 0, 30, 30])], score=0.5)]  # plus a false positive on the image with no GT
    m = coco_map(coco_gt, half, LABEL_TO_CAT)
    assert 0.0 < m["AP"] < 1.0
    assert m["AR100"] == pytest.approx(0.5)


def test_only_listed_images_are_evaluated(coco_gt):
    # Image 1 alone, found perfectly: the unlisted image 2's objects do not count as misses.
    assert coco_map(coco_gt, perfect()[:1], LABEL_TO_CAT)["AP"] == pytest.approx(1.0)


def test_unknown_image_id_raises(coco_gt):
    with pytest.raises(ValueError, match="image_id 99"):
        coco_map(coco_gt, [det(99, [(1, [0, 0, 10, 10])])], LABEL_TO_CAT)


ROWS = {"teacher": {"AP": 0.5, "AP50": 0.754, "AP75": 0.25, "APs": -1.0, "APm": 0.5, "APl": 0.0, "img/s": 12.345},
        "student": {"AP": 0.1234}}


def test_format_table():
    lines = format_table(ROWS).splitlines()
    assert lines[0] == "| model | AP | AP50 | AP75 | APs | APm | APl | img/s |"
    assert lines[1] == "|---|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == "| teacher | 50.0 | 75.4 | 25.0 | n/a | 50.0 | 0.0 | 12.3 |"
    assert lines[3] == "| student | 12.3 | – | – | – | – | – | – |"
    assert format_table(ROWS, columns=("AP",)).splitlines()[2] == "| teacher | 50.0 |"


def test_write_table(tmp_path):
    md, cs = tmp_path / "out" / "r.md", tmp_path / "out" / "r.csv"
    write_table(ROWS, md, cs)
    assert md.read_text(encoding="utf-8") == format_table(ROWS) + "\n"
    with open(cs, newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert table[0] == ["model", "AP", "AP50", "AP75", "APs", "APm", "APl", "img/s"]
    assert table[1] == ["teacher", "50.0", "75.4", "25.0", "n/a", "50.0", "0.0", "12.3"]
    assert table[2][:2] == ["student", "12.3"]
