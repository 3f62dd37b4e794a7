"""Train the bundled demo model: a small CNN on scikit-learn's handwritten digits.

Why: `moub demo` and the tests need a real model trained on real data that ships with the
repository (no model hubs, no network). The digits set (1797 8x8 images) comes with
scikit-learn, trains in seconds on a CPU and gives a model big enough (~73k float weights)
for compression to matter.

Run: .venv/bin/python tools/train_demo_model.py   (needs the [torch] and [convert] extras)
Writes converters/data/{digits_cnn.onnx, digits_val.npz, digits_test.npz}. Everything is seeded
and written canonically (fixed zip timestamps), so a rerun on the same machine gives the same
bytes. The validation split is what the compression search sees; the test split is held back.
"""

from __future__ import annotations

import argparse
import io
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "converters" / "data"
MODEL_NAME = "digits_cnn.onnx"
VAL_NAME = "digits_val.npz"
TEST_NAME = "digits_test.npz"

SEED = 0
VAL_FRACTION = 0.2
TEST_FRACTION = 0.2
EPOCHS = 40
BATCH_SIZE = 64
LEARNING_RATE = 2e-3
WEIGHT_DECAY = 1e-4
HIDDEN = 128
OPSET = 17
INPUT_NAME = "input"
# The committed digits_cnn.onnx carries this text (with the script's former folder name); the
# graph, and with it every demo and golden byte, depends on it, so it stays as it is.
DOC_STRING = "Demo CNN on sklearn load_digits; scripts/train_demo_model.py"
OUTPUT_NAME = "logits"
PIXEL_MAX = 16.0  # load_digits pixels are integers 0..16
MIN_TEST_ACCURACY = 0.97
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamp: np.savez stamps the current time


class DigitsCNN(nn.Module):
    """conv 1->16 -> conv 16->32 -> maxpool -> FC 512->128 -> FC 128->10."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def split_digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stratified 60/20/20 train/val/test split; images float32 [N,1,8,8] in [0,1], labels int64."""
    digits = load_digits()
    images = (digits.images / PIXEL_MAX).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SEED
    )
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=VAL_FRACTION / (1 - TEST_FRACTION), stratify=y_rest,
        random_state=SEED,
    )
    return {"train": (x_train, y_train), "val": (x_val, y_val), "test": (x_test, y_test)}


def train(x: np.ndarray, y: np.ndarray) -> DigitsCNN:
    """Seeded Adam training on one thread, so the weights do not depend on the core count."""
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS)
    loss_fn = nn.CrossEntropyLoss()
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(xs), generator=generator)
        for start in range(0, len(xs), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            optimizer.zero_grad()
            loss_fn(model(xs[batch]), ys[batch]).backward()
            optimizer.step()
        scheduler.step()
    return model.eval()


def export_onnx(model: DigitsCNN, path: Path) -> None:
    """Legacy (TorchScript) exporter: needs no onnxscript and writes all weights inline."""
    buffer = io.BytesIO()
    torch.onnx.export(
        model, (torch.zeros(1, 1, 8, 8),), buffer, dynamo=False, opset_version=OPSET,
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        do_constant_folding=True,
    )
    proto = onnx.load_from_string(buffer.getvalue())
    proto.doc_string = DOC_STRING
    onnx.checker.check_model(proto, full_check=True)
    path.write_bytes(proto.SerializeToString(deterministic=True))


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed but with sorted names and a fixed timestamp, so bytes are stable."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            body = io.BytesIO()
            np.lib.format.write_array(body, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            archive.writestr(info, body.getvalue())


def onnx_logits(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: x})[0]


def count_float_weights(path: Path) -> int:
    model = onnx.load(str(path))
    return sum(
        int(np.prod(t.dims)) for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / MODEL_NAME

    splits = split_digits()
    started = time.perf_counter()
    model = train(*splits["train"])
    train_seconds = time.perf_counter() - started
    export_onnx(model, model_path)

    for name, filename in (("val", VAL_NAME), ("test", TEST_NAME)):
        x, y = splits[name]
        save_npz(args.out_dir / filename, {INPUT_NAME: x, "labels": y})

    x_test, y_test = splits["test"]
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    ort_logits = onnx_logits(model_path, x_test)
    max_diff = float(np.max(np.abs(torch_logits - ort_logits)))
    if not np.allclose(torch_logits, ort_logits, rtol=1e-4, atol=1e-4):
        raise SystemExit(f"{model_path}: onnxruntime differs from torch (max |diff| {max_diff:.2e})")

    print(f"trained in {train_seconds:.1f} s; float weights: {count_float_weights(model_path)}; "
          f"torch vs onnxruntime max |diff| {max_diff:.1e}")
    for name in ("train", "val", "test"):
        x, y = splits[name]
        accuracy = float(np.mean(onnx_logits(model_path, x).argmax(axis=1) == y))
        print(f"{name:5s}: {len(y):4d} samples, onnxruntime accuracy {accuracy:.4f}")
        if name == "test" and accuracy < MIN_TEST_ACCURACY:
            raise SystemExit(f"{model_path}: test accuracy {accuracy:.4f} < {MIN_TEST_ACCURACY}")
    for filename in (MODEL_NAME, VAL_NAME, TEST_NAME):
        print(f"{filename}: {(args.out_dir / filename).stat().st_size} bytes")


if __name__ == "__main__":
    main()
