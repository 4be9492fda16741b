#!/usr/bin/env python3
"""Deterministic vehicle-detection CSV for the streaming benchmarks.

Usage: gen_csv.py N OUT

Writes a header line `plate,segment,district,speed,ts` and N events. Event times start at
2026-11-26T00:00:00Z and advance by 50 µs per event (20,000 events a second, so N events span
N/20,000 s); each event is delivered up to 2 s late (its ts is 0–2 s before its position in the
file), so the file is slightly out of order but never more than a 5 s watermark allows.
3,000 road segments, each in one of 10 districts (segment % 10); plates come from a pool of
100,000 vehicles; speeds 20.0–80.0 km/h. Same N, same bytes: the generator is seeded.
"""

import random
import sys
from datetime import datetime, timedelta, timezone

SEGMENTS = 3000
VEHICLES = 100_000
EVENTS_PER_SECOND = 20_000
LATENESS_MAX_US = 2_000_000
START = datetime(2026, 11, 26, tzinfo=timezone.utc)
DISTRICTS = ["西湖区", "上城区", "拱墅区", "滨江区", "萧山区",
             "余杭区", "临平区", "钱塘区", "富阳区", "临安区"]
# Mostly local (浙A) plates, some from elsewhere.
PROVINCES = ["浙A"] * 6 + ["浙B", "沪A", "苏E", "皖A"]
PLATE_CHARS = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # no I or O, as on real plates


def plate_for(vehicle, rng):
    tail = "".join(rng.choice(PLATE_CHARS) for _ in range(5))
    return PROVINCES[vehicle % len(PROVINCES)] + tail


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: gen_csv.py N OUT")
    n, out = int(sys.argv[1]), sys.argv[2]
    rng = random.Random(20261126)
    plates = [plate_for(v, rng) for v in range(VEHICLES)]
    us_per_event = 1_000_000 // EVENTS_PER_SECOND
    second_prefix = {}  # whole second since START -> "YYYY-MM-DDTHH:MM:SS"
    with open(out, "w", encoding="utf-8", newline="") as f:
        f.write("plate,segment,district,speed,ts\n")
        lines = []
        for i in range(n):
            offset_us = max(0, i * us_per_event - rng.randrange(LATENESS_MAX_US))
            second, micros = divmod(offset_us, 1_000_000)
            prefix = second_prefix.get(second)
            if prefix is None:
                prefix = (START + timedelta(seconds=second)).strftime("%Y-%m-%dT%H:%M:%S")
                second_prefix[second] = prefix
            segment = rng.randrange(SEGMENTS) + 1
            lines.append(f"{plates[rng.randrange(VEHICLES)]},{segment},"
                         f"{DISTRICTS[segment % 10]},{rng.randrange(200, 801) / 10},"
                         f"{prefix}.{micros:06d}Z\n")
            if len(lines) == 100_000:
                f.writelines(lines)
                lines.clear()
        f.writelines(lines)


if __name__ == "__main__":
    main()
