//! Parsing of human sizes (`64KiB`, `1MiB`, `4096`), durations (`1s`, `250ms`, `2m`, `7d`)
//! and UTC times (`2026-11-26T14:03:05Z`).
//!
//! Durations and times are humantime's grammar. Sizes keep their own parser: the documented
//! grammar reads a bare `K`/`M`/`G`/`T` as binary (64K = 64 KiB, as `dd` and the kernel do) and
//! refuses an overflow, where `bytesize` reads `K` as 1000 and saturates; a shim over it would
//! be as long as the parser.

use std::time::{Duration, UNIX_EPOCH};

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

/// Parses a duration as humantime writes it (`250ms`, `1s`, `2m`, `1h 30m`, `7d`); a bare
/// number is seconds. At most 366 days.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let duration = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("{text:?} is out of range"))?
    } else {
        humantime::parse_duration(text).map_err(|error| {
            format!("{text:?} is not a duration ({error}): expected e.g. 1s, 250ms, 2m, 7d")
        })?
    };
    if duration > Duration::from_secs(366 * 86400) {
        return Err(format!("{text:?} is out of range (at most 366 days)"));
    }
    Ok(duration)
}

/// Formats a duration to the second as humantime writes it (`7days 2h 3m`, `45s`).
pub fn format_duration(duration: Duration) -> String {
    humantime::format_duration(Duration::from_secs(duration.as_secs())).to_string()
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

/// Formats Unix milliseconds as UTC, `2026-11-26T14:03:05Z`.
pub fn format_utc(unix_ms: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

/// Parses a UTC time `YYYY-MM-DDTHH:MM:SS[.fff]Z` (also with a space for `T`, without `Z`, or
/// without seconds) into Unix milliseconds; a fraction finer than milliseconds is cut.
pub fn parse_utc(text: &str) -> Result<u64, String> {
    let bad = || format!("{text:?} is not a UTC time: expected e.g. 2026-11-26T14:03:05Z");
    let trimmed = text.trim().trim_end_matches('Z');
    // humantime wants seconds; operators often leave them out.
    let (_, clock) = trimmed.split_once(['T', ' ']).ok_or_else(bad)?;
    let full = if clock.matches(':').count() == 1 {
        format!("{trimmed}:00Z")
    } else {
        format!("{trimmed}Z")
    };
    let time = humantime::parse_rfc3339_weak(&full).map_err(|_| bad())?;
    let since = time.duration_since(UNIX_EPOCH).map_err(|_| bad())?;
    u64::try_from(since.as_millis()).map_err(|_| bad())
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
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("2y").is_err());
        assert!(parse_duration("99999999999999999999").is_err());
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
        assert_eq!(parse_utc("1970-01-01T00:00:01.1234Z"), Ok(1123));
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
