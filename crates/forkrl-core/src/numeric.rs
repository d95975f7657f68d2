//! Small numeric helpers shared by the host-side code of every crate.

use crate::{Error, Result};

/// Returns an error naming the first non-finite value of a row-major array of shape `shape`.
///
/// `shape` gives the dimensions used to turn the flat index into a position (pass `&[values.len()]` for a flat array).
///
/// # Errors
/// [`Error::NonFinite`] with the multi-dimensional position of the first NaN or infinity; [`Error::ShapeMismatch`] when
/// the product of `shape` differs from `values.len()`.
pub fn check_finite<T: Copy + Into<f64>>(what: &'static str, values: &[T], shape: &[usize]) -> Result<()> {
    let expected: usize = shape.iter().product();
    if expected != values.len() {
        return Err(Error::ShapeMismatch { op: what, expected: shape.to_vec(), actual: vec![values.len()] });
    }
    match values.iter().position(|&v| !v.into().is_finite()) {
        None => Ok(()),
        Some(flat) => Err(Error::NonFinite { what, position: unravel(flat, shape), value: values[flat].into() }),
    }
}

/// Checks that an array has the length the operation needs.
///
/// # Errors
/// [`Error::ShapeMismatch`] naming `op`, with both lengths.
pub fn check_len(op: &'static str, actual: usize, expected: usize) -> Result<()> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::ShapeMismatch { op, expected: vec![expected], actual: vec![actual] })
    }
}

/// Checks that a per-token array matches the mask's length and is finite on every masked (loss) position; values on
/// padding are ignored, whatever they hold.
///
/// # Errors
/// [`Error::ShapeMismatch`] naming `what` when the lengths differ; [`Error::NonFinite`] with the flat position of the
/// first NaN or infinity on a masked position.
pub fn check_finite_masked(what: &'static str, values: &[f32], mask: &[bool]) -> Result<()> {
    check_len(what, values.len(), mask.len())?;
    match values.iter().zip(mask).position(|(v, &m)| m && !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::NonFinite { what, position: vec![i], value: f64::from(values[i]) }),
    }
}

/// Converts a flat row-major index into a multi-dimensional position.
pub fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut position = vec![0; shape.len()];
    for (slot, &dim) in position.iter_mut().zip(shape).rev() {
        if dim > 0 {
            *slot = flat % dim;
            flat /= dim;
        }
    }
    position
}

/// Checks `lo <= value <= hi` (or the open bounds when `open` is true) for a named parameter.
///
/// # Errors
/// [`Error::InvalidParameter`] with the parameter's name, value and the valid range.
pub fn check_range(name: &'static str, value: f64, lo: f64, hi: f64, open: bool) -> Result<()> {
    let ok = if open { value > lo && value < hi } else { value >= lo && value <= hi };
    if ok {
        Ok(())
    } else {
        let range = if open { format!("must lie in ({lo}, {hi})") } else { format!("must lie in [{lo}, {hi}]") };
        Err(Error::invalid_parameter(name, value, range))
    }
}

/// SplitMix64's finaliser: a bijective mix of a `u64` (used to derive independent random streams and stable hashes).
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `a·b + c`: fused where the target has an FMA instruction, two roundings otherwise.
#[inline(always)]
pub fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// The polynomial returns exactly 0 at and below this argument (`2^n` with `n = −127` is built as +0.0); `e^{−88}`
/// ≈ 6e-39 is negligible next to the row's maximum term `e^0 = 1`.
pub const EXP_MIN_ARG: f32 = -88.0;

/// `e^x` for `x ∈ [EXP_MIN_ARG, 0]` (0 at `EXP_MIN_ARG`), branch-free so that loops over it vectorise; NaN stays
/// NaN. This is the build without fused multiply-adds; the kernel's FMA paths evaluate the same steps fused.
///
/// Range reduction `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, with round-to-nearest through the 1.5·2^23 trick (no
/// `round` instruction needed on baseline x86-64) and a two-part `ln 2` (Cody–Waite); then
/// `e^r ≈ 1 + r + r²·(c₂ + c₃r + c₄r² + c₅r³)`, coefficients from a Remez fit of the relative error on
/// `[−ln 2/2, ln 2/2]` (1.05e-7 before rounding), and `2^n` built in the exponent bits. Relative error below 3e-7
/// for results above `f32::MIN_POSITIVE` (tested).
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    exp_poly::<false>(x)
}

/// [`exp_nonpositive`] with every step a fused multiply-add when `FMA` (the host kernels' AVX2 / AVX-512 paths of
/// forkrl-entropy), two roundings otherwise (shared by those kernels and the attention kernel of
/// [`crate::attention`]).
#[inline(always)]
pub fn exp_poly<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // few mantissa bits: n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    const C2: f32 = 0.499_992_3;
    const C3: f32 = 0.166_671_14;
    const C4: f32 = 0.041_890_115;
    const C5: f32 = 0.008_312_525;
    let t = madd::<FMA>(x, LOG2E, MAGIC);
    let n = t - MAGIC; // round(x · log2 e), an integer in [−127, 0]
    let r = madd::<FMA>(n, -LN2_LO, madd::<FMA>(n, -LN2_HI, x));
    // t's bits are bits(MAGIC) + n and bits(MAGIC) << 23 wraps to 0, so (bits(t) << 23) + (127 << 23) is the f32
    // 2^n, and +0.0 for n = −127.
    let pow2n = f32::from_bits((t.to_bits() << 23).wrapping_add(127 << 23));
    let p = madd::<FMA>(C5, r, C4);
    let p = madd::<FMA>(p, r, C3);
    let p = madd::<FMA>(p, r, C2);
    let p = madd::<FMA>(p, r, 1.0);
    let p = madd::<FMA>(p, r, 1.0);
    p * pow2n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_first_non_finite_with_position() {
        let v = [0.0f32, 1.0, 2.0, f32::NAN, f32::INFINITY, 0.0];
        match check_finite("logits", &v, &[2, 3]) {
            Err(Error::NonFinite { what: "logits", position, value }) => {
                assert_eq!(position, vec![1, 0]);
                assert!(value.is_nan());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(check_finite("logits", &[1.0f64, 2.0], &[2]).is_ok());
        assert!(matches!(check_finite("x", &[1.0f64], &[2]), Err(Error::ShapeMismatch { .. })));
    }

    #[test]
    fn masked_finiteness_ignores_padding() {
        assert!(check_finite_masked("h", &[1.0, f32::NAN], &[true, false]).is_ok());
        assert!(matches!(
            check_finite_masked("h", &[1.0, f32::INFINITY], &[true, true]),
            Err(Error::NonFinite { what: "h", ref position, .. }) if position == &vec![1]
        ));
        assert!(matches!(check_finite_masked("h", &[1.0], &[true, true]), Err(Error::ShapeMismatch { .. })));
    }

    #[test]
    fn unravel_row_major() {
        assert_eq!(unravel(0, &[2, 3, 4]), vec![0, 0, 0]);
        assert_eq!(unravel(23, &[2, 3, 4]), vec![1, 2, 3]);
        assert_eq!(unravel(13, &[2, 3, 4]), vec![1, 0, 1]);
    }

    #[test]
    fn ranges() {
        assert!(check_range("rho", 0.2, 0.0, 1.0, false).is_ok());
        assert!(check_range("rho", 0.0, 0.0, 1.0, true).is_err());
        let err = check_range("rho", f64::NAN, 0.0, 1.0, false).expect_err("NaN is out of every range");
        assert!(err.to_string().contains("rho"));
    }
}
