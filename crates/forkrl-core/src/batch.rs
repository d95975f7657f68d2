//! The ragged batch layout of one RLVR step: prompts → groups of responses → response tokens.
//!
//! A rollout batch holds `B` responses, padded to a common width `T`. Responses to the same prompt are consecutive
//! rows and form a *group* (GRPO's `G` samples per prompt). Per-token arrays are row-major `[B, T]` buffers; the
//! *response mask* marks which of those positions are loss tokens (position `t` holds the token predicted at `t`,
//! already shifted). Per-sequence arrays (rewards, advantages) have `B` entries, in row order.
//!
//! ```text
//! group 0: rows 0..3   | r0: x x x x . .      x = response token (mask true)
//!                      | r1: x x . . . .      . = padding        (mask false)
//!                      | r2: x x x x x x
//! group 1: rows 3..5   | r3: x . . . . .
//!                      | r4: . . . . . .      (a zero-length response is allowed)
//! ```
//!
//! [`BatchLayout`] validates once at construction (lengths against the mask, group sizes ≥ 1, a non-empty batch)
//! and is trusted afterwards; serde deserialisation goes through the same checks.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Validated layout of a ragged RLVR batch: group boundaries, response lengths and the `[B, T]` response mask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawBatchLayout", into = "RawBatchLayout")]
pub struct BatchLayout {
    /// `group_offsets[g]..group_offsets[g + 1]` are the rows of group `g`; starts at 0, ends at `B`.
    group_offsets: Vec<usize>,
    /// Response length (generated tokens, EOS included) of each row.
    lengths: Vec<usize>,
    /// Padded width `T`.
    max_len: usize,
    /// Row-major `[B, T]` loss-token mask; false at and after each row's length.
    response_mask: Vec<bool>,
    /// Number of true entries of `response_mask`.
    num_tokens: usize,
}

/// The serialised form of [`BatchLayout`], validated on the way back in.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBatchLayout {
    group_sizes: Vec<usize>,
    lengths: Vec<usize>,
    max_len: usize,
    response_mask: Vec<bool>,
}

impl TryFrom<RawBatchLayout> for BatchLayout {
    type Error = Error;

    fn try_from(raw: RawBatchLayout) -> Result<Self> {
        Self::new(&raw.group_sizes, &raw.lengths, raw.max_len, raw.response_mask)
    }
}

impl From<BatchLayout> for RawBatchLayout {
    fn from(layout: BatchLayout) -> Self {
        Self {
            group_sizes: layout.group_sizes().collect(),
            lengths: layout.lengths,
            max_len: layout.max_len,
            response_mask: layout.response_mask,
        }
    }
}

/// One group: the responses to one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    /// Group index.
    pub index: usize,
    /// Rows of the batch that belong to this group.
    pub rows: Range<usize>,
}

impl Group {
    /// Number of responses in the group (`G`).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Always false for a group of a validated layout; present for API completeness.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// One response (a row of the batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Row index in the batch.
    pub row: usize,
    /// Index of the group the row belongs to.
    pub group: usize,
    /// Response length in tokens.
    pub length: usize,
    /// Flat range of this row in a `[B, T]` buffer.
    pub span: Range<usize>,
}

impl BatchLayout {
    /// Builds a layout from group sizes, per-row response lengths and an explicit `[B, T]` response mask.
    ///
    /// The mask may have holes inside a response (e.g. masked tool output) but never marks a position at or beyond the
    /// row's length.
    ///
    /// # Errors
    /// [`Error::EmptyBatch`] when there is no group; [`Error::EmptyGroup`] for a group size of 0;
    /// [`Error::ShapeMismatch`] when `Σ group_sizes ≠ lengths.len()` or the mask is not `[B, T]`;
    /// [`Error::LengthExceedsWidth`] and [`Error::MaskBeyondLength`] for inconsistent rows.
    pub fn new(group_sizes: &[usize], lengths: &[usize], max_len: usize, response_mask: Vec<bool>) -> Result<Self> {
        let group_offsets = offsets_from_sizes(group_sizes)?;
        let batch = *group_offsets.last().unwrap_or(&0);
        if lengths.len() != batch {
            return Err(Error::ShapeMismatch {
                op: "BatchLayout::new lengths (Σ group_sizes)",
                expected: vec![batch],
                actual: vec![lengths.len()],
            });
        }
        if response_mask.len() != batch * max_len {
            return Err(Error::ShapeMismatch {
                op: "BatchLayout::new response_mask [B, T]",
                expected: vec![batch, max_len],
                actual: vec![response_mask.len()],
            });
        }
        let mut num_tokens = 0;
        for (row, &length) in lengths.iter().enumerate() {
            if length > max_len {
                return Err(Error::LengthExceedsWidth { row, length, max_len });
            }
            let row_mask = &response_mask[row * max_len..(row + 1) * max_len];
            if let Some(offset) = row_mask[length..].iter().position(|&m| m) {
                return Err(Error::MaskBeyondLength { row, position: length + offset, length });
            }
            num_tokens += row_mask[..length].iter().filter(|&&m| m).count();
        }
        Ok(Self { group_offsets, lengths: lengths.to_vec(), max_len, response_mask, num_tokens })
    }

    /// Builds a right-padded layout whose mask is true exactly on `0..length` of each row (the usual RLVR case).
    ///
    /// # Errors
    /// As [`BatchLayout::new`].
    pub fn from_lengths(group_sizes: &[usize], lengths: &[usize], max_len: usize) -> Result<Self> {
        let mut mask = vec![false; lengths.len() * max_len];
        for (row, &length) in lengths.iter().enumerate() {
            if length > max_len {
                return Err(Error::LengthExceedsWidth { row, length, max_len });
            }
            mask[row * max_len..row * max_len + length].fill(true);
        }
        Self::new(group_sizes, lengths, max_len, mask)
    }

    /// Builds a layout from a `[B, T]` mask alone: each row's length is one past its last masked position.
    ///
    /// # Errors
    /// As [`BatchLayout::new`]; also [`Error::ShapeMismatch`] when the mask length is not a multiple of `max_len`.
    pub fn from_mask(group_sizes: &[usize], max_len: usize, response_mask: Vec<bool>) -> Result<Self> {
        if max_len == 0 || !response_mask.len().is_multiple_of(max_len) {
            let batch: usize = group_sizes.iter().sum();
            return Err(Error::ShapeMismatch {
                op: "BatchLayout::from_mask response_mask [B, T]",
                expected: vec![batch, max_len],
                actual: vec![response_mask.len()],
            });
        }
        let lengths: Vec<usize> =
            response_mask.chunks_exact(max_len).map(|row| row.iter().rposition(|&m| m).map_or(0, |p| p + 1)).collect();
        Self::new(group_sizes, &lengths, max_len, response_mask)
    }

    /// Number of responses `B`.
    pub fn batch_size(&self) -> usize {
        self.lengths.len()
    }

    /// Padded width `T`.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// `[B, T]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.batch_size(), self.max_len]
    }

    /// Number of groups (prompts).
    pub fn num_groups(&self) -> usize {
        self.group_offsets.len() - 1
    }

    /// Group boundaries: `num_groups + 1` offsets from 0 to `B`.
    pub fn group_offsets(&self) -> &[usize] {
        &self.group_offsets
    }

    /// Size of each group.
    pub fn group_sizes(&self) -> impl ExactSizeIterator<Item = usize> + '_ {
        self.group_offsets.windows(2).map(|w| w[1] - w[0])
    }

    /// Response length of each row.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// The row-major `[B, T]` response mask.
    pub fn response_mask(&self) -> &[bool] {
        &self.response_mask
    }

    /// The mask of one row (`T` entries).
    ///
    /// # Panics
    /// When `row >= B` (an index bug in the caller, not a data error).
    pub fn row_mask(&self, row: usize) -> &[bool] {
        &self.response_mask[row * self.max_len..(row + 1) * self.max_len]
    }

    /// Total number of loss tokens (true mask entries).
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// Number of rows with at least one loss token (zero-length responses are excluded from per-sequence counts).
    pub fn num_nonempty_sequences(&self) -> usize {
        (0..self.batch_size()).filter(|&row| self.row_mask(row).iter().any(|&m| m)).count()
    }

    /// The group of a row.
    ///
    /// # Panics
    /// When `row >= B`.
    pub fn group_of(&self, row: usize) -> usize {
        assert!(row < self.batch_size(), "row {row} out of range for a batch of {}", self.batch_size());
        // group_offsets is sorted; the group is the last offset <= row.
        self.group_offsets.partition_point(|&offset| offset <= row) - 1
    }

    /// Iterates over the groups in order.
    pub fn groups(&self) -> impl ExactSizeIterator<Item = Group> + '_ {
        self.group_offsets.windows(2).enumerate().map(|(index, w)| Group { index, rows: w[0]..w[1] })
    }

    /// Iterates over the responses in row order.
    pub fn sequences(&self) -> impl Iterator<Item = Sequence> + '_ {
        let t = self.max_len;
        self.groups().flat_map(move |g| {
            g.rows.map(move |row| Sequence {
                row,
                group: g.index,
                length: self.lengths[row],
                span: row * t..(row + 1) * t,
            })
        })
    }

    /// Flat (row-major) indices of the loss tokens, in order.
    pub fn token_indices(&self) -> impl Iterator<Item = usize> + '_ {
        self.response_mask.iter().enumerate().filter_map(|(i, &m)| m.then_some(i))
    }

    /// Checks that a per-sequence array has `B` entries.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] naming `what`.
    pub fn check_per_sequence(&self, what: &'static str, len: usize) -> Result<()> {
        if len == self.batch_size() {
            Ok(())
        } else {
            Err(Error::ShapeMismatch { op: what, expected: vec![self.batch_size()], actual: vec![len] })
        }
    }

    /// Checks that a per-token array is `[B, T]`.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] naming `what`.
    pub fn check_per_token(&self, what: &'static str, len: usize) -> Result<()> {
        if len == self.batch_size() * self.max_len {
            Ok(())
        } else {
            Err(Error::ShapeMismatch { op: what, expected: self.shape().to_vec(), actual: vec![len] })
        }
    }

    /// Splits a per-sequence array (`B` entries) into one slice per group.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `values.len() != B`.
    pub fn per_group<'a, T>(&'a self, values: &'a [T]) -> Result<impl ExactSizeIterator<Item = &'a [T]> + 'a> {
        self.check_per_sequence("BatchLayout::per_group values", values.len())?;
        Ok(self.group_offsets.windows(2).map(move |w| &values[w[0]..w[1]]))
    }

    /// Mutable form of [`BatchLayout::per_group`].
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `values.len() != B`.
    pub fn per_group_mut<'a, T>(&'a self, values: &'a mut [T]) -> Result<Vec<&'a mut [T]>> {
        self.check_per_sequence("BatchLayout::per_group_mut values", values.len())?;
        let mut out = Vec::with_capacity(self.num_groups());
        let mut rest = values;
        for size in self.group_sizes() {
            let (head, tail) = rest.split_at_mut(size);
            out.push(head);
            rest = tail;
        }
        Ok(out)
    }

    /// Splits a per-token `[B, T]` array into rows, each paired with its mask.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `values.len() != B·T`.
    pub fn per_sequence<'a, T>(
        &'a self,
        values: &'a [T],
    ) -> Result<impl ExactSizeIterator<Item = (&'a [T], &'a [bool])> + 'a> {
        self.check_per_token("BatchLayout::per_sequence values", values.len())?;
        let t = self.max_len.max(1);
        Ok(values.chunks(t).zip(self.response_mask.chunks(t)).take(self.batch_size()))
    }

    /// Packs the loss-token entries of a `[B, T]` array into a ragged vector of length [`BatchLayout::num_tokens`].
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `values.len() != B·T`.
    pub fn pack<T: Copy>(&self, values: &[T]) -> Result<Vec<T>> {
        self.check_per_token("BatchLayout::pack values", values.len())?;
        Ok(self.token_indices().map(|i| values[i]).collect())
    }

    /// Inverse of [`BatchLayout::pack`]: scatters packed values into a `[B, T]` array, `fill` elsewhere.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `packed.len() != num_tokens`.
    pub fn unpack<T: Copy>(&self, packed: &[T], fill: T) -> Result<Vec<T>> {
        if packed.len() != self.num_tokens {
            return Err(Error::ShapeMismatch {
                op: "BatchLayout::unpack packed",
                expected: vec![self.num_tokens],
                actual: vec![packed.len()],
            });
        }
        let mut out = vec![fill; self.response_mask.len()];
        for (i, &v) in self.token_indices().zip(packed) {
            out[i] = v;
        }
        Ok(out)
    }

    /// Broadcasts a per-sequence value to every loss token of its row (`fill` on padding), e.g. sequence advantages
    /// to token advantages.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `per_sequence.len() != B`.
    pub fn broadcast_to_tokens<T: Copy>(&self, per_sequence: &[T], fill: T) -> Result<Vec<T>> {
        self.check_per_sequence("BatchLayout::broadcast_to_tokens per_sequence", per_sequence.len())?;
        let mut out = vec![fill; self.response_mask.len()];
        for (i, &m) in self.response_mask.iter().enumerate() {
            if m {
                out[i] = per_sequence[i / self.max_len];
            }
        }
        Ok(out)
    }
}

/// Group offsets `[0, s0, s0+s1, ...]` from group sizes, rejecting an empty batch and empty groups.
fn offsets_from_sizes(group_sizes: &[usize]) -> Result<Vec<usize>> {
    if group_sizes.is_empty() {
        return Err(Error::EmptyBatch { op: "BatchLayout (no group)" });
    }
    let mut offsets = Vec::with_capacity(group_sizes.len() + 1);
    offsets.push(0);
    for (group, &size) in group_sizes.iter().enumerate() {
        if size == 0 {
            return Err(Error::EmptyGroup { op: "BatchLayout", group });
        }
        offsets.push(offsets[group] + size);
    }
    Ok(offsets)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> BatchLayout {
        // The layout drawn in the module docs.
        BatchLayout::from_lengths(&[3, 2], &[4, 2, 6, 1, 0], 6).expect("valid layout")
    }

    #[test]
    fn counts_and_offsets() {
        let layout = example();
        assert_eq!(layout.shape(), [5, 6]);
        assert_eq!(layout.num_groups(), 2);
        assert_eq!(layout.group_offsets(), &[0, 3, 5]);
        assert_eq!(layout.group_sizes().collect::<Vec<_>>(), vec![3, 2]);
        assert_eq!(layout.num_tokens(), 4 + 2 + 6 + 1);
        assert_eq!(layout.num_nonempty_sequences(), 4);
        assert_eq!((0..5).map(|r| layout.group_of(r)).collect::<Vec<_>>(), vec![0, 0, 0, 1, 1]);
        assert_eq!(layout.row_mask(1), &[true, true, false, false, false, false]);
        let seqs: Vec<_> = layout.sequences().collect();
        assert_eq!(seqs[3], Sequence { row: 3, group: 1, length: 1, span: 18..24 });
    }

    #[test]
    fn rejects_empty_batch_and_empty_group() {
        assert_eq!(BatchLayout::from_lengths(&[], &[], 4), Err(Error::EmptyBatch { op: "BatchLayout (no group)" }));
        assert_eq!(
            BatchLayout::from_lengths(&[2, 0, 1], &[1, 1, 1], 4),
            Err(Error::EmptyGroup { op: "BatchLayout", group: 1 })
        );
    }

    #[test]
    fn rejects_inconsistent_lengths_and_masks() {
        assert!(matches!(
            BatchLayout::from_lengths(&[2], &[1, 2, 3], 4),
            Err(Error::ShapeMismatch { expected, actual, .. }) if expected == vec![2] && actual == vec![3]
        ));
        assert_eq!(
            BatchLayout::from_lengths(&[2], &[1, 5], 4),
            Err(Error::LengthExceedsWidth { row: 1, length: 5, max_len: 4 })
        );
        let mask = vec![true, false, false, false, false, true];
        assert_eq!(
            BatchLayout::new(&[2], &[1, 2], 3, mask),
            Err(Error::MaskBeyondLength { row: 1, position: 2, length: 2 })
        );
        assert!(matches!(
            BatchLayout::new(&[2], &[1, 1], 3, vec![true; 5]),
            Err(Error::ShapeMismatch { expected, .. }) if expected == vec![2, 3]
        ));
    }

    #[test]
    fn mask_with_holes_keeps_declared_length() {
        let mask = vec![true, false, true, false, true, true, false, false];
        let layout = BatchLayout::new(&[1, 1], &[3, 2], 4, mask).expect("valid");
        assert_eq!(layout.num_tokens(), 4);
        let from_mask = BatchLayout::from_mask(&[1, 1], 4, layout.response_mask().to_vec()).expect("valid");
        assert_eq!(from_mask.lengths(), &[3, 2]);
    }

    #[test]
    fn per_group_and_broadcast() {
        let layout = example();
        let rewards = [1.0, 0.0, 1.0, 0.5, -1.0];
        let groups: Vec<&[f64]> = layout.per_group(&rewards).expect("B entries").collect();
        assert_eq!(groups, vec![&[1.0, 0.0, 1.0][..], &[0.5, -1.0][..]]);
        assert!(layout.per_group(&rewards[..4]).is_err());
        let tokens = layout.broadcast_to_tokens(&rewards, 0.0).expect("B entries");
        assert_eq!(&tokens[18..24], &[0.5, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(layout.pack(&tokens).expect("B*T").iter().sum::<f64>(), 4.0 + 0.0 + 6.0 + 0.5);
    }

    #[test]
    fn per_group_mut_writes_in_place() {
        let layout = example();
        let mut values = [1.0, 2.0, 3.0, 4.0, 5.0];
        for group in layout.per_group_mut(&mut values).expect("B entries") {
            let mean = group.iter().sum::<f64>() / group.len() as f64;
            group.iter_mut().for_each(|v| *v -= mean);
        }
        assert_eq!(values, [-1.0, 0.0, 1.0, -0.5, 0.5]);
    }

    #[test]
    fn serde_validates_on_the_way_in() {
        let layout = example();
        let json = serde_json::to_string(&layout).expect("serialise");
        let back: BatchLayout = serde_json::from_str(&json).expect("deserialise");
        assert_eq!(back, layout);
        let bad = r#"{"group_sizes":[1,0],"lengths":[1],"max_len":2,"response_mask":[true,false]}"#;
        let err = serde_json::from_str::<BatchLayout>(bad).expect_err("empty group");
        assert!(err.to_string().contains("group 1 is empty"), "{err}");
        let unknown = r#"{"group_sizes":[1],"lengths":[1],"max_len":1,"response_mask":[true],"extra":1}"#;
        assert!(serde_json::from_str::<BatchLayout>(unknown).is_err());
    }
}
