"""The data layer: the synthetic shapes set, the COCO reader, the flip and the resumable sampler."""
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fgd.data import (CocoDetection, Compose, RandomHorizontalFlip, ResumableSampler, collate_fn,
                      make_shapes_dataset)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    ann, images = make_shapes_dataset(root, 200, image_size=128, seed=3)
    with open(ann) as f:
        return ann, images, json.load(f)


# ---- shapes -----------------------------------------------------------------------------------

def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_shapes_are_deterministic_and_splits_differ(tmp_path):
    a = make_shapes_dataset(tmp_path / "a", 12, image_size=64, seed=5)
    make_shapes_dataset(tmp_path / "b", 12, image_size=64, seed=5)
    assert a == (str(tmp_path / "a" / "train" / "annotations.json"), str(tmp_path / "a" / "train" / "images"))
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(files_a) == 13 and files_a == files_b
    make_shapes_dataset(tmp_path / "a", 12, image_size=64, seed=5, split="val")
    val = _files(tmp_path / "a" / "val" / "images")
    assert all(val[name] != files_a[name] for name in val)
    with Image.open(tmp_path / "a" / "val" / "images" / "000000.png") as im:
        assert im.mode == "RGB" and im.size == (64, 64)


def test_shapes_rerun_reuses_and_new_parameters_regenerate(tmp_path):
    ann, _ = make_shapes_dataset(tmp_path, 4, image_size=32)
    with open(ann) as f:
        first = f.read()
    with open(ann, "a") as f:  # a marker: a reuse leaves the file alone
        f.write(" ")
    make_shapes_dataset(tmp_path, 4, image_size=32)
    with open(ann) as f:
        assert f.read() == first + " "
    make_shapes_dataset(tmp_path, 5, image_size=32)
    with open(ann) as f:
        assert len(json.load(f)["images"]) == 5


@pytest.mark.parametrize("kw, name", [({"num_images": -1}, "num_images"), ({"image_size": 8}, "image_size"),
                                      ({"empty_fraction": 1.5}, "empty_fraction"), ({"split": ""}, "split"),
                                      ({"seed": -2}, "seed")])
def test_shapes_bad_arguments(tmp_path, kw, name):
    args = {"num_images": 2, **kw}
    with pytest.raises(ValueError, match=name):
        make_shapes_dataset(tmp_path, **args)


def test_shapes_content(shapes):
    _, _, data = shapes
    assert data["categories"] == [{"id": 1, "name": "square"}, {"id": 2, "name": "circle"},
                                  {"id": 3, "name": "triangle"}]
    anns = data["annotations"]
    assert {a["category_id"] for a in anns} == {1, 2, 3}
    per_image = {a["image_id"] for a in anns}
    assert 5 <= len(data["images"]) - len(per_image) <= 50  # about 10 % empty
    areas = np.array([a["area"] for a in anns])
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas < 96**2)).any() and (areas >= 96**2).any()
    assert len({a["id"] for a in anns}) == len(anns)
    for a in anns:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 128 and y + h <= 128
        assert a["area"] == w * h and a["iscrowd"] == 0
    assert any(x == 0 or y == 0 or x + w == 128 or y + h == 128 for x, y, w, h in (a["bbox"] for a in anns))


def test_shapes_speed_smoke(tmp_path):
    import time

    t0 = time.perf_counter()
    make_shapes_dataset(tmp_path, 100)
    assert time.perf_counter() - t0 < 3  # loose: catches a pathological slowdown (timing: RESULTS.md)


# ---- CocoDetection on the shapes --------------------------------------------------------------

def test_coco_reads_the_shapes(shapes):
    ann, images, data = shapes
    ds = CocoDetection(images, ann)
    assert len(ds) == 200 and ds.ids == [im["id"] for im in data["images"]]
    assert ds.num_classes == 4 and ds.class_names == ["__background__", "square", "circle", "triangle"]
    assert ds.label_to_cat_id == {1: 1, 2: 2, 3: 3} and ds.cat_id_to_label == {1: 1, 2: 2, 3: 3}
    assert not ds.skipped and len(ds.coco.getAnnIds()) == len(data["annotations"])
    by_image = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    for i in (0, 1, 7, 199):
        image, target = ds[i]
        assert image.dtype == torch.float32 and image.shape == (3, 128, 128)
        assert 0 <= float(image.min()) and float(image.max()) <= 1
        anns = by_image.get(ds.ids[i], [])
        assert target["image_id"] == ds.ids[i] and target["orig_size"] == (128, 128)
        assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (len(anns), 4)
        assert target["labels"].dtype == torch.int64 and target["labels"].tolist() == [a["category_id"] for a in anns]
        assert target["iscrowd"].dtype == torch.int64 and target["iscrowd"].tolist() == [0] * len(anns)
        assert target["area"].dtype == torch.float32
        assert target["area"].tolist() == [a["area"] for a in anns]
        xywh = [[x, y, x2 - x, y2 - y] for x, y, x2, y2 in target["boxes"].tolist()]
        assert xywh == [a["bbox"] for a in anns]


# ---- CocoDetection on hand-written jsons ------------------------------------------------------

def _write(tmp_path, data, images=(), size=(40, 30)):
    for name in images:
        Image.new("RGB", size, (10, 200, 30)).save(tmp_path / name)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return str(path)


def _img(i, name, w=40, h=30):
    return {"id": i, "file_name": name, "width": w, "height": h}


def _ann(i, image_id, cat, bbox, **kw):
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": 1.0, "iscrowd": 0, **kw}


HAND = {
    "images": [_img(10, "a.png"), _img(20, "b.png"), _img(30, "gone.png")],
    "annotations": [
        _ann(1, 10, 7, [1, 2, 3, 4], area=12.0),
        _ann(2, 10, 3, [0, 0, 40, 30], iscrowd=1),  # crowd: not a target
        _ann(3, 10, 3, [30, 20, 20, 20]),            # partly outside: clipped to 30,20,40,30
        _ann(4, 10, 7, [5, 5, 0, 4]),                # zero width
        _ann(5, 10, 7, [5, 5, -3, 4]),               # negative width
        _ann(6, 10, 3, [50, 5, 4, 4]),               # entirely outside
        _ann(7, 30, 3, [1, 1, 2, 2]),                # on the missing image
    ],
    "categories": [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}],
}


def test_coco_hand_written_cases(tmp_path, caplog):
    ann = _write(tmp_path, HAND, ["a.png", "b.png"])
    with caplog.at_level(logging.WARNING, logger="fgd.data"):
        ds = CocoDetection(str(tmp_path), ann)
    assert ds.ids == [10, 20] and len(ds) == 2
    assert ds.cat_id_to_label == {3: 1, 7: 2} and ds.label_to_cat_id == {1: 3, 2: 7}
    assert ds.class_names == ["__background__", "three", "seven"] and ds.num_classes == 3
    assert ds.skipped == {"missing_image": 1, "zero_size_box": 1, "bad_box": 1, "box_outside_image": 1}
    text = caplog.text
    assert "gone.png" in text and "dropped 3 annotations" in text and len(caplog.records) == 2

    image, target = ds[0]
    assert image.shape == (3, 30, 40) and target["orig_size"] == (30, 40) and target["image_id"] == 10
    assert torch.allclose(image[:, 0, 0], torch.tensor([10, 200, 30]) / 255)
    assert target["boxes"].tolist() == [[1, 2, 4, 6], [30, 20, 40, 30]]
    assert target["labels"].tolist() == [2, 1] and target["area"].tolist() == [12.0, 1.0]

    image, target = ds[1]  # no annotations: kept, with empty targets
    assert target["boxes"].shape == (0, 4) and target["boxes"].dtype == torch.float32
    assert target["labels"].shape == (0,) and target["labels"].dtype == torch.int64

    with pytest.raises(FileNotFoundError, match="gone.png"):
        CocoDetection(str(tmp_path), ann, on_bad="error")
    with pytest.raises(ValueError, match="on_bad"):
        CocoDetection(str(tmp_path), ann, on_bad="ignore")


def test_coco_non_finite_box_is_dropped(tmp_path):
    data = {"images": [_img(1, "a.png")], "annotations": [_ann(1, 1, 1, [1, 1, float("nan"), 2])],
            "categories": [{"id": 1, "name": "x"}]}
    ds = CocoDetection(str(tmp_path), _write(tmp_path, data, ["a.png"]))
    assert ds.skipped == {"bad_box": 1} and ds[0][1]["boxes"].shape == (0, 4)


def test_coco_undecodable_image_names_the_file(tmp_path):
    data = {"images": [_img(1, "broken.png")], "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    ann = _write(tmp_path, data)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    ds = CocoDetection(str(tmp_path), ann)
    from fgd.data import BadImageError  # (the one-line policy of tests/test_data_reliability.py)

    with pytest.raises(BadImageError, match="broken.png"):
        ds[0]


@pytest.mark.parametrize("content, why", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "top level"),
    ('{"images": [], "annotations": []}', "'categories'"),
    ('{"images": {}, "annotations": [], "categories": []}', "'images' must be a list"),
    ('{"images": [{"id": "1", "file_name": "a.png", "width": 4, "height": 4}], "annotations": [],'
     ' "categories": []}', r"images\[0\]"),
    ('{"images": [], "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2]}],'
     ' "categories": []}', "bbox"),
    ('{"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}],'
     ' "annotations": [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [1, 2, 1, 1]}],'
     ' "categories": [{"id": 1}]}', "category 9"),
])
def test_coco_malformed_json_names_the_file(tmp_path, content, why):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=why) as e:
        CocoDetection(str(tmp_path), str(path))
    assert str(path) in str(e.value)


def test_coco_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.json"):
        CocoDetection(str(tmp_path), str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="no_dir"):
        CocoDetection(str(tmp_path / "no_dir"), str(tmp_path / "nope.json"))


# Each of these makes pycocotools' COCOeval score wrong (or crash) without a word, so it is refused.
_GOOD = _ann(1, 1, 1, [1, 1, 10, 10])


@pytest.mark.parametrize("anns, why", [
    ([_GOOD, _ann(1, 1, 1, [5, 5, 10, 10])], r"annotation id 1 appears twice \(annotations\[1\]\)"),
    ([_ann(0, 1, 1, [1, 1, 10, 10])], r"annotations\[0\] has id 0"),
    ([_GOOD, _ann(2, 9, 1, [1, 1, 10, 10])], r"annotations\[1\] \(id 2\) refers to image 9"),
    ([_GOOD, _ann(2, 1, 9, [1, 1, 10, 10])], r"annotations\[1\] \(id 2\) has category 9"),
    ([_ann(1, 1, 1, [1, 1, 10, 10], iscrowd=2)], r"annotations\[0\] \(id 1\): 'iscrowd' must be 0 or 1, got 2"),
    ([_ann(1, 1, 1, [1, 1, 10, 10], iscrowd=0.5)], r"'iscrowd' must be 0 or 1, got 0.5"),
    ([_ann(1, 1, 1, [1, 1, 10, 10], iscrowd="no")], r"'iscrowd' must be 0 or 1, got 'no'"),
    ([_ann(1, 1, 1, [1, 1, 10, 10], area="big")], r"annotations\[0\] \(id 1\): 'area' must be a number"),
    ([_ann(1, 1, 1, [1, 1, 10, 10], area=None)], r"'area' must be a number, got None"),
])
def test_coco_rejects_what_would_make_coco_eval_wrong(tmp_path, anns, why):
    data = {"images": [_img(1, "a.png")], "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
    path = _write(tmp_path, data, ["a.png"])
    with pytest.raises(ValueError, match=why) as e:
        CocoDetection(str(tmp_path), path)
    assert path in str(e.value)


def _perfect(ds):
    """Exact detections of every training target, as evaluation would pass them to coco_map."""
    return [{"image_id": t["image_id"], "boxes": t["boxes"], "scores": torch.ones(len(t["labels"])),
             "labels": t["labels"]} for t in (ds[i][1] for i in range(len(ds)))]


@pytest.mark.parametrize("bad, reason", [
    (dict(bbox=[1, 1, float("nan"), 5]), "bad_box"),
    (dict(bbox=[1, float("inf"), 5, 5]), "bad_box"),
    (dict(bbox=[20, 10, -5, 5]), "bad_box"),
    (dict(bbox=[20, 10, 5, 0]), "zero_size_box"),
    (dict(bbox=[50, 10, 5, 5]), "box_outside_image"),
    (dict(bbox=[20, 10, 5, 5], area=float("nan")), "bad_area"),
    (dict(bbox=[20, 10, 5, 5], area=float("inf")), "bad_area"),
    (dict(bbox=[20, 10, 5, 5], area=-1.0), "bad_area"),
])
def test_coco_what_training_drops_is_not_evaluated(tmp_path, caplog, bad, reason):
    from fgd.evaluate import coco_map

    anns = [_ann(1, 1, 1, [1, 1, 10, 10], area=100.0), {**_ann(2, 1, 1, None), **bad}]
    data = {"images": [_img(1, "a.png")], "annotations": anns, "categories": [{"id": 1, "name": "x"}]}
    with caplog.at_level(logging.WARNING, logger="fgd.data"):
        ds = CocoDetection(str(tmp_path), _write(tmp_path, data, ["a.png"]))
    assert ds.skipped == {reason: 1} and "dropped 1 annotations from training and evaluation" in caplog.text
    assert sorted(ds.coco.anns) == [1] and ds.coco.getAnnIds(imgIds=[1]) == [1]
    # the one box training keeps, found exactly: COCOeval must not count the dropped one as missed
    m = coco_map(ds.coco, _perfect(ds), ds.label_to_cat_id)
    assert [m[k] for k in ("AP", "AR100", "APs")] == pytest.approx([1.0] * 3) and m["APm"] == m["APl"] == -1.0


def test_coco_missing_area_and_iscrowd_get_the_training_defaults(tmp_path):
    from fgd.evaluate import coco_map

    ann = {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 10, 10]}  # COCOeval needs both keys
    data = {"images": [_img(1, "a.png")], "annotations": [ann], "categories": [{"id": 1, "name": "x"}]}
    ds = CocoDetection(str(tmp_path), _write(tmp_path, data, ["a.png"]))
    assert ds.coco.anns[1]["area"] == 100 and ds.coco.anns[1]["iscrowd"] == 0
    assert coco_map(ds.coco, _perfect(ds), ds.label_to_cat_id)["AP"] == pytest.approx(1.0)


def test_collate_fn():
    batch = [(torch.zeros(3, 4, 5), {"image_id": 1}), (torch.ones(3, 6, 2), {"image_id": 2})]
    images, targets = collate_fn(batch)
    assert isinstance(images, list) and [im.shape[1] for im in images] == [4, 6]
    assert targets == [{"image_id": 1}, {"image_id": 2}]
    assert collate_fn([]) == ([], [])


# ---- flip -------------------------------------------------------------------------------------

def _sample():
    image = torch.arange(2 * 3 * 10, dtype=torch.float32).reshape(2, 3, 10)
    return image, {"boxes": torch.tensor([[1.0, 0.0, 4.0, 2.0], [0.0, 1.0, 10.0, 3.0]]), "image_id": 5}


def test_flip_moves_image_and_boxes():
    image, target = _sample()
    flipped, t = RandomHorizontalFlip(p=1.0)(image, target, 0)
    assert torch.equal(flipped, image.flip(-1))
    assert t["boxes"].tolist() == [[6, 0, 9, 2], [0, 1, 10, 3]] and t["image_id"] == 5
    assert target["boxes"][0].tolist() == [1, 0, 4, 2]  # the input is left alone
    same, t = RandomHorizontalFlip(p=0.0)(image, target, 0)
    assert same is image and t is target


def test_flip_is_a_function_of_seed_epoch_index():
    def decisions(seed, epoch):
        flip = Compose([RandomHorizontalFlip(0.5, seed=seed)])
        flip.set_epoch(epoch)
        return [flip.transforms[0].flips(i) for i in range(200)]

    torch.manual_seed(0)
    first = decisions(0, 0)
    torch.manual_seed(1)
    np.random.seed(1)  # global RNGs do not matter
    assert decisions(0, 0) == first
    assert 70 < sum(first) < 130
    assert decisions(0, 1) != first and decisions(1, 0) != first

    image, target = _sample()
    flip = RandomHorizontalFlip(0.5, seed=0)
    out = [flip(image, target, i)[0] for i in range(8)]
    assert [not torch.equal(o, image) for o in out] == first[:8]


def test_flip_rejects_bad_p():
    with pytest.raises(ValueError, match="p must"):
        RandomHorizontalFlip(p=2)


def test_dataset_applies_transforms_with_index(shapes):
    ann, images, _ = shapes
    seen = []

    def record(image, target, index):
        seen.append(index)
        return image, target

    ds = CocoDetection(images, ann, transforms=Compose([record]))
    ds[3]
    assert seen == [3]


# ---- sampler ----------------------------------------------------------------------------------

def test_sampler_order_depends_on_seed_and_epoch_only():
    s = ResumableSampler(50, seed=1)
    first = list(s)
    torch.manual_seed(123)
    assert list(s) == first and sorted(first) == list(range(50)) and first != list(range(50))
    s.set_epoch(1)
    assert list(s) != first
    assert list(ResumableSampler(50, seed=2)) != first
    assert list(ResumableSampler(7, shuffle=False)) == list(range(7))


@pytest.mark.parametrize("n, world", [(10, 3), (12, 4), (5, 1), (2, 4)])
def test_sampler_ranks_partition_the_epoch(n, world):
    ranks = [ResumableSampler(n, seed=4, rank=r, world_size=world) for r in range(world)]
    for r in ranks:
        r.set_epoch(2)
    parts = [list(r) for r in ranks]
    assert all(len(p) == len(r) == -(-n // world) for p, r in zip(parts, ranks))
    merged = [i for p in parts for i in p]
    assert set(merged) == set(range(n))
    assert len(merged) - len(set(merged)) == -(-n // world) * world - n  # only the wrap-around padding repeats

    dropped = [list(ResumableSampler(n, seed=4, rank=r, world_size=world, drop_last=True)) for r in range(world)]
    flat = [i for p in dropped for i in p]
    assert len(flat) == len(set(flat)) == n // world * world


def test_sampler_set_start_skips_once():
    s = ResumableSampler(20, seed=0, rank=1, world_size=2)
    s.set_epoch(3)
    full = list(s)
    s.set_start(4)
    assert list(s) == full[4:]
    assert list(s) == full  # the skip was for one pass only
    s.set_start(len(s))
    assert list(s) == []
    with pytest.raises(ValueError, match="position"):
        s.set_start(len(s) + 1)
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(5, rank=2, world_size=2)


def test_sampler_in_a_dataloader_resumes_exactly(shapes):
    ann, images, _ = shapes
    ds = CocoDetection(images, ann, transforms=Compose([RandomHorizontalFlip(0.5, seed=9)]))
    sampler = ResumableSampler(len(ds), seed=9)

    def epoch_ids(epoch, start=0, batches=3):
        sampler.set_epoch(epoch)
        sampler.set_start(start)
        ds.transforms.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate_fn)
        out = []
        for n, (ims, targets) in enumerate(loader):
            out += [(t["image_id"], float(ims[k].sum())) for k, t in enumerate(targets)]
            if n + 1 == batches:
                break
        return out

    full = epoch_ids(1, batches=4)
    assert epoch_ids(1, start=4) == full[4:]  # a resume sees the same images, flipped the same way
    assert epoch_ids(1, batches=4) == full and epoch_ids(2, batches=4) != full
