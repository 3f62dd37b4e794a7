"""The ``moub`` command: a thin layer over the library.

Exit codes: 0 success, 2 bad input or usage (one line on stderr), 1 internal
failure. Other packages add subcommands through the ``moub.commands`` entry-point
group; each is loaded only when asked for, so the device runtime never imports them.

Everything printed that comes from a file (names, producer, metadata, error
messages quoting them) goes through :func:`printable`, so a file cannot drive
the terminal: no escape sequences, carriage returns or bidirectional overrides
reach it, only their escaped spelling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import unicodedata
from collections.abc import Sequence

from .compact import COMPACT_MODES  # the package's loader imports it anyway

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2
MAX_MEMBERS_SHOWN = 12  # pack members listed per pack by ``moub inspect`` without --json


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        print(f"moub: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


_SHOWN_AS_IS = frozenset({"\t"})
_INVISIBLE = frozenset({"Cc", "Cf", "Co", "Cs", "Zl", "Zp"})  # controls, format (bidi, zero-width), private, surrogates, separators


def printable(text: object) -> str:
    """``text`` with every character that could steer a terminal (C0/C1 controls, escape
    sequences, carriage return, bidirectional and zero-width format characters, line and
    paragraph separators) written as a visible escape: ``\x1b``, ``\r``, ``\u202e``."""
    out = []
    for ch in str(text):
        if ch not in _SHOWN_AS_IS and unicodedata.category(ch) in _INVISIBLE:
            code = ord(ch)
            out.append({"\n": "\\n", "\r": "\\r"}.get(ch) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
                                                               if code < 0x10000 else f"\\U{code:08x}"))
        else:
            out.append(ch)
    return "".join(out)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> int:
    print(f"moub: {printable(' '.join(str(message).split()))}", file=sys.stderr)
    return code


def _limits(args: argparse.Namespace):
    from moub_format import DEFAULT_LIMITS, ReaderLimits

    if args.memory_budget is None:
        return DEFAULT_LIMITS
    return ReaderLimits(memory_budget=args.memory_budget)


def dtype_name(code: int) -> str:
    """ONNX's name for a TensorProto data type ("float", "float16"); the number if unknown."""
    from .onnx_proto import TensorProto

    try:
        return TensorProto.DataType.Name(code).lower()
    except ValueError:
        return str(code)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def cmd_layers(args: argparse.Namespace) -> int:
    from .layers import layer_rows, with_report

    rows = layer_rows(args.file, _limits(args))
    if args.report:
        rows = with_report(rows, args.report)
    if args.json:
        print(json.dumps({"file": str(args.file), "layers": [r.to_dict() for r in rows]}, indent=2, sort_keys=True))
        return EXIT_OK
    extra = f" {'sensitivity':>11} {'share':>6}" if args.report else ""
    print(f"{'tensor':40} {'weights':>9} {'step':>9} {'levels':>6} {'bits/w':>6}{extra}")
    for r in rows:
        name = printable(r.path)
        name = name if len(name) <= 40 else "..." + name[-37:]
        step = f"{r.step:9.3g}" if r.step is not None else f"{'cb ' + str(r.codebook):>9}"
        line = f"{name:40} {r.weights:>9} {step} {r.levels:>6} {r.bits_per_weight:>6.2f}"
        if args.report:
            sens = f"{r.sensitivity:11.3g}" if r.sensitivity is not None else f"{'-':>11}"
            share = f"{100 * r.error_share:5.1f}%" if r.error_share is not None else f"{'-':>6}"
            line += f" {sens} {share}"
        print(line)
    total = sum(r.weights for r in rows)
    bits = sum(r.weights * r.bits_per_weight for r in rows) / total if total else 0.0
    print(f"{len(rows)} quantized tensors, {total} weights at {bits:.3f} bits/weight of codes")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import summarize

    if args.report and not args.layers:
        return _fail("inspect: --report goes with --layers")
    if args.layers:
        return cmd_layers(args)

    summary = summarize(args.file, _limits(args))
    if args.json:  # JSON escapes every control character itself
        print(json.dumps(summary.to_dict(), indent=2, sort_keys=True))
        return EXIT_OK
    print(f"{printable(summary.file)}: .moub format {summary.format_version}, written by {printable(summary.producer)}")
    print(
        f"  file {_human(summary.file_bytes)}, decoded {_human(summary.decoded_bytes)} (ratio {summary.ratio:.2f}x); "
        f"{summary.quantized_weights} quantized weights at {summary.bits_per_weight:.3f} bits/weight incl. tables"
    )
    if summary.integer_weights:
        print(f"  {summary.integer_weights} integer weights coded losslessly at "
              f"{8 * summary.integer_bytes / summary.integer_weights:.3f} bits/weight incl. tables")
    print(
        f"  bytes: index {summary.index_bytes}, graph {summary.graph_bytes}, tensors {summary.tensor_bytes}, "
        f"packs {summary.pack_bytes}, padding {summary.padding_bytes}"
    )
    if summary.tables:
        print(
            f"  code-length tables: {summary.tables} ({summary.packed_tables} packed), "
            f"{summary.table_bytes} index bytes for {summary.table_entries} code lengths"
        )
    for i, cb in enumerate(summary.codebooks):
        kind = "grid values" if cb.get("grid") else "entries"
        print(f"  codebook {i}: {cb['entries']} {kind} in [{cb['min']:.6g}, {cb['max']:.6g}], longest code {cb['longest_code']} bits")
    if summary.tensors:
        print(f"  {'tensor':48} {'dtype':>7} {'shape':>18} {'encoding':>8} {'bytes':>10} {'bits/w':>7}")
    for t in summary.tensors:
        shape = "x".join(str(d) for d in t.dims) or "scalar"
        print(f"  {printable(t.path)[:48]:48} {dtype_name(t.dtype):>7} {shape[:18]:>18} {t.encoding:>8} {t.stored_bytes:>10} "
              f"{t.bits_per_weight:>7.3f}")
    for p in summary.packs:
        print(
            f"  pack {p.number}: {len(p.members)} members, {p.elements} weights, {p.stored_bytes} bytes in {p.chunks} chunks, "
            f"codebook {p.codebook}, table {p.table}: {p.bits_per_weight:.3f} bits/weight, "
            f"{p.bits_per_weight_with_index:.3f} with its index share ({p.index_bytes} bytes)"
        )
        for m in p.members[:MAX_MEMBERS_SHOWN]:
            name = printable(m["path"]) if m["path"] is not None else f"site {m['site']}"
            offset = f" offset {m['offset']:+d}" if m.get("offset") else ""
            print(f"    {name[:56]:56} {m['elements']:>10} x {m['scale']:.6g}{offset}")
        if len(p.members) > MAX_MEMBERS_SHOWN:
            print(f"    ... {len(p.members) - MAX_MEMBERS_SHOWN} more (--json lists all)")
    if summary.compact is not None:
        _print_compact(summary.compact)
    if summary.metadata:
        print("  provenance:")
        for key, value in summary.metadata.items():
            shown = printable(value)
            shown = shown if len(shown) <= 100 else shown[:97] + "..."
            print(f"    {printable(key)}: {shown}")
    return EXIT_OK


def _print_compact(compact: dict) -> None:
    """One line for what a compact session holds as integers, one per reason a quantized tensor stays float."""
    held = ", ".join(f"{v['tensors']} tensors ({v['weights']} weights) as {k}" for k, v in sorted(compact["held"].items()))
    print(f"  compact session (compact=True: {compact['mode']!r} here): {held or 'nothing'} held as integers "
          f"({_human(compact['held_weight_bytes'])})")
    for reason, v in sorted(compact["kept_float"].items()):
        print(f"    kept float: {v['tensors']} tensors ({v['weights']} weights): {reason}")
    if compact["mode"] != "smallest" and "smallest_resident_bytes" in compact:
        print(f"    compact='smallest' holds every quantized weight it can: {_human(compact['smallest_resident_bytes'])} "
              "with the rest float32")


def cmd_decode(args: argparse.Namespace) -> int:
    from .loader import decode_to_onnx
    from .output import unwritable_reason

    reason = unwritable_reason(args.output)
    if reason:
        return _fail(reason)
    decode_to_onnx(args.file, args.output, _limits(args), compact=args.compact)
    print(f"wrote {printable(args.output)}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from .inspect import verify_file

    if bool(args.model) != bool(args.data):
        return _fail("verify: --model and --data go together")
    if not args.model and (args.labels or args.metric or args.batch_axis or args.shared or args.max_drop is not None):
        return _fail("verify: --labels, --metric, --batch-axis, --shared and --max-drop need --model and --data")
    problems = verify_file(args.file, _limits(args))
    for problem in problems:
        print(f"FAIL {printable(problem)}")
    if problems:
        return _fail(f"{args.file}: {len(problems)} problem(s) found")
    print(f"{printable(args.file)}: structure, checksums, graph and every tensor and pack decode: OK")
    if args.model:
        scoring = bool(args.labels or args.metric or args.batch_axis or args.shared or args.max_drop is not None)
        scorer = _scorer()
        lines: list[str] = []
        if scorer is not None:  # the converter's data reading and metrics: any layout, a metric per head, labels
            try:
                lines = scorer(args.model, args.file, args.data, labels=args.labels, metric=args.metric,
                               batch_axis=args.batch_axis, shared=args.shared, max_drop=args.max_drop)
            except ValueError as exc:
                if scoring:
                    raise
                lines = [f"not scored by a metric: {exc}"]  # the data is still one feed the runtime can compare on
        elif scoring:
            return _fail("verify: --labels, --metric, --batch-axis, --shared and --max-drop score with the "
                         "converter's metrics: pip install 'moub[convert]'")
        if not lines or lines[0].startswith("not scored"):
            from .compare import compare_outputs

            lines += compare_outputs(args.model, args.file, args.data, _limits(args)).lines()
        for line in lines:
            print(printable(line))
    return EXIT_OK


SCORING_GROUP = "moub.scoring"  # entry point 'verify': scores a file against its original by a metric


def _scorer():
    """The converter's scoring for ``verify`` if it is installed, else None (the runtime compares raw outputs)."""
    from importlib.metadata import entry_points

    for entry in entry_points(group=SCORING_GROUP, name="verify"):
        try:
            return entry.load()
        except ImportError:
            return None
    return None


COMMAND_GROUP = "moub.commands"  # entry points: name -> function(argv) -> exit code
BUILT_IN = ("inspect", "decode", "verify")  # found without reading the installed packages' metadata


def plugin_commands() -> dict:
    """The subcommands other installed packages register (name -> entry point), not loaded."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=COMMAND_GROUP)}


def _run_plugin(entry, argv: list[str]) -> int:
    try:
        run = entry.load()
    except ImportError as exc:
        dist = entry.dist.name if entry.dist is not None else "moub"
        extra = f"[{','.join(entry.extras)}]" if entry.extras else ""
        return _fail(f"moub {entry.name} is not installed: pip install '{dist}{extra}' ({exc})")
    return run(argv)


def _size(text: str) -> int:
    from moub_format.budget import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_memory_budget(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-budget", type=_size, metavar="SIZE",
                   help="most memory reading the file may take, e.g. 300M or 2G (default: half of the memory available, "
                        "at most 64G); a file that needs more is refused before anything is decoded")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moub", description="Compress ONNX models into .moub files and load them back.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("inspect", help="tensors, codebooks, bits/weight, ratio, provenance")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.add_argument("--layers", action="store_true", help="one row per quantized tensor: weights, step or codebook, "
                   "levels used, bits per weight of its codes (decodes the indices)")
    p.add_argument("--report", metavar="R.json", help="with --layers: add the sensitivity and error share the "
                   "converter's report measured")
    _add_memory_budget(p)
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("decode", help="write the runnable ONNX model with decoded weights")
    p.add_argument("file")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--compact", nargs="?", const=True, choices=COMPACT_MODES, default=False,
                   help="keep grid-quantized weights as 8/16-bit integers behind DequantizeLinear (a smaller model in "
                        "memory); 'fast' keeps grouped Convs' weights float, 'smallest' holds them too; without a value, "
                        "'fast' where this onnxruntime runs Convs in NCHWc (x86), else 'smallest'")
    _add_memory_budget(p)
    p.set_defaults(func=cmd_decode)
    p = sub.add_parser("verify", help="checksums, structure, decode; optionally compare with the original")
    p.add_argument("file")
    p.add_argument("--model", help="original .onnx to compare outputs with")
    p.add_argument("--data", help=".npz inputs for the comparison (with the converter installed: any data "
                   "'moub convert --data' takes)")
    p.add_argument("--labels", help="labels.npy for a labelled metric (else the 'labels' array of DATA.npz)")
    p.add_argument("--metric", help="score by this metric (default: the one the file was converted with)")
    p.add_argument("--batch-axis", action="append", default=[], metavar="NAME=AXIS",
                   help="the axis of input NAME that holds the samples (repeatable)")
    p.add_argument("--shared", action="append", default=[], metavar="NAME",
                   help="input NAME's array is fed whole to every sample (repeatable)")
    p.add_argument("--max-drop", type=float, help="judge the loss against this (default: the file's own)")
    _add_memory_budget(p)
    p.set_defaults(func=cmd_verify)
    for name in sorted(plugin_commands()):
        sub.add_parser(name, help=f"see moub {name} -h", add_help=False)
    return parser


def broken_pipe() -> int:
    """The reader of standard output went away (``moub inspect f.moub | head``): no message, as
    any Unix tool in a pipe, and exit 2 (not an internal failure); stdout goes to devnull so that
    the interpreter's final flush stays quiet."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_BAD_INPUT


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plugins = plugin_commands() if argv and argv[0] not in BUILT_IN and not argv[0].startswith("-") else {}
    if argv and argv[0] in plugins:
        return _run_plugin(plugins[argv[0]], argv[1:])
    args = build_parser().parse_args(argv)
    from moub_format import MoubFormatError

    try:
        return args.func(args)
    except MoubFormatError as exc:
        return _fail(str(exc))
    except ValueError as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted", EXIT_INTERNAL)
    except BrokenPipeError:
        return broken_pipe()
    except OSError as exc:  # a file that is missing or unreadable, a disk that is full: the input or the place, not us
        return _fail(f"{exc.filename or args.file}: {exc.strerror or exc}")
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, exit 1
        return _fail(f"internal error: {type(exc).__name__}: {exc}", EXIT_INTERNAL)


if __name__ == "__main__":
    raise SystemExit(main())
