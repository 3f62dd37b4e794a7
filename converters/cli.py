"""``moub convert`` and ``moub demo``: thin layers over :func:`moub_converters.convert`.

Exit codes: 0 success; 2 bad input or usage, with one line on stderr and no
output file left behind; 1 internal failure (also one line).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import options
from .errors import ConvertError, OptionError

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"moub {self.prog.split()[-1]}: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"moub: {' '.join(str(message).split())}", file=sys.stderr)
    return code


def build_convert_parser() -> argparse.ArgumentParser:
    from .modes import MODES

    p = _Parser(prog="moub convert", description="Compress an ONNX (or TorchScript) model into a .moub file by "
                "multi-objective uniform binning: a search for the smallest file within --max-drop of the original's quality.")
    p.add_argument("model", help="MODEL.onnx (external data is read from its folder) or model.pt with --input-shape")
    p.add_argument("-o", "--output", required=True, help="OUT.moub")
    p.add_argument("--data", help="DATA.npz: one array per model input, samples stacked on the model's batch axis "
                   "(optional 'labels'); or a folder of .npz files, one feed per sample")
    p.add_argument("--batch-axis", action="append", default=[], metavar="NAME=AXIS",
                   help="the axis of input NAME that holds the samples, where the model's dims do not say (repeatable)")
    p.add_argument("--shared", action="append", default=[], metavar="NAME",
                   help="input NAME's array is fed whole to every sample (a scalar, an initial state; repeatable)")
    p.add_argument("--labels", help="labels.npy, one class per sample (else the 'labels' array of DATA.npz)")
    p.add_argument("--test", help="TEST.npz (or a folder of feeds) the search never sees: the written file is scored on "
                   "it in the closing table and the report")
    p.add_argument("--test-labels", help="labels.npy for --test (else its 'labels' array)")
    options.add_arguments(p, choices={"mode": sorted(MODES)})
    p.add_argument("--input-shape", action="append", help="TorchScript only: example input shape, e.g. 1,3,32,32 (repeat per input)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--plot", help="write the Pareto plot and bits per tensor against sensitivity (PNG) here")
    p.add_argument("--plot-compare", action="append", default=[], metavar="R.json",
                   help="mark this report's choice on the plot too (another run on the model, e.g. --mode paper)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--from-report", metavar="REPORT.json", help="no search: write a candidate of this report's search "
                   "(same model and data; its settings), the same bytes a search choosing it writes")
    p.add_argument("--point", metavar="NAME", help="with --from-report: the candidate's name (default: the report's choice)")
    return p


def _outputs(args: argparse.Namespace) -> list[Path]:
    paths = [Path(args.output)] + [Path(p) for p in (args.report, args.plot) if p]
    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        raise OptionError("-o, --report and --plot must be different files")
    if Path(args.model).resolve() in resolved:
        raise OptionError(f"{args.output}: would overwrite the input model")
    return paths


def _run_convert(args: argparse.Namespace) -> int:
    from .api import check_writable, convert
    from .data import parse_batch_axes
    from .torch_export import parse_shape

    for path in _outputs(args):
        check_writable(path)
    if args.plot and args.bins is not None:
        raise OptionError("--plot needs a search; --bins K encodes without one")
    shapes = [parse_shape(s) for s in args.input_shape] if args.input_shape else None
    axes = parse_batch_axes(args.batch_axis, args.shared)
    if args.from_report:
        result = _from_report(args, axes)
    else:
        if args.point:
            raise OptionError("--point NAME needs --from-report REPORT.json")
        result = convert(args.model, data=args.data, labels=args.labels, batch_axes=axes, test=args.test,
                         test_labels=args.test_labels, quiet=args.quiet, input_shapes=shapes,
                         **options.from_arguments(args))
    written: list[Path] = []
    try:
        result.write(args.output)
        written.append(Path(args.output))
        if args.report:
            result.write_report(args.report)
            written.append(Path(args.report))
        if args.plot:
            result.write_plot(args.plot, [_compared(path) for path in args.plot_compare])
            written.append(Path(args.plot))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    print(result.closing_table())
    print(f"wrote {args.output}" + "".join(f", {p}" for p in (args.report, args.plot) if p))
    return EXIT_OK


def _compared(path: str) -> dict:
    from .front_point import read_report

    return read_report(path)


def _from_report(args: argparse.Namespace, axes):
    from .front_point import write_point

    chosen = options.from_arguments(args)
    given = [name for name, value in chosen.items() if value != options.default(name) and options.determines_file(name)]
    if given:
        raise OptionError(f"--from-report takes the settings of the report's search; drop {options.flag(given[0])}")
    if not args.data:
        raise OptionError("--from-report needs --data: the data the report's conversion used")
    return write_point(args.model, args.data, args.from_report, args.point, labels=args.labels, batch_axes=axes,
                       test=args.test, test_labels=args.test_labels, layer_shares=chosen["layer_shares"])


def _guarded(run, args) -> int:
    try:
        return run(args)
    except ConvertError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERNAL)
    except BrokenPipeError:  # the files are written before anything is printed
        from moub_runtime.cli import broken_pipe

        return broken_pipe()
    except MemoryError:
        return _fail("out of memory", EXIT_INTERNAL)
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, exit 1
        return _fail(f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL)


def convert_main(argv: Sequence[str]) -> int:
    args = build_convert_parser().parse_args(list(argv))
    return _guarded(_run_convert, args)


def demo_main(argv: Sequence[str]) -> int:
    from .demo import build_demo_parser, run_demo

    args = build_demo_parser(_Parser).parse_args(list(argv))
    return _guarded(run_demo, args)
