//! Helpers shared by the trainer's integration tests (each test binary uses some of them).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use forkrl_trainer::{
    Trainer,
    batch::{Rollout, RolloutBatch},
};

/// A hand-built batch of `(prompt, response, reward)` rows in groups of `group_sizes`, each response ended by EOS,
/// encoded with the trainer's vocabulary.
pub fn batch_of(t: &Trainer, rows: &[(&str, &str, f32)], group_sizes: Vec<usize>) -> RolloutBatch {
    let v = t.vocab();
    let rollouts = rows
        .iter()
        .map(|(p, r, reward)| {
            let mut response = v.encode(r).expect("encodes");
            response.push(v.eos[0]);
            Rollout { prompt: v.encode(p).expect("encodes"), response, truncated: false, reward: *reward }
        })
        .collect();
    RolloutBatch::new(1, rollouts, group_sizes, v.pad).expect("valid batch")
}

/// A scratch folder `<temp>/forkrl-<name>-<pid>`, emptied when made and removed with its contents when dropped (the
/// tests leave nothing behind in the temp folder, a failing one included: the drop runs while the panic unwinds).
#[derive(Debug)]
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("forkrl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch folder");
        Self(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<Path> for Scratch {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for Scratch {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
