"""One moub conversion in its own process (so the harness can bound its time and memory).

    python -m benchmarks.peers.moub_worker JOB.json

JOB.json: {"model", "data", "out", "summary", "mode", "metric", "max_drop", "seed", "options"}.
Writes the .moub to "out" and a JSON summary (evaluations, wall time, qualities, the report) to
"summary". Calls the converter's Python API, `moub_converters.convert`.
"""
from __future__ import annotations

import inspect
import json
import sys
import time


def _jsonable(value):
    try:
        json.dumps(value)
        return value
    except TypeError:
        return json.loads(json.dumps(value, default=lambda o: getattr(o, "tolist", lambda: repr(o))()))


def main(argv: list[str]) -> None:
    job = json.loads(open(argv[0]).read())
    from moub_converters import convert

    kwargs = dict(metric=job["metric"], max_drop=job["max_drop"], mode=job["mode"], seed=job["seed"], quiet=True)
    options = dict(job.get("options") or {})
    accepted = {name for name, p in inspect.signature(convert).parameters.items() if p.kind is not p.VAR_KEYWORD}
    try:  # convert(**advanced) goes to ConvertOptions: its fields are accepted too
        import dataclasses

        from moub_converters.options import ConvertOptions

        accepted |= {f.name for f in dataclasses.fields(ConvertOptions)}
    except (ImportError, TypeError):
        pass
    ignored = sorted(set(options) - accepted)
    options = {k: v for k, v in options.items() if k in accepted}
    t = time.perf_counter()
    result = convert(job["model"], data=job["data"], **kwargs, **options)
    wall = time.perf_counter() - t
    result.write(job["out"])
    from benchmarks.memory import children_peak_kib, own_peak_kib

    own, workers = own_peak_kib(), children_peak_kib()
    summary = {
        "wall_s": wall,
        # the converter's process and its largest worker, in GB (ru_maxrss is in KiB on Linux)
        "peak_rss_gb": round(max(own, workers) * 1024 / 1e9, 3),
        "converter_wall_s": getattr(result, "wall_seconds", None),
        "evaluations": getattr(result, "evaluations", None),
        "quality_original": getattr(result, "quality_original", None),
        "quality_compressed": getattr(result, "quality_compressed", None),
        "ignored_options": ignored,
        "report": _jsonable(getattr(result, "report", None)),
    }
    with open(job["summary"], "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main(sys.argv[1:])
