//! Byte counts, durations and message-size distributions from the command
//! line, and the small PRNG that draws from them.

use std::time::Duration;

/// Largest message vmcload sends: the blocking client's receive cap.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024 - 1;

/// Parses `65536`, `64K`, `64KiB`, `1M`, `1MiB`, `2G` (binary units).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a byte count; write e.g. 65536, 64K or 4MiB"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => 1 << 10,
        "m" | "mib" | "mb" => 1 << 20,
        "g" | "gib" | "gb" => 1 << 30,
        _ => return Err(format!("`{s}`: unknown unit `{unit}`; use K, M or G (binary: 1K = 1024)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("`{s}` is too large"))
}

/// Parses `5`, `2.5`, `5s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a duration; write e.g. 5, 2.5s or 500ms"))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(format!("duration `{s}` must be positive"));
    }
    Duration::try_from_secs_f64(v * scale).map_err(|e| format!("duration `{s}`: {e}"))
}

/// Message sizes to draw from: one size, a uniform choice, or weights.
#[derive(Debug, Clone, PartialEq)]
pub struct SizeDist {
    /// `(size, cumulative probability)`, the last one 1.0.
    choices: Vec<(usize, f64)>,
    text: String,
}

impl SizeDist {
    /// Always `size` bytes.
    pub fn fixed(size: usize) -> Self {
        Self { choices: vec![(size, 1.0)], text: size.to_string() }
    }

    /// Parses `64,1024,65536` (uniform) or `64:0.9,65536:0.1` (weighted;
    /// weights are normalised). Sizes take units: `64K:1,1M:1`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut raw: Vec<(usize, f64)> = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (size_s, weight) = match part.split_once(':') {
                Some((a, w)) => {
                    let w: f64 = w.trim().parse().map_err(|_| format!("weight `{w}` in `{part}` is not a number"))?;
                    if !w.is_finite() || w <= 0.0 {
                        return Err(format!("weight in `{part}` must be positive"));
                    }
                    (a, w)
                }
                None => (part, 1.0),
            };
            let size = usize::try_from(parse_bytes(size_s)?).map_err(|_| format!("size `{size_s}` is too large"))?;
            if size == 0 || size > MAX_MESSAGE_BYTES {
                return Err(format!("message size {size} must be 1..={MAX_MESSAGE_BYTES}"));
            }
            raw.push((size, weight));
        }
        if raw.is_empty() {
            return Err(format!("size distribution `{s}` is empty; write e.g. 64,1024,65536 or 64:0.9,65536:0.1"));
        }
        let total: f64 = raw.iter().map(|r| r.1).sum();
        let mut acc = 0.0;
        let mut choices: Vec<(usize, f64)> = raw
            .iter()
            .map(|&(size, w)| {
                acc += w / total;
                (size, acc)
            })
            .collect();
        if let Some(last) = choices.last_mut() {
            last.1 = 1.0;
        }
        Ok(Self { choices, text: s.trim().to_string() })
    }

    /// Draws one size.
    pub fn pick(&self, rng: &mut Rng) -> usize {
        if let [(only, _)] = self.choices.as_slice() {
            return *only;
        }
        let u = rng.next_f64();
        self.choices.iter().find(|c| u < c.1).or(self.choices.last()).map_or(1, |c| c.0)
    }

    /// The largest size it can draw.
    pub fn max(&self) -> usize {
        self.choices.iter().map(|c| c.0).max().unwrap_or(1)
    }

    /// Whether it always draws the same size.
    pub fn is_fixed(&self) -> bool {
        self.choices.len() == 1
    }
}

impl std::fmt::Display for SizeDist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// xorshift64*: cheap, seedable, good enough to pick sizes and phases.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed` (any value, zero included).
    pub fn new(seed: u64) -> Self {
        Self(crate::load::pattern::block(seed, 0x5EED) | 1)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[0, 1)`.
    #[allow(clippy::cast_precision_loss)] // 53 bits are exact in an f64
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_counts() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64K"), Ok(65536));
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("4MiB"), Ok(4 << 20));
        assert_eq!(parse_bytes("1g"), Ok(1 << 30));
        assert!(parse_bytes("12q").is_err());
        assert!(parse_bytes("K").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn distributions() {
        let u = SizeDist::parse("64,1024,64K").expect("uniform");
        assert_eq!(u.max(), 65536);
        let mut rng = Rng::new(1);
        let mut seen = [0u32; 3];
        for _ in 0..3000 {
            match u.pick(&mut rng) {
                64 => seen[0] += 1,
                1024 => seen[1] += 1,
                65536 => seen[2] += 1,
                other => panic!("drew {other}"),
            }
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
        let w = SizeDist::parse("64:0.9,65536:0.1").expect("weighted");
        let small = (0..10_000).filter(|_| w.pick(&mut rng) == 64).count();
        assert!((8500..9500).contains(&small), "{small}");
        assert!(SizeDist::parse("").is_err());
        assert!(SizeDist::parse("64:-1").is_err());
        assert!(SizeDist::parse("0").is_err());
        assert!(SizeDist::fixed(5).is_fixed());
    }
}
