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
