"""The `goldstream` command: one entry point with a subcommand per job."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from goldstream import __version__


def _schemas_export(args: argparse.Namespace) -> int:
    from schemas.export import export

    for path in export(Path(args.dir)):
        print(path)
    return 0


def _schemas_validate(args: argparse.Namespace) -> int:
    """Validate a JSONL file line by line, so a producer can check its output before publishing."""
    import schemas

    models = {m.__name__: m for m in schemas.MESSAGES}
    model = models[args.message]
    bad = 0
    with open(args.file, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                schemas.decode(model, line.rstrip(b"\r\n"))
            except schemas.SchemaError as exc:
                bad += 1
                print(f"{args.file}:{n}: {exc}", file=sys.stderr)
    print(f"{args.message}: {bad} invalid line(s) in {args.file}")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="goldstream", description=__doc__)
    ap.add_argument("--version", action="version", version=f"goldstream {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    sch = sub.add_parser("schemas", help="message contracts: export JSON Schema, validate files")
    sch_sub = sch.add_subparsers(dest="schemas_command", metavar="ACTION", required=True)
    exp = sch_sub.add_parser("export", help="write the JSON Schema of every message into DIR")
    exp.add_argument("dir")
    exp.set_defaults(func=_schemas_export)
    val = sch_sub.add_parser("validate", help="validate a JSONL file of one message type")
    from schemas.messages import MESSAGES

    val.add_argument("message", choices=[m.__name__ for m in MESSAGES])
    val.add_argument("file")
    val.set_defaults(func=_schemas_validate)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
