//! Log lines a sysadmin can grep: `TIMESTAMP LEVEL vmcrelay[wN] EVENT key=value ...`.
//!
//! One line per link and one per close, written with a single `write` to
//! stderr so lines from different workers never interleave.
//!
//! `--log-format json` writes the same lines as one JSON object each, for
//! log shippers: `time`, `level`, `who` and `message` (the text line's
//! message, whole), plus `event` (the words before the first `key=value`,
//! e.g. `close`) and every `key=value` of the message as its own field:
//! unquoted integers and decimals become JSON numbers (`c2e_bytes=16777216`
//! → `16777216`), except numbers written with a leading zero (`mode=0660`)
//! or in hex (`session=0xbba1ec65`), which stay strings as written;
//! `[a b]` becomes an array of strings, `"..."` a string. A key that would
//! shadow one of the five fields above is stored as `field_KEY`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Verbosity: 0 errors, 1 warnings, 2 info (default), 3 debug.
static LEVEL: AtomicU8 = AtomicU8::new(2);

/// 0 text, 1 JSON.
static FORMAT: AtomicU8 = AtomicU8::new(0);

/// How log lines are written (`--log-format`, `[relay] log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// `TIMESTAMP LEVEL vmcrelay[who] event key=value ...`
    #[default]
    Text,
    /// One JSON object per line with the same fields.
    Json,
}

/// Sets the line format.
pub fn set_format(format: LogFormat) {
    FORMAT.store(u8::from(format == LogFormat::Json), Ordering::Relaxed);
}

/// The line format in force.
pub fn format() -> LogFormat {
    if FORMAT.load(Ordering::Relaxed) == 1 { LogFormat::Json } else { LogFormat::Text }
}

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
    match format() {
        LogFormat::Text => {
            let _ = writeln!(s, "{} {tag} vmcrelay[{who}] {msg}", timestamp());
        }
        LogFormat::Json => {
            let _ = write!(s, "{msg}");
            s = json_line(&timestamp(), tag, who, &s);
        }
    }
    let _ = std::io::stderr().lock().write_all(s.as_bytes());
}

/// A message outside a worker's or the main thread's log lines (the
/// binary's last word before it exits): `vmcrelay: MSG` in text, an
/// `ERROR` object from `who` = `vmcrelay` in JSON.
pub fn fatal(msg: &str) {
    let s = match format() {
        LogFormat::Text => format!("vmcrelay: {msg}\n"),
        LogFormat::Json => json_line(&timestamp(), "ERROR", "vmcrelay", msg),
    };
    let _ = std::io::stderr().lock().write_all(s.as_bytes());
}

/// The JSON form of one line, newline included (see the module docs):
/// `time`, `level`, `who`, `event`, `message`, then the fields in the
/// order the text line has them.
pub fn json_line(time: &str, level: &str, who: &str, msg: &str) -> String {
    let q = |t: &str| serde_json::Value::from(t).to_string();
    let mut line = format!("{{\"time\":{},\"level\":{},\"who\":{}", q(time), q(level), q(who));
    let (event, fields) = split_fields(msg);
    let mut keys: Vec<String> = ["time", "level", "who", "message", "event"].map(String::from).to_vec();
    if let Some(e) = event {
        let _ = write!(line, ",\"event\":{}", q(&e));
    }
    let _ = write!(line, ",\"message\":{}", q(msg));
    for (k, v) in fields {
        let key = if keys.iter().any(|s| s == k) { format!("field_{k}") } else { k.to_string() };
        if keys.contains(&key) {
            continue;
        }
        let _ = write!(line, ",{}:{v}", q(&key));
        keys.push(key);
    }
    line.push_str("}\n");
    line
}

/// `KEY=` at the start of `t`, KEY being `[a-z_][a-z0-9_]*`.
fn key_of(t: &str) -> Option<&str> {
    let eq = t.find('=')?;
    let k = &t[..eq];
    let mut chars = k.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    (first_ok && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).then_some(k)
}

/// A bare value as JSON: a number when it reads as one the way people
/// write numbers (no leading zero, no sign games), else the text.
fn bare_value(v: &str) -> serde_json::Value {
    let digits = v.strip_prefix('-').unwrap_or(v);
    let leading_zero = digits.len() > 1 && digits.starts_with('0') && !digits.starts_with("0.");
    let numeric = !digits.is_empty()
        && digits.starts_with(|c: char| c.is_ascii_digit())
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.');
    if numeric && !leading_zero {
        if let Ok(n) = v.parse::<u64>() {
            return n.into();
        }
        if let Ok(n) = v.parse::<i64>() {
            return n.into();
        }
        if let Some(n) = v.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
            return serde_json::Value::Number(n);
        }
    }
    serde_json::Value::from(v)
}

/// The event words and the `key=value` fields of a message. Values are
/// bare (up to a space), `"quoted"` (up to a `"` that ends the text or is
/// followed by a space, `:`, `;` or `,`) or `[bracketed]` (up to the
/// matching `]`, split on spaces). Text between fields is skipped.
pub fn split_fields(msg: &str) -> (Option<String>, Vec<(&str, serde_json::Value)>) {
    let mut fields = Vec::new();
    let mut words: Vec<&str> = Vec::new();
    let mut in_event = true;
    let mut rest = msg;
    loop {
        rest = rest.trim_start_matches(' ');
        if rest.is_empty() {
            break;
        }
        let Some(k) = key_of(rest) else {
            let end = rest.find(' ').unwrap_or(rest.len());
            let word = &rest[..end];
            if in_event && !word.is_empty() && word.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c == '-') {
                words.push(word);
            } else if in_event {
                in_event = false;
                words.clear();
            }
            rest = &rest[end..];
            continue;
        };
        in_event = false;
        let v = &rest[k.len() + 1..];
        let (value, used) = if let Some(q) = v.strip_prefix('"') {
            let b = q.as_bytes();
            let end = (0..b.len())
                .find(|&i| b[i] == b'"' && b.get(i + 1).is_none_or(|n| matches!(n, b' ' | b':' | b';' | b',')))
                .unwrap_or(b.len());
            (serde_json::Value::from(&q[..end]), (end + 2).min(v.len()))
        } else if let Some(inner) = v.strip_prefix('[') {
            let mut depth = 1usize;
            let mut end = inner.len();
            for (i, c) in inner.char_indices() {
                match c {
                    '[' => depth += 1,
                    ']' => {
                        depth -= 1;
                        if depth == 0 {
                            end = i;
                            break;
                        }
                    }
                    _ => {}
                }
            }
            let items: Vec<serde_json::Value> =
                inner[..end].split(' ').filter(|i| !i.is_empty()).map(serde_json::Value::from).collect();
            (serde_json::Value::Array(items), (end + 2).min(v.len()))
        } else {
            let end = v.find(' ').unwrap_or(v.len());
            (bare_value(&v[..end]), end)
        };
        fields.push((k, value));
        rest = &v[used..];
    }
    let event = (!fields.is_empty() && !words.is_empty()).then(|| words.join(" "));
    (event, fields)
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

    fn parse(msg: &str) -> serde_json::Value {
        let l = super::json_line("2026-01-01T00:00:00.000Z", "INFO", "w1", msg);
        assert!(l.ends_with('\n') && !l[..l.len() - 1].contains('\n'), "{l}");
        serde_json::from_str(&l).expect("valid JSON")
    }

    #[test]
    fn json_close_line_has_typed_fields() {
        let msg = "close peer=127.0.0.1:53562 service=default channel=port:com.example.echo session=0xbba1ec65 \
                   c2e_bytes=16777216 c2e_msgs=256 duration_ms=69 reason=\"session closed\"";
        let v = parse(msg);
        assert_eq!(v["time"], "2026-01-01T00:00:00.000Z");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["who"], "w1");
        assert_eq!(v["message"], msg);
        assert_eq!(v["event"], "close");
        assert_eq!(v["peer"], "127.0.0.1:53562");
        assert_eq!(v["channel"], "port:com.example.echo");
        assert_eq!(v["session"], "0xbba1ec65");
        assert_eq!(v["c2e_bytes"], 16_777_216);
        assert_eq!(v["duration_ms"], 69);
        assert_eq!(v["reason"], "session closed");
    }

    #[test]
    fn json_odd_values() {
        let v = parse("unix-listen:/run/x.sock mode=0660 uid=0 gid=0");
        assert_eq!(v["mode"], "0660");
        assert_eq!(v["uid"], 0);
        assert!(v.get("event").is_none(), "{v}");
        let v = parse("service name=vm1 listen=127.0.0.1:1 channels=[port:a=echo: 128=sink:] ticketing=off");
        assert_eq!(v["event"], "service");
        assert_eq!(v["channels"], serde_json::json!(["port:a=echo:", "128=sink:"]));
        assert_eq!(v["ticketing"], "off");
        let v = parse("endpoint gone channel=usbredir:0 reason=\"eof\": channel closed; level=x c2e_mib_s=1.5");
        assert_eq!(v["event"], "endpoint gone");
        assert_eq!(v["reason"], "eof");
        assert_eq!(v["field_level"], "x");
        assert_eq!(v["level"], "INFO");
        assert_eq!(v["c2e_mib_s"], 1.5);
        let v = parse("SIGTERM received: draining");
        assert!(v.get("event").is_none());
        // Hostile text stays one valid line.
        for m in ["a=\"", "a=[", "k=\"x\ny\"", "=", "a= b=", "\u{0}x=1", "ß=1 x=\"\\\""] {
            let v = parse(m);
            assert_eq!(v["message"], m);
        }
    }
}
