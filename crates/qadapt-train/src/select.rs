//! Which base parameters train when the base itself is fine-tuned: all of them (full
//! fine-tuning), the top k decoder layers (the k closest to the output) with the final norm and
//! an untied `lm_head`, or one [`LayerGroup`] (surgical fine-tuning, see [`crate::surgical`]);
//! everything else is frozen. With tied embeddings the table is frozen under top-k (it is also
//! the input layer), and it is the head's matrix in [`LayerGroup::Head`] (the same tensor as
//! [`LayerGroup::Embeddings`]).
//!
//! Parameter counts (C width, I MLP width, Q = heads·D, K = kv_heads·D, V vocabulary, L layers):
//! ```text
//! per layer   = 2C + C·Q (q) + 2·C·K (k, v) + Q·C (o) + 3·C·I (gate, up, down)
//! full        = V·C + L·per layer + C + (untied ? V·C : 0)
//! top-k       = k·per layer + C + (untied ? V·C : 0)
//! embeddings  = V·C
//! layers      = count·per layer
//! head        = C + V·C                      (lm_head, or embed_tokens when tied)
//! ```

use std::fmt;
use std::str::FromStr;

use qadapt::{Error, Result};

use crate::config::LlamaConfig;
use crate::invalid;
use crate::weights::layout;

/// A contiguous part of the network, the unit surgical fine-tuning trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerGroup {
    /// The input embedding table `embed_tokens`.
    Embeddings,
    /// Decoder layers `first..first + count` (every tensor of each, norms included).
    Layers {
        /// First layer.
        first: usize,
        /// Number of layers (at least 1).
        count: usize,
    },
    /// The final norm and the output matrix (`lm_head`, or `embed_tokens` when tied).
    Head,
}

impl LayerGroup {
    /// The usual partition of a model: the embeddings, the decoder layers in blocks of
    /// `block` (the last block may be shorter), the head.
    pub fn partition(cfg: &LlamaConfig, block: usize) -> Result<Vec<LayerGroup>> {
        if block == 0 {
            return Err(invalid("layer groups", "the block size must be positive"));
        }
        let l = cfg.num_hidden_layers;
        let mut out = vec![LayerGroup::Embeddings];
        out.extend((0..l).step_by(block).map(|first| LayerGroup::Layers {
            first,
            count: block.min(l - first),
        }));
        out.push(LayerGroup::Head);
        Ok(out)
    }

    fn check(&self, cfg: &LlamaConfig) -> Result<()> {
        let l = cfg.num_hidden_layers;
        match *self {
            LayerGroup::Layers { first, count } if count == 0 || first + count > l => Err(invalid(
                "layer group",
                format!("layers {first}..{} of a {l}-layer model", first + count),
            )),
            _ => Ok(()),
        }
    }
}

/// `embeddings`, `layers:A..B` (half-open) and `head`, as [`FromStr`] reads them.
impl fmt::Display for LayerGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            LayerGroup::Embeddings => f.write_str("embeddings"),
            LayerGroup::Layers { first, count } => write!(f, "layers:{first}..{}", first + count),
            LayerGroup::Head => f.write_str("head"),
        }
    }
}

impl FromStr for LayerGroup {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            invalid(
                "layer group",
                format!("{s:?} is not embeddings, head or layers:A..B with A < B"),
            )
        };
        match s {
            "embeddings" => Ok(LayerGroup::Embeddings),
            "head" => Ok(LayerGroup::Head),
            _ => {
                let (a, b) = s
                    .strip_prefix("layers:")
                    .and_then(|r| r.split_once(".."))
                    .ok_or_else(bad)?;
                let (first, end): (usize, usize) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if end <= first {
                    return Err(bad());
                }
                Ok(LayerGroup::Layers {
                    first,
                    count: end - first,
                })
            }
        }
    }
}

/// The trainable subset of the base parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Every parameter.
    Full,
    /// The last k decoder layers, the final norm and an untied head.
    TopK(usize),
    /// One layer group.
    Group(LayerGroup),
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

/// The decoder layer a parameter name belongs to, if any.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?
        .split('.')
        .next()?
        .parse()
        .ok()
}

impl Selection {
    /// One flag per tensor of [`layout`] order: trained or frozen.
    pub fn mask(&self, cfg: &LlamaConfig) -> Result<Vec<bool>> {
        let l = cfg.num_hidden_layers;
        if let Selection::TopK(k) = *self
            && !(1..=l).contains(&k)
        {
            return Err(invalid(
                "top-k selection",
                format!("k = {k} must be in 1..={l}"),
            ));
        }
        if let Selection::Group(g) = self {
            g.check(cfg)?;
        }
        let tied = cfg.tie_word_embeddings;
        Ok(layout(cfg)
            .iter()
            .map(|(name, _)| {
                let head = name == "model.norm.weight" || name == "lm_head.weight";
                let embed = name == "model.embed_tokens.weight";
                match *self {
                    Selection::Full => true,
                    Selection::TopK(k) => layer_of(name).map_or(head, |i| i >= l - k),
                    Selection::Group(LayerGroup::Embeddings) => embed,
                    Selection::Group(LayerGroup::Head) => head || (tied && embed),
                    Selection::Group(LayerGroup::Layers { first, count }) => {
                        layer_of(name).is_some_and(|i| (first..first + count).contains(&i))
                    }
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
            Selection::Group(LayerGroup::Embeddings) => v * c,
            Selection::Group(LayerGroup::Layers { count, .. }) => count * per_layer(cfg),
            Selection::Group(LayerGroup::Head) => c + v * c,
        }
    }
}

#[cfg(test)]
mod tests {
    use qadapt::ops::rope::RopeScaling;

    use super::*;

    /// C 8, I 12, Q 8, K 4, V 11, 3 layers.
    fn cfg(tied: bool) -> LlamaConfig {
        LlamaConfig {
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 3,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            vocab_size: 11,
            tie_word_embeddings: tied,
            max_position_embeddings: 32,
        }
    }

    /// Counts the masked tensors' elements from the layout's shapes.
    fn counted(sel: Selection, cfg: &LlamaConfig) -> usize {
        layout(cfg)
            .iter()
            .zip(sel.mask(cfg).unwrap())
            .filter(|(_, m)| *m)
            .map(|((_, s), _)| s.iter().product::<usize>())
            .sum()
    }

    #[test]
    fn group_counts_match_the_formulas_and_the_masks() {
        // 2·8 + 8·8 + 2·8·4 + 8·8 + 3·8·12 = 496.
        let per = 16 + 64 + 64 + 64 + 288;
        for tied in [false, true] {
            let c = cfg(tied);
            assert_eq!(per_layer(&c), per);
            let cases = [
                (LayerGroup::Embeddings, 11 * 8),
                (LayerGroup::Layers { first: 0, count: 1 }, per),
                (LayerGroup::Layers { first: 1, count: 2 }, 2 * per),
                (LayerGroup::Head, 8 + 11 * 8),
            ];
            for (g, want) in cases {
                let sel = Selection::Group(g);
                assert_eq!(sel.num_params(&c), want, "{g} tied {tied}");
                assert_eq!(counted(sel, &c), want, "{g} tied {tied}");
            }
            // The partition covers every tensor once, except the tied table (in both ends).
            let groups = LayerGroup::partition(&c, 2).unwrap();
            assert_eq!(groups.len(), 4);
            let total: usize = groups
                .iter()
                .map(|g| Selection::Group(*g).num_params(&c))
                .sum();
            let shared = if tied { 11 * 8 } else { 0 };
            assert_eq!(total, Selection::Full.num_params(&c) + shared);
        }
    }

    #[test]
    fn head_holds_the_tied_table_and_layer_masks_pick_their_layers() {
        let names: Vec<String> = layout(&cfg(true)).into_iter().map(|(n, _)| n).collect();
        let on = |sel: Selection, c: &LlamaConfig| -> Vec<String> {
            layout(c)
                .into_iter()
                .zip(sel.mask(c).unwrap())
                .filter(|(_, m)| *m)
                .map(|((n, _), _)| n)
                .collect()
        };
        assert_eq!(
            on(Selection::Group(LayerGroup::Head), &cfg(true)),
            ["model.embed_tokens.weight", "model.norm.weight"]
        );
        assert_eq!(
            on(Selection::Group(LayerGroup::Head), &cfg(false)),
            ["model.norm.weight", "lm_head.weight"]
        );
        let mid = on(
            Selection::Group(LayerGroup::Layers { first: 1, count: 1 }),
            &cfg(true),
        );
        assert_eq!(mid.len(), 9);
        assert!(mid.iter().all(|n| n.starts_with("model.layers.1.")));
        assert_eq!(names.len(), 1 + 3 * 9 + 1);
    }

    #[test]
    fn bad_groups_are_refused_and_names_round_trip() {
        let c = cfg(false);
        for g in [
            LayerGroup::Layers { first: 0, count: 0 },
            LayerGroup::Layers { first: 2, count: 2 },
        ] {
            assert!(Selection::Group(g).mask(&c).is_err(), "{g:?}");
        }
        assert!(LayerGroup::partition(&c, 0).is_err());
        for g in LayerGroup::partition(&c, 2).unwrap() {
            assert_eq!(g.to_string().parse::<LayerGroup>().unwrap(), g);
        }
        assert_eq!(
            "layers:1..3".parse::<LayerGroup>().unwrap(),
            LayerGroup::Layers { first: 1, count: 2 }
        );
        for s in ["layers:2..2", "layers:1", "tail", "layers:a..3"] {
            assert!(s.parse::<LayerGroup>().is_err(), "{s}");
        }
    }
}
