//! Parsers for the sizes and durations users type on the command line.

use std::fmt;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("'{0}' is not a size: use a whole number with an optional K, M, G or T suffix (powers of 1024), e.g. 100G")]
    BadSize(String),
    #[error("size '{0}' must be greater than zero")]
    ZeroSize(String),
    #[error("size '{0}' is too large")]
    SizeOverflow(String),
    #[error("'{0}' is not a duration: use minutes as a whole number (e.g. 180) or a number with s, m or h (e.g. 90s, 15m, 2h)")]
    BadDuration(String),
}

/// Bytes, always a power-of-1024 multiple of the unit the user wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `100G`, `512M`, `1T`, `64GiB`, `4096` (bytes). K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024,
    /// case-insensitive. Zero, negative, fractional, overflowing and unknown suffixes are rejected.
    pub fn parse(input: &str) -> Result<Self, UnitError> {
        let text = input.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (digits, suffix) = text.split_at(split);
        if digits.is_empty() {
            return Err(UnitError::BadSize(input.to_string()));
        }
        let shift = match suffix.to_ascii_lowercase().as_str() {
            "" | "b" => 0,
            "k" | "kib" => 10,
            "m" | "mib" => 20,
            "g" | "gib" => 30,
            "t" | "tib" => 40,
            _ => return Err(UnitError::BadSize(input.to_string())),
        };
        let number: u64 = digits.parse().map_err(|_| UnitError::SizeOverflow(input.to_string()))?;
        if number == 0 {
            return Err(UnitError::ZeroSize(input.to_string()));
        }
        number.checked_mul(1u64 << shift).map(ByteSize).ok_or_else(|| UnitError::SizeOverflow(input.to_string()))
    }
}

impl fmt::Display for ByteSize {
    /// The largest unit that divides the size exactly, so that `parse(display(x)) == x`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if self.0.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for ByteSize {
    type Err = UnitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ByteSize::parse(s)
    }
}

/// Parses an idle timeout: a bare number is minutes (as in the original CLI); `90s`, `15m`, `2h` also work.
/// `0` disables.
pub fn parse_idle_timeout(input: &str) -> Result<Duration, UnitError> {
    let text = input.trim();
    let bad = || UnitError::BadDuration(input.to_string());
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    if digits.is_empty() {
        return Err(bad());
    }
    let number: u64 = digits.parse().map_err(|_| bad())?;
    let seconds_per_unit = match suffix {
        "" | "m" | "min" => 60,
        "s" => 1,
        "h" => 3600,
        _ => return Err(bad()),
    };
    number.checked_mul(seconds_per_unit).map(Duration::from_secs).ok_or_else(bad)
}

/// Formats a duration the way `parse_idle_timeout` reads it.
pub fn format_duration(duration: Duration) -> String {
    let secs = duration.as_secs();
    match secs {
        0 => "0".into(),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A duration for people (`status`): rounded down to seconds, two units at most.
pub fn human_duration(seconds: f64) -> String {
    let s = seconds as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 if s.is_multiple_of(60) => format!("{}m", s / 60),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        _ if s.is_multiple_of(3600) => format!("{}h", s / 3600),
        _ => format!("{}h {}m", s / 3600, s % 3600 / 60),
    }
}

/// A byte count for people (`status`): binary units, one decimal.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_binary() {
        assert_eq!(ByteSize::parse("100G").unwrap().0, 100 << 30);
        assert_eq!(ByteSize::parse("100g").unwrap().0, 100 << 30);
        assert_eq!(ByteSize::parse("64GiB").unwrap().0, 64 << 30);
        assert_eq!(ByteSize::parse("512M").unwrap().0, 512 << 20);
        assert_eq!(ByteSize::parse("1T").unwrap().0, 1 << 40);
        assert_eq!(ByteSize::parse("4k").unwrap().0, 4096);
        assert_eq!(ByteSize::parse("4096").unwrap().0, 4096);
        assert_eq!(ByteSize::parse(" 2G ").unwrap().0, 2 << 30);
    }

    #[test]
    fn bad_sizes_are_rejected() {
        for bad in ["", "G", "-5G", "1.5G", "100GB", "100X", "10 G", "0", "0G", "0x10"] {
            assert!(ByteSize::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(ByteSize::parse("0G"), Err(UnitError::ZeroSize("0G".into())));
        assert_eq!(ByteSize::parse("99999999999T"), Err(UnitError::SizeOverflow("99999999999T".into())));
        assert_eq!(ByteSize::parse("999999999999999999999"), Err(UnitError::SizeOverflow("999999999999999999999".into())));
    }

    #[test]
    fn size_display_round_trips() {
        for text in ["100G", "1T", "512M", "3K", "1000"] {
            assert_eq!(ByteSize::parse(text).unwrap().to_string(), text);
        }
        assert_eq!(ByteSize(1 << 30).to_string(), "1G");
    }

    #[test]
    fn idle_timeouts() {
        assert_eq!(parse_idle_timeout("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_idle_timeout("180").unwrap(), Duration::from_secs(180 * 60));
        assert_eq!(parse_idle_timeout("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_idle_timeout("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_idle_timeout("2h").unwrap(), Duration::from_secs(7200));
        for bad in ["", "-1", "1.5", "5d", "m", "99999999999999999999h"] {
            assert!(parse_idle_timeout(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(human_duration(59.9), "59s");
        assert_eq!(human_duration(3660.0), "1h 1m");
        assert_eq!(human_duration(150.0), "2m 30s");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
    }
}
