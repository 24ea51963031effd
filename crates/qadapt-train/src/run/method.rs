//! A method's trainable state from the [`Config`]: a fresh adapter (LoRA with PEFT's init,
//! (IA)³ on k, v and down, a soft prompt, prefixes with or without the MLP, Houlsby adapters)
//! or a selection of the base's own tensors; and the memory the settings make the run allocate,
//! checked against the budget before any of it is.

use qadapt::bottleneck::Activation;

use super::{Config, Error, Method};
use crate::budget;
use crate::dataset::Sequence;
use crate::{
    Adapter, HoulsbyAdapter, HoulsbyConfig, Ia3Adapter, Ia3Config, Llama, LlamaConfig, LoraAdapter,
    LoraConfig, LoraInit, PrefixMlp, PrefixTuning, Proj, PromptInit, PromptTuning, Selection,
    Trainable,
};

/// What a run trains.
#[derive(Debug, Clone)]
pub enum State {
    /// An adapter over the frozen base.
    Adapter(Adapter<f32>),
    /// The base's own tensors of a selection.
    Base(Selection),
}

impl State {
    /// The state as the trainer takes it.
    pub fn trainable(&mut self) -> Trainable<'_> {
        match self {
            State::Adapter(a) => Trainable::Adapter(a),
            State::Base(sel) => Trainable::Base(*sel),
        }
    }

    /// The adapter, if the method trains one.
    /// Trainable parameters of a model of `cfg`.
    pub fn num_params(&self, cfg: &LlamaConfig) -> usize {
        match self {
            State::Adapter(a) => a.num_params(cfg),
            State::Base(sel) => sel.num_params(cfg),
        }
    }

    pub fn adapter(&self) -> Option<&Adapter<f32>> {
        match self {
            State::Adapter(a) => Some(a),
            State::Base(_) => None,
        }
    }
}

fn lora_config(c: &Config) -> LoraConfig {
    LoraConfig {
        r: c.rank,
        alpha: c.alpha,
        use_rslora: c.rslora,
        dropout: c.lora_dropout,
        target_modules: c.targets.clone(),
    }
}

fn houlsby_config(c: &Config) -> HoulsbyConfig {
    HoulsbyConfig {
        bottleneck: c.bottleneck,
        activation: Activation::Relu,
    }
}

/// Virtual positions the method puts before every sequence.
pub fn virtual_tokens(c: &Config) -> usize {
    if matches!(c.method, Method::Prompt | Method::Prefix) {
        c.virtual_tokens
    } else {
        0
    }
}

/// The method's fresh trainable state for a model of `cfg` (seeded by `c.seed`); prompt tuning
/// needs the model itself (`model`, its embedding) for its vocabulary initializations.
pub fn build(
    c: &Config,
    cfg: &LlamaConfig,
    model: Option<&Llama<f32>>,
    tok: &tokenizers::Tokenizer,
) -> Result<State, Error> {
    Ok(match c.method {
        Method::Full | Method::SurgicalAuto | Method::Surgical => State::Base(Selection::Full),
        Method::TopK => State::Base(Selection::TopK(c.top_k)),
        Method::Lora | Method::Qlora => State::Adapter(Adapter::Lora(LoraAdapter::new(
            cfg,
            lora_config(c),
            LoraInit::Peft { seed: c.seed },
        )?)),
        Method::Ia3 => State::Adapter(Adapter::Ia3(Ia3Adapter::new(
            cfg,
            Ia3Config {
                target_modules: ["k_proj", "v_proj", "down_proj"].map(String::from).to_vec(),
                feedforward_modules: vec!["down_proj".into()],
            },
            true,
        )?)),
        Method::Prompt => {
            let init = match c.prompt_init.as_str() {
                "random" => PromptInit::Random {
                    seed: c.seed,
                    scale: 0.5,
                },
                // Embeddings of random vocabulary tokens (PEFT's "SAMPLE_VOCAB").
                "vocab" => PromptInit::sample_vocab(cfg, c.virtual_tokens, c.seed ^ 0x5EED),
                t => match t.strip_prefix("text:") {
                    Some(text) => PromptInit::from_text(tok, text)?,
                    None => {
                        return Err(Error::Config(format!(
                            "--prompt-init {t:?}: use random, vocab or text:WORDS"
                        )));
                    }
                },
            };
            let model = model.ok_or_else(|| {
                Error::Config("prompt tuning initializes from the model's embedding".into())
            })?;
            State::Adapter(Adapter::Prompt(PromptTuning::new(
                cfg,
                &model.weights.embed_tokens,
                c.virtual_tokens,
                &init,
            )?))
        }
        Method::Prefix => match c.prefix_mlp {
            Some(width) => State::Adapter(Adapter::PrefixMlp(PrefixMlp::new(
                cfg,
                c.virtual_tokens,
                width,
                c.seed,
                0.5,
            )?)),
            None => State::Adapter(Adapter::Prefix(PrefixTuning::new(
                cfg,
                c.virtual_tokens,
                c.seed,
                0.5,
            )?)),
        },
        Method::Adapter => State::Adapter(Adapter::Houlsby(HoulsbyAdapter::new(
            cfg,
            houlsby_config(c),
            1e-3,
            c.seed,
        )?)),
    })
}

/// What the settings make the run allocate, checked against the memory budget before any of it
/// is: the trainable tensors with their gradients and AdamW moments (4 f32 each, sized by the
/// method's setting), then one micro-batch of `batch` sequences of the longest training example
/// (plus the virtual tokens), unless `host_activations` is false (a device run: its activations
/// are the device memory plan's). The error names the flag and its value.
pub fn check_sizes(
    c: &Config,
    cfg: &LlamaConfig,
    train: &[Sequence],
    host_activations: bool,
) -> Result<(), Error> {
    let lora = lora_config(c);
    // A size past what the model can use adds parameters and nothing else: refused before the
    // budget is even asked.
    let limit = match (c.method, c.prefix_mlp) {
        (Method::Lora | Method::Qlora, _) => Some((
            "--rank",
            c.rank,
            Proj::ALL
                .iter()
                .filter(|&&p| (0..cfg.num_hidden_layers).any(|l| lora.targets(l, p)))
                .map(|p| {
                    let (i, o) = p.dims(cfg);
                    i.min(o)
                })
                .min()
                .unwrap_or(usize::MAX),
            "the smaller side of a targeted projection",
        )),
        (Method::Adapter, _) => Some((
            "--bottleneck",
            c.bottleneck,
            cfg.hidden_size,
            "the model's hidden_size",
        )),
        (Method::Prefix, Some(width)) => Some((
            "--prefix-mlp",
            width,
            PrefixTuning::<f32>::width(cfg),
            "the width of the prefix it produces (layers x 2 x kv_dim)",
        )),
        _ => None,
    };
    if let Some((flag, v, max, what)) = limit
        && v > max
    {
        return Err(Error::Config(format!(
            "{flag} {v} is larger than {what}, {max}"
        )));
    }
    let (flag, params) = match (c.method, c.prefix_mlp) {
        (Method::Lora | Method::Qlora, _) => (format!("--rank {}", c.rank), lora.num_params(cfg)),
        (Method::Adapter, _) => (
            format!("--bottleneck {}", c.bottleneck),
            houlsby_config(c).num_params(cfg),
        ),
        (Method::Prefix, Some(width)) => (
            format!("--prefix-mlp {width}"),
            PrefixMlp::<f32>::num_params(cfg, c.virtual_tokens, width),
        ),
        (Method::Prefix, None) => (
            format!("--virtual-tokens {}", c.virtual_tokens),
            budget::product(&[c.virtual_tokens, PrefixTuning::<f32>::width(cfg)]),
        ),
        (Method::Prompt, _) => (
            format!("--virtual-tokens {}", c.virtual_tokens),
            budget::product(&[c.virtual_tokens, cfg.hidden_size]),
        ),
        (Method::Ia3, _) => (String::from("--method ia3"), Some(0)),
        (Method::Full | Method::TopK | Method::Surgical | Method::SurgicalAuto, _) => (
            format!("--method {}", c.method.name()),
            budget::llama_params(cfg),
        ),
    };
    let state = params.and_then(|n| n.checked_mul(16));
    budget::check(
        &format!("{flag}: the trainable tensors, their gradients and AdamW moments"),
        state,
    )
    .map_err(|e| Error::Config(e.to_string()))?;
    if !host_activations {
        return Ok(());
    }
    let longest = train.iter().map(|q| q.ids.len()).max().unwrap_or(0);
    let seq = longest.saturating_add(virtual_tokens(c));
    budget::check(
        &format!(
            "--batch {} of {seq}-token sequences: the activations (with the trainable state)",
            c.batch
        ),
        budget::activation_bytes(cfg, c.batch, seq, 4)
            .zip(state)
            .and_then(|(a, b)| a.checked_add(b)),
    )
    .map_err(|e| Error::Config(e.to_string()))
}
