"""The prediction picture: its size, labels that never overlap, one drawing for both backends."""

import itertools

import numpy as np
import torch

from d2persist.predict.outputs import MIN_DRAW_SIZE, draw_instances, layout_labels


def _crowd(n=30, size=64, seed=0):
    rng = np.random.default_rng(seed)
    x0 = rng.uniform(0, size * 0.3, n)
    y0 = rng.uniform(0, size * 0.3, n)
    boxes = np.stack([x0, y0, x0 + size * 0.2, y0 + size * 0.2], axis=1).astype(np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    for i, (a, b, c, d) in enumerate(boxes.astype(int)):
        masks[i, b:d, a:c] = True
    return (boxes, rng.uniform(0.3, 1.0, n).astype(np.float32),
            rng.integers(0, 3, n).astype(np.int64), masks)


def test_small_images_are_upscaled_large_ones_keep_their_size():
    boxes, scores, classes, masks = _crowd(3, size=64)
    small = draw_instances(np.zeros((48, 64, 3), np.uint8), boxes, scores, classes,
                           ["circle", "square", "triangle"], masks[:, :48])
    assert small.shape == (MIN_DRAW_SIZE * 48 // 64, MIN_DRAW_SIZE, 3)
    large = draw_instances(np.zeros((600, 800, 3), np.uint8), boxes * 10, scores, classes,
                           ["circle", "square", "triangle"])
    assert large.shape == (600, 800, 3)


def test_labels_of_a_crowded_prediction_never_overlap():
    boxes = [(10.0 + i, 10.0 + i, 60.0, 60.0) for i in range(40)]  # 40 boxes on one spot
    spots = layout_labels([(70, 18)] * 40, boxes, (512, 512))
    for a, b in itertools.combinations(spots, 2):
        assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)
    assert all(0 <= r[0] and r[2] <= 512 and 0 <= r[1] and r[3] <= 512 for r in spots)
    assert spots[0] == (10.0, 0.0, 80.0, 18.0)  # the first at its box: above it, clamped


def test_both_backends_draw_equal_predictions_alike():
    from detectron2.structures import Boxes, Instances

    from d2persist.predict.onnx_predictor import OnnxPrediction
    from d2persist.predict.predictor import Prediction

    boxes, scores, classes, masks = _crowd()
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # BGR
    names = ["circle", "square", "triangle"]
    inst = Instances((64, 64), pred_boxes=Boxes(torch.from_numpy(boxes)),
                     scores=torch.from_numpy(scores), pred_classes=torch.from_numpy(classes),
                     pred_masks=torch.from_numpy(masks))
    meta = {"thing_classes": names, "thing_colors": [[255, 0, 0], [0, 255, 0], [0, 0, 255]]}
    pytorch = Prediction({"instances": inst}, names, image, "BGR").draw(meta, min_score=0.5)
    onnx = OnnxPrediction(boxes, scores, classes, masks, names, image, "BGR").draw(
        meta, min_score=0.5)
    assert pytorch.shape == (MIN_DRAW_SIZE, MIN_DRAW_SIZE, 3)
    assert np.array_equal(pytorch, onnx)
    assert not np.array_equal(pytorch, Prediction({"instances": inst}, names, image, "BGR")
                              .draw(meta, min_score=0.0))  # the threshold is honoured


def _dense_prediction(seed=0, size=48):
    """Arrays of a prediction with every output: instances with keypoints, maps, proposals."""
    from d2persist.predict.outputs import PredictionArrays

    boxes, scores, classes, masks = _crowd(3, size=size, seed=seed)
    rng = np.random.default_rng(seed)
    keypoints = np.concatenate([boxes[:, None, :2] + rng.uniform(0, 8, (3, 4, 2)),
                                rng.uniform(0, 1, (3, 4, 1))], axis=2).astype(np.float32)
    sem = np.zeros((size, size), np.int64)
    sem[:, size // 2:] = 1
    sem[size // 3:size // 2, :10] = 3
    pan = np.where(masks[0], 1, 2)
    info = [{"id": 1, "isthing": True, "category_id": int(classes[0]), "score": 0.9},
            {"id": 2, "isthing": False, "category_id": 1, "area": int((pan == 2).sum())}]
    return PredictionArrays(size, size, boxes, scores, classes, masks, keypoints, sem, pan, info)


META = {"thing_classes": ["circle", "square", "triangle"],
        "stuff_classes": ["background", "circle", "square", "triangle"],
        "keypoint_names": ["top", "right", "bottom", "left"],
        "keypoint_connection_rules": [["top", "right", [255, 255, 0]],
                                      ["bottom", "left", [255, 0, 255]]]}


def test_every_output_is_drawn_and_both_backends_draw_it_alike():
    import dataclasses

    from d2persist.predict.onnx_predictor import OnnxPrediction
    from d2persist.predict.outputs import draw_prediction

    a = _dense_prediction()
    image = np.random.default_rng(2).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    fields = {f.name: getattr(a, f.name) for f in dataclasses.fields(a)
              if f.name not in ("height", "width", "boxes", "scores", "classes", "masks")}
    onnx = OnnxPrediction(a.boxes, a.scores, a.classes, a.masks, META["thing_classes"], image,
                          "RGB", META, **fields).draw(None)
    assert np.array_equal(onnx, draw_prediction(image, a, META))
    # each output changes the picture: none is silently left out
    for field in ("keypoints", "sem_seg"):
        without = draw_prediction(image, dataclasses.replace(a, panoptic=None, **{field: None}),
                                  META)
        assert not np.array_equal(without, draw_prediction(image, dataclasses.replace(
            a, panoptic=None), META)), field
    panoptic_only = draw_prediction(image, a, META)  # a panoptic model draws its segments
    assert not np.array_equal(panoptic_only, draw_prediction(
        image, dataclasses.replace(a, panoptic=None), META))
    # the skeleton in the metadata's colours
    kp = draw_prediction(image, dataclasses.replace(a, panoptic=None, sem_seg=None), META)
    assert (kp == [255, 255, 0]).all(axis=2).any()


def test_json_of_every_output_decodes_back_to_its_maps():
    import json

    from pycocotools import mask as coco_mask

    from d2persist.predict.outputs import prediction_json, rle_decode

    a = _dense_prediction()
    data = json.loads(json.dumps(prediction_json(a, META, "x.png", min_score=0.5)))
    assert all(i["score"] >= 0.5 for i in data["instances"])
    assert data["keypoint_names"] == META["keypoint_names"]
    dense = np.full(a.sem_seg.shape, -1)
    for item in data["sem_seg"]:
        m = rle_decode(item["segmentation"])
        np.testing.assert_array_equal(m, coco_mask.decode(dict(
            item["segmentation"], counts=item["segmentation"]["counts"].encode())).astype(bool))
        dense[m] = item["category_id"]
        assert item["category_name"] == META["stuff_classes"][item["category_id"]]
    np.testing.assert_array_equal(dense, a.sem_seg)
    segments = data["panoptic_seg"]["segments_info"]
    assert [(s["id"], s["isthing"], s["category_name"]) for s in segments] == [
        (1, True, META["thing_classes"][int(a.classes[0])]), (2, False, "circle")]
    for s in segments:
        assert np.array_equal(rle_decode(s["segmentation"]), a.panoptic == s["id"])


def test_onnx_masks_are_pasted_for_the_instances_shown_only(mocker):
    """JSON and picture at a threshold paste only the masks they show, and equal a full paste."""
    from d2persist.predict import onnx_predictor
    from d2persist.predict.onnx_predictor import OnnxPrediction, paste_masks

    boxes, scores, classes, _ = _crowd(30, size=64)
    probs = np.random.default_rng(2).uniform(0, 1, (30, 28, 28)).astype(np.float32)
    keypoints = np.random.default_rng(3).uniform(0, 64, (30, 4, 3)).astype(np.float32)
    image = np.zeros((64, 64, 3), np.uint8)
    names = ["circle", "square", "triangle"]
    full = OnnxPrediction(boxes, scores, classes, paste_masks(probs, boxes, 64, 64), names,
                          image, "BGR", keypoints=keypoints)
    spy = mocker.spy(onnx_predictor, "paste_masks")
    lazy = OnnxPrediction(boxes, scores, classes, None, names, image, "BGR", mask_probs=probs,
                          keypoints=keypoints)
    shown = int((scores >= 0.7).sum())
    assert 0 < shown < 30
    assert lazy.to_json("x", min_score=0.7) == full.to_json("x", min_score=0.7)
    assert np.array_equal(lazy.draw(None, min_score=0.7), full.draw(None, min_score=0.7))
    assert [len(c.args[0]) for c in spy.call_args_list] == [shown]  # once for both
    assert lazy.to_json("x", min_score=0.9) == full.to_json("x", min_score=0.9)
    assert len(spy.call_args_list[-1].args[0]) == int((scores >= 0.9).sum())
    assert lazy.to_json("x") == full.to_json("x")  # all shown: all pasted, once
    assert np.array_equal(lazy.masks, full.masks) and len(spy.call_args_list[-1].args[0]) == 30
    assert np.array_equal(lazy.draw(None), full.draw(None))
    assert len(spy.call_args_list) == 3
