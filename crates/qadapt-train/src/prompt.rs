//! Prompt tuning and prefix tuning (soft prompts), in HF PEFT's format.
//!
//! **Prompt tuning** prepends `P` trainable embeddings `E [P, C]` to every sequence's input
//! embeddings; the model then runs on `P + T` positions (RoPE positions `0..P+T`) and its logits
//! include the virtual positions, as PEFT returns them. PEFT's loss gives the virtual positions the
//! label -100, so after the causal shift the last virtual position predicts the first real token:
//! targets `[None; P-1] ++ ids ++ [None]` per sequence ([`prompt_targets`]). The gradient of `E` is
//! the input-embedding gradient of the virtual rows, summed over the batch.
//!
//! **Prefix tuning** gives every layer `P` extra key and value rows that every query sees (see
//! [`crate::prefix_attention`]). PEFT stores them as one tensor `prompt_embeddings
//! [P, layers * 2 * kv_heads * D]` (after the optional reparameterization MLP): column block
//! `2 l` is layer l's keys and `2 l + 1` its values, each `[kv_heads, D]`. The prefix enters the
//! cache as past keys and values, so the keys get no RoPE, and the real tokens' positions start
//! at `P` (transformers' cache position). The logits cover only the real tokens and the labels are
//! the plain causal ones.
//!
//! Both are read from and written to `adapter_config.json` (peft_type "PROMPT_TUNING" or
//! "PREFIX_TUNING") + `adapter_model.safetensors` with the single key `prompt_embeddings`.

use std::path::Path;

use qadapt::Result;
use qadapt::ops::linear::{self, LinearShape};
use qadapt::ops::{Accumulate, Real};
use rand::Rng;
use serde_json::{Value, json};

use crate::config::LlamaConfig;
use crate::peft_io::{read_json, read_tensors, usize_field, write_adapter};
use crate::rng::{stream, uniform};
use crate::{format_err, invalid};

/// The key of the soft prompt in `adapter_model.safetensors`.
pub const PROMPT_KEY: &str = "prompt_embeddings";

/// How a prompt-tuning adapter starts.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInit {
    /// Uniform in `±scale`, reproducible from the seed.
    Random {
        /// Seed.
        seed: u64,
        /// Half-width.
        scale: f64,
    },
    /// Copies of the embedding rows of these token ids, cycled to `P` rows (PEFT's "TEXT" init
    /// with the ids of a tokenized text, or "SAMPLE_VOCAB" with sampled ids).
    FromTokens(Vec<u32>),
}

/// A prompt-tuning adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTuning<T> {
    /// P.
    pub num_virtual_tokens: usize,
    /// `[P, C]`.
    pub embeddings: Vec<T>,
}

/// A prefix-tuning adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixTuning<T> {
    /// P.
    pub num_virtual_tokens: usize,
    /// `[P, layers * 2 * kv_dim]` (PEFT's `prompt_embeddings`).
    pub values: Vec<T>,
}

/// The causal targets of a prompt-tuned batch of `P + seq` positions (see the module doc).
pub fn prompt_targets(ids: &[u32], batch: usize, seq: usize, p: usize) -> Vec<Option<u32>> {
    let mut out = Vec::with_capacity(batch * (p + seq));
    for s in ids.chunks_exact(seq).take(batch) {
        out.extend((1..p).map(|_| None));
        if p > 0 {
            out.push(Some(s[0]));
        }
        out.extend(s[1..].iter().map(|&t| Some(t)));
        out.push(None);
    }
    out
}

impl PromptInit {
    /// PEFT's "TEXT" init: the ids of `text` as the tokenizer encodes it with its special tokens
    /// (what `tokenizer(text)["input_ids"]` gives), truncated or repeated to the prompt length by
    /// [`PromptTuning::new`].
    pub fn from_text(tokenizer: &tokenizers::Tokenizer, text: &str) -> Result<PromptInit> {
        let enc = tokenizer
            .encode(text, true)
            .map_err(|e| invalid("prompt tuning", format!("tokenizing the init text: {e}")))?;
        Ok(PromptInit::FromTokens(enc.get_ids().to_vec()))
    }

    /// PEFT's "SAMPLE_VOCAB" init: `p` ids drawn uniformly from the vocabulary with `seed`.
    pub fn sample_vocab(model: &LlamaConfig, p: usize, seed: u64) -> PromptInit {
        let mut s = stream(seed);
        PromptInit::FromTokens(
            (0..p)
                .map(|_| s.random_range(0..model.vocab_size) as u32)
                .collect(),
        )
    }
}

impl<T: Real> PromptTuning<T> {
    /// Whether the soft prompt has tokens and `[P, hidden]` embeddings for `model`.
    pub fn fits(&self, model: &LlamaConfig) -> bool {
        self.num_virtual_tokens > 0
            && self.embeddings.len() == self.num_virtual_tokens * model.hidden_size
    }

    /// A new soft prompt of `p` tokens for `model`; `embed` is the model's embedding table.
    pub fn new(model: &LlamaConfig, embed: &[T], p: usize, init: &PromptInit) -> Result<Self> {
        let c = model.hidden_size;
        if p == 0 {
            return Err(invalid(
                "prompt tuning",
                "num_virtual_tokens must be positive",
            ));
        }
        crate::budget::check_elements(
            &format!("num_virtual_tokens = {p}: the soft prompt"),
            crate::budget::product(&[p, c]),
            std::mem::size_of::<T>(),
        )
        .map_err(|e| invalid("prompt tuning", e))?;
        let embeddings = match init {
            PromptInit::Random { seed, scale } => {
                let mut s = stream(*seed);
                (0..p * c)
                    .map(|_| T::from_f64(scale * uniform(&mut s)))
                    .collect()
            }
            PromptInit::FromTokens(ids) => {
                if ids.is_empty() || ids.iter().any(|&t| t as usize >= model.vocab_size) {
                    return Err(invalid(
                        "prompt tuning",
                        format!(
                            "init token ids must be non-empty and below {}",
                            model.vocab_size
                        ),
                    ));
                }
                (0..p)
                    .flat_map(|i| {
                        let t = ids[i % ids.len()] as usize;
                        embed[t * c..(t + 1) * c].iter().copied()
                    })
                    .collect()
            }
        };
        Ok(PromptTuning {
            num_virtual_tokens: p,
            embeddings,
        })
    }

    /// Writes the adapter in PEFT's layout.
    pub fn save(&self, dir: &Path, model: &LlamaConfig) -> Result<()> {
        let cfg = json!({
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": null,
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": model.hidden_size,
            "num_transformer_submodules": 1,
            "num_attention_heads": model.num_attention_heads,
            "num_layers": model.num_hidden_layers,
            "prompt_tuning_init": "RANDOM",
            "inference_mode": true,
        });
        write_adapter(dir, &cfg, &self.named(model))
    }

    /// `(key, shape, values)`.
    pub fn named(&self, model: &LlamaConfig) -> Vec<(String, Vec<usize>, &[T])> {
        vec![(
            PROMPT_KEY.to_owned(),
            vec![self.num_virtual_tokens, model.hidden_size],
            &self.embeddings,
        )]
    }
}

impl<T: Real> PrefixTuning<T> {
    /// Whether the prefix has tokens and `[P, width]` values for `model` ([`Self::width`]).
    pub fn fits(&self, model: &LlamaConfig) -> bool {
        self.num_virtual_tokens > 0
            && self.values.len() == self.num_virtual_tokens * Self::width(model)
    }

    /// Width of one virtual token's row: `layers * 2 * kv_dim`.
    pub fn width(model: &LlamaConfig) -> usize {
        model.num_hidden_layers * 2 * model.kv_dim()
    }

    /// A prefix of `p` tokens, uniform in `±scale` from `seed`.
    pub fn new(model: &LlamaConfig, p: usize, seed: u64, scale: f64) -> Result<Self> {
        if p == 0 {
            return Err(invalid(
                "prefix tuning",
                "num_virtual_tokens must be positive",
            ));
        }
        crate::budget::check_elements(
            &format!("num_virtual_tokens = {p}: the prefixes"),
            crate::budget::product(&[p, Self::width(model)]),
            std::mem::size_of::<T>(),
        )
        .map_err(|e| invalid("prefix tuning", e))?;
        let mut s = stream(seed);
        Ok(PrefixTuning {
            num_virtual_tokens: p,
            values: (0..p * Self::width(model))
                .map(|_| T::from_f64(scale * uniform(&mut s)))
                .collect(),
        })
    }

    /// Layer `l`'s keys (`which = 0`) or values (`which = 1`), `[P, kv_dim]`.
    pub fn gather(&self, model: &LlamaConfig, l: usize, which: usize) -> Vec<T> {
        let (w, kd) = (Self::width(model), model.kv_dim());
        let at = (2 * l + which) * kd;
        self.values
            .chunks_exact(w)
            .flat_map(|row| row[at..at + kd].iter().copied())
            .collect()
    }

    /// Adds `[P, kv_dim]` gradients of layer `l`'s keys or values into their columns.
    pub fn scatter_add(&mut self, model: &LlamaConfig, l: usize, which: usize, g: &[T]) {
        let (w, kd) = (Self::width(model), model.kv_dim());
        let at = (2 * l + which) * kd;
        for (row, gr) in self.values.chunks_exact_mut(w).zip(g.chunks_exact(kd)) {
            for (x, y) in row[at..at + kd].iter_mut().zip(gr) {
                *x += *y;
            }
        }
    }

    /// Writes the adapter in PEFT's layout (prefix_projection false: the stored values are the
    /// prefix itself).
    pub fn save(&self, dir: &Path, model: &LlamaConfig) -> Result<()> {
        let cfg = json!({
            "peft_type": "PREFIX_TUNING",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": null,
            "num_virtual_tokens": self.num_virtual_tokens,
            "token_dim": model.kv_dim(),
            "encoder_hidden_size": model.kv_dim(),
            "num_transformer_submodules": 1,
            "num_attention_heads": model.num_key_value_heads,
            "num_layers": model.num_hidden_layers,
            "prefix_projection": false,
            "inference_mode": true,
        });
        write_adapter(dir, &cfg, &self.named(model))
    }

    /// `(key, shape, values)`.
    pub fn named(&self, model: &LlamaConfig) -> Vec<(String, Vec<usize>, &[T])> {
        vec![(
            PROMPT_KEY.to_owned(),
            vec![self.num_virtual_tokens, Self::width(model)],
            &self.values,
        )]
    }
}

fn check_common(path: &Path, v: &Value, model: &LlamaConfig, token_dim: usize) -> Result<usize> {
    let p = usize_field(path, v, "num_virtual_tokens")?;
    if p == 0 {
        return Err(format_err(path, "num_virtual_tokens must be positive"));
    }
    for (key, want) in [
        ("token_dim", token_dim),
        ("num_layers", model.num_hidden_layers),
        ("num_transformer_submodules", 1),
    ] {
        if let Some(got) = v.get(key).and_then(Value::as_u64)
            && got as usize != want
        {
            return Err(format_err(
                path,
                format!("{key} is {got}, this model needs {want}"),
            ));
        }
    }
    Ok(p)
}

/// Loads a PEFT prompt-tuning adapter directory.
pub fn load_prompt(dir: &Path, model: &LlamaConfig) -> Result<PromptTuning<f32>> {
    let cfg_path = dir.join("adapter_config.json");
    let v = read_json(&cfg_path)?;
    if v.get("peft_type").and_then(Value::as_str) != Some("PROMPT_TUNING") {
        return Err(format_err(&cfg_path, "peft_type is not \"PROMPT_TUNING\""));
    }
    let p = check_common(&cfg_path, &v, model, model.hidden_size)?;
    let spec = [(PROMPT_KEY.to_owned(), vec![p, model.hidden_size])];
    let mut t = read_tensors(&dir.join("adapter_model.safetensors"), &spec, PROMPT_KEY)?;
    Ok(PromptTuning {
        num_virtual_tokens: p,
        embeddings: t.remove(0),
    })
}

/// Loads a PEFT prefix-tuning adapter directory.
pub fn load_prefix(dir: &Path, model: &LlamaConfig) -> Result<PrefixTuning<f32>> {
    let cfg_path = dir.join("adapter_config.json");
    let v = read_json(&cfg_path)?;
    if v.get("peft_type").and_then(Value::as_str) != Some("PREFIX_TUNING") {
        return Err(format_err(&cfg_path, "peft_type is not \"PREFIX_TUNING\""));
    }
    let p = check_common(&cfg_path, &v, model, model.kv_dim())?;
    let spec = [(
        PROMPT_KEY.to_owned(),
        vec![p, PrefixTuning::<f32>::width(model)],
    )];
    let mut t = read_tensors(&dir.join("adapter_model.safetensors"), &spec, PROMPT_KEY)?;
    Ok(PrefixTuning {
        num_virtual_tokens: p,
        values: t.remove(0),
    })
}

/// Prefix tuning with PEFT's reparameterization (`prefix_projection: true`), for training: the
/// prefix is `tanh(E W1^T + b1) W2^T + b2` with `E [P, kv_dim]`, `W1 [H, kv_dim]`,
/// `W2 [layers * 2 * kv_dim, H]` (PEFT's `PrefixEncoder.transform`: Linear, Tanh, Linear). The
/// MLP is dropped after training: [`PrefixMlp::project`] gives the [`PrefixTuning`] that is saved,
/// exactly what PEFT saves for such an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct PrefixMlp<T> {
    /// P.
    pub num_virtual_tokens: usize,
    /// H (PEFT's `encoder_hidden_size`).
    pub hidden: usize,
    /// `E [P, kv_dim]`.
    pub embedding: Vec<T>,
    /// `W1 [H, kv_dim]`.
    pub w1: Vec<T>,
    /// `b1 [H]`.
    pub b1: Vec<T>,
    /// `W2 [layers * 2 * kv_dim, H]`.
    pub w2: Vec<T>,
    /// `b2 [layers * 2 * kv_dim]`.
    pub b2: Vec<T>,
}

impl<T: Real> PrefixMlp<T> {
    /// Whether every tensor has the shape `model` needs (the field docs' shapes).
    pub fn fits(&self, model: &LlamaConfig) -> bool {
        let (p, h, kv) = (self.num_virtual_tokens, self.hidden, model.kv_dim());
        let width = PrefixTuning::<T>::width(model);
        p > 0
            && self.embedding.len() == p * kv
            && self.w1.len() == h * kv
            && self.b1.len() == h
            && self.w2.len() == width * h
            && self.b2.len() == width
    }

    /// Uniform in `±scale` for E and `±1/sqrt(fan_in)` for the layers (PyTorch's Linear bound),
    /// from `seed`.
    pub fn new(
        model: &LlamaConfig,
        p: usize,
        hidden: usize,
        seed: u64,
        scale: f64,
    ) -> Result<Self> {
        if p == 0 || hidden == 0 {
            return Err(invalid(
                "prefix tuning",
                "num_virtual_tokens and encoder_hidden_size must be positive",
            ));
        }
        let (kd, w) = (model.kv_dim(), PrefixTuning::<T>::width(model));
        crate::budget::check_elements(
            &format!("num_virtual_tokens = {p}, encoder_hidden_size = {hidden}: the prefix MLP"),
            Self::num_params(model, p, hidden),
            std::mem::size_of::<T>(),
        )
        .map_err(|e| invalid("prefix tuning", e))?;
        let mut s = stream(seed);
        let mut fill = |n: usize, b: f64| -> Vec<T> {
            (0..n).map(|_| T::from_f64(b * uniform(&mut s))).collect()
        };
        let (b1b, b2b) = (1.0 / (kd as f64).sqrt(), 1.0 / (hidden as f64).sqrt());
        Ok(PrefixMlp {
            num_virtual_tokens: p,
            hidden,
            embedding: fill(p * kd, scale),
            w1: fill(hidden * kd, b1b),
            b1: fill(hidden, b1b),
            w2: fill(w * hidden, b2b),
            b2: fill(w, b2b),
        })
    }

    /// Trainable parameters of a `p`-token prefix through an MLP of width `hidden` on `model`
    /// (`E`, `W1`, `b1`, `W2`, `b2`), computed without allocating (`None` on overflow).
    pub fn num_params(model: &LlamaConfig, p: usize, hidden: usize) -> Option<u64> {
        use crate::budget::product;
        let (kd, w) = (model.kv_dim(), PrefixTuning::<T>::width(model));
        product(&[p, kd])?
            .checked_add(product(&[hidden, kd])?)?
            .checked_add(hidden as u64)?
            .checked_add(product(&[w, hidden])?)?
            .checked_add(w as u64)
    }

    fn shapes(&self, model: &LlamaConfig) -> [LinearShape; 2] {
        let (p, kd, w) = (
            self.num_virtual_tokens,
            model.kv_dim(),
            PrefixTuning::<T>::width(model),
        );
        [
            LinearShape {
                rows: p,
                inp: kd,
                out: self.hidden,
            },
            LinearShape {
                rows: p,
                inp: self.hidden,
                out: w,
            },
        ]
    }

    /// The prefix this reparameterization gives, and the hidden activations `tanh(..) [P, H]`
    /// the backward needs.
    pub fn project(&self, model: &LlamaConfig) -> Result<(PrefixTuning<T>, Vec<T>)> {
        let [s1, s2] = self.shapes(model);
        let mut h: Vec<T> = self
            .b1
            .iter()
            .cycle()
            .take(s1.rows * s1.out)
            .copied()
            .collect();
        linear::forward(s1, &self.embedding, &self.w1, &mut h, Accumulate::Add)?;
        h.iter_mut().for_each(|v| *v = tanh(*v));
        let mut out: Vec<T> = self
            .b2
            .iter()
            .cycle()
            .take(s2.rows * s2.out)
            .copied()
            .collect();
        linear::forward(s2, &h, &self.w2, &mut out, Accumulate::Add)?;
        Ok((
            PrefixTuning {
                num_virtual_tokens: self.num_virtual_tokens,
                values: out,
            },
            h,
        ))
    }

    /// Accumulates into `grads` the gradients of every tensor, given the prefix's gradient
    /// `dprefix [P, layers * 2 * kv_dim]` and the `h` that [`Self::project`] returned.
    pub fn backward(
        &self,
        model: &LlamaConfig,
        h: &[T],
        dprefix: &[T],
        grads: &mut PrefixMlp<T>,
    ) -> Result<()> {
        let [s1, s2] = self.shapes(model);
        for row in dprefix.chunks_exact(s2.out) {
            grads.b2.iter_mut().zip(row).for_each(|(g, d)| *g += *d);
        }
        let mut dh = vec![T::ZERO; h.len()];
        linear::backward(
            s2,
            h,
            &self.w2,
            dprefix,
            Some((&mut dh, Accumulate::Overwrite)),
            Some(&mut grads.w2),
        )?;
        dh.iter_mut()
            .zip(h)
            .for_each(|(d, v)| *d *= T::ONE - *v * *v);
        for row in dh.chunks_exact(s1.out) {
            grads.b1.iter_mut().zip(row).for_each(|(g, d)| *g += *d);
        }
        linear::backward(
            s1,
            &self.embedding,
            &self.w1,
            &dh,
            Some((&mut grads.embedding, Accumulate::Add)),
            Some(&mut grads.w1),
        )
    }

    /// Same shapes, all zero.
    pub fn zeros_like(&self) -> Self {
        let z = |v: &Vec<T>| vec![T::ZERO; v.len()];
        PrefixMlp {
            num_virtual_tokens: self.num_virtual_tokens,
            hidden: self.hidden,
            embedding: z(&self.embedding),
            w1: z(&self.w1),
            b1: z(&self.b1),
            w2: z(&self.w2),
            b2: z(&self.b2),
        }
    }

    /// `(name, shape, values)` of the trainable tensors, named as PEFT's `PrefixEncoder`
    /// parameters (these are never saved: the projected prefix is).
    pub fn named(&self, model: &LlamaConfig) -> Vec<(String, Vec<usize>, &[T])> {
        let (p, kd, w, h) = (
            self.num_virtual_tokens,
            model.kv_dim(),
            PrefixTuning::<T>::width(model),
            self.hidden,
        );
        let k = |s: &str| format!("prompt_encoder.{s}");
        vec![
            (k("embedding.weight"), vec![p, kd], &self.embedding),
            (k("transform.0.weight"), vec![h, kd], &self.w1),
            (k("transform.0.bias"), vec![h], &self.b1),
            (k("transform.2.weight"), vec![w, h], &self.w2),
            (k("transform.2.bias"), vec![w], &self.b2),
        ]
    }

    /// The tensors, mutable, in [`Self::named`] order.
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<T>> {
        vec![
            &mut self.embedding,
            &mut self.w1,
            &mut self.b1,
            &mut self.w2,
            &mut self.b2,
        ]
    }

    /// The same tensors in another [`Real`] type.
    pub fn cast<U: Real>(&self) -> PrefixMlp<U> {
        let c = |v: &Vec<T>| v.iter().map(|x| U::from_f64(x.to_f64())).collect();
        PrefixMlp {
            num_virtual_tokens: self.num_virtual_tokens,
            hidden: self.hidden,
            embedding: c(&self.embedding),
            w1: c(&self.w1),
            b1: c(&self.b1),
            w2: c(&self.w2),
            b2: c(&self.b2),
        }
    }
}

fn tanh<T: Real>(x: T) -> T {
    // 1 - 2 / (e^{2x} + 1), stable for large |x| (e^{2x} -> inf gives 1, -> 0 gives -1).
    T::ONE - T::from_f64(2.0) / ((x + x).exp() + T::ONE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qadapt::ops::rope::RopeScaling;

    fn cfg() -> LlamaConfig {
        LlamaConfig {
            hidden_size: 2,
            intermediate_size: 4,
            num_hidden_layers: 1,
            num_attention_heads: 1,
            num_key_value_heads: 1,
            head_dim: 2,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            vocab_size: 3,
            tie_word_embeddings: false,
            max_position_embeddings: 8,
        }
    }

    #[test]
    fn text_init_repeats_or_truncates_the_token_rows_as_peft() {
        let json = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
          "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
          "decoder": null, "model": {"type": "WordLevel",
          "vocab": {"[UNK]": 0, "hello": 1, "world": 2}, "unk_token": "[UNK]"}}"#;
        let tok: tokenizers::Tokenizer = json.parse().unwrap();
        let init = PromptInit::from_text(&tok, "world hello").unwrap();
        assert_eq!(init, PromptInit::FromTokens(vec![2, 1]));
        let embed = [0.0f32, 0.5, 1.0, 1.5, 2.0, 2.5];
        // 5 virtual tokens from 2 text tokens: [2, 1, 2, 1, 2] (repeat, then truncate).
        let p = PromptTuning::new(&cfg(), &embed, 5, &init).unwrap();
        assert_eq!(
            p.embeddings,
            [2.0, 2.5, 1.0, 1.5, 2.0, 2.5, 1.0, 1.5, 2.0, 2.5]
        );
        // 1 virtual token: truncated to the first.
        let p = PromptTuning::new(&cfg(), &embed, 1, &init).unwrap();
        assert_eq!(p.embeddings, [2.0, 2.5]);
        let PromptInit::FromTokens(ids) = PromptInit::sample_vocab(&cfg(), 50, 1) else {
            unreachable!()
        };
        assert!(ids.iter().all(|&t| t < 3) && (0..3).all(|t| ids.contains(&t)));
        assert!(PromptTuning::new(&cfg(), &embed, 2, &PromptInit::FromTokens(vec![3])).is_err());
    }

    #[test]
    fn prompt_targets_label_the_virtual_positions_minus_100() {
        // P = 2, ids [7, 8, 9]: positions v0 v1 7 8 9 -> targets None, 7, 8, 9, None.
        assert_eq!(
            prompt_targets(&[7, 8, 9], 1, 3, 2),
            [None, Some(7), Some(8), Some(9), None]
        );
    }
}
