//! `LlamaConfig`: the architecture fields of an HF `config.json` that the model needs.
//!
//! Both spellings of the RoPE settings are read: transformers 5 writes
//! `rope_parameters: {rope_type, rope_theta, factor, ...}`, older files have a top-level
//! `rope_theta` and `rope_scaling: {rope_type | type, factor, ...}`. The "default", "linear" and
//! "llama3" rope types are supported (Llama 2, its position-interpolated variants, Llama 3, 3.1,
//! 3.2); any other is refused rather than silently computed wrong.
//!
//! Mistral configs (`MistralForCausalLM`, `model_type: "mistral"`) are Llama in all but name,
//! except for `sliding_window`: each query attends to at most that many keys. Up to the window
//! that is plain causal attention, so a finite window caps `max_position_embeddings` (longer
//! sequences are refused, never computed with the wrong attention).

use std::path::Path;

use qadapt::ops::attention::AttentionShape;
use qadapt::ops::rope::RopeScaling;
use qadapt::{Error, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::format_err;

/// The architecture of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Model width C.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Size of one head (`hidden_size / num_attention_heads` unless the file says otherwise).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency rescaling.
    pub rope_scaling: RopeScaling,
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// The output projection is the embedding table.
    pub tie_word_embeddings: bool,
    /// Longest sequence the model was configured for.
    pub max_position_embeddings: usize,
}

#[derive(Deserialize)]
struct Raw {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    vocab_size: usize,
    #[serde(default)]
    tie_word_embeddings: bool,
    max_position_embeddings: usize,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    /// Mistral's attention window (`null` or absent: none).
    #[serde(default)]
    sliding_window: Option<usize>,
}

impl LlamaConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            file: path.to_owned(),
            source,
        })?;
        Self::from_json(&text, path)
    }

    /// Parses the text of a `config.json`; `path` only names the file in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let raw: Raw = serde_json::from_str(text).map_err(|e| format_err(path, e))?;
        let arch = |name: &str| {
            raw.architectures
                .as_ref()
                .is_some_and(|a| a.iter().any(|s| s == name))
        };
        let is_mistral = arch("MistralForCausalLM") || raw.model_type.as_deref() == Some("mistral");
        let is_llama =
            arch("LlamaForCausalLM") || raw.model_type.as_deref() == Some("llama") || is_mistral;
        if !is_llama {
            return Err(format_err(
                path,
                format!(
                    "not a Llama model: architectures {:?}, model_type {:?} (need LlamaForCausalLM, \
                     MistralForCausalLM, llama or mistral)",
                    raw.architectures, raw.model_type
                ),
            ));
        }
        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(format_err(
                path,
                format!("hidden_act {act:?} is not supported (silu only)"),
            ));
        }
        if raw.attention_bias || raw.mlp_bias {
            return Err(format_err(
                path,
                "attention_bias / mlp_bias are not supported",
            ));
        }
        let heads = raw.num_attention_heads;
        let kv = raw.num_key_value_heads.unwrap_or(heads);
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(format_err(
                path,
                format!(
                    "num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv}"
                ),
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size.is_multiple_of(heads) => raw.hidden_size / heads,
            None => {
                return Err(format_err(
                    path,
                    format!(
                        "hidden_size {} is not a multiple of {heads} heads",
                        raw.hidden_size
                    ),
                ));
            }
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(format_err(
                path,
                format!("head_dim {head_dim} must be even and positive"),
            ));
        }
        let rope = raw
            .rope_parameters
            .as_ref()
            .or(raw.rope_scaling.as_ref())
            .filter(|v| !v.is_null());
        let rope_theta = rope
            .and_then(|r| r.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(raw.rope_theta)
            .unwrap_or(10000.0);
        let rope_scaling = match rope {
            None => RopeScaling::None,
            Some(r) => parse_rope(r, path)?,
        };
        let cfg = LlamaConfig {
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            rope_theta,
            rope_scaling,
            vocab_size: raw.vocab_size,
            tie_word_embeddings: raw.tie_word_embeddings,
            max_position_embeddings: match raw.sliding_window {
                Some(w) if is_mistral && w > 0 => raw.max_position_embeddings.min(w),
                _ => raw.max_position_embeddings,
            },
        };
        cfg.check_sizes().map_err(|e| format_err(path, e))?;
        Ok(cfg)
    }

    /// Refuses zero sizes and sizes whose parameter count overflows 64 bits (the reason names
    /// the field and its value). What the sizes need in memory is checked where they are
    /// allocated, against the weights present and [`crate::budget`].
    pub fn check_sizes(&self) -> std::result::Result<(), String> {
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(format!("{field} = 0 must be positive"));
            }
        }
        if crate::budget::llama_params(self).is_none() {
            let (field, v) = [
                ("num_hidden_layers", self.num_hidden_layers),
                ("vocab_size", self.vocab_size),
                ("intermediate_size", self.intermediate_size),
                ("hidden_size", self.hidden_size),
                ("head_dim", self.head_dim),
            ]
            .into_iter()
            .max_by_key(|&(_, v)| v)
            .unwrap_or(("hidden_size", self.hidden_size));
            return Err(format!(
                "{field} = {v}: the parameter count of these sizes overflows 64 bits"
            ));
        }
        Ok(())
    }

    /// The attention op's shape for `batch` sequences of `seq` tokens.
    pub fn attention_shape(&self, batch: usize, seq: usize) -> AttentionShape {
        AttentionShape {
            batch,
            seq,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
        }
    }

    /// Width of the query projection (`heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the key and value projections (`kv_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The names [`Self::named`] knows, as `qadapt plan-memory --random-shape` takes them.
    pub const NAMED: [&'static str; 6] = [
        "llama3-8b",
        "llama3-70b",
        "llama3.2-1b",
        "llama3.2-3b",
        "llama2-7b",
        "mistral-7b",
    ];

    /// A published architecture by name (one of [`Self::NAMED`]): the shapes only, for planning
    /// or for a randomly initialized model.
    pub fn named(name: &str) -> Option<Self> {
        Some(match name {
            "llama3-8b" => Self::llama3_8b(),
            "llama3-70b" => Self::llama3_70b(),
            "llama3.2-1b" => Self::llama3_2_1b(),
            "llama3.2-3b" => Self::llama3_2_3b(),
            "llama2-7b" => Self::llama2_7b(),
            "mistral-7b" => Self::mistral_7b(),
            _ => return None,
        })
    }

    /// The fields every named architecture below shares the form of.
    #[allow(clippy::too_many_arguments)]
    fn shape(
        hidden: usize,
        intermediate: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        vocab: usize,
        rope_theta: f64,
        max_positions: usize,
    ) -> Self {
        LlamaConfig {
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden / heads,
            rms_norm_eps: 1e-5,
            rope_theta,
            rope_scaling: RopeScaling::None,
            vocab_size: vocab,
            tie_word_embeddings: false,
            max_position_embeddings: max_positions,
        }
    }

    /// Llama 3's 128k-context RoPE rescaling (Llama 3.1 and 3.2 `config.json`).
    fn llama3_rope() -> RopeScaling {
        RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        }
    }

    /// Meta-Llama-3-8B (`config.json`): 4096 wide, MLP 14336, 32 layers, 32 heads over 8 KV heads,
    /// vocabulary 128256, RoPE base 500000, 8192 positions, untied head.
    pub fn llama3_8b() -> Self {
        Self::shape(4096, 14336, 32, 32, 8, 128_256, 500_000.0, 8192)
    }

    /// Meta-Llama-3-70B: 8192 wide, MLP 28672, 80 layers, 64 heads over 8 KV heads, vocabulary
    /// 128256, RoPE base 500000, 8192 positions, untied head.
    pub fn llama3_70b() -> Self {
        Self::shape(8192, 28672, 80, 64, 8, 128_256, 500_000.0, 8192)
    }

    /// Llama-3.2-1B: 2048 wide, MLP 8192, 16 layers, 32 heads (of 64) over 8 KV heads,
    /// vocabulary 128256, RoPE base 500000 with the llama3 rescaling (factor 32), 131072
    /// positions, the head tied to the embeddings.
    pub fn llama3_2_1b() -> Self {
        LlamaConfig {
            rope_scaling: Self::llama3_rope(),
            tie_word_embeddings: true,
            ..Self::shape(2048, 8192, 16, 32, 8, 128_256, 500_000.0, 131_072)
        }
    }

    /// Llama-3.2-3B: 3072 wide, MLP 8192, 28 layers, 24 heads (of 128) over 8 KV heads,
    /// vocabulary 128256, RoPE base 500000 with the llama3 rescaling (factor 32), 131072
    /// positions, the head tied to the embeddings.
    pub fn llama3_2_3b() -> Self {
        LlamaConfig {
            rope_scaling: Self::llama3_rope(),
            tie_word_embeddings: true,
            ..Self::shape(3072, 8192, 28, 24, 8, 128_256, 500_000.0, 131_072)
        }
    }

    /// Llama-2-7b-hf: 4096 wide, MLP 11008, 32 layers, 32 heads (no grouping), vocabulary 32000,
    /// RoPE base 10000, 4096 positions, untied head.
    pub fn llama2_7b() -> Self {
        Self::shape(4096, 11008, 32, 32, 32, 32_000, 10_000.0, 4096)
    }

    /// Mistral-7B-v0.1 as a Llama: 4096 wide, MLP 14336, 32 layers, 32 heads over 8 KV heads,
    /// vocabulary 32000, RoPE base 10000, 32768 positions, untied head (its 4096-token sliding
    /// window does not change what a step of at most 4096 tokens allocates).
    pub fn mistral_7b() -> Self {
        Self::shape(4096, 14336, 32, 32, 8, 32_000, 10_000.0, 32_768)
    }
}

fn parse_rope(r: &Value, path: &Path) -> Result<RopeScaling> {
    let kind = r
        .get("rope_type")
        .or_else(|| r.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => {
            let factor = r.get("factor").and_then(Value::as_f64).ok_or_else(|| {
                format_err(path, "linear rope scaling lacks the number \"factor\"")
            })?;
            Ok(RopeScaling::Linear { factor })
        }
        "llama3" => {
            let field = |name: &str| {
                r.get(name).and_then(Value::as_f64).ok_or_else(|| {
                    format_err(
                        path,
                        format!("llama3 rope scaling lacks the number {name:?}"),
                    )
                })
            };
            Ok(RopeScaling::Llama3 {
                factor: field("factor")?,
                low_freq_factor: field("low_freq_factor")?,
                high_freq_factor: field("high_freq_factor")?,
                original_max_position_embeddings: field("original_max_position_embeddings")?,
            })
        }
        other => Err(format_err(
            path,
            format!("rope_type {other:?} is not supported (default, linear or llama3)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "vocab_size": 128, "max_position_embeddings": 256"#;

    fn parse(extra: &str) -> Result<LlamaConfig> {
        LlamaConfig::from_json(&format!("{{{BASE}{extra}}}"), Path::new("dir/config.json"))
    }

    #[test]
    fn linear_rope_and_mistral_configs() {
        let lin =
            parse(r#", "model_type": "llama", "rope_scaling": {"type": "linear", "factor": 4.0}"#)
                .unwrap();
        assert_eq!(lin.rope_scaling, RopeScaling::Linear { factor: 4.0 });
        let base = qadapt::ops::rope::inv_freq(16, 10000.0, RopeScaling::None).unwrap();
        let scaled = qadapt::ops::rope::inv_freq(16, 10000.0, lin.rope_scaling).unwrap();
        for (b, s) in base.iter().zip(&scaled) {
            assert_eq!(*s, b / 4.0);
        }
        assert!(parse(r#", "model_type": "llama", "rope_scaling": {"type": "linear"}"#).is_err());
        assert!(qadapt::ops::rope::inv_freq(16, 1e4, RopeScaling::Linear { factor: 0.0 }).is_err());
        // Mistral: a Llama; a finite window caps the context, null or a wider one does not.
        let m =
            parse(r#", "architectures": ["MistralForCausalLM"], "sliding_window": 100"#).unwrap();
        assert_eq!(m.max_position_embeddings, 100);
        let wide = parse(r#", "model_type": "mistral", "sliding_window": 4096"#).unwrap();
        assert_eq!(wide.max_position_embeddings, 256);
        let none = parse(r#", "model_type": "mistral", "sliding_window": null"#).unwrap();
        assert_eq!(none.max_position_embeddings, 256);
        // A Llama's sliding_window field means nothing (transformers ignores it there).
        let llama = parse(r#", "model_type": "llama", "sliding_window": 100"#).unwrap();
        assert_eq!(llama.max_position_embeddings, 256);
        let e = parse(r#", "model_type": "gpt2""#).unwrap_err().to_string();
        assert!(e.contains("MistralForCausalLM"), "{e}");
    }

    #[test]
    fn legacy_and_v5_rope_spellings() {
        let a = parse(
            r#", "architectures": ["LlamaForCausalLM"], "rope_theta": 500000.0,
            "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        )
        .unwrap();
        assert_eq!(a.head_dim, 16);
        assert_eq!(a.rope_theta, 500000.0);
        assert!(!a.tie_word_embeddings);
        let b = parse(
            r#", "model_type": "llama", "tie_word_embeddings": true, "head_dim": 32,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}"#,
        )
        .unwrap();
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert_eq!((b.head_dim, b.q_dim(), b.kv_dim()), (32, 128, 64));
        assert!(b.tie_word_embeddings);
        let c = parse(r#", "model_type": "llama""#).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling), (10000.0, RopeScaling::None));
    }

    #[test]
    fn named_shapes_have_their_published_parameter_counts() {
        // Parameter counts as the model cards give them (billions, rounded).
        for (name, billions) in [
            ("llama3-8b", 8.03),
            ("llama3-70b", 70.55),
            ("llama3.2-1b", 1.24),
            ("llama3.2-3b", 3.21),
            ("llama2-7b", 6.74),
            ("mistral-7b", 7.24),
        ] {
            let c = LlamaConfig::named(name).unwrap();
            c.check_sizes().unwrap();
            let p = crate::budget::llama_params(&c).unwrap() as f64 / 1e9;
            assert!((p - billions).abs() < 0.01, "{name}: {p}");
        }
        assert_eq!(LlamaConfig::named("llama3.2-3b").unwrap().head_dim, 128);
        assert!(LlamaConfig::named("gpt2").is_none());
    }

    #[test]
    fn refusals_name_the_file() {
        let e =
            parse(r#", "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2""#).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("dir/config.json: not a Llama model"),
            "{e}"
        );
        let e = parse(r#", "model_type": "llama", "rope_parameters": {"rope_type": "yarn"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("\"yarn\" is not supported"), "{e}");
        let e = LlamaConfig::from_json("{}", Path::new("x.json")).unwrap_err();
        assert!(e.to_string().starts_with("x.json: missing field"), "{e}");
    }
}
