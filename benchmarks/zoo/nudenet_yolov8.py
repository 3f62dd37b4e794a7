"""NudeNet's detector (nudenet wheel, 320n.onnx): a YOLOv8n exported by Ultralytics, 18 classes.

One input `images` [1, 3, 320, 320]; one output [1, 22, 2100]: per anchor 4 box values and 18 class
scores, the raw YOLOv8 head (no NMS in the graph).

Inputs: real photographs shipped by scikit-image and matplotlib (the astronaut, the cameraman,
Grace Hopper, a cat, coffee, a rocket, ...) as 2x2 mosaics of random crops, with faces from
scikit-image's LFW subset pasted in at several sizes, so each image holds a few people; turned into
the model input by the package's own `_read_image` (pad to square, resize, RGB, /255).

Fidelity: detections after the package's own postprocess (score filter, NMS) with the candidate,
matched one to one to the shipped model's (same class, IoU >= 0.5); the figure is the F1 pooled
over the held-back images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fidelity import Fidelity
from . import sources
from .core import Memo, Samples, Split, ZooModel, ragged, ragged_item

CANVAS = 480
IOU = 0.5


def detect(model_path: Path, bgr: np.ndarray) -> list[dict]:
    from nudenet import NudeDetector

    return NudeDetector(model_path=str(model_path)).detect(bgr)


def _iou(a: list[int], b: list[int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = iw * ih
    union = aw * ah + bw * bh - inter
    return inter / union if union > 0 else 0.0


def matches(ref: list[dict], est: list[dict]) -> int:
    """Greedy one-to-one matching by score: same class and IoU >= 0.5."""
    used: set[int] = set()
    n = 0
    for e in sorted(est, key=lambda d: -d["score"]):
        best, best_iou = None, IOU
        for j, r in enumerate(ref):
            if j in used or r["class"] != e["class"]:
                continue
            iou = _iou(r["box"], e["box"])
            if iou >= best_iou:
                best, best_iou = j, iou
        if best is not None:
            used.add(best)
            n += 1
    return n


def _decode(jpeg: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.ascontiguousarray(jpeg, np.uint8), cv2.IMREAD_COLOR)


class NudeNetYolov8(ZooModel):
    name = "nudenet"
    title = "NudeNet 320n (YOLOv8n detector)"
    family = "YOLO-family detector"
    dist = "nudenet"
    module = "nudenet"
    file = "320n.onnx"
    licence = "AGPL-3.0 (the wheel's LICENSE file and the model's Ultralytics metadata; its METADATA says MIT)"
    inputs_made = ("2x2 mosaics of random crops of the photographs scikit-image and matplotlib ship, with 0-4 LFW "
                   "faces (skimage.data.lfw_subset) pasted in; the package's _read_image")
    criterion = "detection F1 at IoU 0.5, same class, after the package's postprocess+NMS, against the shipped model"
    pass_rule = "detection F1 >= 99%"
    # The pass rule counts detections: with 96 images the test split held 82, so F1 >= 99% allowed no
    # error at all, and detections within 0.001 of the package's 0.25 score threshold decided every
    # row. 480 images give 416 test detections (four errors allowed); they are kept as JPEG
    # bytes (quality 95), and the feeds are made from the decoded pixels.
    settings = {"images": 480, "canvas": CANVAS, "jpeg_quality": 95}

    def __init__(self) -> None:
        self._memo = Memo()

    def images(self) -> list[np.ndarray]:
        """BGR uint8 images, as cv2.imread would give the package."""
        import cv2

        photos = sources.photos()
        faces = sources.faces()[:100]
        rng = np.random.default_rng(14)
        half = CANVAS // 2
        out = []
        for _ in range(self.settings["images"]):
            canvas = np.zeros((CANVAS, CANVAS, 3), np.uint8)
            for cy in (0, half):
                for cx in (0, half):
                    img = photos[int(rng.integers(len(photos)))]
                    h, w = img.shape[:2]
                    s = int(min(h, w) * rng.uniform(0.5, 1.0))
                    y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
                    tile = img[y:y + s, x:x + s]
                    if rng.random() < 0.5:
                        tile = tile[:, ::-1]
                    canvas[cy:cy + half, cx:cx + half] = cv2.resize(np.ascontiguousarray(tile), (half, half),
                                                                    interpolation=cv2.INTER_AREA)
            for _ in range(int(rng.integers(0, 5))):
                face = (faces[int(rng.integers(len(faces)))] * 255).astype(np.uint8)
                size = int(rng.integers(60, 150))
                face = cv2.resize(np.stack([face] * 3, axis=-1), (size, size), interpolation=cv2.INTER_CUBIC)
                y, x = int(rng.integers(0, CANVAS - size)), int(rng.integers(0, CANVAS - size))
                canvas[y:y + size, x:x + size] = face
            out.append(np.ascontiguousarray(canvas[:, :, ::-1]))
        return out

    def build(self) -> Samples:
        from nudenet.nudenet import _read_image

        import cv2

        quality = [int(cv2.IMWRITE_JPEG_QUALITY), self.settings["jpeg_quality"]]
        encoded = [cv2.imencode(".jpg", img, quality)[1].ravel() for img in self.images()]
        feeds = [{"images": _read_image(_decode(jpg), 320)[0].astype(np.float32)} for jpg in encoded]
        return Samples(feeds, np.arange(len(encoded)), ragged(encoded, "jpeg"))

    def _detections(self, model_path: Path, test: Split) -> list[list[dict]]:
        from nudenet import NudeDetector

        det = NudeDetector(model_path=str(model_path))
        return [det.detect(_decode(ragged_item(test.side, "jpeg", g))) for g in test.group_ids]

    def score(self, candidate: Path, test: Split) -> Fidelity:
        ref = self._memo.get((self.name, test.name), lambda: self._detections(self.path(), test))
        est = self._detections(candidate, test)
        matched = sum(matches(r, e) for r, e in zip(ref, est))
        n_ref, n_est = sum(map(len, ref)), sum(map(len, est))
        f1 = 2 * matched / (n_ref + n_est) if n_ref + n_est else 1.0
        return Fidelity(f1, "detection F1 @IoU0.5", {"precision": matched / max(n_est, 1),
                                                     "recall": matched / max(n_ref, 1)})


MODEL = NudeNetYolov8
