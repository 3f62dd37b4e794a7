"""Every constant of the benchmark in one place: sample counts, seeds, sweeps, thresholds, paths.

Changing a value here invalidates the cached inputs it affects (the cache key includes it).
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
CACHE = ROOT / ".cache"
OUT = ROOT / "out"  # per-run artefacts (compressed files, decoded models); git-ignored
RESULTS_MD = ROOT / "RESULTS.md"
PLOT_PNG = ROOT / "results.png"

SEED = 0
MODELS = ("digits", "magika", "cls", "rec", "det")
SMOKE_MODELS = ("digits",)

# Samples per model (search split + test split). Search data is what a converter may tune on;
# every fidelity in the table is measured on the test split, which no converter ever sees.
N_SAMPLES = {"magika": 1000, "cls": 600, "rec": 300, "det": 20}
SEARCH_FRACTION = 0.5
SMOKE_MAX_TEST = 200  # the smoke run evaluates at most this many test samples

# Real files for magika: walked in sorted order, sampled with SEED.
MAGIKA_ROOTS = ("/usr/share", "/usr/lib/python3", "/usr/lib/python3.11", "/etc")
MAGIKA_MAX_FILES_SCANNED = 60000

# Text rendering for rapidocr (Debian package fonts-dejavu-core).
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf")
TEXT_SOURCES = ("/usr/share/common-licenses", "/usr/lib/python3.11")
LINE_HEIGHT_PX = (28, 64)  # rendered line heights before rapidocr resizes them to 48 px
REC_MAX_WH_RATIO = 320 / 48  # rapidocr's rec_img_shape [3, 48, 320]; lines wider are cropped
PAGE_SIZE = (736, 960)  # (height, width): both multiples of 32, min side = rapidocr's limit 736
DET_MASK_THRESHOLD = 0.3  # rapidocr's DB postprocess thresh

# Headline rule and sweeps.
FIDELITY_TARGET = 0.99
KMEANS_KS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
KMEANS_ITERS = 30
NNCODEC_QPS = (-8, -12, -16, -20, -24, -28, -32, -36, -40, -44, -48)  # larger qp = coarser step (step about 2^(qp/4))
NNCODEC_VERSION = "2.1.3"
NNCODEC_VENV = CACHE / "nncodec-venv"
MIN_ELEMENTS = 1024  # float tensors smaller than this pass through losslessly (as in moub)
ZSTD_LEVEL = 19
FP16_MAX = 65504.0

# moub rows (the converter's API, see peers/moub.py). The search tunes on the search split with
# the converter's own metric; the table's fidelity is measured on the test split like every row.
# --max-drop is swept loosest first (each point is a whole search) until the test split passes,
# within a per-model time budget for all of a row's conversions. The sweep starts below 0.01:
# a search that holds 1% on a few hundred samples lands on either side of 1% on the test split
# (at 0.01: rec 98.90% adaptive, 98.82% paper; magika 99.20%, 99.40%), and a second point of
# rec's sweep costs 4-7 minutes that the 30-minute bench does not have
# (docs/decisions/0009-bench-sweeps-max-drop.md).
MOUB_MAX_DROPS = (0.0075, 0.005)
MOUB_METRIC = "agreement"
# det's output is a probability map: the converter has no mask IoU, so it holds the relative L2
# error instead. On the search split, the peers' det files at mask IoU 0.99 have rel-l2 about
# 0.945 (cosine 0.998), hence drops of 0.05 then 0.035 for det.
MOUB_METRICS = {"digits": "accuracy", "det": "rel-l2"}
MOUB_MAX_DROPS_BY_MODEL = {"det": (0.05, 0.035)}
MOUB_SEED = 0
# The zoo's moub rows are the converter as a new user runs it: its default metric per output head,
# told the tolerance of the model's criterion (every zoo criterion keeps 99%, so --max-drop 0.01),
# one conversion each, choosing on the search split alone (no sweep stopped by the test split, as
# the peers' are), with two worker processes (the converter's wall time and peak RSS, its workers
# included, go into the row), within 15 minutes.
ZOO_MOUB_MAX_DROPS = (round(1.0 - FIDELITY_TARGET, 6),)
ZOO_MOUB_OPTIONS: dict = {"workers": 2}
ZOO_MOUB_BUDGET_S = 900
# Extra convert() keywords for full runs: evaluations in one worker process per core (at most 4;
# the converter evaluates with one onnxruntime thread per process). Same files as workers=1.
MOUB_OPTIONS: dict = {"workers": max(1, min(4, len(os.sched_getaffinity(0))))}
MOUB_SMOKE_OPTIONS = {"population": 4, "generations": 2, "merge_budget": 2, "workers": 1}
MOUB_BEST_MODE_ENV = "MOUB_BENCH_BEST_MODE"  # set to force the mode of the moub_best row
MOUB_BUDGET_S = {"digits": 60, "magika": 360, "cls": 150, "rec": 600, "det": 480}  # per row, all its conversions
MOUB_SMOKE_TIMEOUT_S = 120

# Timing of decode-and-load in a fresh subprocess: best of this many repeats.
LOAD_REPEATS = 3
