"""The shapes data for every task: keypoints, semantic and panoptic labels of the same images."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from d2persist.data.shapes import (
    SEMANTIC_CLASSES,
    SHAPE_KEYPOINTS,
    ShapesSpec,
    generate_labels,
    shape_keypoints,
)


def test_keypoints_are_the_extremes_of_each_shape():
    triangle = [[50, 10], [80, 60], [20, 60]]  # pointing up
    kps = np.array(shape_keypoints(np.array(triangle).ravel())).reshape(4, 3)
    top, right, bottom, left = kps
    assert list(top) == [50, 10, 2] and list(right) == [80, 60, 2]
    assert list(bottom) == [50, 60, 2] and list(left) == [20, 60, 2]  # an edge: its middle
    mirrored = np.array(triangle, float) * [-1, 1] + [100, 0]
    flipped = np.array(shape_keypoints(mirrored.ravel())).reshape(4, 3)
    order = [SHAPE_KEYPOINTS.index(n) for n in ("top", "left", "bottom", "right")]
    np.testing.assert_allclose(flipped[order][:, 0], 100 - kps[:, 0])  # left and right swap


def test_semantic_and_panoptic_labels_agree_with_the_polygons(tmp_path):
    from d2persist.data.shapes import _STUFF_DATASET_ID

    dicts, folder = generate_labels(ShapesSpec(4, size=64, seed=3), str(tmp_path))
    index = json.loads((tmp_path / folder / "panoptic.json").read_text())
    cats = {c["id"]: c for c in index["categories"]}
    assert [c["name"] for c in index["categories"]] == SEMANTIC_CLASSES[1:] + ["background"]
    for d, ann in zip(dicts, index["annotations"]):
        stem = os.path.splitext(os.path.basename(d["file_name"]))[0]
        sem = np.asarray(Image.open(os.path.join(folder, "sem", stem + ".png")))
        rgb = np.asarray(Image.open(os.path.join(folder, "panoptic", stem + ".png"))).astype(int)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
        pan_sem = np.asarray(Image.open(os.path.join(folder, "pan_sem", stem + ".png")))
        assert sorted(np.unique(ids)) == sorted(s["id"] for s in ann["segments_info"])
        for seg in ann["segments_info"]:
            region = ids == seg["id"]
            assert region.sum() == seg["area"]
            thing = cats[seg["category_id"]]["isthing"]
            expected = seg["category_id"] if thing else 0  # semantic id: 1 + thing id
            assert (sem[region] == expected).all()
            assert (pan_sem[region] == (0 if thing else 1)).all()
        things = [s for s in ann["segments_info"] if s["category_id"] != _STUFF_DATASET_ID]
        assert [s["category_id"] - 1 for s in things] == [
            a["category_id"] for a in d["annotations"]]


def test_the_evaluator_is_chosen_by_the_dataset_task(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from d2persist.data.shapes import register_shapes
    from d2persist.errors import ConfigError
    from d2persist.export.self_eval import evaluator_name, family_evaluator

    register_shapes()
    kp = family_evaluator("shapes_kp_val", str(tmp_path), [0.05] * 4)
    assert evaluator_name(kp) == "COCOEvaluator"
    assert evaluator_name(family_evaluator("shapes_sem_val", str(tmp_path))) == "SemSegEvaluator"
    assert evaluator_name(family_evaluator("shapes_panoptic_val", str(tmp_path))) == (
        "DatasetEvaluators(SemSegEvaluator, COCOEvaluator, COCOPanopticEvaluator)")
    if "d2persist_mystery" not in DatasetCatalog.list():
        DatasetCatalog.register("d2persist_mystery", lambda: [])
        MetadataCatalog.get("d2persist_mystery").set(evaluator_type="mystery")
    with pytest.raises(ConfigError, match="evaluator_type 'mystery'"):
        family_evaluator("d2persist_mystery", str(tmp_path))
