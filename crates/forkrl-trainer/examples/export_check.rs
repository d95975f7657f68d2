//! Writes a Hugging Face export and our logits beside it, for `scripts/check_hf_export.py` to compare with
//! `transformers` (run by hand, offline of the tests, where a Python environment with torch exists):
//!
//! ```text
//! cargo run --example export_check -- OUT_DIR [CHECKPOINT_DIR]
//! python scripts/check_hf_export.py OUT_DIR
//! ```
//!
//! Without a checkpoint it exports the built-in tiny model as `cargo xtask train` initialises it (seed 0). Next to
//! the export it writes `forkrl_logits.json`: a text, its token ids and our full-sequence logits.

use std::path::PathBuf;

use burn::{
    module::Module,
    tensor::{Int, Tensor, TensorData},
};
use forkrl_core::Backend;
use forkrl_trainer::{TrainConfig, Trainer};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().ok_or("usage: export_check OUT_DIR [CHECKPOINT_DIR]")?);
    let device = Backend::Cpu.device()?;
    let trainer = match args.next() {
        Some(dir) => Trainer::from_checkpoint(&PathBuf::from(dir), &device)?,
        None => {
            let mut config = TrainConfig::default();
            config.sft.steps = 0;
            Trainer::new(config.check()?, &device)?
        }
    };
    trainer.export(&out)?;
    let text = "12+34-5=46|41";
    let ids = trainer.vocab().encode(text)?;
    let policy = trainer.policy().valid();
    let t = Tensor::<2, Int>::from_data(
        TensorData::new(ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(), [1, ids.len()]),
        &policy.device(),
    );
    let logits = policy.forward(t)?;
    let shape = logits.dims().to_vec();
    let values = logits.into_data().try_to_vec::<f32>().map_err(|e| format!("{e:?}"))?;
    let json = serde_json::json!({"text": text, "input_ids": ids, "shape": shape, "logits": values});
    std::fs::write(out.join("forkrl_logits.json"), serde_json::to_string(&json)?)?;
    println!("wrote {} and forkrl_logits.json", out.display());
    Ok(())
}
