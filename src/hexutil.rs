//! Hex text in and out: the `decode` command's input, fixtures and log fields.

use std::fmt::Write as _;

/// A token that is not an even-length run of hex digits.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not hex: {token:?}{}", if *.odd { " (odd number of digits)" } else { "" })]
pub struct HexError {
    /// The offending whitespace-separated token.
    pub token: String,
    /// Whether the token was hex with an odd digit count.
    pub odd: bool,
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Parses hex tokens separated by whitespace or commas (`"23 00 0a"`, `"23000a"`,
/// `"0x23, 0x00"`, or a mix; a `0x` prefix is allowed on each token) into bytes.
pub fn parse_hex(s: &str) -> Result<Vec<u8>, HexError> {
    let mut out = Vec::with_capacity(s.len() / 2);
    for token in s
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
    {
        // `0x23`, `0X23` and `0x2300…` as well as bare digits.
        let digits = token
            .strip_prefix("0x")
            .or_else(|| token.strip_prefix("0X"))
            .unwrap_or(token);
        let t = digits.as_bytes();
        if t.is_empty() {
            // A lone `0x` is a byte someone forgot, not zero bytes.
            return Err(HexError {
                token: token.to_owned(),
                odd: false,
            });
        }
        if t.iter().any(|&c| nibble(c).is_none()) {
            return Err(HexError {
                token: token.to_owned(),
                odd: false,
            });
        }
        if t.len() % 2 != 0 {
            return Err(HexError {
                token: token.to_owned(),
                odd: true,
            });
        }
        for pair in t.chunks_exact(2) {
            // Both digits were checked above.
            let hi = nibble(pair[0]).unwrap_or(0);
            let lo = nibble(pair[1]).unwrap_or(0);
            out.push(hi << 4 | lo);
        }
    }
    Ok(out)
}

/// Lower-case hex with no separators.
pub fn to_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for byte in b {
        let _ = write!(s, "{byte:02x}");
    }
    s
}

/// [`to_hex`] of at most the first `max` bytes, then `…(+N bytes)` for the rest (one-line
/// summaries of a 64 KiB frame stay short and cost nothing to build).
pub fn to_hex_capped(b: &[u8], max: usize) -> String {
    match b.get(..max) {
        Some(head) if b.len() > max => format!("{}…(+{} bytes)", to_hex(head), b.len() - max),
        _ => to_hex(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats() {
        assert_eq!(parse_hex("23 00 0A ff").unwrap(), vec![0x23, 0, 0x0a, 0xff]);
        assert_eq!(
            parse_hex("  2300\n0aff ").unwrap(),
            vec![0x23, 0, 0x0a, 0xff]
        );
        assert_eq!(parse_hex("").unwrap(), Vec::<u8>::new());
        assert_eq!(
            parse_hex("0x23, 0X00,0a 0xff0e").unwrap(),
            vec![0x23, 0, 0x0a, 0xff, 0x0e]
        );
        assert_eq!(to_hex(&[0x7e, 0x0a]), "7e0a");
    }

    #[test]
    fn names_the_bad_token() {
        let e = parse_hex("23 00 zz 11").unwrap_err();
        assert_eq!(e.token, "zz");
        assert!(e.to_string().contains("\"zz\""));
        let e = parse_hex("23 0").unwrap_err();
        assert!(e.odd);
        assert_eq!(e.token, "0");
        assert_eq!(parse_hex("0x").unwrap_err().token, "0x");
        assert_eq!(parse_hex("0x23, 0x, 00").unwrap_err().token, "0x");
        assert!(parse_hex("0xzz").is_err());
        assert!(parse_hex("x23").is_err());
        assert!(parse_hex("…").is_err());
    }

    #[test]
    fn capped_hex_names_what_it_left_out() {
        assert_eq!(to_hex_capped(&[1, 2, 3], 3), "010203");
        assert_eq!(to_hex_capped(&[1, 2, 3], 2), "0102…(+1 bytes)");
        assert_eq!(to_hex_capped(&[], 0), "");
        assert!(to_hex_capped(&vec![0u8; 1 << 20], 48).len() < 140);
    }
}
