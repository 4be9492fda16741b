#!/usr/bin/env python3
"""Checks Flink's windowed results against plain Python on the same detections CSV.

Usage: check.py DATA.csv RESULT.csv

RESULT.csv is what `tumble.py DATA.csv --verify RESULT.csv` wrote; its header tells the query:
`seg` (window_start, window_end, segment, vehicles) or `rollup` (… district, segment, vehicles,
plates, speed). Python floors each ts to its UTC minute and counts; every group must match
exactly (vehicles), plates exactly or within 5 % (APPROX_COUNT_DISTINCT), speed within 1e-9
relative. A window_start that is not the data's own whole minute shows up as missing and extra
groups. Exits 1 on any mismatch, printing the first few.
"""

import csv
import sys
from collections import defaultdict
from datetime import datetime, timedelta

PLATES_TOLERANCE = 0.05
SPEED_TOLERANCE = 1e-9
SHOWN_MAX = 10


def window_of(ts):
    """'2026-11-26T00:00:59.999999Z' -> '2026-11-26 00:00:00' (UTC minute, as Flink prints it)."""
    if not ts.endswith("Z") or ts[10] != "T":
        raise ValueError(f"ts {ts!r} is not RFC 3339 UTC")
    return ts[:10] + " " + ts[11:16] + ":00"


def expected_groups(data_path, rollup):
    """Maps each group key (window_start, district, segment) to [vehicles, plates, speed_sum]."""
    groups = defaultdict(lambda: [0, set(), 0.0])
    with open(data_path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f)
        if next(rows) != ["plate", "segment", "district", "speed", "ts"]:
            sys.exit(f"error: {data_path} does not start with plate,segment,district,speed,ts")
        for plate, segment, district, speed, ts in rows:
            window = window_of(ts)
            keys = ([(window, district, segment), (window, district, ""), (window, "", "")]
                    if rollup else [(window, "", segment)])
            for key in keys:
                group = groups[key]
                group[0] += 1
                if rollup:
                    group[1].add(plate)
                    group[2] += float(speed)
    return groups


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: check.py DATA.csv RESULT.csv")
    data_path, result_path = sys.argv[1:]
    with open(result_path, encoding="utf-8", newline="") as f:
        result = list(csv.DictReader(f))
    rollup = result and "district" in result[0]
    expected = expected_groups(data_path, rollup)

    problems = []
    seen = set()
    for row in result:
        start = row["window_start"]
        key = (start, row.get("district", ""), row["segment"])
        end = (datetime.fromisoformat(start) + timedelta(minutes=1)).isoformat(sep=" ")
        if row["window_end"] != end:
            problems.append(f"{key}: window_end {row['window_end']}, expected {end}")
        if key in seen:
            problems.append(f"{key}: reported twice")
        seen.add(key)
        if key not in expected:
            problems.append(f"{key}: not in the data (vehicles {row['vehicles']})")
            continue
        vehicles, plates, speed_sum = expected[key]
        if int(row["vehicles"]) != vehicles:
            problems.append(f"{key}: vehicles {row['vehicles']}, expected {vehicles}")
        if rollup:
            if abs(int(row["plates"]) - len(plates)) > PLATES_TOLERANCE * len(plates):
                problems.append(f"{key}: plates {row['plates']}, expected {len(plates)}")
            speed = speed_sum / vehicles
            if abs(float(row["speed"]) - speed) > SPEED_TOLERANCE * speed:
                problems.append(f"{key}: speed {row['speed']}, expected {speed}")
    missing = sorted(set(expected) - seen)
    problems += [f"{key}: missing (vehicles {expected[key][0]})" for key in missing]

    events = sum(v[0] for k, v in expected.items() if k[1:] == ("", "") or not rollup)
    windows = sorted({k[0] for k in expected})
    if problems:
        print(f"FAIL: {len(problems)} problems in {len(result)} rows; first {SHOWN_MAX}:")
        print("\n".join(problems[:SHOWN_MAX]))
        sys.exit(1)
    print(f"OK: {len(result)} rows match plain Python ({events} events, windows {windows})")


if __name__ == "__main__":
    main()
