"""Basic Pitch (basic-pitch wheel, its ONNX variant nmp.onnx): polyphonic note transcription.

One input, a 2-second window of 22.05 kHz audio `[1, 43844, 1]`; three sigmoid outputs: notes and
onsets `[1, 172, 88]`, pitch contour `[1, 172, 264]`. The constant-Q front end is inside the graph.

Inputs: folk tunes from abcmidi's examples rendered by fluidsynth with a General MIDI sound font,
on four instruments and at two transpositions (real polyphonic music: melody with chords), cut
into windows by the package's own `get_audio_input` (the windows `predict` runs).

Fidelity: the candidate transcribes each held-back clip through the package's `predict` (its
window overlap, unwrapping and note creation with default thresholds); the figure is the note F1
against the shipped model's notes (onset within 50 ms and same pitch, offsets ignored: mir_eval's
transcription metric), pooled over clips.
"""
from __future__ import annotations

import contextlib
import io
import tempfile
import wave
from pathlib import Path

import numpy as np

from ..fidelity import Fidelity
from . import sources
from .core import Memo, Samples, Split, ZooModel, ragged, ragged_item

RATE = 22050  # basic_pitch.constants.AUDIO_SAMPLE_RATE
N_OVERLAPPING_FRAMES = 30  # run_inference's overlap
FFT_HOP = 256


def _write_wav(path: Path, audio: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


def windows(wav: Path) -> list[np.ndarray]:
    """The windows run_inference feeds the model, by the package's get_audio_input."""
    from basic_pitch.constants import AUDIO_N_SAMPLES
    from basic_pitch.inference import get_audio_input

    overlap = N_OVERLAPPING_FRAMES * FFT_HOP
    return [w.astype(np.float32) for w, _, _ in get_audio_input(wav, overlap, AUDIO_N_SAMPLES - overlap)]


def transcribe(model_path: Path, wav: Path) -> np.ndarray:
    """Notes [start s, end s, MIDI pitch] by the package's predict with its default settings."""
    from basic_pitch.inference import predict

    with contextlib.redirect_stdout(io.StringIO()):
        _, _, events = predict(wav, model_path)
    return np.asarray([(s, e, p) for s, e, p, *_ in events], dtype=np.float64).reshape(-1, 3)


def note_matches(ref: np.ndarray, est: np.ndarray) -> int:
    """Notes matched one to one: same pitch (within 50 cents), onsets within 50 ms (mir_eval)."""
    import mir_eval

    if len(ref) == 0 or len(est) == 0:
        return 0
    hz = lambda p: 440.0 * 2.0 ** ((p - 69.0) / 12.0)  # noqa: E731
    pairs = mir_eval.transcription.match_notes(ref[:, :2], hz(ref[:, 2]), est[:, :2], hz(est[:, 2]),
                                                offset_ratio=None)
    return len(pairs)


class BasicPitch(ZooModel):
    name = "basic_pitch"
    title = "Basic Pitch (polyphonic note transcription)"
    family = "audio CNN with three sigmoid heads"
    dist = "basic-pitch"
    module = "basic_pitch"
    file = "saved_models/icassp_2022/nmp.onnx"
    licence = "Apache-2.0"
    inputs_made = ("abcmidi's example tunes rendered by fluidsynth (TimGM6mb sound font) on piano, guitar, strings "
                   "and flute, transposed 0 and -5 semitones, first 15 s; windows by the package's get_audio_input")
    criterion = ("note F1 (onset 50 ms, same pitch; mir_eval) of the package's predict() with the candidate against "
                 "the shipped model's notes, pooled over held-back clips")
    pass_rule = "note F1 >= 99%"
    settings = {"programs": (0, 24, 48, 73), "transpose": (0, -5), "seconds": 15.0}

    def __init__(self) -> None:
        self._memo = Memo()

    def clips(self) -> list[np.ndarray]:
        clips = []
        for program in self.settings["programs"]:
            for shift in self.settings["transpose"]:
                clips += sources.render_tunes(program, shift, RATE, self.settings["seconds"])
        return clips

    def build(self) -> Samples:
        feeds, groups, audio = [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            for g, clip in enumerate(self.clips()):
                wav = Path(tmp) / f"{g}.wav"
                _write_wav(wav, clip)
                for w in windows(wav):
                    feeds.append({"serving_default_input_2:0": w})
                    groups.append(g)
                audio.append(clip)
        return Samples(feeds, np.asarray(groups), ragged(audio, "audio"))

    def _notes(self, model_path: Path, test: Split) -> list[np.ndarray]:
        out = []
        with tempfile.TemporaryDirectory() as tmp:
            for g in test.group_ids:
                wav = Path(tmp) / f"{g}.wav"
                _write_wav(wav, ragged_item(test.side, "audio", g))
                out.append(transcribe(model_path, wav))
        return out

    def score(self, candidate: Path, test: Split) -> Fidelity:
        ref = self._memo.get((self.name, test.name), lambda: self._notes(self.path(), test))
        est = self._notes(candidate, test)
        matched = sum(note_matches(r, e) for r, e in zip(ref, est))
        n_ref, n_est = sum(len(r) for r in ref), sum(len(e) for e in est)
        f1 = 2 * matched / (n_ref + n_est) if n_ref + n_est else 1.0
        return Fidelity(f1, "note F1", {"precision": matched / max(n_est, 1), "recall": matched / max(n_ref, 1)})


MODEL = BasicPitch
