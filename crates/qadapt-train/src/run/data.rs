//! A run's data: examples read from JSONL or plain text, split into training and held-out
//! sets, tokenized with the model's tokenizer (a tokenizer error stops the run, it never yields
//! an empty example) and framed as `[bos] prompt completion [eos]`, with the loss on the
//! completion and the eos (see [`crate::dataset::tokenize`]).

use std::path::Path;

use super::{Config, Error, Observer};
use crate::dataset::{self, Example, Framing, Overlong, Sequence, Strictness};

/// bos/eos ids: config.json's `bos_token_id`/`eos_token_id` (a number or the first of a list),
/// else the tokenizer's `<s>`/`</s>`, else none.
pub fn framing(model_dir: &Path, tok: &tokenizers::Tokenizer) -> Framing {
    let cfg: Option<serde_json::Value> = std::fs::read_to_string(model_dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let id = |key: &str, token: &str| {
        cfg.as_ref()
            .and_then(|c| c.get(key))
            .and_then(|v| v.as_u64().or_else(|| v.get(0).and_then(|x| x.as_u64())))
            .map(|v| v as u32)
            .or_else(|| tok.token_to_id(token))
    };
    Framing {
        bos: id("bos_token_id", "<s>"),
        eos: id("eos_token_id", "</s>"),
    }
}

/// Loaded and tokenized data.
#[derive(Debug, Clone)]
pub struct Data {
    /// Training sequences.
    pub train: Vec<Sequence>,
    /// Held-out sequences.
    pub heldout: Vec<Sequence>,
    /// Whether every training example is prompt/completion (exact match means something).
    pub completions: bool,
}

fn read_examples(path: &Path, strict: bool, obs: &mut dyn Observer) -> Result<Vec<Example>, Error> {
    let strictness = if strict {
        Strictness::Strict
    } else {
        Strictness::Skip
    };
    let loaded = dataset::load(path, strictness)?;
    if !loaded.skipped.is_empty() {
        for s in loaded.skipped.iter().take(5) {
            obs.warning(&format!(
                "{}:{}: {} (skipped)",
                path.display(),
                s.line,
                s.reason
            ));
        }
        obs.warning(&format!(
            "{}: {} malformed line(s) skipped (--strict stops at the first)",
            path.display(),
            loaded.skipped.len()
        ));
    }
    Ok(loaded.examples)
}

fn tokenize_all(
    what: &str,
    examples: &[Example],
    tok: &tokenizers::Tokenizer,
    framing: Framing,
    max_len: usize,
    obs: &mut dyn Observer,
) -> Result<Vec<Sequence>, Error> {
    let (seqs, stats) = dataset::tokenize(examples, tok, framing, max_len, Overlong::Skip)
        .map_err(|e| Error::Data(format!("{what}: {e}")))?;
    if stats.dropped > 0 {
        obs.warning(&format!(
            "{what}: {} example(s) longer than {max_len} tokens (or with nothing to learn) skipped",
            stats.dropped
        ));
    }
    if seqs.is_empty() {
        return Err(Error::Data(format!(
            "{what}: no usable example (all {} skipped)",
            examples.len()
        )));
    }
    Ok(seqs)
}

/// Reads, splits and tokenizes the run's data: `data` and `heldout_data` of the config, or the
/// default task's `train.jsonl` and `heldout.jsonl` in `task` when no data is set. Without a
/// held-out file, `heldout` examples (at most a fifth, at least one) are split off `data` by a
/// seeded shuffle. Sequences longer than `max_len` are skipped with a warning.
pub fn load(
    c: &Config,
    task: Option<&Path>,
    tok: &tokenizers::Tokenizer,
    framing: Framing,
    max_len: usize,
    obs: &mut dyn Observer,
) -> Result<Data, Error> {
    let (train_ex, held_ex) = match (&c.data, task) {
        // The default task's own held-out file unless `heldout_data` replaces it.
        (None, Some(dir)) => (
            read_examples(&dir.join("train.jsonl"), c.strict, obs)?,
            read_examples(
                c.heldout_data
                    .as_deref()
                    .unwrap_or(&dir.join("heldout.jsonl")),
                c.strict,
                obs,
            )?,
        ),
        (None, None) => {
            return Err(Error::Config(
                "no training data: set `data` (or give the run a default task)".into(),
            ));
        }
        (Some(data), _) => {
            let all = read_examples(data, c.strict, obs)?;
            match &c.heldout_data {
                None => {
                    if all.len() < 2 {
                        return Err(Error::Data(format!(
                            "{}: {} example(s); need at least 2 to hold one out (or give \
                             --heldout-data)",
                            data.display(),
                            all.len()
                        )));
                    }
                    let n = c.heldout.min(all.len() / 5).max(1);
                    dataset::split_heldout(&all, n, c.seed)
                }
                Some(h) => (all, read_examples(h, c.strict, obs)?),
            }
        }
    };
    let completions = train_ex
        .iter()
        .all(|e| matches!(e, Example::PromptCompletion { .. }));
    Ok(Data {
        train: tokenize_all("training data", &train_ex, tok, framing, max_len, obs)?,
        heldout: tokenize_all("held-out data", &held_ex, tok, framing, max_len, obs)?,
        completions,
    })
}
