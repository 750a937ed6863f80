//! SAM3's text-prompt tokenizer: OpenAI CLIP's byte-level BPE, loaded from the `tokenizer.json`
//! (transformers' `CLIPTokenizerFast` format) that ships with the SAM3 checkpoint directory.
//!
//! The real vocabulary (49,408 entries: 256 byte symbols, their `</w>` variants, 48,894 merges,
//! `<|startoftext|>` = 49406 and `<|endoftext|>` = 49407) comes with the checkpoint; nothing is
//! bundled here (the tests use a tiny CLIP-shaped vocabulary under
//! `tests/fixtures/tokenizer/`).
//!
//! Sequence layout (Meta's `tokenizer_ve.py` and the HF processor agree on the valid part):
//! `[SOT] tokens… [EOT]`, truncated to `context_length` with the last kept token forced to
//! `[EOT]` (Meta's behaviour; the HF processor does not truncate), then right-padded to
//! `context_length` with `[EOT]` (HF's pad token; Meta pads with id 0). The mask is 1 on
//! `[SOT]…[EOT]` and 0 on padding. Because the text transformer is causal and pads are masked
//! downstream, the pad id never changes the features of valid tokens.
//!
//! Text cleaning: Meta's "lower" mode runs ftfy, unescapes HTML entities twice, collapses
//! whitespace, strips and lower-cases. Here: HTML unescape (named entities `&amp; &lt; &gt;
//! &quot; &apos; &nbsp;` and numeric `&#N;`/`&#xH;`) twice, whitespace collapse + strip and
//! lower-casing; the tokenizer.json normalizer then applies NFC, whitespace collapse and
//! lower-casing again (idempotent). ftfy's mojibake repair is not reproduced (it only matters
//! for broken encodings).

use std::path::{Path, PathBuf};

/// The start-of-text special token.
pub const SOT_TOKEN: &str = "<|startoftext|>";
/// The end-of-text special token (also HF's pad token).
pub const EOT_TOKEN: &str = "<|endoftext|>";
/// SAM3's text context length (the positional table has 32 rows).
pub const DEFAULT_CONTEXT_LENGTH: usize = 32;

/// Why a tokenizer could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.json` is not in the directory.
    #[error(
        "{path} not found: SAM3 prompts need the CLIP tokenizer that ships with the checkpoint. \
         Put the checkpoint's tokenizer.json (e.g. from the hub repo facebook/sam3, next to \
         config.json and model.safetensors) into {dir}"
    )]
    Missing {
        /// The file looked for.
        path: PathBuf,
        /// The directory searched.
        dir: PathBuf,
    },
    /// The file exists but cannot be used.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The tokenizer's ids do not fit the model's token embedding table.
    #[error(
        "tokenizer.json has {tokenizer} tokens but the model's text vocab_size is {model}: the tokenizer \
         does not belong to this model (use the tokenizer.json that ships with the checkpoint)"
    )]
    Vocab {
        /// Tokens of the tokenizer (special tokens included).
        tokenizer: usize,
        /// `text_config.vocab_size`.
        model: usize,
    },
    /// Tokenization itself failed.
    #[error("cannot tokenize {text:?}: {reason}")]
    Encode {
        /// The prompt.
        text: String,
        /// The tokenizer's error.
        reason: String,
    },
}

/// CLIP BPE tokenizer producing fixed-length SAM3 prompt sequences.
pub struct PromptTokenizer {
    inner: tokenizers::Tokenizer,
    sot: u32,
    eot: u32,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("sot", &self.sot)
            .field("eot", &self.eot)
            .finish()
    }
}

impl PromptTokenizer {
    /// Load `dir/tokenizer.json` (a model directory or a directory holding just the tokenizer).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(TokenizerError::Missing { path, dir: dir.to_path_buf() });
        }
        Self::from_file(&path)
    }

    /// Load a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let invalid = |reason: String| TokenizerError::Invalid { path: path.to_path_buf(), reason };
        let mut inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| invalid(format!("not a loadable tokenizers JSON file: {e}")))?;
        // Truncation and padding are done here, with SAM3's rules; ignore any in the file.
        inner.with_truncation(None).map_err(|e| invalid(format!("cannot disable truncation: {e}")))?;
        inner.with_padding(None);
        let special = |tok: &str| {
            inner.token_to_id(tok).ok_or_else(|| {
                invalid(format!("no {tok} token: this is not a CLIP tokenizer (SAM3 needs CLIP's BPE)"))
            })
        };
        let sot = special(SOT_TOKEN)?;
        let eot = special(EOT_TOKEN)?;
        Ok(PromptTokenizer { inner, sot, eot })
    }

    /// Id of `<|startoftext|>`.
    pub fn sot_id(&self) -> u32 {
        self.sot
    }

    /// Id of `<|endoftext|>` (also the pad id).
    pub fn eot_id(&self) -> u32 {
        self.eot
    }

    /// Check that every id this tokenizer can produce exists in a text model with `vocab_size`
    /// token embeddings (a tokenizer from another model would index past the table).
    pub fn check_model_vocab(&self, vocab_size: usize) -> Result<(), TokenizerError> {
        let n = self.vocab_size();
        let max_id = self.sot.max(self.eot) as usize;
        if n > vocab_size || max_id >= vocab_size {
            return Err(TokenizerError::Vocab { tokenizer: n, model: vocab_size });
        }
        Ok(())
    }

    /// Vocabulary size including special tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// BPE ids of the cleaned text, without special tokens.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let cleaned = clean_text(text);
        let enc = self
            .inner
            .encode(cleaned.as_str(), false)
            .map_err(|e| TokenizerError::Encode { text: text.to_string(), reason: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// `(ids, mask)` of length `context_length`: `[SOT] tokens [EOT]` truncated (last kept token
    /// forced to `[EOT]`) and padded with `[EOT]`; mask 1 = valid, 0 = padding.
    pub fn try_encode(
        &self,
        text: &str,
        context_length: usize,
    ) -> Result<(Vec<u32>, Vec<u32>), TokenizerError> {
        let tokens = self.tokenize(text)?;
        Ok(self.frame(&tokens, context_length))
    }

    /// [`Self::try_encode`], infallible: BPE with an unknown token over a byte-level alphabet
    /// cannot fail on any UTF-8 input; should the tokenizer still report an error, it is logged
    /// and the prompt becomes `[SOT][EOT]` (the empty prompt).
    pub fn encode(&self, text: &str, context_length: usize) -> (Vec<u32>, Vec<u32>) {
        match self.try_encode(text, context_length) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("{e}; using the empty prompt");
                self.frame(&[], context_length)
            }
        }
    }

    /// How `prompts` fit a context of `context_length` tokens: the ones cut short (with their
    /// token count, start and end tokens included), and the pairs that become the same ids
    /// (cut short alike, or spelt apart only in what the tokenizer ignores): the model sees
    /// one prompt where the data has two.
    pub fn prompt_fit(&self, prompts: &[String], context_length: usize) -> PromptFit {
        let mut fit = PromptFit::default();
        let mut seen: Vec<(&String, Vec<u32>)> = Vec::new();
        for p in prompts {
            let tokens = self.tokenize(p).unwrap_or_default();
            if tokens.len() + 2 > context_length {
                fit.truncated.push((p.clone(), tokens.len() + 2));
            }
            let ids = self.frame(&tokens, context_length).0;
            match seen.iter().find(|(_, other)| *other == ids) {
                Some((q, _)) if *q != p => fit.same.push(((*q).clone(), p.clone())),
                Some(_) => {}
                None => seen.push((p, ids)),
            }
        }
        fit
    }

    /// Frame BPE ids as a fixed-length SAM3 sequence.
    fn frame(&self, tokens: &[u32], context_length: usize) -> (Vec<u32>, Vec<u32>) {
        let mut ids = Vec::with_capacity(tokens.len() + 2);
        ids.push(self.sot);
        ids.extend_from_slice(tokens);
        ids.push(self.eot);
        if ids.len() > context_length {
            ids.truncate(context_length);
            if let Some(last) = ids.last_mut() {
                *last = self.eot;
            }
        }
        let valid = ids.len();
        ids.resize(context_length, self.eot);
        let mut mask = vec![1u32; valid];
        mask.resize(context_length, 0);
        (ids, mask)
    }
}

/// Meta's `basic_clean` + `whitespace_clean` + lower-casing (without ftfy; see the module doc).
pub fn clean_text(text: &str) -> String {
    let unescaped = html_unescape(&html_unescape(text));
    unescaped.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase()
}

/// A minimal `html.unescape`: the common named entities and numeric character references.
fn html_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('&') {
        out.push_str(&rest[..pos]);
        let tail = &rest[pos..];
        let (decoded, used) = decode_entity(tail);
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &tail[used..];
            }
            None => {
                out.push('&');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Decode one entity at the start of `s` (which begins with '&'): the char and the bytes used.
fn decode_entity(s: &str) -> (Option<char>, usize) {
    let Some(end) = s[1..].find(';').map(|e| e + 1) else { return (None, 0) };
    if end > 12 {
        return (None, 0);
    }
    let body = &s[1..end];
    let c = if let Some(num) = body.strip_prefix('#') {
        let v = if let Some(hex) = num.strip_prefix('x').or_else(|| num.strip_prefix('X')) {
            u32::from_str_radix(hex, 16).ok()
        } else {
            num.parse::<u32>().ok()
        };
        v.and_then(char::from_u32)
    } else {
        match body {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some('\u{a0}'),
            _ => None,
        }
    };
    (c, end + 1)
}

/// What [`PromptTokenizer::prompt_fit`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PromptFit {
    /// Prompts longer than the context, with their token counts.
    pub truncated: Vec<(String, usize)>,
    /// Pairs of prompts the model cannot tell apart.
    pub same: Vec<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PromptTokenizer {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tokenizer"));
        PromptTokenizer::from_dir(dir).expect("fixture tokenizer loads")
    }

    // Expected ids were produced by transformers' CLIPTokenizer on the same vocabulary
    // (tests/fixtures/tokenizer/generate.py prints them): SOT 526, EOT 527.

    #[test]
    fn places_sot_eot_and_pads() {
        let t = fixture();
        assert_eq!((t.sot_id(), t.eot_id(), t.vocab_size()), (526, 527, 528));
        let (ids, mask) = t.encode("a red car", 8);
        assert_eq!(ids, vec![526, 320, 513, 515, 527, 527, 527, 527]);
        assert_eq!(mask, vec![1, 1, 1, 1, 1, 0, 0, 0]);
    }

    #[test]
    fn lower_cases_and_cleans_whitespace() {
        let t = fixture();
        let (ids, mask) = t.encode("  A  Photo\tof THE Dog!\n", 8);
        assert_eq!(ids, vec![526, 320, 525, 521, 520, 518, 256, 527]);
        assert_eq!(mask, vec![1; 8]);
        assert_eq!(t.encode("the cat's", 8).0, vec![526, 520, 516, 6, 338, 527, 527, 527]);
        // HTML entities are unescaped (twice, as Meta's basic_clean does).
        assert_eq!(t.encode("red &amp;amp; car", 8).0, t.encode("red & car", 8).0);
        assert_eq!(clean_text(" Red&nbsp;CAR &#65;&#x42; "), "red car ab");
    }

    /// Prompts cut short by the context are named with their length; two that differ only
    /// past the cut, or only in case and spacing, are one prompt to the model.
    #[test]
    fn prompts_that_do_not_fit_or_read_alike_are_found() {
        let t = fixture();
        let prompts: Vec<String> =
            ["red car", "red car red car red car red", "red car red car red car car", "Red  CAR", "the dog"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let fit = t.prompt_fit(&prompts, 8);
        assert_eq!(
            fit.truncated.iter().map(|(p, n)| (p.as_str(), *n)).collect::<Vec<_>>(),
            [("red car red car red car red", 9), ("red car red car red car car", 9)]
        );
        assert_eq!(
            fit.same,
            [(prompts[1].clone(), prompts[2].clone()), (prompts[0].clone(), prompts[3].clone())]
        );
        assert_eq!(t.prompt_fit(&prompts[..1], 8), PromptFit::default());
    }

    #[test]
    fn truncates_with_eot_last() {
        let t = fixture();
        let (ids, mask) = t.encode("red car red car red car red car", 8);
        assert_eq!(ids, vec![526, 513, 515, 513, 515, 513, 515, 527]);
        assert_eq!(mask, vec![1; 8]);
        assert_eq!(t.encode("red car", 1), (vec![527], vec![1]));
        let (ids, mask) = t.encode("", 4);
        assert_eq!((ids, mask), (vec![526, 527, 527, 527], vec![1, 1, 0, 0]));
    }

    #[test]
    fn vocab_larger_than_the_model_is_refused() {
        let t = fixture();
        assert!(t.check_model_vocab(528).is_ok() && t.check_model_vocab(49408).is_ok());
        let e = t.check_model_vocab(128).unwrap_err().to_string();
        assert!(
            e.contains("tokenizer.json has 528 tokens but the model's text vocab_size is 128")
                && e.contains("does not belong to this model"),
            "{e}"
        );
    }

    #[test]
    fn missing_file_names_the_fix() {
        let e = PromptTokenizer::from_dir(Path::new("/nonexistent/model")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/model/tokenizer.json") && e.contains("checkpoint"), "{e}");
    }
}
