//! Per-prompt outcome statistics kept across training steps (and checkpoints): the history HORA's posterior reads.

use std::collections::BTreeMap;

use forkrl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// Successes and failures of one prompt (fractional for rewards in [0, 1]: `s += r`, `f += 1 − r`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptStats {
    /// (Decayed) successes.
    pub successes: f64,
    /// (Decayed) failures.
    pub failures: f64,
    /// Last step the prompt was rolled out.
    pub last_seen: u64,
}

/// The store: prompt id → statistics, with an optional per-visit decay γ of the old counts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PromptStatsStore {
    prompts: BTreeMap<u64, PromptStats>,
    /// Old counts are multiplied by γ before a new visit's rewards are added (1 = no decay).
    pub decay: f64,
}

impl PromptStatsStore {
    /// An empty store with decay γ.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] unless `0 < γ ≤ 1`.
    pub fn new(decay: f64) -> Result<Self> {
        forkrl_core::numeric::check_range("decay", decay, 0.0, 1.0, false)?;
        if decay == 0.0 {
            return Err(Error::invalid_parameter("decay", 0.0, "must be > 0"));
        }
        Ok(Self { prompts: BTreeMap::new(), decay })
    }

    /// Records one visit: the rewards (in [0, 1]) of the rollouts of `prompt` at `step`.
    ///
    /// # Errors
    /// [`Error::InvalidParameter`] for a reward outside [0, 1] or NaN.
    pub fn record(&mut self, prompt: u64, rewards: &[f32], step: u64) -> Result<()> {
        if let Some(&r) = rewards.iter().find(|r| !(0.0..=1.0).contains(*r)) {
            return Err(Error::invalid_parameter("reward", r, "HORA counts need rewards in [0, 1]"));
        }
        let decay = if self.decay > 0.0 { self.decay } else { 1.0 };
        let e = self.prompts.entry(prompt).or_default();
        e.successes *= decay;
        e.failures *= decay;
        e.successes += rewards.iter().map(|&r| f64::from(r)).sum::<f64>();
        e.failures += rewards.iter().map(|&r| 1.0 - f64::from(r)).sum::<f64>();
        e.last_seen = step;
        Ok(())
    }

    /// The statistics of `prompt` (zeros if never seen).
    pub fn get(&self, prompt: u64) -> PromptStats {
        self.prompts.get(&prompt).copied().unwrap_or_default()
    }

    /// Number of prompts seen.
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    /// Whether no prompt was seen.
    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_decays_and_round_trips() {
        let mut s = PromptStatsStore::new(0.5).expect("valid");
        s.record(7, &[1.0, 0.0, 1.0], 1).expect("valid");
        s.record(7, &[0.0, 0.5], 2).expect("valid");
        let p = s.get(7);
        assert_eq!((p.successes, p.failures, p.last_seen), (1.0 + 0.5, 0.5 + 1.5, 2));
        assert_eq!(s.get(8), PromptStats::default());
        let json = serde_json::to_string(&s).expect("serialise");
        assert_eq!(serde_json::from_str::<PromptStatsStore>(&json).expect("parse"), s);
        assert!(s.record(1, &[1.5], 0).is_err());
        assert!(PromptStatsStore::new(0.0).is_err());
    }
}
