//! Log lines a sysadmin can grep: `TIMESTAMP LEVEL vmcrelay[wN] EVENT key=value ...`.
//!
//! One line per link and one per close, written with a single `write` to
//! stderr so lines from different workers never interleave.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Verbosity: 0 errors, 1 warnings, 2 info (default), 3 debug.
static LEVEL: AtomicU8 = AtomicU8::new(2);

/// Sets the verbosity.
pub fn set_level(level: u8) {
    LEVEL.store(level, Ordering::Relaxed);
}

/// Whether lines of `level` are printed.
pub fn enabled(level: u8) -> bool {
    level <= LEVEL.load(Ordering::Relaxed)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for the current time (UTC, no dependency).
pub fn timestamp() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm), valid for 1970..9999.
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Writes one line: `TS LEVEL vmcrelay[who] msg`.
pub fn line(level: u8, who: &str, msg: std::fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let tag = match level {
        0 => "ERROR",
        1 => "WARN",
        2 => "INFO",
        _ => "DEBUG",
    };
    let mut s = String::with_capacity(160);
    let _ = writeln!(s, "{} {tag} vmcrelay[{who}] {msg}", timestamp());
    let _ = std::io::stderr().lock().write_all(s.as_bytes());
}

/// Logs at info level.
#[macro_export]
macro_rules! info {
    ($who:expr, $($arg:tt)*) => { $crate::relay::log::line(2, &$who, format_args!($($arg)*)) };
}
/// Logs at warning level.
#[macro_export]
macro_rules! warn {
    ($who:expr, $($arg:tt)*) => { $crate::relay::log::line(1, &$who, format_args!($($arg)*)) };
}
/// Logs at error level.
#[macro_export]
macro_rules! error {
    ($who:expr, $($arg:tt)*) => { $crate::relay::log::line(0, &$who, format_args!($($arg)*)) };
}
/// Logs at debug level.
#[macro_export]
macro_rules! debug {
    ($who:expr, $($arg:tt)*) => { $crate::relay::log::line(3, &$who, format_args!($($arg)*)) };
}

#[cfg(test)]
mod tests {
    #[test]
    fn timestamp_shape() {
        let t = super::timestamp();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z') && &t[10..11] == "T");
    }
}
