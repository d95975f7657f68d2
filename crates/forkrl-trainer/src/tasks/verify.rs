//! Verifiers for math answers: final-answer extraction (`\boxed{}`, `####`, last number) and equivalence of numbers
//! (integers, decimals, simple fractions, `\frac{a}{b}`), exact, in rational arithmetic.
//!
//! Model output is untrusted: every function here reads its input a bounded number of times, never recurses on it,
//! never allocates more than a copy of it, and returns `None` / `false` rather than panicking. Numbers of more than 36
//! digits are rejected instead of overflowing.

use serde::{Deserialize, Serialize};

/// Where the final answer of a response is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Extraction {
    /// The last `\boxed{…}`, else the text after the last `####`, else the last number.
    #[default]
    Auto,
    /// The content of the last `\boxed{…}` (or `\fbox{…}`).
    Boxed,
    /// The first line after the last `####` (GSM8K).
    Hash,
    /// The last number in the text.
    LastNumber,
}

/// An exact rational `num / den` in lowest terms, `den > 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rational {
    /// Numerator.
    pub num: i128,
    /// Denominator (positive).
    pub den: i128,
}

/// The greatest common divisor of `|a|` and `|b|`, over unsigned magnitudes (`|i128::MIN|` = 2¹²⁷ fits a `u128`).
fn gcd(a: i128, b: i128) -> u128 {
    let (mut a, mut b) = (a.unsigned_abs(), b.unsigned_abs());
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Rational {
    /// `num / den` reduced, with a positive denominator; `None` for a zero denominator or a value whose reduced form
    /// does not fit (`i128::MIN / −1`). Never overflows: the magnitudes are reduced as `u128`, then signed.
    pub fn new(num: i128, den: i128) -> Option<Self> {
        if den == 0 {
            return None;
        }
        let g = gcd(num, den).max(1);
        let (n, d) = (num.unsigned_abs() / g, den.unsigned_abs() / g);
        let negative = (num < 0) != (den < 0) && n != 0;
        let num = if negative { 0i128.checked_sub_unsigned(n)? } else { i128::try_from(n).ok()? };
        Some(Self { num, den: i128::try_from(d).ok()? })
    }

    /// An integer.
    pub fn int(n: i128) -> Self {
        Self { num: n, den: 1 }
    }

    /// `self + o`, `None` on overflow.
    pub fn checked_add(self, o: Self) -> Option<Self> {
        Self::new(self.num.checked_mul(o.den)?.checked_add(o.num.checked_mul(self.den)?)?, self.den.checked_mul(o.den)?)
    }

    /// `self − o`, `None` on overflow.
    pub fn checked_sub(self, o: Self) -> Option<Self> {
        self.checked_add(Self { num: o.num.checked_neg()?, den: o.den })
    }

    /// `self · o`, `None` on overflow.
    pub fn checked_mul(self, o: Self) -> Option<Self> {
        Self::new(self.num.checked_mul(o.num)?, self.den.checked_mul(o.den)?)
    }

    /// `self / o`, `None` on overflow or division by zero.
    pub fn checked_div(self, o: Self) -> Option<Self> {
        Self::new(self.num.checked_mul(o.den)?, self.den.checked_mul(o.num)?)
    }
}

const MAX_DIGITS: usize = 36;
/// Longest final answer compared (an extracted "answer" longer than this is not an answer).
const MAX_ANSWER_LEN: usize = 1000;

/// Parses an unsigned decimal `123`, `1,234`, `3.50`, `.5` into a rational.
fn parse_decimal(s: &str) -> Option<Rational> {
    let s = s.replace(',', "");
    let (int, frac) = s.split_once('.').unwrap_or((&s, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || int.len() + frac.len() > MAX_DIGITS
    {
        return None;
    }
    let digits = format!("{int}{frac}");
    let num: i128 = if digits.is_empty() { 0 } else { digits.parse().ok()? };
    Rational::new(num, 10i128.checked_pow(frac.len() as u32)?)
}

/// Parses a number written as an integer, a decimal, `a/b`, `\frac{a}{b}` (also `\dfrac`, `\tfrac`), with an optional
/// sign, surrounding `$`, spaces, `\!`, `\,` and a trailing period; thousands separators `1,234` are accepted.
pub fn parse_number(text: &str) -> Option<Rational> {
    if text.len() > 4 * MAX_DIGITS {
        return None;
    }
    let mut s: String = text.replace("\\!", "").replace("\\,", "").replace(['$', ' '], "");
    while s.ends_with('.') {
        s.pop();
    }
    let (neg, body) = match s.strip_prefix('-') {
        Some(rest) => (true, rest.to_string()),
        None => (false, s.strip_prefix('+').unwrap_or(&s).to_string()),
    };
    let value = if let Some(rest) = ["\\frac", "\\dfrac", "\\tfrac"].iter().find_map(|p| body.strip_prefix(p)) {
        // \frac{a}{b} or \frac12
        let (a, b) = if let Some(r) = rest.strip_prefix('{') {
            let (a, r) = r.split_once('}')?;
            let b = r.strip_prefix('{')?.strip_suffix('}')?;
            (a.to_string(), b.to_string())
        } else if rest.len() == 2 && rest.bytes().all(|b| b.is_ascii_digit()) {
            (rest[..1].to_string(), rest[1..].to_string())
        } else {
            return None;
        };
        parse_signed(&a)?.checked_div(parse_signed(&b)?)?
    } else if let Some((a, b)) = body.split_once('/') {
        parse_decimal(a)?.checked_div(parse_decimal(b)?)?
    } else {
        parse_decimal(&body)?
    };
    if neg { Rational::new(value.num.checked_neg()?, value.den) } else { Some(value) }
}

fn parse_signed(s: &str) -> Option<Rational> {
    match s.strip_prefix('-') {
        Some(rest) => {
            let v = parse_decimal(rest)?;
            Rational::new(v.num.checked_neg()?, v.den)
        }
        None => parse_decimal(s),
    }
}

/// The content of the last `\boxed{…}` or `\fbox{…}`, braces balanced (unbalanced → `None`).
pub fn extract_boxed(text: &str) -> Option<&str> {
    let start = ["\\boxed", "\\fbox"].iter().filter_map(|m| text.rfind(m).map(|i| i + m.len())).max()?;
    let rest = text[start..].trim_start();
    let offset = text.len() - rest.len();
    if !rest.starts_with('{') {
        return None;
    }
    let mut depth = 0usize;
    for (i, c) in rest.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(text[offset + 1..offset + i].trim());
                }
            }
            _ => {}
        }
    }
    None
}

/// The first line after the last `####`, trimmed (GSM8K's answer marker).
pub fn extract_after_hash(text: &str) -> Option<&str> {
    let i = text.rfind("####")?;
    let line = text[i + 4..].trim_start().lines().next().unwrap_or("").trim();
    (!line.is_empty()).then_some(line)
}

/// The last number in `text`: an optional `-`, digits with optional `,` groups, an optional decimal part, and an
/// optional `/denominator`.
pub fn extract_last_number(text: &str) -> Option<&str> {
    let b = text.as_bytes();
    let mut end = b.len();
    while end > 0 && !b[end - 1].is_ascii_digit() {
        end -= 1;
    }
    if end == 0 {
        return None;
    }
    let mut start = end;
    while start > 0 {
        let c = b[start - 1];
        let inner = start >= 2 && b[start - 2].is_ascii_digit();
        if c.is_ascii_digit() || (matches!(c, b',' | b'.' | b'/') && inner) {
            start -= 1;
        } else {
            break;
        }
    }
    if start > 0 && b[start - 1] == b'-' {
        start -= 1;
    }
    Some(&text[start..end])
}

/// The final answer of `text` by `how`.
pub fn extract(text: &str, how: Extraction) -> Option<&str> {
    match how {
        Extraction::Boxed => extract_boxed(text),
        Extraction::Hash => extract_after_hash(text),
        Extraction::LastNumber => extract_last_number(text),
        Extraction::Auto => {
            extract_boxed(text).or_else(|| extract_after_hash(text)).or_else(|| extract_last_number(text))
        }
    }
}

/// Strips what does not change a short math answer: spaces, `$`, `\left`/`\right`, `\!`, `\,`, `\text{…}` wrappers,
/// a trailing period.
fn normalise(s: &str) -> String {
    let mut t = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "");
    for wrapper in ["\\text{", "\\mathrm{", "\\textbf{"] {
        while let Some(i) = t.find(wrapper) {
            let inner = &t[i + wrapper.len()..];
            let Some(close) = inner.find('}') else { break };
            t = format!("{}{}{}", &t[..i], &inner[..close], &inner[close + 1..]);
        }
    }
    let mut t: String = t.chars().filter(|c| !c.is_whitespace() && *c != '$').collect();
    while t.ends_with('.') {
        t.pop();
    }
    t
}

/// Whether a predicted final answer equals the gold one: equal as numbers when both parse, else equal after
/// [`normalise`] (and non-empty).
pub fn answers_match(predicted: &str, gold: &str) -> bool {
    if predicted.len() > MAX_ANSWER_LEN || gold.len() > MAX_ANSWER_LEN {
        return false;
    }
    match (parse_number(predicted), parse_number(gold)) {
        (Some(p), Some(g)) => p == g,
        _ => {
            let (p, g) = (normalise(predicted), normalise(gold));
            !g.is_empty() && p == g
        }
    }
}

/// 1.0 when the final answer extracted from `response` matches `gold`, else 0.0.
pub fn math_reward(response: &str, gold: &str, how: Extraction) -> f32 {
    match extract(response, how) {
        Some(answer) if answers_match(answer, gold) => 1.0,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn rationals_at_the_i128_boundary_reduce_without_overflow() {
        let min = i128::MIN;
        assert_eq!(Rational::new(min, 1), Some(Rational { num: min, den: 1 }));
        assert_eq!(Rational::new(min, 2), Some(Rational { num: min / 2, den: 1 }));
        assert_eq!(Rational::new(min, min), Some(Rational::int(1)));
        assert_eq!(Rational::new(min, -1), None, "2^127 does not fit");
        assert_eq!(Rational::new(1, min), None, "a denominator of 2^127 does not fit");
        assert_eq!(Rational::new(-1, min), None);
        assert_eq!(Rational::new(2, min), Some(Rational { num: -1, den: 1i128 << 126 }));
        assert_eq!(Rational::new(4, -2), Some(Rational::int(-2)));
        assert_eq!(Rational::new(0, -5), Some(Rational::int(0)));
        assert_eq!(Rational::new(i128::MAX, i128::MAX), Some(Rational::int(1)));
        // Exact powers of two reach i128::MIN through checked arithmetic: 2^64 · (−2^63).
        let big = Rational::int(1i128 << 64).checked_mul(Rational::int(-(1i128 << 63)));
        assert_eq!(big, Some(Rational::int(min)));
        assert_eq!(big.and_then(|b| b.checked_div(Rational::int(-1))), None);
        assert_eq!(big.and_then(|b| b.checked_sub(Rational::int(1))), None);
    }

    #[test]
    fn boxed_fractions_that_reach_i128_min_parse_without_panic() {
        // −2^119 / 2^−8 = −2^127: the answer of a crafted response, or a dataset's gold answer.
        let frac = "\\frac{-664613997892457936451903530140172288}{0.00390625}";
        assert_eq!(parse_number(frac), Some(Rational::int(i128::MIN)));
        assert_eq!(parse_number(&format!("-{frac}")), None, "its negation does not fit");
        assert_eq!(math_reward(&format!("\\boxed{{{frac}}}"), frac, Extraction::Auto), 1.0);
        assert_eq!(math_reward("\\boxed{1}", &format!("-{frac}"), Extraction::Auto), 0.0);
    }

    #[test]
    fn extraction() {
        let t = "so x = 3. Then \\boxed{\\frac{1}{2}} and more {text}";
        assert_eq!(extract_boxed(t), Some("\\frac{1}{2}"));
        assert_eq!(extract_boxed("\\boxed{a{b}c} then \\boxed {7}"), Some("7"));
        assert_eq!(extract_boxed("\\boxed{unclosed"), None);
        assert_eq!(extract_boxed("no box"), None);
        assert_eq!(extract_after_hash("Natalia sold 48/2 = 24 clips.\n#### 72"), Some("72"));
        assert_eq!(extract_after_hash("#### \n"), None);
        assert_eq!(extract_last_number("it costs $1,234.50 or -3/4"), Some("-3/4"));
        assert_eq!(extract_last_number("total 1,234."), Some("1,234"));
        assert_eq!(extract_last_number("none"), None);
        assert_eq!(extract("#### 5 and \\boxed{6}", Extraction::Auto), Some("6"));
        assert_eq!(extract("#### 5\nthen 7", Extraction::Auto), Some("5"));
        assert_eq!(extract("then 7", Extraction::Hash), None);
    }

    #[test]
    fn numbers_and_equivalence() {
        let r = |n, d| Rational::new(n, d).expect("den");
        assert_eq!(parse_number("42"), Some(r(42, 1)));
        assert_eq!(parse_number("-1,234"), Some(r(-1234, 1)));
        assert_eq!(parse_number("3.50"), Some(r(7, 2)));
        assert_eq!(parse_number(".5"), Some(r(1, 2)));
        assert_eq!(parse_number("6/8"), Some(r(3, 4)));
        assert_eq!(parse_number("\\frac{3}{4}"), Some(r(3, 4)));
        assert_eq!(parse_number("-\\dfrac{6}{4}"), Some(r(-3, 2)));
        assert_eq!(parse_number("\\frac12"), Some(r(1, 2)));
        assert_eq!(parse_number("$18$."), Some(r(18, 1)));
        assert_eq!(parse_number("1/0"), None);
        assert_eq!(parse_number("x+1"), None);
        assert_eq!(parse_number(&"9".repeat(40)), None);
        assert!(answers_match("0.75", "\\frac{3}{4}"));
        assert!(answers_match("18", "18.00"));
        assert!(answers_match("\\text{(B)}", "(B)"));
        assert!(!answers_match("17", "18"));
        assert!(!answers_match("", ""));
        assert_eq!(math_reward("Let me think. \\boxed{72}", "72", Extraction::Auto), 1.0);
        assert_eq!(math_reward("#### 72", "72.0", Extraction::Hash), 1.0);
        assert_eq!(math_reward("I give up", "72", Extraction::Auto), 0.0);
    }

    proptest! {
        /// Untrusted model output: no panic on arbitrary strings (bounded work is by construction: linear scans).
        #[test]
        fn arbitrary_text_never_panics(s in ".{0,400}", gold in ".{0,20}") {
            for how in [Extraction::Auto, Extraction::Boxed, Extraction::Hash, Extraction::LastNumber] {
                let _ = math_reward(&s, &gold, how);
            }
            let _ = parse_number(&s);
            let _ = answers_match(&s, &gold);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let s = String::from_utf8_lossy(&bytes);
            let _ = math_reward(&s, "12", Extraction::Auto);
        }

        #[test]
        fn integers_round_trip(n in -1_000_000_000i64..1_000_000_000) {
            prop_assert_eq!(parse_number(&n.to_string()), Some(Rational::int(i128::from(n))));
            prop_assert_eq!(math_reward(&format!("so \\boxed{{{n}}}"), &n.to_string(), Extraction::Auto), 1.0);
        }
    }
}
