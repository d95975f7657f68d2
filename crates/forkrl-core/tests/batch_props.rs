//! Property tests of the ragged batch layout: constructors, pack/unpack and serde round trips.

use forkrl_core::{BatchLayout, Error};
use proptest::prelude::*;

/// A random valid layout: 1..6 groups of 1..5 rows, width 0..9, random masks within each row's length.
fn layout_strategy() -> impl Strategy<Value = BatchLayout> {
    (prop::collection::vec(1usize..5, 1..6), 0usize..9).prop_flat_map(|(sizes, max_len)| {
        let batch: usize = sizes.iter().sum();
        (
            Just(sizes),
            Just(max_len),
            prop::collection::vec((0..=max_len, prop::collection::vec(any::<bool>(), max_len)), batch),
        )
            .prop_map(|(sizes, max_len, rows)| {
                let lengths: Vec<usize> = rows.iter().map(|(l, _)| *l).collect();
                let mut mask = Vec::with_capacity(rows.len() * max_len);
                for (length, bits) in rows {
                    mask.extend(bits.iter().enumerate().map(|(t, &b)| b && t < length));
                }
                BatchLayout::new(&sizes, &lengths, max_len, mask).expect("constructed valid")
            })
    })
}

proptest! {
    #[test]
    fn pack_unpack_round_trip(layout in layout_strategy(), seed in any::<u64>()) {
        let n = layout.batch_size() * layout.max_len();
        let values: Vec<u64> = (0..n as u64).map(|i| i.wrapping_mul(6364136223846793005).wrapping_add(seed)).collect();
        let packed = layout.pack(&values).expect("B*T values");
        prop_assert_eq!(packed.len(), layout.num_tokens());
        let unpacked = layout.unpack(&packed, u64::MAX).expect("num_tokens values");
        for (i, (&u, &m)) in unpacked.iter().zip(layout.response_mask()).enumerate() {
            prop_assert_eq!(u, if m { values[i] } else { u64::MAX });
        }
        prop_assert_eq!(layout.pack(&unpacked).expect("B*T values"), packed);
    }

    #[test]
    fn serde_round_trip(layout in layout_strategy()) {
        let json = serde_json::to_string(&layout).expect("serialise");
        let back: BatchLayout = serde_json::from_str(&json).expect("deserialise");
        prop_assert_eq!(back, layout);
    }

    #[test]
    fn from_mask_recovers_tight_lengths(layout in layout_strategy()) {
        let rebuilt = BatchLayout::from_mask(
            &layout.group_sizes().collect::<Vec<_>>(), layout.max_len().max(1),
            if layout.max_len() == 0 { vec![false; layout.batch_size()] } else { layout.response_mask().to_vec() },
        ).expect("valid mask");
        prop_assert_eq!(rebuilt.num_tokens(), layout.num_tokens());
        for (row, (&tight, &declared)) in rebuilt.lengths().iter().zip(layout.lengths()).enumerate() {
            prop_assert!(tight <= declared);
            prop_assert!(tight == 0 || layout.row_mask(row)[tight - 1]);
        }
    }

    #[test]
    fn groups_partition_rows(layout in layout_strategy()) {
        let mut next = 0;
        for group in layout.groups() {
            prop_assert_eq!(group.rows.start, next);
            prop_assert!(!group.is_empty());
            for row in group.rows.clone() {
                prop_assert_eq!(layout.group_of(row), group.index);
            }
            next = group.rows.end;
        }
        prop_assert_eq!(next, layout.batch_size());
        let seqs: Vec<_> = layout.sequences().collect();
        prop_assert_eq!(seqs.len(), layout.batch_size());
        let tokens: usize = layout.per_sequence(&vec![1u8; layout.batch_size() * layout.max_len()])
            .expect("B*T").map(|(_, m)| m.iter().filter(|&&b| b).count()).sum();
        prop_assert_eq!(tokens, layout.num_tokens());
    }

    #[test]
    fn a_corrupted_mask_is_rejected(layout in layout_strategy()) {
        // Mark a position at or beyond some row's length: the constructor must name that row.
        if let Some(row) = (0..layout.batch_size()).find(|&r| layout.lengths()[r] < layout.max_len()) {
            let mut mask = layout.response_mask().to_vec();
            let length = layout.lengths()[row];
            mask[row * layout.max_len() + length] = true;
            let sizes: Vec<usize> = layout.group_sizes().collect();
            let err = BatchLayout::new(&sizes, layout.lengths(), layout.max_len(), mask).expect_err("beyond length");
            prop_assert_eq!(err, Error::MaskBeyondLength { row, position: length, length });
        }
    }
}
