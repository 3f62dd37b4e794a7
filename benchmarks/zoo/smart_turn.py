"""Smart Turn v3.2 (pipecat-ai wheel): end-of-turn detection on the last 8 s of speech, int8 QDQ.

One input, Whisper log-mel features `input_features` [1, 80, 800]; one output, the probability that
the speaker has finished `[1, 1]`. The file is already quantized by onnxruntime (QDQ: 7.8 M int8
weights behind DequantizeLinear, 190 k float scales, norms and biases).

Inputs: espeak-ng utterances, half of them whole sentences followed by a short pause (finished
turns), half cut off mid-sentence (unfinished turns); each made into features the way pipecat's
LocalSmartTurnAnalyzerV3._predict_endpoint does: keep the last 8 s or left-pad with zeros to 8 s,
then pipecat's own numpy Whisper feature extractor.

Fidelity: decision agreement at the package's threshold (probability > 0.5) on held-back
utterances, with the largest probability change beside it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fidelity import Fidelity
from . import sources
from .core import Memo, Samples, Split, ZooModel, first_outputs

RATE = 16000
SECONDS = 8
THRESHOLD = 0.5


def features(audio: np.ndarray) -> np.ndarray:
    """_predict_endpoint's preprocessing: last 8 s (or zeros in front), Whisper log-mel, batch axis."""
    from pipecat.audio.turn.smart_turn._whisper_features import compute_whisper_log_mel_features

    n = SECONDS * RATE
    audio = audio[-n:] if len(audio) > n else np.pad(audio, (n - len(audio), 0))
    return compute_whisper_log_mel_features(audio.astype(np.float32), do_normalize=True)[None].astype(np.float32)


class SmartTurn(ZooModel):
    name = "smart_turn"
    title = "Smart Turn v3.2 (int8 QDQ, Whisper-encoder turn detector)"
    family = "already-int8 model (QDQ), speech classifier"
    dist = "pipecat-ai"
    module = "pipecat"
    file = "audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
    licence = "BSD-2-Clause"
    inputs_made = ("espeak-ng utterances (8 voices), finished (whole sentence + 0.2-0.6 s pause) or cut off "
                   "mid-sentence; pipecat's own 8-s crop/pad and numpy Whisper features")
    criterion = "turn-end decision agreement (p > 0.5) on held-back utterances; max |dp| beside it"
    pass_rule = "decisions agree >= 99%"
    settings = {"utterances": 200, "voices": sources.ESPEAK_VOICES}

    def __init__(self) -> None:
        self._memo = Memo()

    def utterances(self) -> list[np.ndarray]:
        rng = np.random.default_rng(15)
        out = []
        for text in sources.sentences(self.settings["utterances"], seed=15, min_words=6, max_words=24):
            voice = sources.ESPEAK_VOICES[int(rng.integers(len(sources.ESPEAK_VOICES)))]
            speech = sources.speak(text, voice, int(rng.integers(130, 200)), int(rng.integers(30, 70)))
            if rng.random() < 0.5:
                speech = speech[: int(len(speech) * rng.uniform(0.35, 0.85))]
            tail = np.zeros(int(rng.uniform(0.2, 0.6) * RATE), np.float32)
            audio = np.concatenate([speech * float(rng.uniform(0.4, 1.0)), tail])
            out.append((audio + rng.normal(0.0, 0.002, size=audio.shape)).astype(np.float32))
        return out

    def build(self) -> Samples:
        feeds = [{"input_features": features(a)} for a in self.utterances()]
        return Samples(feeds, np.arange(len(feeds)))

    def score(self, candidate: Path, test: Split) -> Fidelity:
        ref = self._memo.get((self.name, test.name), lambda: first_outputs(self.path(), test.feeds)).reshape(-1)
        out = first_outputs(candidate, test.feeds).reshape(-1)
        agree = float(np.mean((out > THRESHOLD) == (ref > THRESHOLD)))
        return Fidelity(agree, "decision agreement", {"max |dp|": float(np.abs(out - ref).max()),
                                                      "mean |dp|": float(np.abs(out - ref).mean())})


MODEL = SmartTurn
