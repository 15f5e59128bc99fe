"""Re-derive the phase seconds of study records from each arm's gradprune.json (quality_study.phase_seconds).

Records written before 2026-12-07 summed `score_<scorer>_peak_mb` into `score_seconds` (a timings key that also starts
with `score_`), so their score and compress seconds were ~megabytes too high. The checkpoints' gradprune.json files
still hold the timings (`--drop-weights` keeps them): this rewrites those three fields of every record whose
checkpoint is under OUT and leaves the rest as they are. Run it while no study process appends to RESULTS.

    .venv/bin/python scripts/study/rederive_seconds.py docs/study-records/powered.jsonl runs/powered
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from quality_study import checkpoint_dir, phase_seconds


def rederive(records: list[dict], out: Path) -> int:
    changed = 0
    for record in records:
        manifest = checkpoint_dir(out, record["task"], record["arm"], record.get("seed", 0)) / "gradprune.json"
        if record["arm"] == "dense" or "judge" in record or not manifest.is_file():
            continue
        fields = phase_seconds(json.loads(manifest.read_text())["timings"])
        changed += any(record.get(k) != v for k, v in fields.items())
        record.update(fields)
    return changed


def main() -> None:
    results, out = Path(sys.argv[1]), Path(sys.argv[2])
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    changed = rederive(records, out)
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    print(json.dumps({"records": len(records), "rederived": changed}))


if __name__ == "__main__":
    main()
