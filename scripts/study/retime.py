"""Set one study record aside (OUT/<arm>-<task>-first-run.json) so the next study run measures it again.

Used when an arm's wall time was taken while other jobs shared the machine: the rerun gives the
cost ratio a clean denominator; the first record is kept beside it for comparison.

    .venv/bin/python scripts/study/retime.py runs/quality-study sst2 dense
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    out, task, arm = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    path = out / "results.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    chosen = [r for r in records if r["task"] == task and r["arm"] == arm]
    if len(chosen) != 1:
        raise SystemExit(f"error: expected one record for {task} {arm}, found {len(chosen)}")
    (out / f"{arm}-{task}-first-run.json").write_text(json.dumps(chosen[0]))
    path.write_text("".join(json.dumps(r) + "\n" for r in records if r is not chosen[0]))
    print(json.dumps({"set_aside": f"{task} {arm}", "seconds": chosen[0]["seconds"]}))


if __name__ == "__main__":
    main()
