//! A training-free simulation of rollout allocation on a synthetic prompt population with known success
//! probabilities, to see what each allocator buys at an equal rollout budget.
//!
//! Population: `prompts` prompts; a share `saturated_frac` has `p ~ U(0.95, 1)`, a share `hopeless_frac` has
//! `p ~ U(0, 0.01)`, the rest `p ~ Beta(beta_a, beta_b)` (integer parameters, drawn as an order statistic of uniforms).
//! Each round draws `batch_prompts` prompts without replacement and spends `batch_prompts · group_size` rollouts:
//!
//! - **uniform**: `G` rollouts per prompt (GRPO);
//! - **hora_history**: [`crate::hora_allocate`] on posteriors from all earlier rounds (`l = 2`, `u = 4G`);
//! - **hora_probe**: 2 probe rollouts per prompt, then HORA on history + probe for the rest;
//! - **dynamic_sampling**: groups of `G` for the batch's prompts and then further random prompts until the budget is
//!   spent; only groups with both outcomes are kept for training (DAPO).
//!
//! Per round and method: the fraction of rollouts in zero-variance groups (no GRPO signal), the number of groups with
//! signal, the mean true hit utility `1 − (1 − p)^m` of the prompts rolled out, and the coverage — the fraction of the
//! population solved at least once so far (the pass@K-style quantity the allocation is meant to raise).
//!
//! Mixed-CUTS: on saturated prompts (`p_std ~ U(0.9, 1)`), standard groups of 16 against 8 standard + 8 CUTS whose
//! success probability is `cuts_success_ratio · p_std` — **an assumption of this simulation** (the paper reports that
//! CUTS rollouts fail more often on saturated data, not by how much). It reports the mean population variance of the
//! group rewards, the share of zero-variance groups and the variance identity
//! `σ² = ½(σ²_std + σ²_cuts) + ¼(μ_std − μ_cuts)²` (decomposed vs direct).

use forkrl_core::{
    Error, Result,
    report::{Panel, Series, line_chart_svg},
};
use rand::{RngExt, SeedableRng, seq::index};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::{BetaPosterior, PromptStatsStore, hora_allocate, hora_allocate_after_probe, mixed_group_variance};

/// Simulation parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SimulationConfig {
    /// Population size.
    pub prompts: usize,
    /// Prompts per round.
    pub batch_prompts: usize,
    /// `G`, rollouts per prompt under uniform allocation.
    pub group_size: usize,
    /// Rounds.
    pub rounds: usize,
    /// Share of saturated prompts (`p ∈ [0.95, 1]`).
    pub saturated_frac: f64,
    /// Share of hopeless prompts (`p ∈ [0, 0.01]`).
    pub hopeless_frac: f64,
    /// Beta α of the other prompts (integer ≥ 1).
    pub beta_a: u32,
    /// Beta β of the other prompts (integer ≥ 1).
    pub beta_b: u32,
    /// CUTS success probability as a share of the standard one on saturated prompts (assumption).
    pub cuts_success_ratio: f64,
    /// Mixed-CUTS groups simulated.
    pub cuts_groups: usize,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SimulationConfig {
    fn default() -> Self {
        Self {
            prompts: 1000,
            batch_prompts: 128,
            group_size: 8,
            rounds: 40,
            saturated_frac: 0.3,
            hopeless_frac: 0.2,
            beta_a: 1,
            beta_b: 2,
            cuts_success_ratio: 0.6,
            cuts_groups: 20_000,
            seed: 0,
        }
    }
}

/// The allocators compared.
pub const METHODS: [&str; 4] = ["uniform", "hora_history", "hora_probe", "dynamic_sampling"];

/// One method in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRow {
    /// Round (0-based).
    pub round: usize,
    /// Method name (one of [`METHODS`]).
    pub method: String,
    /// Rollouts spent.
    pub rollouts: usize,
    /// Fraction of rollouts in groups whose rewards are all equal.
    pub frac_zero_variance_rollouts: f64,
    /// Groups with both outcomes (usable by GRPO).
    pub signal_groups: usize,
    /// Mean true hit utility `1 − (1 − p)^m` over the prompts rolled out.
    pub mean_hit_utility: f64,
    /// Fraction of the population solved at least once so far.
    pub coverage: f64,
}

/// Mixed-CUTS against standard sampling on saturated prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CutsReport {
    /// Mean population variance of standard groups of `2G`.
    pub standard_variance: f64,
    /// Mean population variance of Mixed-CUTS groups (`G` + `G`).
    pub mixed_variance: f64,
    /// Share of zero-variance standard groups.
    pub standard_zero_variance: f64,
    /// Share of zero-variance mixed groups.
    pub mixed_zero_variance: f64,
    /// Largest |decomposed − direct| of the variance identity over all groups.
    pub identity_max_error: f64,
}

/// Everything the simulation measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimulationReport {
    /// The parameters.
    pub config: SimulationConfig,
    /// Per-round rows, every method.
    pub rows: Vec<RoundRow>,
    /// The Mixed-CUTS comparison.
    pub cuts: CutsReport,
}

impl SimulationReport {
    /// Mean of a per-round quantity for one method over all rounds.
    pub fn mean(&self, method: &str, f: impl Fn(&RoundRow) -> f64) -> f64 {
        let rows: Vec<&RoundRow> = self.rows.iter().filter(|r| r.method == method).collect();
        rows.iter().map(|r| f(r)).sum::<f64>() / rows.len().max(1) as f64
    }

    /// The summary table (markdown).
    pub fn markdown(&self) -> String {
        let c = &self.config;
        let mut s = format!(
            "Population {} prompts ({:.0} % saturated, {:.0} % hopeless, rest Beta({}, {})); {} prompts x G = {} per round, {} rounds, seed {}.\n\n",
            c.prompts,
            c.saturated_frac * 100.0,
            c.hopeless_frac * 100.0,
            c.beta_a,
            c.beta_b,
            c.batch_prompts,
            c.group_size,
            c.rounds,
            c.seed
        );
        s.push_str("| method | rollouts / round | zero-variance rollouts | groups with signal / round | mean hit utility | final coverage |\n");
        s.push_str("|---|---|---|---|---|---|\n");
        for m in METHODS {
            let last = self.rows.iter().rfind(|r| r.method == m).map_or(0.0, |r| r.coverage);
            s.push_str(&format!(
                "| {m} | {:.0} | {:.3} | {:.1} | {:.3} | {:.3} |\n",
                self.mean(m, |r| r.rollouts as f64),
                self.mean(m, |r| r.frac_zero_variance_rollouts),
                self.mean(m, |r| r.signal_groups as f64),
                self.mean(m, |r| r.mean_hit_utility),
                last
            ));
        }
        let k = &self.cuts;
        s.push_str(&format!(
            "\nMixed-CUTS on saturated prompts (p_std ~ U(0.9, 1), CUTS success = {} x p_std, {} groups of {}):\n\n",
            c.cuts_success_ratio,
            c.cuts_groups,
            2 * c.group_size
        ));
        s.push_str("| sampling | mean group reward variance | zero-variance groups |\n|---|---|---|\n");
        s.push_str(&format!("| standard | {:.4} | {:.3} |\n", k.standard_variance, k.standard_zero_variance));
        s.push_str(&format!("| Mixed-CUTS | {:.4} | {:.3} |\n", k.mixed_variance, k.mixed_zero_variance));
        s.push_str(&format!(
            "\nVariance identity, largest |decomposed - direct| over all groups: {:.2e}\n",
            k.identity_max_error
        ));
        s
    }

    /// A two-panel SVG: coverage and zero-variance share per round, one line per method.
    pub fn svg(&self) -> String {
        let panel = |title: &str, f: fn(&RoundRow) -> f64| Panel {
            title: title.into(),
            x_label: "round".into(),
            y_max: 1.0,
            y_min: 0.0,
            series: METHODS
                .iter()
                .map(|m| {
                    Series::new(
                        *m,
                        self.rows.iter().filter(|r| r.method == *m).map(|r| (r.round as f64, f(r))).collect(),
                    )
                })
                .collect(),
        };
        line_chart_svg(&[
            panel("coverage (solved at least once)", |r| r.coverage),
            panel("zero-variance rollouts", |r| r.frac_zero_variance_rollouts),
        ])
    }
}

/// Draws a Beta(a, b) variate with integer parameters: the a-th smallest of a + b − 1 uniforms.
fn beta_int(rng: &mut ChaCha8Rng, a: u32, b: u32) -> f64 {
    let mut u: Vec<f64> = (0..a + b - 1).map(|_| rng.random::<f64>()).collect();
    u.sort_by(f64::total_cmp);
    u[a as usize - 1]
}

fn successes(rng: &mut ChaCha8Rng, p: f64, m: usize) -> Vec<f32> {
    (0..m).map(|_| if rng.random::<f64>() < p { 1.0 } else { 0.0 }).collect()
}

/// Runs the simulation.
///
/// # Errors
/// [`Error::InvalidParameter`] for sizes of 0, shares outside [0, 1] (or summing above 1), Beta parameters of 0, or a
/// batch larger than the population.
pub fn simulate(config: &SimulationConfig) -> Result<SimulationReport> {
    let c = *config;
    if c.prompts == 0 || c.batch_prompts == 0 || c.group_size < 2 || c.rounds == 0 || c.batch_prompts > c.prompts {
        return Err(Error::invalid_parameter(
            "prompts/batch_prompts/group_size/rounds",
            format!("{}/{}/{}/{}", c.prompts, c.batch_prompts, c.group_size, c.rounds),
            "need positive sizes, G >= 2 and batch <= population",
        ));
    }
    if !(0.0..=1.0).contains(&c.saturated_frac)
        || !(0.0..=1.0).contains(&c.hopeless_frac)
        || c.saturated_frac + c.hopeless_frac > 1.0
    {
        return Err(Error::invalid_parameter(
            "saturated_frac + hopeless_frac",
            c.saturated_frac + c.hopeless_frac,
            "shares must lie in [0, 1]",
        ));
    }
    if c.beta_a == 0 || c.beta_b == 0 {
        return Err(Error::invalid_parameter("beta_a/beta_b", format!("{}/{}", c.beta_a, c.beta_b), "must be >= 1"));
    }
    forkrl_core::numeric::check_range("cuts_success_ratio", c.cuts_success_ratio, 0.0, 1.0, false)?;
    let mut rng = ChaCha8Rng::seed_from_u64(c.seed);
    let p: Vec<f64> = (0..c.prompts)
        .map(|_| {
            let u = rng.random::<f64>();
            if u < c.saturated_frac {
                0.95 + 0.05 * rng.random::<f64>()
            } else if u < c.saturated_frac + c.hopeless_frac {
                0.01 * rng.random::<f64>()
            } else {
                beta_int(&mut rng, c.beta_a, c.beta_b)
            }
        })
        .collect();
    let g = c.group_size;
    let budget = c.batch_prompts * g;
    let mut rows = Vec::new();
    let mut stores: Vec<PromptStatsStore> =
        (0..METHODS.len()).map(|_| PromptStatsStore::new(1.0)).collect::<Result<_>>()?;
    let mut solved = vec![vec![false; c.prompts]; METHODS.len()];
    for round in 0..c.rounds {
        // Every method sees the same batch; each has its own outcome stream.
        let batch: Vec<usize> = index::sample(&mut rng, c.prompts, c.batch_prompts).into_vec();
        for (k, method) in METHODS.iter().enumerate() {
            let mut mrng = ChaCha8Rng::seed_from_u64(c.seed ^ ((round as u64) << 20) ^ ((k as u64) << 50));
            let posterior = |store: &PromptStatsStore, i: usize| {
                let s = store.get(i as u64);
                BetaPosterior::from_counts(s.successes, s.failures, 1.0, 1.0)
            };
            // (prompt, rewards) of every group rolled out this round.
            let groups: Vec<(usize, Vec<f32>)> = match *method {
                "uniform" => batch.iter().map(|&i| (i, successes(&mut mrng, p[i], g))).collect(),
                "hora_history" => {
                    let post: Vec<BetaPosterior> =
                        batch.iter().map(|&i| posterior(&stores[k], i)).collect::<Result<_>>()?;
                    let a = hora_allocate(&post, budget, 2, 4 * g)?;
                    batch.iter().zip(a.counts).map(|(&i, m)| (i, successes(&mut mrng, p[i], m))).collect()
                }
                "hora_probe" => {
                    let probes: Vec<Vec<f32>> = batch.iter().map(|&i| successes(&mut mrng, p[i], 2)).collect();
                    let post: Vec<BetaPosterior> = batch
                        .iter()
                        .zip(&probes)
                        .map(|(&i, pr)| {
                            let s = stores[k].get(i as u64);
                            let hits = pr.iter().map(|&r| f64::from(r)).sum::<f64>();
                            BetaPosterior::from_counts(s.successes + hits, s.failures + 2.0 - hits, 1.0, 1.0)
                        })
                        .collect::<Result<_>>()?;
                    let a = hora_allocate_after_probe(&post, budget, 2, 2, 4 * g)?;
                    batch
                        .iter()
                        .zip(probes)
                        .zip(a.counts)
                        .map(|((&i, mut pr), m)| {
                            pr.extend(successes(&mut mrng, p[i], m - 2));
                            (i, pr)
                        })
                        .collect()
                }
                _ => {
                    // Dynamic sampling: the batch, then random further prompts, G each, until the budget is spent.
                    let mut order = batch.clone();
                    let mut out = Vec::new();
                    let mut spent = 0;
                    while spent + g <= budget {
                        let i = if out.len() < order.len() {
                            order[out.len()]
                        } else {
                            let extra = mrng.random_range(0..c.prompts);
                            order.push(extra);
                            extra
                        };
                        out.push((i, successes(&mut mrng, p[i], g)));
                        spent += g;
                    }
                    out
                }
            };
            let mut rollouts = 0;
            let mut zero_var = 0;
            let mut signal = 0;
            let mut utility = 0.0;
            for (i, r) in &groups {
                rollouts += r.len();
                let hits = r.iter().filter(|&&x| x > 0.5).count();
                if hits == 0 || hits == r.len() {
                    zero_var += r.len();
                } else {
                    signal += 1;
                }
                if hits > 0 {
                    solved[k][*i] = true;
                }
                utility += 1.0 - (1.0 - p[*i]).powi(r.len() as i32);
                stores[k].record(*i as u64, r, round as u64)?;
            }
            rows.push(RoundRow {
                round,
                method: method.to_string(),
                rollouts,
                frac_zero_variance_rollouts: zero_var as f64 / rollouts.max(1) as f64,
                signal_groups: signal,
                mean_hit_utility: utility / groups.len().max(1) as f64,
                coverage: solved[k].iter().filter(|&&s| s).count() as f64 / c.prompts as f64,
            });
        }
    }

    let mut cuts = CutsReport {
        standard_variance: 0.0,
        mixed_variance: 0.0,
        standard_zero_variance: 0.0,
        mixed_zero_variance: 0.0,
        identity_max_error: 0.0,
    };
    let pop_var = |v: &[f32]| {
        let m = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        v.iter().map(|&x| (f64::from(x) - m).powi(2)).sum::<f64>() / v.len() as f64
    };
    for _ in 0..c.cuts_groups {
        let p_std = 0.9 + 0.1 * rng.random::<f64>();
        let standard = successes(&mut rng, p_std, 2 * g);
        let half = successes(&mut rng, p_std, g);
        let cut = successes(&mut rng, c.cuts_success_ratio * p_std, g);
        let (decomposed, direct) = mixed_group_variance(&half, &cut)?;
        let v_std = pop_var(&standard);
        cuts.standard_variance += v_std;
        cuts.mixed_variance += direct;
        cuts.standard_zero_variance += f64::from(u8::from(v_std == 0.0));
        cuts.mixed_zero_variance += f64::from(u8::from(direct == 0.0));
        cuts.identity_max_error = cuts.identity_max_error.max((decomposed - direct).abs());
    }
    let n = c.cuts_groups.max(1) as f64;
    cuts.standard_variance /= n;
    cuts.mixed_variance /= n;
    cuts.standard_zero_variance /= n;
    cuts.mixed_zero_variance /= n;
    Ok(SimulationReport { config: c, rows, cuts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_run_is_deterministic_and_hora_wastes_less() {
        let cfg = SimulationConfig {
            prompts: 200,
            batch_prompts: 64,
            rounds: 8,
            cuts_groups: 500,
            ..SimulationConfig::default()
        };
        let a = simulate(&cfg).expect("valid");
        assert_eq!(a, simulate(&cfg).expect("valid"));
        assert_eq!(a.rows.len(), 8 * METHODS.len());
        for r in &a.rows {
            assert_eq!(r.rollouts, 64 * 8, "{r:?}");
        }
        // After the first round HORA has history and spends less on zero-variance groups than uniform.
        let late = |m: &str| {
            a.rows.iter().filter(|r| r.method == m && r.round >= 3).map(|r| r.frac_zero_variance_rollouts).sum::<f64>()
        };
        assert!(late("hora_history") < late("uniform"), "{}", a.markdown());
        assert!(a.cuts.mixed_variance > a.cuts.standard_variance && a.cuts.identity_max_error < 1e-12);
        assert!(a.svg().starts_with("<svg") && a.markdown().contains("hora_probe"));
        assert!(simulate(&SimulationConfig { group_size: 1, ..cfg }).is_err());
    }
}
