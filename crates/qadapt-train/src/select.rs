//! Which base parameters train when the base itself is fine-tuned: all of them (full
//! fine-tuning) or the top k decoder layers (the k closest to the output) with the final norm and
//! an untied `lm_head`; everything else is frozen. With tied embeddings the table is frozen under
//! top-k (it is also the input layer).
//!
//! Parameter counts (C width, I MLP width, Q = heads·D, K = kv_heads·D, V vocabulary, L layers):
//! ```text
//! per layer   = 2C + C·Q (q) + 2·C·K (k, v) + Q·C (o) + 3·C·I (gate, up, down)
//! full        = V·C + L·per layer + C + (untied ? V·C : 0)
//! top-k       = k·per layer + C + (untied ? V·C : 0)
//! ```

use qadapt::Result;

use crate::config::LlamaConfig;
use crate::invalid;
use crate::weights::layout;

/// The trainable subset of the base parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Every parameter.
    Full,
    /// The last k decoder layers, the final norm and an untied head.
    TopK(usize),
}

/// Parameters of one decoder layer.
pub fn per_layer(cfg: &LlamaConfig) -> usize {
    let (c, i, q, k) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.q_dim(),
        cfg.kv_dim(),
    );
    2 * c + c * q + 2 * c * k + q * c + 3 * c * i
}

impl Selection {
    /// One flag per tensor of [`layout`] order: trained or frozen.
    pub fn mask(&self, cfg: &LlamaConfig) -> Result<Vec<bool>> {
        let l = cfg.num_hidden_layers;
        let first = match *self {
            Selection::Full => 0,
            Selection::TopK(k) if k >= 1 && k <= l => l - k,
            Selection::TopK(k) => {
                return Err(invalid(
                    "top-k selection",
                    format!("k = {k} must be in 1..={l}"),
                ));
            }
        };
        Ok(layout(cfg)
            .iter()
            .map(|(name, _)| {
                if *self == Selection::Full {
                    return true;
                }
                match name.strip_prefix("model.layers.") {
                    Some(rest) => {
                        let idx: usize = rest
                            .split('.')
                            .next()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        idx >= first
                    }
                    None => name == "model.norm.weight" || name == "lm_head.weight",
                }
            })
            .collect())
    }

    /// Trainable parameters by the formula of the module doc.
    pub fn num_params(&self, cfg: &LlamaConfig) -> usize {
        let (c, v) = (cfg.hidden_size, cfg.vocab_size);
        let head = if cfg.tie_word_embeddings { 0 } else { v * c };
        match *self {
            Selection::Full => v * c + cfg.num_hidden_layers * per_layer(cfg) + c + head,
            Selection::TopK(k) => k * per_layer(cfg) + c + head,
        }
    }
}
