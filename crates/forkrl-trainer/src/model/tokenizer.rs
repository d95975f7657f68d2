//! Tokenizers: a character-level one for the built-in tasks ([`CharTokenizer`]) and Hugging Face `tokenizer.json`
//! files through the `tokenizers` crate ([`HfTokenizer`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::TrainerError;

/// Padding id.
pub const PAD: u32 = 0;
/// End-of-sequence id.
pub const EOS: u32 = 1;
pub(crate) const CHARS: &str = "0123456789+-=|*/(),>:";

/// Characters of the built-in tasks plus PAD and EOS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CharTokenizer;

impl CharTokenizer {
    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        CHARS.len() + 2
    }

    /// Token ids of `text`; `None` when a character is not in the vocabulary.
    pub fn encode(&self, text: &str) -> Option<Vec<u32>> {
        text.chars().map(|c| CHARS.find(c).map(|i| i as u32 + 2)).collect()
    }

    /// Text of `ids`, stopping at EOS; PAD and unknown ids are skipped.
    pub fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .take_while(|&&i| i != EOS)
            .filter_map(|&i| CHARS.as_bytes().get((i as usize).wrapping_sub(2)).map(|&b| b as char))
            .collect()
    }
}

/// A Hugging Face `tokenizer.json`, as `transformers`' fast tokenizers use it.
#[derive(Debug, Clone)]
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
}

impl HfTokenizer {
    /// Reads `path` (a `tokenizer.json`).
    ///
    /// # Errors
    /// [`TrainerError::Io`] when the file cannot be read, [`TrainerError::Tokenizer`] when it is not a valid tokenizer.
    pub fn from_file(path: &Path) -> Result<Self, TrainerError> {
        let bytes = std::fs::read(path).map_err(|source| TrainerError::Io { path: path.into(), source })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| TrainerError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self { inner })
    }

    /// Ids of `text`, with the tokenizer's own special tokens added as `transformers` does by default
    /// (`add_special_tokens=True`); special-token text inside `text` maps to its id.
    ///
    /// # Errors
    /// [`TrainerError::Tokenizer`] when the tokenizer fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TrainerError> {
        Ok(self.inner.encode(text, true).map_err(|e| TrainerError::Tokenizer(e.to_string()))?.get_ids().to_vec())
    }

    /// Ids of `text` as a continuation of other text: no special tokens added (`add_special_tokens=False`), so a
    /// tokenizer whose post-processor adds BOS (Llama) does not put one in the middle of a sequence.
    ///
    /// # Errors
    /// [`TrainerError::Tokenizer`] when the tokenizer fails.
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>, TrainerError> {
        Ok(self.inner.encode(text, false).map_err(|e| TrainerError::Tokenizer(e.to_string()))?.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens kept (`skip_special_tokens=False`). Ids past the tokenizer's vocabulary (a model's
    /// embedding is often padded beyond it) are skipped, as `transformers` does.
    ///
    /// # Errors
    /// [`TrainerError::Tokenizer`] when the tokenizer's decoder fails.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TrainerError> {
        self.inner.decode(ids, false).map_err(|e| TrainerError::Tokenizer(e.to_string()))
    }

    /// Id of a token string (e.g. `"<|im_end|>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// The tokenizer of a run: the character tokenizer of the built-in tasks or a checkpoint's `tokenizer.json`.
#[derive(Debug, Clone)]
pub enum TextTokenizer {
    /// [`CharTokenizer`].
    Char(CharTokenizer),
    /// [`HfTokenizer`] (boxed: it is large, and there is one per run).
    Hf(Box<HfTokenizer>),
}

impl TextTokenizer {
    /// Ids of `text`.
    ///
    /// # Errors
    /// [`TrainerError::Tokenizer`] naming a character outside the character vocabulary, or the tokenizer's failure.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TrainerError> {
        match self {
            TextTokenizer::Char(t) => t.encode(text).ok_or_else(|| {
                let bad = text.chars().find(|&c| !CHARS.contains(c)).unwrap_or('?');
                TrainerError::Tokenizer(format!(
                    "character {bad:?} is not in the built-in tasks' vocabulary {CHARS:?} (text {text:?}); a dataset \
                     needs a Hugging Face model and its tokenizer (--model)"
                ))
            }),
            TextTokenizer::Hf(t) => t.encode(text),
        }
    }

    /// Ids of `text` continuing a sequence (a response after its prompt): never a BOS or other added special token.
    ///
    /// # Errors
    /// As [`TextTokenizer::encode`].
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>, TrainerError> {
        match self {
            TextTokenizer::Char(_) => self.encode(text),
            TextTokenizer::Hf(t) => t.encode_continuation(text),
        }
    }

    /// Text of a response: the ids before the first of `eos` (ids the tokenizer cannot decode are dropped).
    pub fn decode_response(&self, ids: &[u32], eos: &[u32]) -> String {
        let end = ids.iter().position(|t| eos.contains(t)).unwrap_or(ids.len());
        match self {
            TextTokenizer::Char(t) => t.decode(&ids[..end]),
            TextTokenizer::Hf(t) => t.decode(&ids[..end]).unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = CharTokenizer;
        let ids = t.encode("17+25-8=42|34").expect("known chars");
        assert_eq!(t.decode(&ids), "17+25-8=42|34");
        let mut with_eos = ids.clone();
        with_eos.extend([EOS, 5, 6]);
        assert_eq!(t.decode(&with_eos), "17+25-8=42|34");
        assert_eq!(t.encode("a"), None);
        assert_eq!(t.vocab_size(), 23);
        assert_eq!(t.decode(&t.encode("4,6,3>21:(4*6)-3/1").expect("countdown chars")), "4,6,3>21:(4*6)-3/1");
    }
}
