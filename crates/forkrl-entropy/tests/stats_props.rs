//! Properties of the entropy statistics.

use forkrl_entropy::{SummaryOptions, entropy_change_by_base_percentile, summarize, top_entropy_overlap};
use proptest::prelude::*;

fn batch() -> impl Strategy<Value = (Vec<f32>, Vec<f32>, Vec<bool>)> {
    prop::collection::vec((0.0f32..12.0, 0.0f32..12.0, any::<bool>()), 0..150).prop_map(|v| {
        let (mut a, mut b, mut m) = (Vec::new(), Vec::new(), Vec::new());
        for (x, y, z) in v {
            a.push(x);
            b.push(y);
            m.push(z);
        }
        (a, b, m)
    })
}

proptest! {
    #[test]
    fn summary_invariants((h, _, m) in batch()) {
        let s = summarize(&h, &m, &SummaryOptions::default()).expect("valid");
        prop_assert_eq!(s.count, m.iter().filter(|&&b| b).count());
        let hist = &s.histogram;
        prop_assert_eq!(hist.counts.iter().sum::<u64>() + hist.underflow + hist.overflow, s.count as u64);
        for w in s.percentiles.windows(2) {
            prop_assert!(w[0].1 <= w[1].1, "percentiles not monotone: {:?}", s.percentiles);
        }
        for w in s.frac_below.windows(2) {
            prop_assert!(w[0].1 <= w[1].1);
        }
        if s.count > 0 {
            prop_assert!(s.mean <= s.max + 1e-9);
            prop_assert!(s.percentiles.iter().all(|(_, v)| *v <= s.max + 1e-9));
        }
    }

    #[test]
    fn overlap_is_a_fraction_and_one_with_itself((a, b, m) in batch(), rho in 0.05f64..=1.0) {
        let o = top_entropy_overlap(&a, &b, &m, rho).expect("valid");
        prop_assert!((0.0..=1.0).contains(&o));
        prop_assert_eq!(top_entropy_overlap(&a, &a, &m, rho).expect("valid"), 1.0);
    }

    #[test]
    fn change_bins_partition_the_tokens((a, b, m) in batch(), bins in 1usize..10) {
        let out = entropy_change_by_base_percentile(&a, &b, &m, bins).expect("valid");
        prop_assert_eq!(out.len(), bins);
        prop_assert_eq!(out.iter().map(|x| x.count).sum::<usize>(), m.iter().filter(|&&x| x).count());
        for w in out.windows(2) {
            if w[0].count > 0 && w[1].count > 0 {
                prop_assert!(w[0].mean_base <= w[1].mean_base + 1e-9);
            }
        }
    }
}

mod quadrants {
    use forkrl_entropy::{EntropyCut, polarity_entropy_quadrants};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn quadrant_counts_sum_to_n(
            rows in prop::collection::vec((0.0f32..5.0, (-2i8..=2).prop_map(f32::from), any::<bool>()), 0..120),
            rho in 0.05f64..=1.0,
        ) {
            let h: Vec<f32> = rows.iter().map(|r| r.0).collect();
            let a: Vec<f32> = rows.iter().map(|r| r.1).collect();
            let m: Vec<bool> = rows.iter().map(|r| r.2).collect();
            let n = m.iter().filter(|&&b| b).count();
            for cut in [EntropyCut::TopRatio(rho), EntropyCut::Threshold(2.5)] {
                let q = polarity_entropy_quadrants(&h, &a, &m, cut).expect("valid");
                prop_assert_eq!(q.phr.count + q.plr.count + q.nhr.count + q.nlr.count + q.zero_advantage, n);
                prop_assert!(q.phr.advantage_sum >= 0.0 && q.nhr.advantage_sum <= 0.0);
                let total: f64 = m.iter().zip(&a).filter(|(k, _)| **k).map(|(_, x)| f64::from(x.abs())).sum();
                let mass = q.phr.advantage_mass + q.plr.advantage_mass + q.nhr.advantage_mass + q.nlr.advantage_mass;
                prop_assert!((mass - total).abs() < 1e-9);
            }
        }
    }
}

mod cancellation {
    use forkrl_core::BatchLayout;
    use forkrl_entropy::cancellation_analysis;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn cancelled_fraction_is_a_fraction_and_zero_for_one_sign(
            sizes in prop::collection::vec(1usize..4, 1..5),
            seed in any::<u64>(),
            one_sign in any::<bool>(),
        ) {
            let b: usize = sizes.iter().sum();
            let t = 6;
            let mut s = seed | 1;
            let mut next = || { s ^= s << 13; s ^= s >> 7; s ^= s << 17; s };
            let lengths: Vec<usize> = (0..b).map(|_| (next() % (t as u64 + 1)) as usize).collect();
            let layout = BatchLayout::from_lengths(&sizes, &lengths, t).expect("valid");
            let ids: Vec<u32> = (0..b * t).map(|_| (next() % 4) as u32).collect();
            let seq_adv: Vec<f32> = (0..b)
                .map(|_| { let a = (next() % 5) as f32 - 2.0; if one_sign { a.abs() } else { a } })
                .collect();
            let adv = layout.broadcast_to_tokens(&seq_adv, 0.0).expect("B entries");
            let r = cancellation_analysis(&layout, &ids, &adv, 3).expect("valid");
            prop_assert!((0.0..=1.0 + 1e-12).contains(&r.cancelled_fraction));
            if one_sign {
                prop_assert!(r.cancelled_fraction.abs() < 1e-12);
            }
            let occ: u64 = r.per_token.iter().map(|e| e.occurrences).sum();
            prop_assert_eq!(occ as usize, layout.num_tokens());
        }
    }
}
