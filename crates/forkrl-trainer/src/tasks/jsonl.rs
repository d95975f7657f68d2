//! JSONL datasets in GSM8K / MATH style: one JSON object per line with the question under `question` (or `prompt`,
//! or `problem`) and the gold answer under `answer` (a string or a number). GSM8K's answers carry their worked
//! solution and end with `#### 72`: the gold answer is then what follows `####` and the whole text is the SFT target.
//! A `solution` field (MATH), when present, is the SFT target. Blank lines are skipped; anything else that is not such
//! an object is [`TrainerError::Dataset`] naming the file and the 1-based line.
//!
//! The prompt is the dataset's question put into a template with `{question}`; the default is the 80/20 paper's
//! math template.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{TrainerError, tasks::verify::extract_after_hash};

/// The 80/20 paper's prompt template for math ("Beyond the 80/20 Rule", arXiv 2506.01939, §B).
pub const DEFAULT_TEMPLATE: &str =
    "User:\n{question}\nPlease reason step by step, and put your final answer within \\boxed{}.\n\nAssistant:\n";

/// One record of a dataset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The question text.
    pub question: String,
    /// The gold final answer.
    pub answer: String,
    /// A worked solution for SFT, when the dataset has one.
    pub solution: Option<String>,
}

/// Where a JSONL task reads its data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JsonlConfig {
    /// Training file.
    pub path: PathBuf,
    /// Held-out file; when absent, a `test_share` of `path`'s lines (chosen by a hash of the line number) is held out.
    pub test_path: Option<PathBuf>,
    /// Held-out share of `path` when there is no `test_path`.
    pub test_share: f64,
    /// Prompt template; `{question}` is replaced by the question.
    pub template: String,
    /// Final-answer extraction of the verifier.
    pub extraction: crate::tasks::verify::Extraction,
}

impl Default for JsonlConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::new(),
            test_path: None,
            test_share: 0.1,
            template: DEFAULT_TEMPLATE.into(),
            extraction: crate::tasks::verify::Extraction::Auto,
        }
    }
}

fn bad(path: &Path, line: usize, reason: impl Into<String>) -> TrainerError {
    TrainerError::Dataset { path: path.to_path_buf(), line, reason: reason.into() }
}

/// Parses one line (1-based `line` for errors).
///
/// # Errors
/// [`TrainerError::Dataset`] naming the file, the line and what is wrong.
pub fn parse_line(path: &Path, line: usize, text: &str) -> Result<Record, TrainerError> {
    let v: Value = serde_json::from_str(text).map_err(|e| bad(path, line, format!("not valid JSON: {e}")))?;
    let obj = v.as_object().ok_or_else(|| bad(path, line, "not a JSON object"))?;
    let question = ["question", "prompt", "problem"]
        .iter()
        .find_map(|k| obj.get(*k))
        .ok_or_else(|| bad(path, line, "no `question` (or `prompt` / `problem`) field"))?
        .as_str()
        .ok_or_else(|| bad(path, line, "the question is not a string"))?
        .to_string();
    let raw = match obj.get("answer") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => return Err(bad(path, line, "`answer` is neither a string nor a number")),
        None => return Err(bad(path, line, "no `answer` field")),
    };
    let mut solution = match obj.get("solution") {
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err(bad(path, line, "`solution` is not a string")),
        None => None,
    };
    let answer = match extract_after_hash(&raw) {
        Some(final_answer) => {
            solution.get_or_insert_with(|| raw.clone());
            final_answer.to_string()
        }
        None => raw.trim().to_string(),
    };
    if question.trim().is_empty() || answer.is_empty() {
        return Err(bad(path, line, "empty question or answer"));
    }
    Ok(Record { question, answer, solution })
}

/// Reads a whole JSONL file.
///
/// # Errors
/// [`TrainerError::Io`] when the file cannot be read; [`TrainerError::Dataset`] for the first bad line, or for a file
/// with no record.
pub fn read(path: &Path) -> Result<Vec<Record>, TrainerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainerError::Io { path: path.into(), source })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if !line.trim().is_empty() {
            out.push(parse_line(path, i + 1, line)?);
        }
    }
    if out.is_empty() {
        return Err(bad(path, 0, "no records"));
    }
    Ok(out)
}

/// Puts `question` into `template` (every `{question}`).
pub fn apply_template(template: &str, question: &str) -> String {
    template.replace("{question}", question)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_and_math_lines() {
        let p = Path::new("data.jsonl");
        let gsm = parse_line(p, 1, r#"{"question": "2+2?", "answer": "2 plus 2 is 4.\n#### 4"}"#).expect("gsm8k");
        assert_eq!(gsm.answer, "4");
        assert_eq!(gsm.solution.as_deref(), Some("2 plus 2 is 4.\n#### 4"));
        let math = parse_line(p, 2, r#"{"problem": "x?", "solution": "so \\boxed{\\frac12}", "answer": "\\frac12"}"#)
            .expect("math");
        assert_eq!((math.answer.as_str(), math.solution.as_deref()), ("\\frac12", Some("so \\boxed{\\frac12}")));
        let num = parse_line(p, 3, r#"{"prompt": "q", "answer": 7}"#).expect("number");
        assert_eq!(num.answer, "7");
        for (line, text, needle) in [
            (4, "{not json", "not valid JSON"),
            (5, "[1, 2]", "not a JSON object"),
            (6, r#"{"answer": "1"}"#, "no `question`"),
            (7, r#"{"question": "q"}"#, "no `answer`"),
            (8, r#"{"question": "q", "answer": [1]}"#, "neither a string"),
        ] {
            match parse_line(p, line, text) {
                Err(TrainerError::Dataset { line: l, reason, .. }) => {
                    assert_eq!(l, line);
                    assert!(reason.contains(needle), "{reason}");
                }
                other => panic!("line {line}: {other:?}"),
            }
        }
        assert_eq!(apply_template("Q: {question}\nA:", "2+2?"), "Q: 2+2?\nA:");
    }

    #[test]
    fn files_name_the_bad_line() {
        let dir = std::env::temp_dir().join(format!("forkrl-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join("d.jsonl");
        std::fs::write(&path, "{\"question\": \"a\", \"answer\": \"1\"}\n\n{\"question\": \"b\"}\n").expect("write");
        match read(&path) {
            Err(e @ TrainerError::Dataset { line: 3, .. }) => assert!(e.to_string().contains("d.jsonl:3"), "{e}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(read(&dir.join("missing.jsonl")), Err(TrainerError::Io { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
