//! Human byte sizes (`1G`, `512MiB`, `4096`): binary multiples, as storage
//! admins and Cinder (GiB) mean them.

/// Why a size string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number followed by an optional unit.
    #[error("{input:?} is not a size; write a number with an optional unit (K, M, G, T, KiB…)")]
    Malformed {
        /// The refused input.
        input: String,
    },
    /// The value does not fit in 64 bits.
    #[error("{input:?} is larger than 16 EiB")]
    Overflow {
        /// The refused input.
        input: String,
    },
}

/// Parses `1G`, `1GiB`, `1g`, `512M`, `4096` into bytes (units are binary).
///
/// # Errors
/// [`SizeError`] on anything else, or on overflow.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let trimmed = input.trim();
    let split = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let malformed = || SizeError::Malformed {
        input: input.to_owned(),
    };
    let value: u64 = digits.parse().map_err(|_| malformed())?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return Err(malformed()),
    };
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow {
            input: input.to_owned(),
        })
}

/// Formats bytes with the largest binary unit that divides them exactly
/// (`1073741824` → `1 GiB`), or with one decimal otherwise.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut value = bytes as f64;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_units() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2 t"), Ok(2 << 40));
        assert!(parse_size("1.5G").is_err());
        assert!(parse_size("G").is_err());
        assert!(matches!(
            parse_size("99999999999P"),
            Err(SizeError::Overflow { .. })
        ));
    }

    #[test]
    fn formats_round_trip() {
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(1536), "1.5 KiB");
    }
}
