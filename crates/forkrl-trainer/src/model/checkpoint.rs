//! Saving and loading our own policy checkpoints, atomically.
//!
//! A checkpoint is a directory holding `policy_config.json` (the [`PolicyConfig`]) and `policy.bpk` (the parameters
//! as a burn record, "burnpack"). [`save_policy`] writes everything into a sibling temporary directory, then renames
//! it into place: a reader (or a crash) sees either the old checkpoint or the new one, never a half-written one.

use std::path::{Path, PathBuf};

use burn::{module::Module, tensor::Device};

use crate::{
    TrainerError,
    model::policy::{Policy, PolicyConfig},
};

type Result<T> = std::result::Result<T, TrainerError>;

/// File of the parameters inside a checkpoint directory.
pub const POLICY_FILE: &str = "policy.bpk";
/// File of the configuration inside a checkpoint directory.
pub const CONFIG_FILE: &str = "policy_config.json";

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainerError + '_ {
    move |source| TrainerError::Io { path: path.to_path_buf(), source }
}

fn sibling(dir: &Path, tag: &str) -> Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| TrainerError::Checkpoint {
        path: dir.to_path_buf(),
        reason: "a checkpoint path needs a final directory name".into(),
    })?;
    let mut sibling = name.to_os_string();
    sibling.push(format!(".{tag}-{}", std::process::id()));
    Ok(dir.with_file_name(sibling))
}

/// Writes a directory atomically: `fill` writes into a fresh temporary sibling of `dir`, which then replaces `dir`.
///
/// # Errors
/// [`TrainerError::Io`] from the file system, or whatever `fill` returns (the temporary directory is removed then).
pub fn write_dir_atomic(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = sibling(dir, "tmp")?;
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    if let Err(e) = fill(&tmp).and_then(|()| sync_tree(&tmp)) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        // rename(2) cannot replace a non-empty directory: move the old one aside first.
        let old = sibling(dir, "old")?;
        std::fs::rename(dir, &old).map_err(io(dir))?;
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
    }
    forkrl_core::report::sync_dir(dir.parent()).map_err(io(dir))
}

/// Flushes every file of a freshly written directory, and the directory, to disk (so that a power loss after the
/// rename cannot leave a checkpoint whose files are empty).
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if path.is_file() {
            std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(io(&path))?;
        }
    }
    forkrl_core::report::sync_dir(Some(dir)).map_err(io(dir))
}

/// Whether `name` is a temporary or set-aside sibling that [`write_dir_atomic`] or
/// [`forkrl_core::report::write_atomic`] leaves behind when a process dies mid-write (`<name>.tmp-<pid>`,
/// `<name>.old-<pid>`).
pub fn is_stale_temporary(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(_, tag)| {
        (tag.starts_with("tmp-") || tag.starts_with("old-"))
            && tag.len() > 4
            && tag[4..].chars().all(|c| c.is_ascii_digit())
    })
}

/// Writes `policy_config.json` and `policy.bpk` into the (existing) directory `dir`, not atomically: the building
/// block of [`save_policy`] and of the trainer's checkpoints, which make the directory appear atomically.
///
/// # Errors
/// [`TrainerError::Io`] / [`TrainerError::Checkpoint`] when writing fails.
pub fn write_policy_files(policy: &Policy, config: &PolicyConfig, dir: &Path) -> Result<()> {
    let config_path = dir.join(CONFIG_FILE);
    let json = serde_json::to_string_pretty(config)
        .map_err(|e| TrainerError::Checkpoint { path: config_path.clone(), reason: e.to_string() })?;
    std::fs::write(&config_path, json).map_err(io(&config_path))?;
    let policy_path = dir.join(POLICY_FILE);
    // IMAX's soft prefixes are not part of the policy file (the trainer keeps them in `prefixes.bpk`).
    let mut bare = policy.clone();
    bare.take_prefixes();
    bare.save_file(&policy_path)
        .map_err(|e| TrainerError::Checkpoint { path: policy_path.clone(), reason: format!("{e:?}") })
}

/// Saves `policy` (built from `config`) to the checkpoint directory `dir`, atomically.
///
/// # Errors
/// [`TrainerError::Io`] / [`TrainerError::Checkpoint`] when writing fails.
pub fn save_policy(policy: &Policy, config: &PolicyConfig, dir: &Path) -> Result<()> {
    write_dir_atomic(dir, |tmp| write_policy_files(policy, config, tmp))
}

/// Loads a checkpoint written by [`save_policy`] onto `device`.
///
/// # Errors
/// [`TrainerError::Io`] for a missing file; [`TrainerError::Checkpoint`] for a malformed configuration or a
/// truncated / mismatched parameter file.
pub fn load_policy(dir: &Path, device: &Device) -> Result<(Policy, PolicyConfig)> {
    let config_path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&config_path).map_err(io(&config_path))?;
    let config: PolicyConfig = serde_json::from_str(&text)
        .map_err(|e| TrainerError::Checkpoint { path: config_path.clone(), reason: e.to_string() })?;
    let policy_path = dir.join(POLICY_FILE);
    if !policy_path.is_file() {
        return Err(TrainerError::Io {
            path: policy_path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "parameter file missing"),
        });
    }
    // The fresh policy's eager initialisation draws from the shared generator; the checkpoint then replaces it.
    let fresh = {
        let _guard = crate::model::generator_lock();
        config.init(device)?
    };
    let policy = fresh
        .try_load_file(&policy_path)
        .map_err(|e| TrainerError::Checkpoint { path: policy_path.clone(), reason: format!("{e:?}") })?;
    Ok((policy, config))
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Int, Tensor, TensorData};

    use super::*;

    fn logits(policy: &Policy, device: &Device) -> Vec<f32> {
        let ids = Tensor::<2, Int>::from_data(TensorData::new(vec![2i64, 5, 7, 3, 9, 4], [2, 3]), device);
        policy.forward(ids).expect("forward").into_data().try_to_vec::<f32>().expect("f32")
    }

    #[test]
    fn round_trip_and_overwrite_and_damage() {
        let device = Device::flex();
        let dir = std::env::temp_dir().join(format!("forkrl-ckpt-{}", std::process::id())).join("ckpt");
        let _ = std::fs::remove_dir_all(&dir);
        let config = PolicyConfig::new(12).with_d_model(16).with_n_heads(2).with_d_ff(24).with_qk_norm(true);
        let a = config.init(&device).expect("a");
        save_policy(&a, &config, &dir).expect("save a");
        let (loaded, loaded_config) = load_policy(&dir, &device).expect("load a");
        assert_eq!(loaded_config, config);
        assert_eq!(logits(&loaded, &device), logits(&a, &device));

        // Overwriting replaces the whole directory and leaves no temporary sibling.
        let b = config.init(&device).expect("b");
        save_policy(&b, &config, &dir).expect("save b");
        let (loaded, _) = load_policy(&dir, &device).expect("load b");
        assert_eq!(logits(&loaded, &device), logits(&b, &device));
        assert_ne!(logits(&a, &device), logits(&b, &device));
        let siblings: Vec<_> = std::fs::read_dir(dir.parent().expect("parent")).expect("ls").collect();
        assert_eq!(siblings.len(), 1, "only the checkpoint remains: {siblings:?}");

        // A truncated parameter file is a typed error, not a panic.
        let path = dir.join(POLICY_FILE);
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
        assert!(matches!(load_policy(&dir, &device), Err(TrainerError::Checkpoint { .. })));
        // A configuration whose shapes differ from the parameters.
        std::fs::write(&path, &bytes).expect("restore");
        let other = PolicyConfig::new(12).with_d_model(32).with_n_heads(2).with_d_ff(24);
        std::fs::write(dir.join(CONFIG_FILE), serde_json::to_string(&other).expect("json")).expect("write");
        assert!(matches!(load_policy(&dir, &device), Err(TrainerError::Checkpoint { .. })));
        std::fs::remove_file(dir.join(CONFIG_FILE)).expect("rm");
        assert!(matches!(load_policy(&dir, &device), Err(TrainerError::Io { .. })));
        let _ = std::fs::remove_dir_all(dir.parent().expect("parent"));
    }
}
