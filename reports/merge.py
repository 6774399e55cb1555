"""Merge the results of CI shards (`--shard I/N`) into one results document and report.

Why a separate step: each matrix job gates its own checkpoints; the required check that publishes the report
runs after all of them and must see exactly what a single run would have produced. Shards must agree on the
run settings (model, benchmarks, items, thresholds) and must not disagree about any check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fixtures.errors import AuditError
from reports.formats import template_dir_from_env, write_reports
from reports.render import SCHEMA, build_document


def merge_documents(documents: Sequence[dict[str, Any]]) -> dict[str, Any]:
    if not documents:
        raise AuditError("nothing to merge")
    settings = documents[0]["settings"]
    checks: dict[tuple[str, str], dict[str, Any]] = {}
    for index, document in enumerate(documents):
        if document.get("schema") != SCHEMA:
            raise AuditError(f"document {index}: schema {document.get('schema')!r}, expected {SCHEMA!r}")
        if document["settings"] != settings:
            raise AuditError(f"document {index}: run settings differ from the first shard's: "
                             f"{document['settings']} vs {settings}")
        for check in document["checks"]:
            key = (check["checkpoint"]["id"], check["metric"])
            if key in checks and _comparable(checks[key]) != _comparable(check):
                raise AuditError(f"shards disagree on {key[0]} {key[1]}")
            checks[key] = check
    return build_document(list(checks.values()), settings, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


# Where a check ran (test node, xdist worker and GPU) is not part of what it measured.
UNCOMPARED = ("nodeid", "placement", "artefact")


def _comparable(check: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in check.items() if k not in UNCOMPARED}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.merge", description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results.json of each shard")
    parser.add_argument("--out", type=Path, required=True, help="directory for the merged report")
    args = parser.parse_args(argv)
    try:
        documents = [json.loads(path.read_text(encoding="utf-8")) for path in args.results]
        merged = merge_documents(documents)
    except (OSError, json.JSONDecodeError, KeyError, AuditError) as exc:
        print(f"moe-fbs-audit merge: {exc}", file=sys.stderr)
        return 2
    outputs = write_reports(merged, args.out, template_dir_from_env())
    blocked = sum(row["verdict"] != "pass" for row in merged["checkpoints"])
    print(f"moe-fbs-audit merge: {len(args.results)} shard(s), {len(merged['checkpoints'])} checkpoint(s), "
          f"{blocked} blocked; report -> {outputs[0]}; also {', '.join(path.name for path in outputs[1:])}")
    return 1 if blocked else 0


if __name__ == "__main__":
    sys.exit(main())
