//! A character-level tokenizer for the built-in tasks.

use serde::{Deserialize, Serialize};

/// Padding id.
pub const PAD: u32 = 0;
/// End-of-sequence id.
pub const EOS: u32 = 1;
const CHARS: &str = "0123456789+-=|";

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
        assert_eq!(t.vocab_size(), 16);
    }
}
