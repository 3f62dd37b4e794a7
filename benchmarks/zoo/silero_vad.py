"""Silero VAD (silero-vad wheel): a streaming voice-activity detector with a recurrent state.

Inputs, per 32 ms frame at 16 kHz: `input` [1, 576] (64 samples of context + 512 new ones),
`state` [2, 1, 128] (the previous frame's `stateN`: batch on axis 1) and `sr`, a scalar. The feeds
are recorded from silero-vad's own `OnnxWrapper` while its `get_speech_timestamps` walks real
speech clips (espeak-ng sentences between pauses, with a little noise), so every state is the one
the package itself carries from frame to frame.

Fidelity: the candidate runs each held-back clip through the same package code, carrying its own
state; the figure is the share of frames whose speech decision (probability >= 0.5, the package's
threshold) matches the shipped model's, with the speech-segment overlap and the largest
probability change beside it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fidelity import Fidelity
from . import sources
from .core import Feed, Memo, Recorder, Samples, Split, ZooModel, ragged, ragged_item

RATE = 16000
THRESHOLD = 0.5  # get_speech_timestamps' default




def stream(model_path: Path, audio: np.ndarray) -> tuple[list[Feed], np.ndarray, list[dict]]:
    """Run the package's get_speech_timestamps on one clip: (feeds, per-frame probabilities, segments)."""
    import torch
    from silero_vad.utils_vad import OnnxWrapper, get_speech_timestamps

    torch.set_num_threads(1)
    wrapper = OnnxWrapper(str(model_path), force_onnx_cpu=True)
    recorder = Recorder(wrapper.session)
    wrapper.session = recorder
    segments = get_speech_timestamps(torch.from_numpy(audio), wrapper, threshold=THRESHOLD, sampling_rate=RATE)
    probs = np.concatenate([o.reshape(-1) for o in recorder.outputs])
    return recorder.feeds, probs, [dict(s) for s in segments]


def _mask(segments: list[dict], n: int) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    for s in segments:
        m[s["start"]:s["end"]] = True
    return m


class SileroVad(ZooModel):
    name = "silero_vad"
    title = "Silero VAD v6 (streaming LSTM)"
    family = "recurrent streaming audio model with state"
    dist = "silero-vad"
    module = "silero_vad"
    file = "data/silero_vad.onnx"
    licence = "MIT"
    inputs_made = ("espeak-ng sentences (8 voices, varied speed and pitch) between pauses, light noise, 16 kHz; "
                   "feeds recorded from silero-vad's OnnxWrapper inside its get_speech_timestamps")
    criterion = ("frame decision agreement at p >= 0.5 with the candidate carrying its own state through each "
                 "held-back clip (package code); speech-segment IoU and max |dp| beside it")
    pass_rule = "frame decisions agree >= 99%"
    settings = {"clips": 24, "voices": sources.ESPEAK_VOICES, "noise": 0.003}

    def __init__(self) -> None:
        self._memo = Memo()

    def clips(self) -> list[np.ndarray]:
        rng = np.random.default_rng(11)
        texts = sources.sentences(3 * self.settings["clips"], seed=11, max_words=14)
        clips = []
        for c in range(self.settings["clips"]):
            parts = [np.zeros(int(rng.uniform(0.3, 1.0) * RATE), np.float32)]
            for k in range(int(rng.integers(1, 4))):
                voice = sources.ESPEAK_VOICES[int(rng.integers(len(sources.ESPEAK_VOICES)))]
                speech = sources.speak(texts[3 * c + k], voice, int(rng.integers(130, 200)), int(rng.integers(30, 70)))
                parts += [speech * float(rng.uniform(0.3, 1.0)), np.zeros(int(rng.uniform(0.2, 1.2) * RATE), np.float32)]
            audio = np.concatenate(parts)
            audio = audio + rng.normal(0.0, self.settings["noise"], size=audio.shape).astype(np.float32)
            clips.append(np.clip(audio, -1, 1).astype(np.float32))
        return clips

    def build(self) -> Samples:
        feeds, groups, audio = [], [], []
        for g, clip in enumerate(self.clips()):
            clip_feeds, _, _ = stream(self.path(), clip)
            feeds += clip_feeds
            groups += [g] * len(clip_feeds)
            audio.append(clip)
        return Samples(feeds, np.asarray(groups), ragged(audio, "audio"))

    def stack(self, feeds: list[Feed]) -> Feed:
        """input [N, 576]; state [2, N, 128] (its batch axis is 1); sr one scalar shared by all."""
        return {"input": np.concatenate([f["input"] for f in feeds], axis=0),
                "state": np.concatenate([f["state"] for f in feeds], axis=1),
                "sr": feeds[0]["sr"]}

    def _reference(self, test: Split) -> list[tuple[np.ndarray, list[dict]]]:
        def make():
            return [stream(self.path(), ragged_item(test.side, "audio", g))[1:] for g in test.group_ids]
        return self._memo.get((self.name, test.name), make)

    def score(self, candidate: Path, test: Split) -> Fidelity:
        agree, n, inter, union, worst = 0, 0, 0, 0, 0.0
        for g, (ref_p, ref_seg) in zip(test.group_ids, self._reference(test)):
            clip = ragged_item(test.side, "audio", g)
            _, p, seg = stream(candidate, clip)
            agree += int(np.sum((p >= THRESHOLD) == (ref_p >= THRESHOLD)))
            n += len(p)
            worst = max(worst, float(np.abs(p - ref_p).max()))
            a, b = _mask(ref_seg, len(clip)), _mask(seg, len(clip))
            inter += int(np.count_nonzero(a & b))
            union += int(np.count_nonzero(a | b))
        return Fidelity(agree / n, "frame decision agreement",
                        {"segment IoU": inter / union if union else 1.0, "max |dp|": worst})


MODEL = SileroVad
