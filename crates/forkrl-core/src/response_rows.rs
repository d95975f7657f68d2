//! Response tokens that sit anywhere in the rows of a `[B, W]` array, and the left-aligned [`BatchLayout`] of the same
//! tokens.
//!
//! A trainer holds `prompt ++ response` rows: the response tokens of row `r` are the positions where its `[B, W]`
//! mask is true, after the prompt. The host methods of forkrl (`BatchLayout` users: SHEAR, HTPO, VPS, entropy
//! statistics per sequence) expect every row's tokens at `0..length`. [`ResponseRows`] is the one conversion between
//! the two: [`ResponseRows::compact`] moves per-token values (with a trailing feature dimension, e.g. hidden states) to
//! the left of each row, [`ResponseRows::scatter`] puts per-token results back.
//!
//! ```text
//! [B, W] (prompt p, response x):   p p x x x .      compact [B, L]:   x x x
//!                                  p x x . . .                        x x .
//! ```

use crate::{BatchLayout, Error, Result};

/// The positions of each row's response tokens in a row-major `[B, W]` mask, and their left-aligned layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseRows {
    /// Flat `[B, W]` index of each row's response tokens, in order.
    positions: Vec<Vec<usize>>,
    /// `W`.
    width: usize,
    /// The same tokens at `0..length` of each row, `L = max(length, 1)` wide.
    layout: BatchLayout,
}

impl ResponseRows {
    /// The response tokens of a `[B, W]` mask (`B = Σ group_sizes`).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `mask.len() ≠ B·W`; the errors of [`BatchLayout::from_lengths`].
    pub fn new(mask: &[bool], width: usize, group_sizes: &[usize]) -> Result<Self> {
        let batch: usize = group_sizes.iter().sum();
        if mask.len() != batch * width {
            return Err(Error::ShapeMismatch {
                op: "ResponseRows::new mask [B, W]",
                expected: vec![batch, width],
                actual: vec![mask.len()],
            });
        }
        let positions: Vec<Vec<usize>> =
            (0..batch).map(|r| (r * width..(r + 1) * width).filter(|&i| mask[i]).collect()).collect();
        let lengths: Vec<usize> = positions.iter().map(Vec::len).collect();
        let compact_width = lengths.iter().copied().max().unwrap_or(0).max(1);
        let layout = BatchLayout::from_lengths(group_sizes, &lengths, compact_width)?;
        Ok(Self { positions, width, layout })
    }

    /// The left-aligned layout `[B, L]`.
    pub fn layout(&self) -> &BatchLayout {
        &self.layout
    }

    /// `W`, the width of the scattered rows.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Moves per-token values `[B, W, dim]` to the left of each row: `[B, L, dim]`, `T::default()` on padding.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `values.len() ≠ B·W·dim`.
    pub fn compact<T: Copy + Default>(&self, values: &[T], dim: usize) -> Result<Vec<T>> {
        let b = self.positions.len();
        if values.len() != b * self.width * dim {
            return Err(Error::ShapeMismatch {
                op: "ResponseRows::compact values [B, W, dim]",
                expected: vec![b, self.width, dim],
                actual: vec![values.len()],
            });
        }
        let l = self.layout.max_len();
        let mut out = vec![T::default(); b * l * dim];
        for (r, pos) in self.positions.iter().enumerate() {
            for (j, &i) in pos.iter().enumerate() {
                out[(r * l + j) * dim..(r * l + j + 1) * dim].copy_from_slice(&values[i * dim..(i + 1) * dim]);
            }
        }
        Ok(out)
    }

    /// Puts per-token values `[B, L]` back at their `[B, W]` positions, `fill` elsewhere.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `compact.len() ≠ B·L`.
    pub fn scatter<T: Copy>(&self, compact: &[T], fill: T) -> Result<Vec<T>> {
        let b = self.positions.len();
        let l = self.layout.max_len();
        if compact.len() != b * l {
            return Err(Error::ShapeMismatch {
                op: "ResponseRows::scatter values [B, L]",
                expected: vec![b, l],
                actual: vec![compact.len()],
            });
        }
        let mut out = vec![fill; b * self.width];
        for (r, pos) in self.positions.iter().enumerate() {
            for (j, &i) in pos.iter().enumerate() {
                out[i] = compact[r * l + j];
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compacts_and_scatters_back_hand_computed() {
        // Row 0: prompt of 2, response of 3; row 1: prompt of 1, response of 2 (W = 6).
        let mask = [false, false, true, true, true, false, false, true, true, false, false, false];
        let rows = ResponseRows::new(&mask, 6, &[2]).expect("valid");
        assert_eq!(rows.layout().lengths(), &[3, 2]);
        assert_eq!(rows.layout().max_len(), 3);
        let values: Vec<f32> = (0..12).map(|i| i as f32).collect();
        assert_eq!(rows.compact(&values, 1).expect("shape"), vec![2.0, 3.0, 4.0, 7.0, 8.0, 0.0]);
        let back = rows.scatter(&[10.0, 11.0, 12.0, 13.0, 14.0, 99.0], -1.0).expect("shape");
        assert_eq!(back, vec![-1.0, -1.0, 10.0, 11.0, 12.0, -1.0, -1.0, 13.0, 14.0, -1.0, -1.0, -1.0]);
        // A feature dimension moves whole vectors.
        let hidden: Vec<u32> = (0..24).collect();
        assert_eq!(rows.compact(&hidden, 2).expect("shape"), vec![4, 5, 6, 7, 8, 9, 14, 15, 16, 17, 0, 0]);
    }

    #[test]
    fn scatter_inverts_compact_on_the_mask_and_shapes_are_checked() {
        let mask = [true, false, true, false, false, true];
        let rows = ResponseRows::new(&mask, 3, &[1, 1]).expect("valid");
        let values = [1, 2, 3, 4, 5, 6];
        let back = rows.scatter(&rows.compact(&values, 1).expect("shape"), 0).expect("shape");
        assert_eq!(back, vec![1, 0, 3, 0, 0, 6]);
        assert!(matches!(ResponseRows::new(&mask, 4, &[1, 1]), Err(Error::ShapeMismatch { .. })));
        assert!(matches!(rows.compact(&values[..5], 1), Err(Error::ShapeMismatch { .. })));
        assert!(matches!(rows.scatter(&[1, 2, 3], 0), Err(Error::ShapeMismatch { .. })));
        // An all-padding batch still has a one-wide layout.
        let empty = ResponseRows::new(&[false; 4], 2, &[2]).expect("valid");
        assert_eq!(empty.layout().max_len(), 1);
    }
}
