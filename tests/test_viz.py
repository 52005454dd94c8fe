import numpy as np
import pytest
import torch
from PIL import Image

from fgd.viz import CAPTION_BAND, draw_detections, overlay_masks, plot_curves, plot_map_table

H, W = 32, 48


@pytest.fixture
def image():
    # mid-grey: tinting red visibly changes every channel
    return torch.full((3, H, W), 0.5)


def masks():
    m0 = torch.zeros(8, 12, dtype=torch.bool)
    m0[:4, :6] = True  # top-left quarter of the image
    m1 = torch.zeros(4, 6, dtype=torch.bool)
    m1[2:, 3:] = True  # bottom-right quarter
    m2 = torch.ones(2, 3, dtype=torch.bool)
    return [m0, m1, m2]


def test_overlay_masks_size_and_tint(image, tmp_path):
    path = overlay_masks(image, masks(), tmp_path / "sub" / "m.png", boxes=torch.tensor([[1.0, 1.0, 10.0, 10.0]]),
                         labels=torch.tensor([1]), class_names=["bg", "cat"], title="t")
    with Image.open(path) as im:
        assert im.mode == "RGB"
        assert im.size == ((1 + 3) * W, CAPTION_BAND + H) == (4 * W, 14 + H)
        px = np.asarray(im)
    original = px[CAPTION_BAND + 20, 40]  # image panel, away from the box
    assert tuple(original) == (128, 128, 128)
    level0 = px[CAPTION_BAND:, W:2 * W]
    assert tuple(level0[H // 4 + 2, W // 4]) != tuple(original)  # mask on (top-left), away from the box
    assert tuple(level0[3 * H // 4, 3 * W // 4]) == tuple(original)  # mask off
    level1 = px[CAPTION_BAND:, 2 * W:3 * W]
    assert tuple(level1[3 * H // 4, 3 * W // 4]) != tuple(original)
    assert tuple(level1[H // 4 + 2, W // 4]) == tuple(original)
    assert px[CAPTION_BAND + 3, W + 1, 1] == 255  # the box outline (green) on a level panel


def test_overlay_masks_rejects_bad_masks(image, tmp_path):
    with pytest.raises(ValueError, match=r"masks\[1\] must be 2-D"):
        overlay_masks(image, [torch.ones(2, 2, dtype=torch.bool), torch.ones(1, 2, 2, dtype=torch.bool)],
                      tmp_path / "x.png")
    with pytest.raises(ValueError, match="image"):
        overlay_masks(torch.zeros(H, W), masks(), tmp_path / "x.png")


def test_draw_detections(image, tmp_path):
    path = draw_detections(image, torch.tensor([[2.0, 2.0, 20.0, 20.0], [25.0, 22.0, 40.0, 30.0]]),
                           torch.tensor([1, 2]), torch.tensor([0.9, 0.1]), tmp_path / "d.png",
                           class_names=["bg", "cat", "dog"])
    with Image.open(path) as im:
        assert im.mode == "RGB" and im.size == (W, H)
        px = np.asarray(im)
    assert tuple(px[20, 10]) == (0, 255, 0)  # kept box's bottom edge
    assert tuple(px[30, 32]) == (128, 128, 128)  # the 0.1-score box is not drawn


def _write_log(path, rows, header):
    path.write_text(",".join(header) + "\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    return str(path)


def _valid_png(path):
    assert path.stat().st_size > 0
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG"


def test_plot_curves(tmp_path):
    a = _write_log(tmp_path / "a.csv", [(i, 1.0 / (i + 1), 0.5) for i in range(5)], ["iteration", "loss", "loss_imitation"])
    b = _write_log(tmp_path / "b.csv", [(i, 2.0 / (i + 1)) for i in range(5)], ["iteration", "loss"])
    path = plot_curves({"fgfi": a, "student": b}, tmp_path / "c.png", keys=("loss", "loss_imitation"), title="t")
    _valid_png(path)


def test_plot_map_table(tmp_path):
    rows = {"teacher": {"AP": 0.4, "AP50": 0.6, "AP75": 0.3}, "student": {"AP": 0.2, "AP50": -1.0}}
    _valid_png(plot_map_table(rows, tmp_path / "m.png"))
