"""ddddocr's older captcha OCR model (ddddocr wheel, common_old.onnx), dynamically quantized.

One input `input1` [1, 1, 64, width] (grey image scaled to height 64); one output, the best class
per time step [1, steps]. onnxruntime's dynamic quantization: 13.5 M weights stored as uint8/int8
behind ConvInteger, MatMulInteger and DynamicQuantizeLSTM (activations quantized at run time), 19 k
float values left.

Inputs: short pieces of real text (words from licences and Python sources on the machine)
rendered like the bench's text lines, made into feeds by ddddocr's own OCREngine preprocessing
(recorded from its session). The width follows the text, so the feeds do not stack: they are
written one per sample, and no DATA.npz is written (the converter cannot take them yet).

Fidelity: the string ddddocr's predict() returns with the candidate, against the shipped model's,
on held-back images.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..fidelity import Fidelity
from .core import Feed, Memo, Recorder, Samples, Split, ZooModel, ragged, ragged_item, session




def read(model_path: Path, pngs: list[bytes]) -> tuple[list[Feed], list[str]]:
    """ddddocr's OCREngine (old model) on each image, the candidate's session swapped in."""
    from ddddocr.core.ocr_engine import OCREngine

    engine = OCREngine(old=True)
    recorder = Recorder(session(model_path))
    engine.session = recorder
    texts = [engine.predict(png) for png in pngs]
    return recorder.feeds, texts


class DdddocrOld(ZooModel):
    name = "ddddocr_old"
    title = "ddddocr captcha OCR, old model (dynamic int8)"
    family = "already-int8 model (onnxruntime dynamic quantization), CNN + LSTM"
    dist = "ddddocr"
    module = "ddddocr"
    file = "common_old.onnx"
    licence = "MIT"
    inputs_made = ("2-12 character pieces of real text lines rendered with DejaVu fonts and noise (PNG); "
                   "ddddocr's OCREngine preprocessing (height 64, grey, /255)")
    criterion = "string agreement of ddddocr's predict() with the candidate against the shipped model"
    pass_rule = "strings agree >= 99%"
    stackable = False
    settings = {"images": 300}

    def __init__(self) -> None:
        self._memo = Memo()

    def pngs(self) -> list[bytes]:
        from PIL import Image

        from ..inputs import _render_line, _text_lines

        rng = np.random.default_rng(19)
        out = []
        for line in _text_lines(self.settings["images"], 19):
            words = line.split()
            start = int(rng.integers(len(words)))
            text = " ".join(words[start:start + int(rng.integers(1, 3))])[:12]
            bgr, _ = _render_line(text, rng, None)
            buf = io.BytesIO()
            Image.fromarray(bgr[:, :, ::-1]).save(buf, format="PNG")
            out.append(buf.getvalue())
        return out

    def build(self) -> Samples:
        pngs = self.pngs()
        feeds, _ = read(self.path(), pngs)
        return Samples(feeds, np.arange(len(feeds)), ragged([np.frombuffer(p, np.uint8) for p in pngs], "png"))

    def _pngs(self, test: Split) -> list[bytes]:
        return [ragged_item(test.side, "png", g).tobytes() for g in test.group_ids]

    def score(self, candidate: Path, test: Split) -> Fidelity:
        ref = self._memo.get((self.name, test.name), lambda: read(self.path(), self._pngs(test))[1])
        out = read(candidate, self._pngs(test))[1]
        return Fidelity(float(np.mean([a == b for a, b in zip(ref, out)])), "string agreement")


MODEL = DdddocrOld
