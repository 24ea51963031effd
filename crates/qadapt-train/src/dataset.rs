//! Training data: reading examples from JSONL or plain text, turning them into token sequences
//! with a loss mask, and a deterministic held-out split.
//!
//! Input formats (chosen by content, not by extension):
//! - JSON Lines: one object per line with `prompt` and `completion` strings (the loss covers the
//!   completion only) or a `text` string (the loss covers every token). Blank lines are ignored.
//!   A line that is not such an object is reported with its file and line number, then skipped
//!   ([`Strictness::Skip`], the count is kept) or fatal ([`Strictness::Strict`]).
//! - Plain text: documents separated by blank lines, each a `text` example.
//!
//! A sequence is `[bos] prompt completion [eos]`; the mask marks the positions whose token is a
//! training target (the model predicts token t from tokens < t, so the loss at t uses `mask[t]`).

use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;

/// One training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Example {
    /// Train on every token.
    Text(String),
    /// Train on the completion only.
    PromptCompletion {
        /// Context the model sees without loss.
        prompt: String,
        /// What the model learns to produce.
        completion: String,
    },
}

/// What to do with a malformed line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strictness {
    /// Report it, count it, go on.
    #[default]
    Skip,
    /// Stop with an error naming the file and line.
    Strict,
}

/// What to do with a sequence longer than the model's context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlong {
    /// Keep the first `max_len` tokens.
    Truncate,
    /// Drop the example (counted).
    #[default]
    Skip,
    /// Stop with an error.
    Error,
}

/// Errors of the data pipeline, each naming the file (and line) at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A malformed line under [`Strictness::Strict`].
    #[error("{file}:{line}: {reason}")]
    Malformed {
        /// The file.
        file: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// No usable example.
    #[error("{file}: no usable example ({skipped} malformed line(s) skipped)")]
    Empty {
        /// The file.
        file: PathBuf,
        /// Lines skipped as malformed.
        skipped: usize,
    },
    /// The tokenizer failed on an example.
    #[error("example {index}: the tokenizer failed: {reason}")]
    Tokenizer {
        /// 0-based example index.
        index: usize,
        /// The tokenizer's error.
        reason: String,
    },
    /// A sequence longer than the context under [`Overlong::Error`].
    #[error("example {index} has {len} tokens, more than the context of {max_len}")]
    TooLong {
        /// 0-based example index.
        index: usize,
        /// Its length in tokens.
        len: usize,
        /// The context length.
        max_len: usize,
    },
}

/// A malformed line that was skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    pub reason: String,
}

/// The examples of a file and what was skipped on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The file.
    pub file: PathBuf,
    /// Usable examples, in file order.
    pub examples: Vec<Example>,
    /// Malformed lines (empty under [`Strictness::Strict`]).
    pub skipped: Vec<Skipped>,
}

/// The longest line [`load`] and [`read_text`] accept, in bytes (8 MiB): a longer one is refused
/// before it is read whole.
pub const MAX_LINE_BYTES: usize = 8 << 20;

/// Reads a text file whose every line is at most [`MAX_LINE_BYTES`] long; a longer line (or
/// one that is not UTF-8) is a [`DataError::Malformed`] naming the file and line, found without
/// reading that line whole.
pub fn read_text(path: &Path) -> Result<String, DataError> {
    use std::io::{BufRead, Read};
    let io = |source| DataError::Io {
        file: path.to_path_buf(),
        source,
    };
    let mut r = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let mut text = String::new();
    let mut buf = Vec::new();
    for line in 1.. {
        buf.clear();
        let n = r
            .by_ref()
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(io)?;
        if n == 0 {
            break;
        }
        let body = buf.strip_suffix(b"\n").unwrap_or(&buf);
        let body = body.strip_suffix(b"\r").unwrap_or(body);
        if body.len() > MAX_LINE_BYTES {
            return Err(DataError::Malformed {
                file: path.to_path_buf(),
                line,
                reason: format!("a line longer than {MAX_LINE_BYTES} bytes (not read further)"),
            });
        }
        let s = std::str::from_utf8(&buf).map_err(|e| DataError::Malformed {
            file: path.to_path_buf(),
            line,
            reason: format!("not UTF-8 ({e})"),
        })?;
        text.push_str(s);
    }
    Ok(text)
}

/// Reads `path` (see the module docs for the formats); lines are bounded by
/// [`MAX_LINE_BYTES`].
pub fn load(path: &Path, strictness: Strictness) -> Result<Loaded, DataError> {
    let text = read_text(path)?;
    parse(path, &text, strictness)
}

/// [`load`] on text already in memory (`path` names it in messages).
pub fn parse(path: &Path, text: &str, strictness: Strictness) -> Result<Loaded, DataError> {
    // A UTF-8 byte order mark (Windows editors write one) is not part of the first line.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let jsonl = first.trim_start().starts_with('{');
    let mut examples = Vec::new();
    let mut skipped = Vec::new();
    if jsonl {
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match parse_line(line) {
                Ok(e) => examples.push(e),
                Err(reason) => match strictness {
                    Strictness::Strict => {
                        return Err(DataError::Malformed {
                            file: path.to_path_buf(),
                            line: i + 1,
                            reason,
                        });
                    }
                    Strictness::Skip => skipped.push(Skipped {
                        line: i + 1,
                        reason,
                    }),
                },
            }
        }
    } else {
        let mut doc = String::new();
        for line in text.lines().chain(std::iter::once("")) {
            if line.trim().is_empty() {
                if !doc.trim().is_empty() {
                    examples.push(Example::Text(
                        std::mem::take(&mut doc).trim_end().to_string(),
                    ));
                }
                doc.clear();
            } else {
                if !doc.is_empty() {
                    doc.push('\n');
                }
                doc.push_str(line);
            }
        }
    }
    if examples.is_empty() {
        return Err(DataError::Empty {
            file: path.to_path_buf(),
            skipped: skipped.len(),
        });
    }
    Ok(Loaded {
        file: path.to_path_buf(),
        examples,
        skipped,
    })
}

fn parse_line(line: &str) -> Result<Example, String> {
    let v: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("not valid JSON ({e})"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    let field = |k: &str| -> Result<Option<String>, String> {
        match obj.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(format!("field {k:?} is not a string")),
        }
    };
    match (field("prompt")?, field("completion")?, field("text")?) {
        (Some(prompt), Some(completion), None) => {
            if completion.is_empty() {
                return Err("empty completion".into());
            }
            Ok(Example::PromptCompletion { prompt, completion })
        }
        (None, None, Some(text)) if !text.trim().is_empty() => Ok(Example::Text(text)),
        (None, None, Some(_)) => Err("empty text".into()),
        (Some(_), None, _) => Err("prompt without completion".into()),
        (None, Some(_), _) => Err("completion without prompt".into()),
        (Some(_), Some(_), Some(_)) => Err("both text and prompt/completion".into()),
        (None, None, None) => Err("no \"text\" nor \"prompt\"/\"completion\" field".into()),
    }
}

/// Why a tokenizer failed on a text.
pub type TokenizeError = Box<dyn std::error::Error + Send + Sync>;

/// Text to token ids, implemented by the tokenizer the model was trained with.
pub trait Tokenize {
    /// Ids of `text`, without special tokens.
    fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError>;
}

impl Tokenize for tokenizers::Tokenizer {
    fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        Ok(std::ops::Deref::deref(self)
            .encode(text, false)?
            .get_ids()
            .to_vec())
    }
}

/// A tokenized example: ids and, per position, whether its token is a training target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequence {
    /// Token ids, `[bos] prompt completion [eos]`.
    pub ids: Vec<u32>,
    /// `mask[t]`: the loss includes predicting `ids[t]` from `ids[..t]`.
    pub mask: Vec<bool>,
}

/// Special tokens framing every sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Framing {
    /// Prepended when set.
    pub bos: Option<u32>,
    /// Appended when set (and a target: the model learns to stop).
    pub eos: Option<u32>,
}

/// What tokenization dropped or cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenizeStats {
    /// Examples longer than the context that were dropped.
    pub dropped: usize,
    /// Examples longer than the context that were truncated.
    pub truncated: usize,
}

/// Tokenizes `examples` into sequences of at most `max_len` tokens.
pub fn tokenize(
    examples: &[Example],
    tok: &impl Tokenize,
    framing: Framing,
    max_len: usize,
    overlong: Overlong,
) -> Result<(Vec<Sequence>, TokenizeStats), DataError> {
    let mut out = Vec::with_capacity(examples.len());
    let mut stats = TokenizeStats::default();
    for (index, e) in examples.iter().enumerate() {
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        if let Some(b) = framing.bos {
            ids.push(b);
            mask.push(false);
        }
        let (context, target) = match e {
            Example::Text(t) => ("", t.as_str()),
            Example::PromptCompletion { prompt, completion } => {
                (prompt.as_str(), completion.as_str())
            }
        };
        for (text, learn) in [(context, false), (target, true)] {
            if !text.is_empty() {
                let t = tok.encode(text).map_err(|e| DataError::Tokenizer {
                    index,
                    reason: e.to_string(),
                })?;
                mask.extend(std::iter::repeat_n(learn, t.len()));
                ids.extend(t);
            }
        }
        if let Some(eos) = framing.eos {
            ids.push(eos);
            mask.push(true);
        }
        // The first position has no context to predict it from.
        if let Some(m) = mask.first_mut() {
            *m = false;
        }
        if ids.len() > max_len {
            match overlong {
                Overlong::Error => {
                    return Err(DataError::TooLong {
                        index,
                        len: ids.len(),
                        max_len,
                    });
                }
                Overlong::Skip => {
                    stats.dropped += 1;
                    continue;
                }
                Overlong::Truncate => {
                    ids.truncate(max_len);
                    mask.truncate(max_len);
                    stats.truncated += 1;
                }
            }
        }
        if mask.iter().any(|&m| m) {
            out.push(Sequence { ids, mask });
        } else {
            stats.dropped += 1;
        }
    }
    Ok((out, stats))
}

/// Splits `items` into (train, held-out) with `heldout` items chosen by a seeded shuffle
/// (deterministic for a seed; the order inside each part follows the input).
pub fn split_heldout<T: Clone>(items: &[T], heldout: usize, seed: u64) -> (Vec<T>, Vec<T>) {
    let n = items.len();
    let heldout = heldout.min(n);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut crate::rng::stream(seed));
    let mut is_held = vec![false; n];
    for &i in &order[..heldout] {
        is_held[i] = true;
    }
    let train = items
        .iter()
        .zip(&is_held)
        .filter(|(_, h)| !**h)
        .map(|(x, _)| x.clone())
        .collect();
    let held = items
        .iter()
        .zip(&is_held)
        .filter(|(_, h)| **h)
        .map(|(x, _)| x.clone())
        .collect();
    (train, held)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Bytes;
    impl Tokenize for Bytes {
        fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
            Ok(text.bytes().map(u32::from).collect())
        }
    }

    fn p() -> &'static Path {
        Path::new("data.jsonl")
    }

    /// A tokenizer that fails on any text holding a `!`.
    struct Picky;
    impl Tokenize for Picky {
        fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
            if text.contains('!') {
                return Err("no exclamations".into());
            }
            Bytes.encode(text)
        }
    }

    #[test]
    fn a_tokenizer_error_stops_tokenization_naming_the_example() {
        let ex = [
            Example::Text("fine".into()),
            Example::PromptCompletion {
                prompt: "a".into(),
                completion: "b!".into(),
            },
        ];
        let err = tokenize(&ex, &Picky, Framing::default(), 64, Overlong::Skip).unwrap_err();
        assert!(
            matches!(&err, DataError::Tokenizer { index: 1, reason } if reason == "no exclamations"),
            "{err}"
        );
    }

    #[test]
    fn a_byte_order_mark_does_not_turn_jsonl_into_text() {
        let text = "\u{feff}{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"text\": \"c\"}\n";
        let l = parse(p(), text, Strictness::Strict).unwrap();
        assert_eq!(
            l.examples,
            vec![
                Example::PromptCompletion {
                    prompt: "a".into(),
                    completion: "b".into()
                },
                Example::Text("c".into())
            ]
        );
    }

    #[test]
    fn jsonl_with_malformed_lines_reports_file_and_line() {
        let text = "{\"prompt\": \"2+2=\", \"completion\": \"4\"}\n\n{\"text\": \"hello\"}\nnot json\n{\"prompt\": \"x\"}\n[1]\n{\"text\": 3}\n";
        let l = parse(p(), text, Strictness::Skip).unwrap();
        assert_eq!(
            l.examples,
            vec![
                Example::PromptCompletion {
                    prompt: "2+2=".into(),
                    completion: "4".into()
                },
                Example::Text("hello".into())
            ]
        );
        let lines: Vec<usize> = l.skipped.iter().map(|s| s.line).collect();
        assert_eq!(lines, [4, 5, 6, 7]);
        assert!(l.skipped[1].reason.contains("prompt without completion"));
        match parse(p(), text, Strictness::Strict) {
            Err(e @ DataError::Malformed { line: 4, .. }) => {
                assert!(
                    e.to_string().starts_with("data.jsonl:4: not valid JSON"),
                    "{e}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn empty_and_all_malformed_files_are_errors() {
        assert!(matches!(
            parse(p(), "", Strictness::Skip),
            Err(DataError::Empty { skipped: 0, .. })
        ));
        assert!(matches!(
            parse(p(), "\n  \n", Strictness::Skip),
            Err(DataError::Empty { .. })
        ));
        let e = parse(p(), "{\"a\": 1}\n{\"b\": 2}\n", Strictness::Skip).unwrap_err();
        assert_eq!(
            e.to_string(),
            "data.jsonl: no usable example (2 malformed line(s) skipped)"
        );
    }

    #[test]
    fn plain_text_splits_on_blank_lines() {
        let l = parse(
            Path::new("a.txt"),
            "one\ntwo\n\n\nthree\n",
            Strictness::Strict,
        )
        .unwrap();
        assert_eq!(
            l.examples,
            vec![
                Example::Text("one\ntwo".into()),
                Example::Text("three".into())
            ]
        );
    }

    #[test]
    fn masks_cover_the_completion_and_eos_only() {
        let ex = [
            Example::PromptCompletion {
                prompt: "ab".into(),
                completion: "c".into(),
            },
            Example::Text("xy".into()),
        ];
        let f = Framing {
            bos: Some(1),
            eos: Some(2),
        };
        let (seqs, stats) = tokenize(&ex, &Bytes, f, 16, Overlong::Error).unwrap();
        assert_eq!(seqs[0].ids, [1, 97, 98, 99, 2]);
        assert_eq!(seqs[0].mask, [false, false, false, true, true]);
        assert_eq!(seqs[1].mask, [false, true, true, true]);
        assert_eq!(stats, TokenizeStats::default());
    }

    #[test]
    fn overlong_sequences_follow_the_policy() {
        let ex = [Example::Text("abcdefgh".into()), Example::Text("ab".into())];
        let f = Framing {
            bos: Some(1),
            eos: None,
        };
        let (s, st) = tokenize(&ex, &Bytes, f, 4, Overlong::Skip).unwrap();
        assert_eq!((s.len(), st.dropped), (1, 1));
        let (s, st) = tokenize(&ex, &Bytes, f, 4, Overlong::Truncate).unwrap();
        assert_eq!((s[0].ids.len(), st.truncated), (4, 1));
        assert!(matches!(
            tokenize(&ex, &Bytes, f, 4, Overlong::Error),
            Err(DataError::TooLong {
                index: 0,
                len: 9,
                max_len: 4
            })
        ));
    }

    #[test]
    fn heldout_split_is_deterministic_and_disjoint() {
        let items: Vec<u32> = (0..100).collect();
        let (a, b) = split_heldout(&items, 20, 7);
        assert_eq!((a.len(), b.len()), (80, 20));
        assert_eq!(split_heldout(&items, 20, 7), (a.clone(), b.clone()));
        assert_ne!(split_heldout(&items, 20, 8).1, b);
        let mut all: Vec<u32> = a.iter().chain(&b).copied().collect();
        all.sort();
        assert_eq!(all, items);
    }
}
