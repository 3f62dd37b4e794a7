"""Small models of the kinds users train themselves, built with torch on real data sets that ship
with scikit-learn, exported to ONNX: the cases a converter tuned on image classifiers gets wrong.

Each builder returns a :class:`UserModel`: the ONNX file, a search set and a held-out test set
(as the feeds the converter is given), and labels where the task has them. Everything is seeded;
a model trains in a few seconds on one CPU thread.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

OPSET = 17


@dataclass
class UserModel:
    path: Path
    search: dict[str, np.ndarray] | list[dict[str, np.ndarray]]
    test: dict[str, np.ndarray] | list[dict[str, np.ndarray]]
    search_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    notes: dict = field(default_factory=dict)


def _torch():
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    return torch


def _export(module, examples: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic: dict) -> Path:
    torch = _torch()
    buffer = io.BytesIO()
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, examples, buffer, input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    onnx.save(model, str(path))
    return path


def _fit(module, loss_fn, batches, epochs: int, lr: float = 3e-3) -> None:
    torch = _torch()
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    module.train()
    for _ in range(epochs):
        for inputs, target in batches:
            optimizer.zero_grad()
            loss = loss_fn(module(*inputs), target)
            loss.backward()
            optimizer.step()
    module.eval()


def _split(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    half = n // 2
    return order[:half], order[half:]


def regressor(folder: Path) -> UserModel:
    """An MLP regressor with one output value (scikit-learn's diabetes data, standardised)."""
    from sklearn.datasets import load_diabetes

    torch = _torch()
    x, y = load_diabetes(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    y = ((y - y.mean()) / y.std()).astype(np.float32)[:, None]
    net = torch.nn.Sequential(torch.nn.Linear(10, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 1))
    batches = [((torch.from_numpy(x[i:i + 32]),), torch.from_numpy(y[i:i + 32])) for i in range(0, len(x), 32)]
    _fit(net, torch.nn.functional.mse_loss, batches, epochs=60)
    path = _export(net, (torch.zeros(1, 10),), folder / "regressor.onnx", ["x"], ["y"], {"x": {0: "n"}, "y": {0: "n"}})
    search, test = _split(len(x))
    return UserModel(path, {"x": x[search]}, {"x": x[test]})


def binary_classifier(folder: Path) -> UserModel:
    """A binary classifier with one logit (the BCEWithLogits head), breast-cancer data, 0/1 labels."""
    from sklearn.datasets import load_breast_cancer

    torch = _torch()
    x, y = load_breast_cancer(return_X_y=True)
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    net = torch.nn.Sequential(torch.nn.Linear(30, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 1))
    target = y.astype(np.float32)[:, None]
    batches = [((torch.from_numpy(x[i:i + 32]),), torch.from_numpy(target[i:i + 32])) for i in range(0, len(x), 32)]
    _fit(net, torch.nn.functional.binary_cross_entropy_with_logits, batches, epochs=30)
    path = _export(net, (torch.zeros(1, 30),), folder / "binary.onnx", ["x"], ["logit"],
                   {"x": {0: "n"}, "logit": {0: "n"}})
    search, test = _split(len(x))
    return UserModel(path, {"x": x[search]}, {"x": x[test]}, y[search].astype(np.int64), y[test].astype(np.int64))


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y.astype(np.int64)


def detector_head(folder: Path, classes: int = 6, anchors: int = 16) -> UserModel:
    """A YOLO-shaped head: output ``[N, 4 + classes, anchors]`` (boxes then class scores per anchor),
    trained to regress a box around each digit's ink and its class bucket on 4x4 anchor cells."""
    torch = _torch()
    x, y = _digits()
    images = x.reshape(-1, 1, 8, 8)
    ink = images[:, 0] > 0.3
    rows, cols = ink.any(2), ink.any(1)
    box = np.stack([rows.argmax(1), cols.argmax(1), 8 - rows[:, ::-1].argmax(1), 8 - cols[:, ::-1].argmax(1)], 1)
    target = np.zeros((len(x), 4 + classes, anchors), np.float32)
    target[:, :4, :] = (box / 8.0).astype(np.float32)[:, :, None]
    target[np.arange(len(x)), 4 + y % classes, :] = 1.0

    class Head(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.SiLU(),
                                            torch.nn.Conv2d(32, 64, 3, padding=1, stride=2), torch.nn.SiLU(),
                                            torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.SiLU(),
                                            torch.nn.Conv2d(64, 4 + classes, 1))

        def forward(self, image):
            out = self.body(image)
            return torch.cat([out[:, :4].sigmoid(), out[:, 4:].sigmoid()], 1).flatten(2)

    net = Head()
    batches = [((torch.from_numpy(images[i:i + 64]),), torch.from_numpy(target[i:i + 64])) for i in range(0, len(x), 64)]
    _fit(net, torch.nn.functional.mse_loss, batches, epochs=15)
    path = _export(net, (torch.zeros(1, 1, 8, 8),), folder / "detector.onnx", ["images"], ["output0"],
                   {"images": {0: "n"}, "output0": {0: "n"}})
    search, test = _split(len(x))
    return UserModel(path, {"images": images[search]}, {"images": images[test]})


def sparse_tagger(folder: Path, tags: int = 32) -> UserModel:
    """Many independent sigmoid probabilities per sample, few of them on (note or label tagging):
    each digit image tags its class and its class plus 10 and plus 20 of 32 tags, about 9% on."""
    torch = _torch()
    x, y = _digits()
    target = np.zeros((len(x), tags), np.float32)
    for shift in (0, 10, 20):
        target[np.arange(len(x)), (y + shift) % tags] = 1.0
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, tags), torch.nn.Sigmoid())
    batches = [((torch.from_numpy(x[i:i + 64]),), torch.from_numpy(target[i:i + 64])) for i in range(0, len(x), 64)]
    _fit(net, torch.nn.functional.binary_cross_entropy, batches, epochs=20)
    path = _export(net, (torch.zeros(1, 64),), folder / "tagger.onnx", ["pixels"], ["tags"],
                   {"pixels": {0: "n"}, "tags": {0: "n"}})
    search, test = _split(len(x))
    return UserModel(path, {"pixels": x[search]}, {"pixels": x[test]})


def multi_output(folder: Path) -> UserModel:
    """Two heads on one body: class logits ``[N, 10]`` and a regression ``[N, 1]`` (the ink mass)."""
    torch = _torch()
    x, y = _digits()
    mass = x.mean(1, keepdims=True).astype(np.float32)

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU())
            self.classes = torch.nn.Linear(256, 10)
            self.mass = torch.nn.Linear(256, 1)

        def forward(self, pixels):
            h = self.body(pixels)
            return self.classes(h), self.mass(h)

    net = TwoHeads()

    def loss(out, target):
        return torch.nn.functional.cross_entropy(out[0], target[0]) + 10 * torch.nn.functional.mse_loss(out[1], target[1])

    batches = [((torch.from_numpy(x[i:i + 64]),), (torch.from_numpy(y[i:i + 64]), torch.from_numpy(mass[i:i + 64])))
               for i in range(0, len(x), 64)]
    _fit(net, loss, batches, epochs=20)
    path = _export(net, (torch.zeros(1, 64),), folder / "two_heads.onnx", ["pixels"], ["logits", "mass"],
                   {"pixels": {0: "n"}, "logits": {0: "n"}, "mass": {0: "n"}})
    search, test = _split(len(x))
    return UserModel(path, {"pixels": x[search]}, {"pixels": x[test]}, y[search], y[test])


def _frames(n: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Audio-like frames: a tone in noise (voice) or noise alone, as a VAD sees them."""
    rng = np.random.default_rng(seed)
    t = np.arange(width) / 16000.0
    voiced = rng.random(n) < 0.5
    frames = rng.standard_normal((n, width)).astype(np.float32) * 0.1
    pitch = rng.uniform(100, 400, n)
    frames[voiced] += (0.5 * np.sin(2 * np.pi * pitch[voiced, None] * t[None, :])).astype(np.float32)
    return frames, voiced.astype(np.int64)


def streaming_vad(folder: Path, width: int = 576, hidden: int = 128) -> UserModel:
    """A streaming voice-activity detector: frames ``[N, width]``, a recurrent state
    ``[2, N, hidden]`` (batch on axis 1) and a scalar sample rate; outputs a probability ``[N, 1]``
    and the next state."""
    torch = _torch()

    class Vad(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode = torch.nn.Sequential(torch.nn.Linear(width, 256), torch.nn.ReLU(), torch.nn.Linear(256, hidden))
            self.cell = torch.nn.GRUCell(hidden, hidden)
            self.mix = torch.nn.Linear(2 * hidden, hidden)
            self.decide = torch.nn.Linear(hidden, 1)

        def forward(self, frames, state, sr):
            scale = sr.to(torch.float32) / 16000.0
            h = self.cell(self.encode(frames * scale), state[0])
            h2 = torch.tanh(self.mix(torch.cat([h, state[1]], 1)))
            return torch.sigmoid(self.decide(h2)), torch.stack([h, h2])

    net = Vad()
    frames, voiced = _frames(2048, width, seed=0)
    sr = torch.tensor(16000, dtype=torch.int64)
    batches = [((torch.from_numpy(frames[i:i + 64]), torch.zeros(2, 64, hidden), sr),
                torch.from_numpy(voiced[i:i + 64].astype(np.float32))[:, None]) for i in range(0, len(frames), 64)]
    _fit(net, lambda out, target: torch.nn.functional.binary_cross_entropy(out[0], target), batches, epochs=4)
    path = _export(net, (torch.zeros(1, width), torch.zeros(2, 1, hidden), sr), folder / "vad.onnx",
                   ["input", "state", "sr"], ["output", "stateN"],
                   {"input": {0: "n"}, "state": {1: "n"}, "output": {0: "n"}, "stateN": {1: "n"}})
    search_frames, search_voiced = _frames(200, width, seed=1)
    test_frames, test_voiced = _frames(200, width, seed=2)
    rng = np.random.default_rng(3)
    states = [rng.standard_normal((2, 200, hidden)).astype(np.float32) * 0.3 for _ in range(2)]
    sr16k = np.array(16000, dtype=np.int64)
    return UserModel(path, {"input": search_frames, "state": states[0], "sr": sr16k},
                     {"input": test_frames, "state": states[1], "sr": sr16k}, search_voiced, test_voiced)


def sequence_lstm(folder: Path, width: int = 576, hidden: int = 128) -> UserModel:
    """A sequence model fed one block ``[T, width]`` at a time with LSTM state ``h``, ``c`` of shape
    ``[1, 1, hidden]``: a sample is a whole feed, and blocks have different lengths."""
    torch = _torch()

    class Tagger(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode = torch.nn.Linear(width, hidden)
            self.lstm = torch.nn.LSTM(hidden, hidden)
            self.tag = torch.nn.Linear(hidden, 2)

        def forward(self, block, h, c):
            out, (h2, c2) = self.lstm(torch.relu(self.encode(block)).unsqueeze(1), (h, c))
            return self.tag(out.squeeze(1)), h2, c2

    net = Tagger()
    frames, voiced = _frames(2048, width, seed=0)
    batches = [((torch.from_numpy(frames[i:i + 64]), torch.zeros(1, 1, hidden), torch.zeros(1, 1, hidden)),
                torch.from_numpy(voiced[i:i + 64])) for i in range(0, len(frames), 64)]
    _fit(net, lambda out, target: torch.nn.functional.cross_entropy(out[0], target), batches, epochs=3)
    path = _export(net, (torch.zeros(5, width), torch.zeros(1, 1, hidden), torch.zeros(1, 1, hidden)), folder / "tagger.onnx",
                   ["block", "h", "c"], ["tags", "hN", "cN"], {"block": {0: "T"}, "tags": {0: "T"}})

    def feeds(seed: int, count: int) -> list[dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(count):
            block, _ = _frames(int(rng.integers(4, 24)), width, seed=int(rng.integers(1 << 30)))
            state = (rng.standard_normal((2, 1, 1, hidden)) * 0.3).astype(np.float32)
            out.append({"block": block, "h": state[0], "c": state[1]})
        return out

    return UserModel(path, feeds(1, 60), feeds(2, 60))


def token_mixer(folder: Path, width: int = 256) -> UserModel:
    """A transformer-style block on the digits: each image row is a token ``[N, 8, 8]``, a
    per-token MLP (Linear layers on a 3-D input, which torch exports as MatMul + Add with the
    weight as a ``[K, N]`` initializer, as in transformer blocks), mean over the tokens, class logits."""
    torch = _torch()
    x, y = _digits()
    tokens = x.reshape(-1, 8, 8)

    class Mixer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Linear(8, width)
            self.mlp = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, width))
            self.head = torch.nn.Linear(width, 10)

        def forward(self, rows):
            h = self.embed(rows)
            h = h + self.mlp(h)
            return self.head(h.mean(1))

    net = Mixer()
    batches = [((torch.from_numpy(tokens[i:i + 64]),), torch.from_numpy(y[i:i + 64])) for i in range(0, len(x), 64)]
    _fit(net, torch.nn.functional.cross_entropy, batches, epochs=15)
    path = _export(net, (torch.zeros(1, 8, 8),), folder / "mixer.onnx", ["rows"], ["logits"],
                   {"rows": {0: "n"}, "logits": {0: "n"}})
    search, test = _split(len(x))
    return UserModel(path, {"rows": tokens[search]}, {"rows": tokens[test]}, y[search], y[test])


def quantized_models(folder: Path) -> tuple[UserModel, UserModel]:
    """The digits MLP quantized by onnxruntime: int8 QDQ (static, calibrated on the search half)
    and dynamic (MatMulInteger weights)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    torch = _torch()
    x, y = _digits()
    net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                              torch.nn.Linear(256, 10))
    batches = [((torch.from_numpy(x[i:i + 64]),), torch.from_numpy(y[i:i + 64])) for i in range(0, len(x), 64)]
    _fit(net, torch.nn.functional.cross_entropy, batches, epochs=20)
    float_path = _export(net, (torch.zeros(1, 64),), folder / "mlp_fp32.onnx", ["pixels"], ["logits"],
                         {"pixels": {0: "n"}, "logits": {0: "n"}})
    search, test = _split(len(x))

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter([{"pixels": x[i:i + 1]} for i in search[:128]])

        def get_next(self):
            return next(self.rows, None)

    qdq = folder / "mlp_qdq.onnx"
    quantize_static(str(float_path), str(qdq), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    dynamic = folder / "mlp_dynamic.onnx"
    quantize_dynamic(str(float_path), str(dynamic), weight_type=QuantType.QInt8)
    make = lambda path: UserModel(path, {"pixels": x[search]}, {"pixels": x[test]}, y[search], y[test])  # noqa: E731
    return make(qdq), make(dynamic)


def _conv_block(i: int, o: int, stride: int, activation: str) -> list:
    """A 3 x 3 Conv, BatchNorm and ``activation`` (a ``torch.nn`` class name), as detectors stack them."""
    import torch  # not _torch(): seeding again would give every block the same weights
    return [torch.nn.Conv2d(i, o, 3, stride=stride, padding=1), torch.nn.BatchNorm2d(o), getattr(torch.nn, activation)()]


def _smooth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` random RGB images ``[n, 3, size, size]``: 8 x 8 blocks of colour plus a little noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((n, 3, size // 8, size // 8)).astype(np.float32)
    return np.repeat(np.repeat(coarse, 8, 2), 8, 3) + 0.05 * rng.standard_normal(coarse.shape[:2] + (size, size),
                                                                                 dtype=np.float32)


def yolo_detector(folder: Path, samples: int, size: int = 64) -> UserModel:
    """A YOLO-shaped detector on ``size`` x ``size`` RGB images (untrained: the converter's memory is
    the point, not its detections): a strided Conv/BatchNorm/SiLU body and a head ``[N, 4 + 18,
    anchors]``; ``samples`` smooth random images for the search and as many for the test."""
    torch = _torch()

    def block(i: int, o: int, stride: int) -> list:
        return _conv_block(i, o, stride, "SiLU")

    class Detector(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(*block(3, 16, 2), *block(16, 32, 2), *block(32, 64, 2), *block(64, 64, 1),
                                            *block(64, 128, 2), torch.nn.Conv2d(128, 128, 1), torch.nn.SiLU(),
                                            torch.nn.Conv2d(128, 4 + 18, 1))

        def forward(self, image):
            out = self.body(image)
            return torch.cat([out[:, :4], out[:, 4:].sigmoid()], 1).flatten(2)

    path = _export(Detector().eval(), (torch.zeros(1, 3, size, size),), folder / "yolo.onnx", ["images"], ["output0"],
                   {"images": {0: "n"}, "output0": {0: "n"}})
    images = _smooth_images(2 * samples, size)
    return UserModel(path, {"images": images[:samples]}, {"images": images[samples:]})


def segmenter(folder: Path, samples: int, size: int = 64, channels: int = 24) -> UserModel:
    """A segmentation-shaped network on ``size`` x ``size`` RGB images (untrained: the converter's
    memory is the point): a strided Conv/BatchNorm/ReLU encoder, upsampled back to the input's size
    with ``channels`` score maps ``[N, channels, size, size]``, so that its outputs on the samples
    are several times the samples themselves; ``samples`` smooth random images for the search."""
    torch = _torch()
    body = torch.nn.Sequential(*_conv_block(3, 16, 2, "ReLU"), *_conv_block(16, 32, 2, "ReLU"),
                               *_conv_block(32, 64, 1, "ReLU"), torch.nn.Conv2d(64, channels, 1),
                               torch.nn.Upsample(scale_factor=4))
    path = _export(body.eval(), (torch.zeros(1, 3, size, size),), folder / "segmenter.onnx", ["images"],
                   ["maps"], {"images": {0: "n"}, "maps": {0: "n"}})
    images = _smooth_images(samples, size)
    return UserModel(path, {"images": images}, {"images": images[: samples // 10]})
