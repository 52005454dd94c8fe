"""One settings object for the method: every door (fgd.Distiller's keywords, `fgd train`'s config keys,
Ultralytics' fgfi_* keys) maps each of its method keys to one ImitationSettings field, checks it the same
way and says the same thing about a bad value after its own prefix; old configs keep their run ids."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import fgd
from fgd.checkpoint import run_id
from fgd.config import IMITATION_KEYS, TrainConfig
from fgd.distill import FeatureImitation, FGFIParams, ImitationSettings
from fgd.distill import settings as S
from helpers import tiny_detector

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(train_json="a.json", train_images="imgs", distill=False)

# Each field of ImitationSettings: a value it allows (not its default) and one it refuses.
VALUES = {
    "method": ("fgfi", "defeat"),
    "imitation_weight": (0.5, -1.0),
    "warmup_iters": (7, -1),
    "adapter": ("1x1", "5x5"),
    "adapter_relu": (True, "yes"),
    "sparse_adaptation": (False, 1),
    "params.thresh": (0.3, 1.0),
    "params.mask_mode": ("full", "boxes"),
    "params.level_policy": ("per_level", "all"),
    "params.offset": (1.0, 0.5),
}
# The method keys each door had before the settings object: they must keep working.
TODAY = {
    "python": {"imitation_weight", "thresh", "warmup_iters", "mask_mode", "level_policy", "adapter", "adapter_relu",
               "offset", "sparse_adaptation"},
    "config": {"imitation_weight", "thresh", "imitation_warmup", "level_policy", "mask_mode", "adapter",
               "sparse_adaptation"},
    "ultralytics": {"fgfi_psi", "fgfi_lambda", "fgfi_warmup", "fgfi_adapter", "fgfi_mask", "fgfi_levels", "fgfi_sparse"},
}
PREFIX = {"python": "fgd.Distiller: ", "config": "config: ", "ultralytics": "FGFITrainer: "}


def fields():
    top = [f.name for f in dataclasses.fields(ImitationSettings) if f.name != "params"]
    return top + [f"params.{f.name}" for f in dataclasses.fields(FGFIParams)]


def test_the_name_table_covers_every_field_once_per_door():
    assert sorted(S.NAMES) == sorted(fields()) == sorted(VALUES)
    for door in S.DOORS:
        keys = [names[door] for names in S.NAMES.values()]
        assert len(set(keys)) == len(keys), door
        assert TODAY[door] <= set(keys), door
    assert set(IMITATION_KEYS) == {n["config"] for n in S.NAMES.values()}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    return tiny_detector(depth=34, out_channels=96), tiny_detector(depth=18, out_channels=64)


def _door(door, key, value, pair=None):
    """The ImitationSettings a door makes of one key (ValueError/TypeError for a bad value)."""
    if door == "python":
        teacher, student = pair if pair is not None else (nn.Identity(), nn.Identity())
        return fgd.Distiller(teacher, student, **{key: value}).settings  # the settings are checked first
    if door == "config":
        return TrainConfig.from_dict({**BASE, key: value}).imitation
    fu = pytest.importorskip("fgd.integrations.ultralytics")
    return fu.imitation_settings(fu.fgfi_settings({key: value})[0])


@pytest.mark.parametrize("path", sorted(VALUES))
def test_every_door_maps_its_key_to_the_field_and_words_a_bad_value_the_same(path, pair):
    good, bad = VALUES[path]
    texts = {}
    for door in S.DOORS:
        key = S.NAMES[path][door]
        assert S.get(_door(door, key, good, pair), path) == good, (door, key)
        with pytest.raises((ValueError, TypeError)) as e:
            _door(door, key, bad)
        text = str(e.value)
        assert text.startswith(PREFIX[door] + key + " must be "), text
        texts[door] = text[len(PREFIX[door] + key):]
    assert len(set(texts.values())) == 1, texts
    # the core and the settings object itself say it too, under the field's own name
    with pytest.raises((ValueError, TypeError), match=" must be "):
        FeatureImitation([], **{S.NAMES[path]["python"]: bad})


def test_command_line_flags_come_from_the_settings(tmp_path):
    from fgd.cli import build_parser

    args = build_parser().parse_args(["train", "--thresh", "0.3", "--imitation-warmup", "5", "--adapter-relu",
                                      "--offset", "1", "--mask-mode", "full"])
    from fgd.config import given_flags

    given = given_flags(args, TrainConfig)
    s = TrainConfig.from_dict({**BASE, **given}).imitation
    assert (s.params.thresh, s.warmup_iters, s.adapter_relu, s.params.offset, s.params.mask_mode) == (0.3, 5, True, 1.0, "full")


def test_a_nested_imitation_block_gives_the_same_config_as_flat_keys():
    nested = TrainConfig.from_dict({**BASE, "imitation": {"imitation_weight": 0.1, "warmup_iters": 25,
                                                          "params": {"thresh": 0.4, "mask_mode": "gt_box"}}})
    flat = TrainConfig.from_dict({**BASE, "imitation_weight": 0.1, "imitation_warmup": 25, "thresh": 0.4,
                                  "mask_mode": "gt_box"})
    assert nested == flat and nested.imitation == flat.imitation
    with pytest.raises(ValueError, match=r"given both flat and in the imitation block"):
        TrainConfig.from_dict({**BASE, "thresh": 0.4, "imitation": {"params": {"thresh": 0.4}}})
    with pytest.raises(ValueError, match=r"unknown imitation settings \['params.psi'\]"):
        TrainConfig.from_dict({**BASE, "imitation": {"params": {"psi": 0.4}}})
    s = ImitationSettings(imitation_weight=0.2)
    assert ImitationSettings.from_dict(s.to_dict()) == s


def test_door_defaults_and_the_one_automatic_warmup():
    assert ImitationSettings().imitation_weight == 0.01 and ImitationSettings().warmup_iters == 400
    assert TrainConfig(**BASE).imitation.warmup_iters is None
    assert S.from_door({}, "ultralytics").imitation_weight == 0.1
    auto = ImitationSettings(warmup_iters=None)
    assert [auto.warmup_for(n) for n in (None, 100, 10_000)] == [400, 10, 400]
    assert TrainConfig(**BASE, iterations=250).resolved_imitation_warmup() == 25
    core = FeatureImitation([], auto, total_iterations=50)
    assert core.warmup_iters == 5


def test_distiller_aliases_read_and_set_the_settings(pair):
    d = fgd.Distiller(*pair, thresh=0.4)
    assert d.thresh == 0.4 and d.settings.params.thresh == 0.4
    d.warmup_iters = 0
    assert d.settings.warmup_iters == 0 and not d.imitation.warming_up
    with pytest.raises(ValueError, match=r"fgd.Distiller: mask_mode must be one of"):
        d.mask_mode = "boxes"
    d2 = fgd.Distiller(*pair, d.settings, level_policy="per_level")
    assert d2.settings == dataclasses.replace(d.settings, params=dataclasses.replace(d.settings.params,
                                                                                     level_policy="per_level"))


def test_the_turn2_config_keeps_its_run_id():
    fixture = ROOT / "tests" / "fixtures" / "turn2-config.json"
    shared = ROOT.parent / "shared" / "fixtures" / "turn2-config.json"
    if shared.exists():  # the copy here is the shared file, byte for byte
        assert shared.read_bytes() == fixture.read_bytes()
    saved = json.loads(fixture.read_text())
    settings = {k: v for k, v in saved.items() if k not in ("run_id", "resolved_imitation_warmup")}
    cfg = TrainConfig.from_dict(settings)
    assert run_id(dataclasses.asdict(cfg)) == saved["run_id"] == "7912e7e6c337"
    assert cfg.resolved_imitation_warmup() == saved["resolved_imitation_warmup"]
    # a key added since counts in the id only when it differs from the value earlier runs had
    assert run_id(dataclasses.asdict(dataclasses.replace(cfg, offset=1.0))) != saved["run_id"]
    assert run_id(dataclasses.asdict(dataclasses.replace(cfg, adapter_relu=False))) == saved["run_id"]


def test_the_demo_reuses_a_run_whose_config_json_came_from_before_the_new_keys(tmp_path):
    from fgd.demo import demo_id

    saved = json.loads((ROOT / "tests" / "fixtures" / "turn2-config.json").read_text())
    cfg = TrainConfig.from_dict({k: v for k, v in saved.items() if k not in ("run_id", "resolved_imitation_warmup")})
    data = {"data": "shapes"}
    assert demo_id(saved, data) == demo_id(dataclasses.asdict(cfg), data)
    assert demo_id(saved, data) != demo_id(dataclasses.asdict(dataclasses.replace(cfg, offset=1.0)), data)
