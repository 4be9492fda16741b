//! Calendar arithmetic for quotas and permits, in the city's time zone (UTC+8 by default).
//!
//! - A quota period is a natural day, month or year; a spend is counted in the period of the
//!   date the permit is valid for (a permit for 1 December counts in December, whenever it was
//!   applied for).
//! - A validity window is `day` (00:00 to 24:00 of the date) or `noon` (12:00 of the date to
//!   12:00 the next day); it belongs to the date it starts on.
//! - A rest day is a holiday of the calendar, or a Saturday or Sunday that the calendar does
//!   not declare a make-up working day (调休). A window "spans" a rest day when any moment of
//!   it falls on one.

use std::collections::BTreeSet;

use chrono::{Datelike, Duration, NaiveDate, Weekday};
use yunqi_types::Error;

/// How long a quota counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    /// A natural day.
    Day,
    /// A natural month.
    Month,
    /// A natural year.
    Year,
    /// For ever (a lifetime limit).
    Total,
}

impl Period {
    /// Parses `day`, `month`, `year` or `total`.
    pub fn parse(raw: &str) -> Result<Period, Error> {
        match raw {
            "day" => Ok(Period::Day),
            "month" => Ok(Period::Month),
            "year" => Ok(Period::Year),
            "total" => Ok(Period::Total),
            other => Err(Error::invalid(format!("unknown quota period \"{other}\""))
                .hint("use day, month, year or total")),
        }
    }

    /// The number of the period `date` falls in: days since 1970-01-01, months since year 0,
    /// the year, or 0.
    pub fn bucket(self, date: NaiveDate) -> i32 {
        match self {
            Period::Day => (date - NaiveDate::default()).num_days() as i32,
            Period::Month => date.year() * 12 + date.month0() as i32,
            Period::Year => date.year(),
            Period::Total => 0,
        }
    }

    /// The period of `bucket`, as people say it (`2026-11-26`, `2026-11`, `2026`, `total`).
    pub fn label(self, bucket: i32) -> String {
        match self {
            Period::Day => (NaiveDate::default() + Duration::days(bucket as i64)).to_string(),
            Period::Month => format!("{}-{:02}", bucket.div_euclid(12), bucket.rem_euclid(12) + 1),
            Period::Year => bucket.to_string(),
            Period::Total => "total".into(),
        }
    }
}

/// A permit's validity window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    /// 00:00 to 24:00 of the date.
    Day,
    /// 12:00 of the date to 12:00 the next day.
    Noon,
}

impl WindowKind {
    /// Parses `day` or `noon`.
    pub fn parse(raw: &str) -> Result<WindowKind, Error> {
        match raw {
            "day" => Ok(WindowKind::Day),
            "noon" => Ok(WindowKind::Noon),
            other => Err(Error::invalid(format!("unknown window \"{other}\""))
                .hint("use day (00:00–24:00) or noon (12:00 to 12:00 the next day)")),
        }
    }
}

/// A validity window: `[start, end)` in UTC microseconds, and the local dates it touches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validity {
    /// Start, microseconds since the epoch.
    pub start_us: i64,
    /// End (exclusive).
    pub end_us: i64,
    /// The local dates any moment of it falls on, in order.
    pub dates: Vec<NaiveDate>,
}

/// The city's calendar: its time zone and its rest days.
#[derive(Debug, Clone, Default)]
pub struct Calendar {
    /// Offset of local time from UTC, seconds (28,800 for UTC+8).
    pub offset_secs: i32,
    /// Public holidays.
    pub holidays: BTreeSet<NaiveDate>,
    /// Saturdays and Sundays declared working days (调休).
    pub workdays: BTreeSet<NaiveDate>,
}

impl Calendar {
    /// A calendar in UTC+8 with no holidays yet.
    pub fn china() -> Calendar {
        Calendar {
            offset_secs: 8 * 3600,
            ..Calendar::default()
        }
    }

    /// The local date of a UTC instant (microseconds).
    pub fn local_date(&self, at_us: i64) -> NaiveDate {
        let secs = at_us.div_euclid(1_000_000) + self.offset_secs as i64;
        NaiveDate::default() + Duration::days(secs.div_euclid(86_400))
    }

    /// Whether `date` is a rest day.
    pub fn is_rest_day(&self, date: NaiveDate) -> bool {
        self.holidays.contains(&date)
            || (matches!(date.weekday(), Weekday::Sat | Weekday::Sun)
                && !self.workdays.contains(&date))
    }

    /// The window of `kind` starting on `date`.
    pub fn window(&self, kind: WindowKind, date: NaiveDate) -> Validity {
        let midnight_us = ((date - NaiveDate::default()).num_days() * 86_400
            - self.offset_secs as i64)
            * 1_000_000;
        let (start_us, dates) = match kind {
            WindowKind::Day => (midnight_us, vec![date]),
            WindowKind::Noon => (
                midnight_us + 12 * 3_600_000_000,
                vec![date, date + Duration::days(1)],
            ),
        };
        Validity {
            start_us,
            end_us: start_us + 86_400_000_000,
            dates,
        }
    }

    /// The first rest day a window touches, if any.
    pub fn rest_day_in(&self, v: &Validity) -> Option<NaiveDate> {
        v.dates.iter().copied().find(|d| self.is_rest_day(*d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    #[test]
    fn periods_bucket_by_the_local_date() {
        // Month and year boundaries, and a leap day.
        assert_eq!(
            Period::Month.bucket(d("2026-12-31")) + 1,
            Period::Month.bucket(d("2027-01-01"))
        );
        assert_eq!(
            Period::Year.bucket(d("2026-12-31")) + 1,
            Period::Year.bucket(d("2027-01-01"))
        );
        assert_eq!(
            Period::Month.bucket(d("2028-02-29")),
            Period::Month.bucket(d("2028-02-01"))
        );
        assert_ne!(
            Period::Month.bucket(d("2028-02-29")),
            Period::Month.bucket(d("2028-03-01"))
        );
        assert_eq!(
            Period::Day.bucket(d("2028-02-29")) + 1,
            Period::Day.bucket(d("2028-03-01"))
        );
        assert_eq!(
            Period::Month.label(Period::Month.bucket(d("2028-02-29"))),
            "2028-02"
        );
        assert_eq!(
            Period::Day.label(Period::Day.bucket(d("2028-02-29"))),
            "2028-02-29"
        );
        assert_eq!(Period::Year.label(2026), "2026");
        // 2026-11-30 20:00 in UTC is already 1 December in Hangzhou.
        let cal = Calendar::china();
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-30T20:00:00Z").unwrap();
        assert_eq!(cal.local_date(at.timestamp_micros()), d("2026-12-01"));
    }

    #[test]
    fn windows_and_rest_days() {
        let mut cal = Calendar::china();
        cal.holidays.insert(d("2027-01-01"));
        cal.workdays.insert(d("2026-10-10")); // a Saturday worked (调休)
        // Day window: local midnight to midnight.
        let v = cal.window(WindowKind::Day, d("2026-11-26"));
        assert_eq!(
            v.start_us,
            chrono::DateTime::parse_from_rfc3339("2026-11-26T00:00:00+08:00")
                .unwrap()
                .timestamp_micros()
        );
        assert_eq!(v.end_us - v.start_us, 86_400_000_000);
        assert_eq!(cal.rest_day_in(&v), None, "a Thursday");
        // Noon window from Friday runs into Saturday.
        let v = cal.window(WindowKind::Noon, d("2026-11-27"));
        assert_eq!(v.dates, vec![d("2026-11-27"), d("2026-11-28")]);
        assert_eq!(cal.rest_day_in(&v), Some(d("2026-11-28")));
        // Into a holiday; a worked Saturday is not a rest day.
        let v = cal.window(WindowKind::Noon, d("2026-12-31"));
        assert_eq!(cal.rest_day_in(&v), Some(d("2027-01-01")));
        assert_eq!(
            cal.rest_day_in(&cal.window(WindowKind::Day, d("2026-10-10"))),
            None
        );
        assert_eq!(
            cal.rest_day_in(&cal.window(WindowKind::Day, d("2026-10-11"))),
            Some(d("2026-10-11"))
        );
        assert!(WindowKind::parse("evening").unwrap_err().hint.is_some());
        assert!(Period::parse("week").is_err());
    }
}
