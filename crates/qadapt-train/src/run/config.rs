//! The settings of a fine-tuning run: one [`Config`] with defaults, and [`Overrides`] (every
//! field optional) through which a TOML file and a command line change it. The merge order is
//! the caller's: `qadapt train` applies the defaults, then `--config FILE.toml`, then its flags.
//!
//! A setting with no value is `None`, never a stand-in number: no learning rate means the
//! method's default ([`Method::default_lr`]), no model means the caller's default model
//! ([`super::FineTune::with_defaults`]), no `max_len` the model's context, no `eval_every` an
//! evaluation before and after only, no `max_grad_norm` no clipping. A run directory's
//! `run.toml` is the resolved [`Config`] serialized (unset fields left out); it reads back
//! through [`Overrides`], which also accepts the older spelling of "unset" (`""` for a path,
//! `0` for `lr`, `max_len`, `eval_every`, `prefix_mlp` and `max_grad_norm`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Error;
use crate::backend::Checkpointing;
use crate::weights::Proj;

/// The PEFT methods a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Every parameter trains.
    Full,
    /// The last `top_k` decoder layers, the final norm and the head.
    TopK,
    /// Soft prompt of `virtual_tokens` embeddings before the input.
    Prompt,
    /// Per-layer key/value prefixes (`prefix_mlp`: reparameterized by an MLP, folded on save).
    Prefix,
    /// Houlsby bottleneck adapters after attention and after the MLP.
    Adapter,
    /// LoRA on `targets`.
    Lora,
    /// LoRA over an NF4 base (block 64, double quant).
    Qlora,
    /// (IA)³ scaling vectors on k, v and down.
    Ia3,
    /// Surgical fine-tuning, manual: each layer group trains alone; the best on validation is
    /// kept.
    Surgical,
    /// Surgical fine-tuning, automatic: per-tensor learning rates from relative gradient norms.
    SurgicalAuto,
}

impl Method {
    /// Every method, in the order `qadapt compare` runs them.
    pub const ALL: [Method; 10] = [
        Method::Full,
        Method::TopK,
        Method::Prompt,
        Method::Prefix,
        Method::Adapter,
        Method::Lora,
        Method::Qlora,
        Method::Ia3,
        Method::Surgical,
        Method::SurgicalAuto,
    ];

    /// The kebab-case name (`--method NAME`, run.toml, summary.json).
    pub fn name(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::TopK => "top-k",
            Method::Prompt => "prompt",
            Method::Prefix => "prefix",
            Method::Adapter => "adapter",
            Method::Lora => "lora",
            Method::Qlora => "qlora",
            Method::Ia3 => "ia3",
            Method::Surgical => "surgical",
            Method::SurgicalAuto => "surgical-auto",
        }
    }

    /// Learning rate when none is given: adapters with few parameters take larger steps.
    pub fn default_lr(self) -> f32 {
        match self {
            Method::Full | Method::TopK | Method::Surgical | Method::SurgicalAuto => 1e-3,
            Method::Lora | Method::Qlora | Method::Adapter => 3e-3,
            Method::Prompt | Method::Prefix | Method::Ia3 => 3e-2,
        }
    }

    /// Whether the method trains the base model's own tensors (saved as a model directory)
    /// rather than an adapter.
    pub fn trains_base(self) -> bool {
        matches!(
            self,
            Method::Full | Method::TopK | Method::Surgical | Method::SurgicalAuto
        )
    }

    /// Whether the method is LoRA (dense or NF4 base).
    pub fn is_lora(self) -> bool {
        matches!(self, Method::Lora | Method::Qlora)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = String;

    fn from_str(s: &str) -> Result<Method, String> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
                format!("unknown method {s:?} (one of {})", names.join(", "))
            })
    }
}

/// The dtype of a saved adapter's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterDtype {
    /// f32, the trainer's own precision.
    #[default]
    F32,
    /// bf16 (rounded to nearest even): half the file, as a bf16 QLoRA run of PEFT saves it.
    Bf16,
}

impl std::str::FromStr for AdapterDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(AdapterDtype::F32),
            "bf16" => Ok(AdapterDtype::Bf16),
            _ => Err(format!("unknown adapter dtype {s:?} (f32 or bf16)")),
        }
    }
}

/// Every setting of a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// The PEFT method.
    pub method: Method,
    /// HF model directory; `None`: the default model given to the run.
    pub model: Option<PathBuf>,
    /// Training data (JSONL with prompt/completion or text, or plain text); `None`: the default
    /// task given to the run.
    pub data: Option<PathBuf>,
    /// Held-out data; `None`: the default task's (with the default data) or a split of `data`.
    pub heldout_data: Option<PathBuf>,
    /// Examples split off `data` when no held-out file is given (at most a fifth of it).
    pub heldout: usize,
    /// `cpu`, or `cuda[:N]` (LoRA and QLoRA only).
    pub device: String,
    /// What the CUDA path's forward keeps for the backward (`layers`: each decoder layer's
    /// input only, the layer recomputed in the backward; the same step bit for bit).
    pub checkpointing: Checkpointing,
    /// `--checkpointing auto` (CUDA): the run sets `checkpointing` to `none` when the step's
    /// memory plan fits the device's free memory without it (at `batch`, or at one sequence
    /// under `--batch auto`), else to `layers`. Not part of run.toml, which holds the choice.
    #[serde(skip)]
    pub checkpointing_auto: bool,
    /// The dtype of the saved adapter's tensors (`adapter_model.safetensors`; PEFT loads
    /// either). Checkpoints keep f32, so a resume is exact whatever this says.
    pub adapter_dtype: AdapterDtype,
    /// Optimizer steps (manual surgery: in all, split evenly between the layer groups).
    pub steps: u64,
    /// Sequences per micro-batch; with `pack`, rows per micro-batch.
    pub batch: usize,
    /// Sequence packing (CUDA): each micro-batch row holds as many whole training sequences as
    /// fit in `max_len` tokens (the model's context without it), each attending only to itself
    /// with its own RoPE positions, instead of one sequence padded to the longest.
    pub pack: bool,
    /// `--batch auto` (CUDA): the run replaces `batch` by the largest micro-batch the memory
    /// plan fits in the device's free memory before anything goes to the device. Not part of
    /// run.toml, which holds the number chosen.
    #[serde(skip)]
    pub batch_auto: bool,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Peak learning rate; `None`: [`Method::default_lr`].
    pub lr: Option<f32>,
    /// Final rate of the cosine schedule as a fraction of the peak.
    pub min_lr_ratio: f32,
    /// Linear warmup steps (at most a fifth of the schedule).
    pub warmup: u64,
    /// Decoupled AdamW weight decay.
    pub weight_decay: f32,
    /// Clip the global gradient norm to this; `None`: no clipping.
    pub max_grad_norm: Option<f64>,
    /// Seed of initialization, shuffling and dropout.
    pub seed: u64,
    /// Longest sequence in tokens; `None`: the model's context.
    pub max_len: Option<usize>,
    /// Held-out evaluation every N steps; `None`: only before and after.
    pub eval_every: Option<u64>,
    /// Checkpoint every N steps (and on interruption and at the end).
    pub checkpoint_every: u64,
    /// Stop at the first malformed data line instead of skipping it.
    pub strict: bool,
    /// LoRA rank r.
    pub rank: usize,
    /// LoRA alpha.
    pub alpha: f64,
    /// LoRA dropout on the adapter input.
    pub lora_dropout: f64,
    /// rsLoRA scaling alpha/sqrt(r).
    pub rslora: bool,
    /// LoRA target modules (`q_proj`, ..., `down_proj`).
    pub targets: Vec<String>,
    /// Virtual tokens of prompt and prefix tuning.
    pub virtual_tokens: usize,
    /// Prompt tuning init: `random`, `vocab` or `text:<words>`.
    pub prompt_init: String,
    /// Prefix tuning through an MLP of this hidden width; `None`: plain prefixes.
    pub prefix_mlp: Option<usize>,
    /// Houlsby adapter bottleneck width.
    pub bottleneck: usize,
    /// Layers trained by top-k.
    pub top_k: usize,
    /// Surgical: decoder layers per group.
    pub group_size: usize,
    /// Surgical-auto: batches averaged for the relative gradient norms.
    pub rgn_batches: usize,
    /// The run directory; `None`: `runs/<method>-<unix time>`. Not part of run.toml.
    #[serde(skip)]
    pub output: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            method: Method::Qlora,
            model: None,
            data: None,
            heldout_data: None,
            heldout: 200,
            device: "cpu".into(),
            checkpointing: Checkpointing::None,
            checkpointing_auto: false,
            adapter_dtype: AdapterDtype::F32,
            pack: false,
            steps: 300,
            batch: 16,
            batch_auto: false,
            grad_accum: 1,
            lr: None,
            min_lr_ratio: 0.1,
            warmup: 10,
            weight_decay: 0.0,
            max_grad_norm: Some(1.0),
            seed: 0,
            max_len: None,
            eval_every: None,
            checkpoint_every: 50,
            strict: false,
            rank: 8,
            alpha: 16.0,
            lora_dropout: 0.0,
            rslora: false,
            // Every projection, by its module name (`q_proj`, ..., `down_proj`).
            targets: Proj::ALL
                .iter()
                .map(|p| p.name().rsplit('.').next().unwrap_or(p.name()).to_string())
                .collect(),
            virtual_tokens: 10,
            prompt_init: "vocab".into(),
            prefix_mlp: None,
            bottleneck: 16,
            top_k: 1,
            group_size: 1,
            rgn_batches: 4,
            output: None,
        }
    }
}

/// Changes to a [`Config`]: what a TOML file or a command line sets. Keys are the field names
/// (snake_case); unknown keys are refused.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Overrides {
    pub method: Option<Method>,
    pub model: Option<PathBuf>,
    pub data: Option<PathBuf>,
    pub heldout_data: Option<PathBuf>,
    pub heldout: Option<usize>,
    pub device: Option<String>,
    pub checkpointing: Option<Checkpointing>,
    /// `--checkpointing auto` (command line only).
    #[serde(skip)]
    pub checkpointing_auto: Option<bool>,
    pub adapter_dtype: Option<AdapterDtype>,
    pub pack: Option<bool>,
    pub steps: Option<u64>,
    pub batch: Option<usize>,
    /// `--batch auto` (command line only).
    #[serde(skip)]
    pub batch_auto: Option<bool>,
    pub grad_accum: Option<usize>,
    pub lr: Option<f32>,
    pub min_lr_ratio: Option<f32>,
    pub warmup: Option<u64>,
    pub weight_decay: Option<f32>,
    /// 0: no clipping.
    pub max_grad_norm: Option<f64>,
    pub seed: Option<u64>,
    /// 0: the model's context.
    pub max_len: Option<usize>,
    /// 0: evaluate before and after only.
    pub eval_every: Option<u64>,
    pub checkpoint_every: Option<u64>,
    pub strict: Option<bool>,
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    pub lora_dropout: Option<f64>,
    pub rslora: Option<bool>,
    pub targets: Option<Vec<String>>,
    pub virtual_tokens: Option<usize>,
    pub prompt_init: Option<String>,
    /// 0: plain prefixes.
    pub prefix_mlp: Option<usize>,
    pub bottleneck: Option<usize>,
    pub top_k: Option<usize>,
    pub group_size: Option<usize>,
    pub rgn_batches: Option<usize>,
    /// Not read from TOML (run.toml does not hold it).
    #[serde(skip)]
    pub output: Option<PathBuf>,
}

impl Overrides {
    /// The overrides of a TOML text.
    pub fn from_toml(text: &str) -> Result<Overrides, Error> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }
}

impl Config {
    /// `self` with every field `o` sets replaced. A `0` for `lr`, `max_len`, `eval_every`,
    /// `prefix_mlp` or `max_grad_norm`, and an empty path, unset the field (the spelling of
    /// run.toml files written before these were optional, and of "off" on the command line).
    pub fn merge(mut self, o: Overrides) -> Config {
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = o.$f { self.$f = v; } )* };
        }
        set!(
            method,
            heldout,
            device,
            checkpointing,
            checkpointing_auto,
            adapter_dtype,
            pack,
            batch_auto,
            steps,
            batch,
            grad_accum,
            min_lr_ratio,
            warmup,
            weight_decay,
            seed,
            checkpoint_every,
            strict,
            rank,
            alpha,
            lora_dropout,
            rslora,
            targets,
            virtual_tokens,
            prompt_init,
            bottleneck,
            top_k,
            group_size,
            rgn_batches
        );
        let path = |p: PathBuf| (!p.as_os_str().is_empty()).then_some(p);
        macro_rules! unset_empty {
            ($($f:ident),*) => { $( if let Some(v) = o.$f { self.$f = path(v); } )* };
        }
        unset_empty!(model, data, heldout_data);
        macro_rules! unset_zero {
            ($($f:ident: $t:ty),*) => { $( if let Some(v) = o.$f { self.$f = (v != <$t>::default()).then_some(v); } )* };
        }
        unset_zero!(lr: f32, max_len: usize, eval_every: u64, prefix_mlp: usize, max_grad_norm: f64);
        if o.output.is_some() {
            self.output = o.output;
        }
        self
    }

    /// The learning rate: the set one or the method's default.
    pub fn lr(&self) -> f32 {
        self.lr.unwrap_or(self.method.default_lr())
    }

    /// The TOML of run.toml: the settings with the learning rate resolved.
    pub fn to_toml(&self) -> Result<String, Error> {
        let resolved = Config {
            lr: Some(self.lr()),
            ..self.clone()
        };
        toml::to_string(&resolved).map_err(|e| Error::Config(e.to_string()))
    }

    /// Refuses settings that cannot run, naming the flag.
    pub fn check(&self) -> Result<(), Error> {
        let bad = |m: String| Err(Error::Config(m));
        let positive = [
            ("steps", self.steps as usize),
            ("batch", self.batch),
            ("grad-accum", self.grad_accum),
            ("checkpoint-every", self.checkpoint_every as usize),
        ];
        for (name, v) in positive {
            if v == 0 {
                return bad(format!("--{name} must be positive"));
            }
        }
        if self.batch_auto && self.device == "cpu" {
            return bad(
                "--batch auto applies to --device cuda (it sizes the micro-batch by the \
                        device's free memory)"
                    .into(),
            );
        }
        if (self.checkpointing != Checkpointing::None || self.checkpointing_auto)
            && self.device == "cpu"
        {
            return bad(format!(
                "--checkpointing {} applies to --device cuda (the CPU path keeps every activation)",
                if self.checkpointing_auto {
                    "auto"
                } else {
                    self.checkpointing.name()
                }
            ));
        }
        if self.pack && self.device == "cpu" {
            return bad(
                "--pack applies to --device cuda (lora, qlora): the CPU model trains one sequence \
                 per row"
                    .into(),
            );
        }
        let lr = self.lr();
        if !(lr.is_finite() && lr > 0.0) {
            return bad(format!("--lr must be a positive number, got {lr}"));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!(
                "--lora-dropout must be in [0, 1), got {}",
                self.lora_dropout
            ));
        }
        // The schedule decays from lr to lr x ratio: outside [0, 1] it would raise the rate or
        // make it negative.
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(format!(
                "--min-lr-ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "--weight-decay must be 0 or positive, got {}",
                self.weight_decay
            ));
        }
        if let Some(n) = self.max_grad_norm
            && !(n.is_finite() && n > 0.0)
        {
            return bad(format!(
                "--max-grad-norm must be 0 (no clipping) or positive, got {n}"
            ));
        }
        if !self.alpha.is_finite() {
            return bad(format!("--alpha must be a number, got {}", self.alpha));
        }
        if self.method.is_lora() && self.targets.is_empty() {
            return bad(format!(
                "--targets is empty: --method {} would train no parameter (name projections such \
                 as q_proj,v_proj)",
                self.method.name()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn toml_then_flags_override_the_defaults_and_zero_or_empty_unset() {
        let file = Overrides::from_toml(
            "method = \"prefix\"\nlr = 0.5\nprefix_mlp = 64\nmodel = \"m\"\nsteps = 7\n",
        )
        .unwrap();
        let flags = Overrides {
            steps: Some(9),
            lr: Some(0.0),
            model: Some(PathBuf::new()),
            max_grad_norm: Some(0.0),
            ..Overrides::default()
        };
        let c = Config::default().merge(file).merge(flags);
        assert_eq!(c.method, Method::Prefix);
        assert_eq!(c.steps, 9);
        assert_eq!(c.prefix_mlp, Some(64));
        assert_eq!(c.lr, None);
        assert_eq!(c.lr(), Method::Prefix.default_lr());
        assert_eq!(c.model, None);
        assert_eq!(c.max_grad_norm, None);
        assert_eq!(c.batch, Config::default().batch);
        assert!(Overrides::from_toml("no_such_key = 1\n").is_err());
    }

    #[test]
    fn run_toml_reads_back_to_the_same_config() {
        let c = Config {
            method: Method::Lora,
            data: Some("/data/train.jsonl".into()),
            eval_every: Some(5),
            ..Config::default()
        };
        let text = c.to_toml().unwrap();
        let back = Config::default().merge(Overrides::from_toml(&text).unwrap());
        assert_eq!(
            back,
            Config {
                lr: Some(Method::Lora.default_lr()),
                ..c
            }
        );
    }

    #[test]
    fn method_names_parse_back() {
        for m in Method::ALL {
            assert_eq!(m.name().parse::<Method>(), Ok(m));
        }
        assert!("qlora2".parse::<Method>().is_err());
    }

    /// What `--config FILE` goes through before any other file is read: the TOML, the default
    /// learning rate, the checks.
    fn config_text(text: &str) -> Result<Config, Error> {
        let c = Config::default().merge(Overrides::from_toml(text)?);
        c.check()?;
        Ok(c)
    }

    /// The TOML settings are not a libFuzzer target: the committed corpus (`tests/fuzz/corpus/toml_config`) and 20 000 seeded mutations of it, with edits
    /// aimed at the values (huge, negative, non-finite numbers, wrong types), must give settings
    /// or an error, never a panic.
    #[test]
    fn toml_settings_survive_the_corpus_and_its_mutations() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fuzz/corpus/toml_config");
        let corpus: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect();
        assert!(corpus.len() >= 3);
        let run_toml = corpus.iter().filter(|t| config_text(t).is_ok()).count();
        assert!(run_toml >= 3, "the seeds are valid settings");
        const VALUES: [&str; 12] = [
            "18446744073709551616",
            "18446744073709551615",
            "-1",
            "0",
            "nan",
            "inf",
            "-inf",
            "1e400",
            "\"\"",
            "[]",
            "{}",
            "true",
        ];
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (mut ok, mut refused) = (0, 0);
        for _ in 0..20_000 {
            let mut text = corpus[rng.random_range(0..corpus.len())]
                .clone()
                .into_bytes();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..=text.len());
                match rng.random_range(0..4) {
                    // A value replaced after some `=`.
                    0 => {
                        if let Some(eq) = text[..at].iter().rposition(|&b| b == b'=') {
                            let end = text[eq..]
                                .iter()
                                .position(|&b| b == b'\n')
                                .map_or(text.len(), |n| eq + n);
                            let v = format!(" {}", VALUES[rng.random_range(0..VALUES.len())]);
                            text.splice(eq + 1..end, v.into_bytes());
                        }
                    }
                    1 => text.insert(at, rng.random()),
                    2 => {
                        let end = (at + rng.random_range(0..8)).min(text.len());
                        text.drain(at..end);
                    }
                    _ => {
                        if at < text.len() {
                            text[at] = b"0123456789.-e=[]\"\n "[rng.random_range(0..18)];
                        }
                    }
                }
            }
            match config_text(&String::from_utf8_lossy(&text)) {
                Ok(_) => ok += 1,
                Err(_) => refused += 1,
            }
        }
        // The mutations reach both outcomes.
        assert!(
            ok > 100 && refused > 100,
            "{ok} accepted, {refused} refused"
        );
    }
}
