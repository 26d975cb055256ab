//! Parsing of human sizes (`64KiB`, `1MiB`, `4096`), durations (`1s`, `250ms`, `2m`, `7d`)
//! and UTC times (`2026-11-26T14:03:05Z`).

use std::time::Duration;

/// Parses a byte size: a number with an optional binary (`KiB`, `MiB`, `GiB`, `TiB`, also
/// `K`/`M`/`G`/`T`) or decimal (`kB`, `MB`, `GB`, `TB`) unit. `B` is allowed.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() {
        return Err(format!(
            "{text:?} is not a size: expected a number such as 64KiB or 1MiB"
        ));
    }
    let value: u64 = number
        .parse()
        .map_err(|e| format!("{text:?} is not a size: {e}"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "{text:?}: unknown size unit {other:?} (use B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)"
            ));
        }
    };
    value
        .checked_mul(multiplier)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// Parses a duration: a number with a unit `ms`, `s`, `m` or `h` (a bare number is seconds).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: expected e.g. 1s, 250ms, 2m"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        other => {
            return Err(format!(
                "{text:?}: unknown duration unit {other:?} (use ms, s, m, h, d)"
            ));
        }
    };
    if !seconds.is_finite() || !(0.0..=366.0 * 86400.0).contains(&seconds) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Formats a byte count with a binary unit (`64 KiB`, `1.5 GiB`).
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 || value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

/// Formats Unix milliseconds as UTC, `2026-11-26T14:03:05Z`.
pub fn format_utc(unix_ms: u64) -> String {
    let secs = (unix_ms / 1000) as i64;
    let (days, rest) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// Parses a UTC time `YYYY-MM-DDTHH:MM:SS[.mmm]Z` (also with a space for `T`, without `Z`,
/// or without seconds) into Unix milliseconds.
pub fn parse_utc(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a UTC time: expected e.g. 2026-11-26T14:03:05Z");
    let trimmed = text.trim().trim_end_matches('Z');
    let (date, time) = trimmed.split_once(['T', ' ']).ok_or_else(bad)?;
    let mut date_parts = date.split('-');
    let next = |parts: &mut std::str::Split<'_, char>| -> Result<i64, String> {
        parts
            .next()
            .ok_or_else(bad)?
            .parse::<i64>()
            .map_err(|_| bad())
    };
    let (year, month, day) = (
        next(&mut date_parts)?,
        next(&mut date_parts)?,
        next(&mut date_parts)?,
    );
    let mut time_parts = time.split(':');
    let (hour, minute) = (next(&mut time_parts)?, next(&mut time_parts)?);
    // Seconds may carry a fraction, to the millisecond.
    let (second, millis) = match time_parts.next() {
        Some(s) => match s.split_once('.') {
            Some((whole, fraction))
                if !fraction.is_empty()
                    && fraction.len() <= 3
                    && fraction.bytes().all(|b| b.is_ascii_digit()) =>
            {
                let scaled = format!("{fraction:0<3}");
                (
                    whole.parse::<i64>().map_err(|_| bad())?,
                    scaled.parse::<i64>().map_err(|_| bad())?,
                )
            }
            Some(_) => return Err(bad()),
            None => (s.parse::<i64>().map_err(|_| bad())?, 0),
        },
        None => (0, 0),
    };
    if date_parts.next().is_some()
        || time_parts.next().is_some()
        || !(1970..=9999).contains(&year)
        || !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || !(0..24).contains(&hour)
        || !(0..60).contains(&minute)
        || !(0..=60).contains(&second)
    {
        return Err(bad());
    }
    let days = days_from_civil(year, month as u32, day as u32);
    Ok(((days * 86400 + hour * 3600 + minute * 60 + second) * 1000 + millis) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2 GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1kB"), Ok(1000));
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        assert!(parse_size("-1").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("1y").is_err());
        assert!(parse_duration("1e400").is_err());
    }

    #[test]
    fn utc_times() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(1_795_690_476_603), "2026-11-26T10:54:36Z");
        assert_eq!(parse_utc("2026-11-26T10:54:36Z"), Ok(1_795_690_476_000));
        assert_eq!(parse_utc("2026-11-26 10:54"), Ok(1_795_690_440_000));
        assert_eq!(parse_utc("2024-02-29T00:00:00Z"), Ok(1_709_164_800_000));
        for ms in [0u64, 951_782_400_000, 4_102_444_799_000] {
            assert_eq!(parse_utc(&format_utc(ms)), Ok(ms));
        }
        assert_eq!(parse_utc("1970-01-01T00:00:01.5Z"), Ok(1500));
        assert_eq!(parse_utc("1970-01-01T00:00:01.025Z"), Ok(1025));
        assert!(parse_utc("1970-01-01T00:00:01.1234Z").is_err());
        assert!(parse_utc("yesterday").is_err());
        assert!(parse_utc("2026-13-01T00:00:00Z").is_err());
        assert!(parse_utc("2026-11-26T13:34:36:01Z").is_err());
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
    }

    #[test]
    fn formatting() {
        assert_eq!(format_size(65536), "64 KiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(100), "100 B");
    }
}
