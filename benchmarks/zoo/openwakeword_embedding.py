"""openWakeWord's speech embedding model (openwakeword 0.5.1 wheel): 96-d audio embeddings.

Inputs: windows of 76 mel frames x 32 bands `[1, 76, 32, 1]`, 8 frames apart, made by the package's
own `AudioFeatures` (its melspectrogram.onnx and transform) from real speech clips: wake phrases the
package ships classifiers for ("alexa", "hey jarvis", "hey mycroft", "hey rhasspy", "set a timer",
"what's the weather") and other sentences, said by espeak-ng voices.

Fidelity is judged where the embeddings are used: the package's six wake-word classifiers run on
each held-back clip's embedding sequence (every window of 16/22/34 consecutive embeddings, as
`Model.predict` feeds them). The figure is the share of (clip, classifier) decisions (peak score
>= 0.5) that match the shipped model's; the largest peak-score change and the embeddings' mean
cosine are beside it. Embedding cosine alone hides errors: 0.995 can move a classifier by 0.45.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..fidelity import Fidelity
from . import sources
from .core import Feed, Memo, Recorder, Samples, Split, ZooModel, cosine, package_dir, ragged, ragged_item, session

RATE = 16000
THRESHOLD = 0.5
CLASSIFIERS = ("alexa_v0.1", "hey_jarvis_v0.1", "hey_mycroft_v0.1", "hey_rhasspy_v0.1", "timer_v0.1", "weather_v0.1")
PHRASES = ("Alexa.", "Hey Jarvis.", "Hey Mycroft.", "Hey Rhasspy.", "Set a timer for five minutes.",
           "What's the weather today?")




def features(embedding_model: Path, audio: np.ndarray) -> tuple[list[Feed], np.ndarray]:
    """The package's AudioFeatures on one clip: (one feed per embedding window, embeddings [n, 96])."""
    from openwakeword.utils import AudioFeatures

    af = AudioFeatures(inference_framework="onnx", embedding_model_path=str(embedding_model), ncpu=1)
    recorder = Recorder(af.embedding_model)
    af.embedding_model = recorder
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
    emb = np.asarray(af._get_embeddings(pcm)).reshape(-1, 96)
    batch = recorder.feeds[-1]["input_1"]
    return [{"input_1": batch[i:i + 1]} for i in range(len(batch))], emb


def _wake_score(out: np.ndarray) -> float:
    """One wake-word score: a single-class model's probability; for the timer model, whose class 0 is
    background, its best other class (as the package's Model.predict reports each of them)."""
    out = out.reshape(-1)
    return float(out[0] if len(out) == 1 else out[1:].max())


def peak_scores(embeddings: np.ndarray, sessions: dict) -> np.ndarray:
    """Each classifier's highest score over the clip (every window of its length, stride 1)."""
    peaks = []
    for name in CLASSIFIERS:
        sess = sessions[name]
        inp = sess.get_inputs()[0]
        frames = inp.shape[1]
        scores = [_wake_score(sess.run(None, {inp.name: embeddings[None, i:i + frames].astype(np.float32)})[0])
                  for i in range(0, len(embeddings) - frames + 1)]
        peaks.append(max(scores) if scores else 0.0)
    return np.asarray(peaks)


class OpenWakeWordEmbedding(ZooModel):
    name = "openwakeword_embedding"
    title = "openWakeWord speech embedding (96-d)"
    family = "audio embedding model"
    dist = "openwakeword"
    module = "openwakeword"
    file = "resources/models/embedding_model.onnx"
    licence = "Apache-2.0 (code); the wheel's models are CC BY-NC-SA 4.0"
    inputs_made = ("espeak-ng clips (8 voices) of the six wake phrases the wheel has classifiers for and of other "
                   "sentences, 1 s of silence around; mel windows by the package's AudioFeatures")
    criterion = ("wake-word decision agreement (peak score >= 0.5) of the package's six classifiers on the "
                 "held-back clips; max peak-score change and mean embedding cosine beside it")
    pass_rule = "decisions agree >= 99% and peak scores move <= 0.05"
    settings = {"clips_per_phrase": 6, "other_clips": 24, "voices": sources.ESPEAK_VOICES}

    def __init__(self) -> None:
        self._memo = Memo()

    def clips(self) -> list[np.ndarray]:
        rng = np.random.default_rng(12)
        texts = [p for p in PHRASES for _ in range(self.settings["clips_per_phrase"])]
        texts += sources.sentences(self.settings["other_clips"], seed=12, max_words=12)
        clips = []
        for text in texts:
            voice = sources.ESPEAK_VOICES[int(rng.integers(len(sources.ESPEAK_VOICES)))]
            speech = sources.speak(text, voice, int(rng.integers(120, 190)), int(rng.integers(30, 70)))
            pad = np.zeros(RATE, np.float32)
            audio = np.concatenate([pad, speech * float(rng.uniform(0.4, 1.0)), pad])
            clips.append((audio + rng.normal(0.0, 0.002, size=audio.shape)).astype(np.float32))
        return clips

    def build(self) -> Samples:
        feeds, groups, audio = [], [], []
        for g, clip in enumerate(self.clips()):
            clip_feeds, _ = features(self.path(), clip)
            feeds += clip_feeds
            groups += [g] * len(clip_feeds)
            audio.append(clip)
        return Samples(feeds, np.asarray(groups), ragged(audio, "audio"))

    def _classifiers(self) -> dict:
        folder = package_dir(self.module) / "resources" / "models"
        return {name: session(folder / f"{name}.onnx") for name in CLASSIFIERS}

    def _reference(self, test: Split) -> list[tuple[np.ndarray, np.ndarray]]:
        def make():
            sessions = self._classifiers()
            out = []
            for g in test.group_ids:
                emb = features(self.path(), ragged_item(test.side, "audio", g))[1]
                out.append((emb, peak_scores(emb, sessions)))
            return out
        return self._memo.get((self.name, test.name), make)

    def score(self, candidate: Path, test: Split) -> Fidelity:
        sessions = self._classifiers()
        agree, total, worst, cos = 0, 0, 0.0, []
        for g, (ref_emb, ref_peaks) in zip(test.group_ids, self._reference(test)):
            emb = features(candidate, ragged_item(test.side, "audio", g))[1]
            peaks = peak_scores(emb, sessions)
            agree += int(np.sum((peaks >= THRESHOLD) == (ref_peaks >= THRESHOLD)))
            total += len(peaks)
            worst = max(worst, float(np.abs(peaks - ref_peaks).max()))
            cos.append(cosine(ref_emb, emb))
        return Fidelity(agree / total, "wake-word decision agreement",
                        {"max |d peak|": worst, "mean embedding cosine": float(np.concatenate(cos).mean())})

    def passes(self, fid: Fidelity) -> bool:
        return fid.value >= 0.99 and fid.extra["max |d peak|"] <= 0.05


MODEL = OpenWakeWordEmbedding
