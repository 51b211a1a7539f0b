"""The prediction picture: its size, labels that never overlap, one drawing for both backends."""

import itertools

import numpy as np
import torch

from d2persist.outputs import MIN_DRAW_SIZE, draw_instances, layout_labels


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

    from d2persist.onnx_predictor import OnnxPrediction
    from d2persist.predictor import Prediction

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
