"""
The baseline of the cold-start benchmark: what a detectron2 user writes to predict on one image
with DefaultPredictor and save the result as JSON. Usage: RUN_DIR IMAGE OUT_JSON
"""

import json
import sys

import cv2
from detectron2.config import get_cfg
from detectron2.engine import DefaultPredictor


def main(run_dir, image, out_json):
    cfg = get_cfg()
    cfg.merge_from_file(f"{run_dir}/config.yaml")
    cfg.MODEL.WEIGHTS = f"{run_dir}/model_final.pth"
    cfg.MODEL.DEVICE = "cpu"
    inst = DefaultPredictor(cfg)(cv2.imread(image))["instances"].to("cpu")
    with open(out_json, "w") as f:
        json.dump({"image": image, "instances": [
            {"category_id": int(c), "score": float(s), "bbox": b.tolist()}
            for c, s, b in zip(inst.pred_classes, inst.scores, inst.pred_boxes.tensor)
        ]}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
