//! `yunqi simulate traffic`: a city's vehicle detections, for the demo, the tests and the
//! benchmarks. Deterministic for a seed. The city: 10 districts of Hangzhou, road segments with
//! a camera each, a fleet of vehicles (most with local 浙A plates, the rest from elsewhere),
//! more traffic and lower speeds in the morning and evening rush hours, and events delivered
//! out of order (each late by up to `--max-delay-ms`, so a watermark of that delay sees all).

use std::io::Write;
use std::process::ExitCode;

use chrono::{DateTime, Duration, Timelike, Utc};
use clap::Args;

/// The districts of the simulated city.
pub const DISTRICTS: [&str; 10] = [
    "上城区",
    "拱墅区",
    "西湖区",
    "滨江区",
    "萧山区",
    "余杭区",
    "临平区",
    "钱塘区",
    "富阳区",
    "临安区",
];
const ELSEWHERE: [&str; 8] = ["浙B", "浙C", "浙D", "沪A", "苏E", "皖A", "赣A", "粤B"];
const PLATE_CHARS: &[u8] = b"0123456789ABCDEFGHJKLMNPQRSTUVWXYZ";

#[derive(Args, Debug, Clone)]
pub struct TrafficArgs {
    /// Detections per second of simulated time at rush hour (07–10, 17–20 city time); daytime
    /// has 56% of it, evenings 39%, nights 17%.
    #[arg(long, default_value_t = 10_000)]
    pub rate: u64,
    /// Simulated seconds.
    #[arg(long, default_value_t = 60)]
    pub duration: u64,
    /// Start of the simulated time (RFC 3339); default 2026-11-26T08:00:00+08:00 (rush hour).
    #[arg(long)]
    pub start: Option<String>,
    /// Road segments (each with a camera).
    #[arg(long, default_value_t = 3_000)]
    pub segments: u32,
    /// Vehicles in the city.
    #[arg(long, default_value_t = 300_000)]
    pub vehicles: u32,
    /// Share of vehicles with local 浙A plates, in percent.
    #[arg(long, default_value_t = 70)]
    pub local_percent: u32,
    /// Largest delivery delay: events arrive out of order within it.
    #[arg(long, default_value_t = 2_000)]
    pub max_delay_ms: u64,
    /// Seed of the generator.
    #[arg(long, default_value_t = 2026)]
    pub seed: u64,
    /// Write to this file ("-": standard output).
    #[arg(long, default_value = "-")]
    pub out: String,
    /// `ndjson` (one event per line) or `csv` (with a header).
    #[arg(long, value_enum, default_value_t = OutFormat::Ndjson)]
    pub format: OutFormat,
}

/// How `yunqi simulate` writes events.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFormat {
    /// One JSON object per line, timestamps in RFC 3339.
    Ndjson,
    /// `plate,segment,district,speed,ts` with a header line.
    Csv,
}

/// A small deterministic generator (splitmix64), shared with the benchmarks' data.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The plate of vehicle `v`: the same for a seed, every time.
pub(crate) fn plate(seed: u64, v: u32, local_percent: u32) -> String {
    let mut r = Rng(seed ^ (u64::from(v) << 20) ^ 0xA5A5);
    let prefix = if r.below(100) < u64::from(local_percent) {
        "浙A"
    } else {
        ELSEWHERE[r.below(ELSEWHERE.len() as u64) as usize]
    };
    let mut p = String::from(prefix);
    for _ in 0..5 {
        p.push(PLATE_CHARS[r.below(PLATE_CHARS.len() as u64) as usize] as char);
    }
    p
}

/// Traffic at an hour of the day (city time), relative to the mean: rush hours ×1.8, night ×0.3.
fn hour_factor(hour: u32) -> f64 {
    match hour {
        7..=9 | 17..=19 => 1.8,
        10..=16 => 1.0,
        20..=22 | 6 => 0.7,
        _ => 0.3,
    }
}

/// One detection.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    /// Plate.
    pub plate: String,
    /// Road segment.
    pub segment: u32,
    /// Its district.
    pub district: &'static str,
    /// km/h.
    pub speed: f64,
    /// When the camera saw it.
    pub ts: DateTime<Utc>,
}

impl Detection {
    /// The detection as one line of `format` (with its newline; CSV without the header).
    pub fn line(&self, format: OutFormat) -> String {
        let ts = self.ts.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        match format {
            OutFormat::Ndjson => format!(
                "{{\"plate\":\"{}\",\"segment\":{},\"district\":\"{}\",\"speed\":{},\"ts\":\"{ts}\"}}\n",
                self.plate, self.segment, self.district, self.speed
            ),
            OutFormat::Csv => format!(
                "{},{},{},{},{ts}\n",
                self.plate, self.segment, self.district, self.speed
            ),
        }
    }
}

/// The detections of `args`, in delivery order (out of order in event time, within the delay).
pub fn detections(
    args: &TrafficArgs,
    start: DateTime<Utc>,
    mut emit: impl FnMut(&Detection) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let mut rng = Rng(args.seed);
    let segments = args.segments.max(1);
    // Plates are made on first use and kept (most vehicles appear many times).
    let mut plates: std::collections::HashMap<u32, String> = std::collections::HashMap::new();
    // Events waiting for delivery, by arrival time.
    let mut pending: std::collections::BinaryHeap<std::cmp::Reverse<(i64, u64)>> =
        Default::default();
    let mut held: std::collections::HashMap<u64, Detection> = std::collections::HashMap::new();
    let mut next_id = 0u64;
    let mut sent = 0u64;
    let city = chrono::FixedOffset::east_opt(8 * 3600).expect("UTC+8");
    for second in 0..args.duration {
        let t0 = start + Duration::seconds(second as i64);
        let hour = t0.with_timezone(&city).hour();
        let factor = hour_factor(hour);
        let n = (args.rate as f64 * factor / 1.8).round() as u64;
        for _ in 0..n {
            let vehicle = rng.below(u64::from(args.vehicles.max(1))) as u32;
            let segment = rng.below(u64::from(segments)) as u32;
            let ts = t0 + Duration::microseconds(rng.below(1_000_000) as i64);
            let base = 30.0 + 40.0 * rng.unit();
            let speed = (base / factor.max(1.0) * 10.0).round() / 10.0;
            let delay = (rng.unit() * rng.unit() * args.max_delay_ms as f64 * 1000.0) as i64;
            let d = Detection {
                plate: plates
                    .entry(vehicle)
                    .or_insert_with(|| plate(args.seed, vehicle, args.local_percent))
                    .clone(),
                segment,
                district: DISTRICTS[(segment as usize * DISTRICTS.len()) / segments as usize],
                speed,
                ts,
            };
            pending.push(std::cmp::Reverse((ts.timestamp_micros() + delay, next_id)));
            held.insert(next_id, d);
            next_id += 1;
        }
        // Deliver what has arrived by the end of this second.
        let now = (t0 + Duration::seconds(1)).timestamp_micros();
        while let Some(std::cmp::Reverse((arrival, id))) = pending.peek().copied() {
            if arrival > now {
                break;
            }
            pending.pop();
            if let Some(d) = held.remove(&id) {
                emit(&d)?;
                sent += 1;
            }
        }
    }
    while let Some(std::cmp::Reverse((_, id))) = pending.pop() {
        if let Some(d) = held.remove(&id) {
            emit(&d)?;
            sent += 1;
        }
    }
    Ok(sent)
}

/// `yunqi simulate traffic`.
pub fn traffic(args: TrafficArgs) -> anyhow::Result<ExitCode> {
    let start = match &args.start {
        Some(s) => DateTime::parse_from_rfc3339(s)
            .map_err(|_| anyhow::anyhow!("invalid --start \"{s}\"\nhint: give an RFC 3339 time, e.g. 2026-11-26T08:00:00+08:00"))?
            .with_timezone(&Utc),
        None => DateTime::parse_from_rfc3339("2026-11-26T08:00:00+08:00")
            .expect("a valid time")
            .with_timezone(&Utc),
    };
    let out: Box<dyn Write> = if args.out == "-" {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::fs::File::create(&args.out)?)
    };
    let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
    let t = std::time::Instant::now();
    if args.format == OutFormat::Csv {
        writeln!(out, "plate,segment,district,speed,ts")?;
    }
    let written = detections(&args, start, |d| {
        out.write_all(d.line(args.format).as_bytes())
    })
    .and_then(|n| out.flush().map(|_| n));
    let n = match written {
        Ok(n) => n,
        // A reader that has read enough (`| head`) is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
        Err(e) => return Err(e.into()),
    };
    eprintln!(
        "{n} detections over {} simulated seconds in {:.2} s",
        args.duration,
        t.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> TrafficArgs {
        TrafficArgs {
            rate: 2_000,
            duration: 20,
            start: None,
            segments: 300,
            vehicles: 5_000,
            local_percent: 70,
            max_delay_ms: 2_000,
            seed: 7,
            out: "-".into(),
            format: OutFormat::Ndjson,
        }
    }

    fn run(a: &TrafficArgs, start: &str) -> Vec<Detection> {
        let start = DateTime::parse_from_rfc3339(start)
            .unwrap()
            .with_timezone(&Utc);
        let mut out = Vec::new();
        detections(a, start, |d| {
            out.push(d.clone());
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn the_same_seed_gives_the_same_city() {
        let a = args();
        let one = run(&a, "2026-11-26T08:00:00+08:00");
        assert_eq!(one, run(&a, "2026-11-26T08:00:00+08:00"));
        let other = run(&TrafficArgs { seed: 8, ..a }, "2026-11-26T08:00:00+08:00");
        assert_ne!(one, other);
    }

    #[test]
    fn out_of_order_but_within_the_delay_and_nothing_lost() {
        let a = args();
        let events = run(&a, "2026-11-26T08:00:00+08:00");
        assert_eq!(
            events.len() as u64,
            a.rate * a.duration,
            "at rush hour, --rate per second"
        );
        let mut max_seen = events[0].ts;
        let mut out_of_order = 0;
        for e in &events {
            if e.ts < max_seen {
                out_of_order += 1;
                assert!(max_seen - e.ts <= Duration::milliseconds(a.max_delay_ms as i64));
            }
            max_seen = max_seen.max(e.ts);
        }
        assert!(
            out_of_order > events.len() / 10,
            "{out_of_order} of {}",
            events.len()
        );
    }

    #[test]
    fn plates_are_mostly_local_and_nights_are_quiet() {
        let a = args();
        let events = run(&a, "2026-11-26T08:00:00+08:00");
        let local = events.iter().filter(|e| e.plate.starts_with("浙A")).count() as f64;
        let share = local / events.len() as f64;
        assert!((0.6..0.8).contains(&share), "{share}");
        assert!(events.iter().all(|e| e.plate.chars().count() == 7));
        assert!(events.iter().all(|e| DISTRICTS.contains(&e.district)));
        let night = run(&a, "2026-11-26T03:00:00+08:00");
        assert!(
            night.len() * 5 < events.len() * 2,
            "{} at night vs {}",
            night.len(),
            events.len()
        );
    }
}
