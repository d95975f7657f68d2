//! Properties of the one-pass host kernel against an f64 two-pass reference.

use forkrl_entropy::kernel::{KernelOptions, reference_row_stats, token_stats};
use half::bf16;
use proptest::prelude::*;

fn logits_strategy() -> impl Strategy<Value = (Vec<f32>, usize, usize)> {
    (1usize..6, 1usize..700, 0.5f32..30.0).prop_flat_map(|(rows, vocab, scale)| {
        (prop::collection::vec(-1.0f32..1.0, rows * vocab), Just(rows), Just(vocab), Just(scale))
            .prop_map(|(v, r, vo, s)| (v.into_iter().map(|x| x * s).collect(), r, vo))
    })
}

fn opts(temperature: f32, threads: usize) -> KernelOptions {
    KernelOptions { temperature, threads }
}

proptest! {
    #[test]
    fn matches_f64_reference((logits, rows, vocab) in logits_strategy(), t in 0.3f32..2.5, seed in any::<u32>()) {
        let targets: Vec<u32> = (0..rows).map(|r| ((seed as usize + r * 31) % vocab) as u32).collect();
        let out = token_stats(&logits, vocab, Some(&targets), opts(t, 2)).expect("valid input");
        let lp = out.target_logprob.as_ref().expect("targets given");
        for r in 0..rows {
            let (h, lse, lpr) = reference_row_stats(&logits[r * vocab..(r + 1) * vocab], f64::from(t), Some(targets[r] as usize));
            // Relative 1e-5, with an absolute floor for entropies near 0.
            prop_assert!((f64::from(out.entropy[r]) - h).abs() <= 1e-5 * h.max(1e-3), "H {} vs {}", out.entropy[r], h);
            prop_assert!((f64::from(out.logsumexp[r]) - lse).abs() <= 1e-5 * lse.abs().max(1.0));
            prop_assert!((f64::from(lp[r]) - lpr).abs() <= 1e-5 * lpr.abs().max(1.0));
        }
    }

    #[test]
    fn entropy_is_between_zero_and_ln_v((logits, _rows, vocab) in logits_strategy()) {
        let out = token_stats(&logits, vocab, None, KernelOptions::default()).expect("valid");
        let ln_v = (vocab as f32).ln();
        for &h in &out.entropy {
            prop_assert!(h >= -1e-6 && h <= ln_v + 1e-5, "H = {h}, ln V = {ln_v}");
        }
    }

    #[test]
    fn shift_invariant((logits, _rows, vocab) in logits_strategy(), c in -50.0f32..50.0) {
        let a = token_stats(&logits, vocab, None, KernelOptions::default()).expect("valid");
        let shifted: Vec<f32> = logits.iter().map(|x| x + c).collect();
        let b = token_stats(&shifted, vocab, None, KernelOptions::default()).expect("valid");
        for (x, y) in a.entropy.iter().zip(&b.entropy) {
            // The shifted input itself is rounded to f32, so allow a few ulps of |c|.
            prop_assert!((x - y).abs() <= 1e-4 * x.max(1.0) + 1e-6 * c.abs(), "{x} vs {y}");
        }
    }

    #[test]
    fn temperature_equals_prescaled_logits((logits, _rows, vocab) in logits_strategy(), t in 0.25f32..4.0) {
        let a = token_stats(&logits, vocab, None, opts(t, 1)).expect("valid");
        let prescaled: Vec<f32> = logits.iter().map(|x| x * (1.0 / t)).collect();
        let b = token_stats(&prescaled, vocab, None, opts(1.0, 1)).expect("valid");
        prop_assert_eq!(a.entropy, b.entropy);
    }

    #[test]
    fn thread_count_does_not_change_a_bit((logits, _rows, vocab) in logits_strategy(), threads in 1usize..5) {
        let one = token_stats(&logits, vocab, None, opts(1.0, 1)).expect("valid");
        let many = token_stats(&logits, vocab, None, opts(1.0, threads)).expect("valid");
        prop_assert_eq!(one, many);
    }

    #[test]
    fn bf16_input_equals_f32_of_the_same_values((logits, _rows, vocab) in logits_strategy()) {
        let b: Vec<bf16> = logits.iter().map(|&x| bf16::from_f32(x)).collect();
        let widened: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
        let from_bf16 = token_stats(&b, vocab, None, KernelOptions::default()).expect("valid");
        let from_f32 = token_stats(&widened, vocab, None, KernelOptions::default()).expect("valid");
        prop_assert_eq!(from_bf16, from_f32);
    }
}

#[test]
fn uniform_rows_give_ln_v_and_peaked_rows_give_about_zero() {
    for vocab in [2usize, 17, 1000, 151_936] {
        let out = token_stats(&vec![0.25f32; vocab], vocab, None, KernelOptions::default()).expect("valid");
        assert!((f64::from(out.entropy[0]) - (vocab as f64).ln()).abs() < 1e-5 * (vocab as f64).ln());
        let mut peaked = vec![-30.0f32; vocab];
        peaked[vocab / 2] = 30.0;
        let out = token_stats(&peaked, vocab, Some(&[(vocab / 2) as u32]), KernelOptions::default()).expect("valid");
        assert!(out.entropy[0] < 1e-20_f32.max(vocab as f32 * 60.0 * (-60.0f32).exp() * 2.0));
        assert!(out.target_logprob.expect("targets")[0].abs() < 1e-6);
    }
}

proptest! {
    #[test]
    fn backward_matches_the_f64_reference_gradient(
        (logits, rows, vocab) in logits_strategy(),
        t in 0.3f32..2.5,
        seed in any::<u32>(),
        g in prop::array::uniform3(-2.0f32..2.0),
    ) {
        use forkrl_entropy::kernel::{StatsGrad, reference_row_grad, token_stats_backward};
        let targets: Vec<u32> = (0..rows).map(|r| ((seed as usize + r * 31) % vocab) as u32).collect();
        let stats = token_stats(&logits, vocab, Some(&targets), opts(t, 2)).expect("valid");
        let (gh, gl, gp) = (vec![g[0]; rows], vec![g[1]; rows], vec![g[2]; rows]);
        let grad = StatsGrad { entropy: &gh, logsumexp: &gl, target_logprob: Some(&gp) };
        let dz = token_stats_backward(&logits, vocab, Some(&targets), &stats, grad, opts(t, 2)).expect("valid");
        let scale = g.iter().map(|v| v.abs()).fold(0.0f32, f32::max).max(1e-3) as f64 / f64::from(t);
        for r in 0..rows {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let reference = reference_row_grad(row, f64::from(t), Some(targets[r] as usize), g.map(f64::from));
            let mut sum = 0.0f64;
            for (j, (&fast, &exact)) in dz[r * vocab..(r + 1) * vocab].iter().zip(&reference).enumerate() {
                // Relative 1e-5 of the largest term a gradient entry can have (|g| / T), per entry.
                prop_assert!((f64::from(fast) - exact).abs() <= 1e-5 * scale, "row {r} col {j}: {fast} vs {exact}");
                sum += f64::from(fast);
            }
            // H and log p are shift-invariant and ∂lse/∂z sums to 1/T: Σ_j ∂L/∂z_j = g_lse / T.
            prop_assert!((sum - f64::from(g[1]) / f64::from(t)).abs() <= 1e-5 * scale * vocab as f64);
        }
    }
}
