"""Real raw material for the zoo's inputs, all from files and tools on the machine (no downloads).

    sentences   English sentences from the licence texts Debian ships (/usr/share/common-licenses)
    speak       speech synthesised by espeak-ng (Debian package espeak-ng)
    tunes       folk tunes from abcmidi's examples (Debian package abcmidi), rendered to audio by
                fluidsynth with a General MIDI sound font (packages fluidsynth, timgm6mb-soundfont)
    photos      the photographs scikit-image and matplotlib ship (skimage.data, mpl sample_data)

Each function fails with ZooUnavailable naming the missing package.
"""
from __future__ import annotations

import io
import re
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

from .core import ZooUnavailable

LICENCE_DIR = Path("/usr/share/common-licenses")
LICENCE_FILES = ("Apache-2.0", "Artistic", "GFDL-1.3", "GPL-3", "LGPL-3", "MPL-2.0", "CC0-1.0")
ABC_DIR = Path("/usr/share/doc/abcmidi/examples")
SOUND_FONT = Path("/usr/share/sounds/sf2/TimGM6mb.sf2")
ESPEAK_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-gb+f2", "en-029", "en-gb-x-rp+m3", "en-us+f4")
# General MIDI programs the tunes are rendered with: piano, guitar, strings, organ, flute, vibraphone.
GM_PROGRAMS = (0, 24, 48, 19, 73, 11)


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise ZooUnavailable(f"{tool} not found (apt-get install -y {package})")
    return path


# ----------------------------------------------------------------------------- text

_SENTENCE_END = re.compile(r"(?<=[.;:!?])\s+")


def sentences(n: int, seed: int, min_words: int = 5, max_words: int = 30) -> list[str]:
    """n distinct sentences of real English prose, picked with the seed from Debian's licence texts."""
    pool: set[str] = set()
    for name in LICENCE_FILES:
        path = LICENCE_DIR / name
        if not path.is_file():
            continue
        text = " ".join(path.read_text(encoding="utf-8", errors="ignore").split())
        for piece in _SENTENCE_END.split(text):
            words = piece.split()
            letters = sum(ch.isalpha() for ch in piece)
            if min_words <= len(words) <= max_words and letters >= 0.7 * len(piece):
                pool.add(piece)
    if len(pool) < n:
        raise ZooUnavailable(f"only {len(pool)} sentences under {LICENCE_DIR} (package base-files), {n} wanted")
    ordered = sorted(pool)
    pick = np.random.default_rng(seed).choice(len(ordered), size=n, replace=False)
    return [ordered[i] for i in pick]


# ----------------------------------------------------------------------------- audio

def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV as float32 mono in [-1, 1] and its rate."""
    with wave.open(io.BytesIO(data)) as w:
        rate, channels, width = w.getframerate(), w.getnchannels(), w.getsampwidth()
        frames = w.readframes(w.getnframes())
    if width != 2:
        raise ValueError(f"expected 16-bit PCM, got {8 * width}-bit")
    audio = np.frombuffer(frames, dtype="<i2").astype(np.float32) / 32768.0
    return audio.reshape(-1, channels).mean(axis=1), rate


def resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    from math import gcd

    from scipy.signal import resample_poly

    if rate == target:
        return audio.astype(np.float32)
    g = gcd(rate, target)
    return resample_poly(audio, target // g, rate // g).astype(np.float32)


def speak(text: str, voice: str, words_per_minute: int, pitch: int, rate: int = 16000) -> np.ndarray:
    """One utterance by espeak-ng, float32 mono at `rate`."""
    exe = _require("espeak-ng", "espeak-ng")
    proc = subprocess.run([exe, "-v", voice, "-s", str(words_per_minute), "-p", str(pitch), "--stdout", text],
                          capture_output=True, check=True, timeout=120)
    audio, native = read_wav(proc.stdout)
    return resample(audio, native, rate)


def tune_files() -> list[Path]:
    """The abcmidi example files (each may hold several tunes); drums-only files are left out."""
    if not ABC_DIR.is_dir():
        raise ZooUnavailable(f"{ABC_DIR} not found (apt-get install -y abcmidi)")
    return [p for p in sorted(ABC_DIR.glob("*.abc")) if p.stem != "drums"]


def render_tunes(program: int, transpose: int, rate: int, max_seconds: float) -> list[np.ndarray]:
    """Every example tune as audio: abc2midi, then the melody and chords moved to one GM program
    and transposed with pretty_midi, then fluidsynth with the GM sound font; float32 mono."""
    import pretty_midi

    abc2midi = _require("abc2midi", "abcmidi")
    synth = _require("fluidsynth", "fluidsynth")
    if not SOUND_FONT.is_file():
        raise ZooUnavailable(f"{SOUND_FONT} not found (apt-get install -y timgm6mb-soundfont)")
    clips = []
    with tempfile.TemporaryDirectory() as tmp:
        for abc in tune_files():
            stem = Path(tmp) / abc.stem
            subprocess.run([abc2midi, str(abc), "-o", f"{stem}.mid"], capture_output=True, timeout=60)
            # abc2midi writes STEM.mid for a single tune, STEMn.mid for tune n of a file with several.
            for mid in sorted(Path(tmp).glob(f"{abc.stem}*.mid")):
                try:
                    song = pretty_midi.PrettyMIDI(str(mid))
                except Exception:  # noqa: BLE001 - an example abcmidi cannot render is skipped
                    continue
                for inst in song.instruments:
                    if inst.is_drum:
                        continue
                    inst.program = program
                    for note in inst.notes:
                        note.pitch = int(np.clip(note.pitch + transpose, 21, 108))
                song.instruments = [i for i in song.instruments if not i.is_drum and i.notes]
                if not song.instruments:
                    continue
                out_mid, out_wav = f"{mid}.{program}.mid", f"{mid}.{program}.wav"
                song.write(out_mid)
                subprocess.run([synth, "-ni", "-g", "0.5", "-r", str(rate), "-F", out_wav, str(SOUND_FONT), out_mid],
                               capture_output=True, check=True, timeout=300)
                audio, native = read_wav(Path(out_wav).read_bytes())
                audio = resample(audio, native, rate)[: int(max_seconds * rate)]
                if np.abs(audio).max() > 1e-3:
                    clips.append(audio)
                mid.unlink()
    return clips


# ----------------------------------------------------------------------------- images

def photos() -> list[np.ndarray]:
    """Colour photographs shipped by scikit-image and matplotlib, as RGB uint8 arrays."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise ZooUnavailable("scikit-image is not installed (pip install scikit-image)") from None
    names = ("astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina")
    images = []
    for name in names:
        img = getattr(skdata, name)()
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        images.append(np.ascontiguousarray(img[..., :3]))
    import matplotlib.cbook

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        from PIL import Image

        images.append(np.asarray(Image.open(f).convert("RGB")))
    return images


def faces() -> np.ndarray:
    """scikit-image's LFW subset: 100 face photographs (25x25 grey) followed by 100 non-faces."""
    from skimage import data as skdata

    return skdata.lfw_subset()
