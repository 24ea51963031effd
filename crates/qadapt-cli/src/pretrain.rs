//! `qadapt pretrain`: a small Llama from scratch on a text corpus, written as an HF model
//! directory. This is how the embedded default model (`assets/default-model`) is made:
//! `just make-default` runs `assets/make_task.py` (the corpus) and then this command.
//!
//! 1. A byte-level BPE tokenizer is trained on the corpus (the `tokenizers` crate; special
//!    tokens `<unk>` 0, `<s>` 1 (bos, prepended by the post-processor), `</s>` 2 (eos)).
//! 2. Every line becomes `<s> line </s>`; the stream is cut into blocks of `--seq` tokens (the
//!    last partial block is dropped); the last `--heldout` blocks are held out.
//! 3. Full training of a freshly initialized model (N(0, 0.02²) matrices, unit norms) with AdamW,
//!    warmup + cosine schedule, clipping at 1.0, on shuffled blocks.
//! 4. `config.json` (LlamaForCausalLM, transformers 5 keys), `model.safetensors` (`--dtype`),
//!    `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`, atomically.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use qadapt::DType;
use qadapt::ops::rope::RopeScaling;
use qadapt::optim::{AdamW, CosineSchedule};
use qadapt_train::dataset::Sequence;
use qadapt_train::fit::{Sampler, heldout, init_weights, pack};
use qadapt_train::{Llama, LlamaConfig, Selection, Trainable, Trainer};
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use crate::OutDType;
use crate::io::new_directory;

#[derive(Args, Debug)]
pub(crate) struct PretrainArgs {
    /// Training text, one document per line.
    #[arg(long)]
    corpus: PathBuf,
    /// New output directory (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u64).range(1..))]
    steps: u64,
    /// Blocks per step.
    #[arg(long, default_value_t = 16, value_parser = crate::positive())]
    batch: usize,
    /// Tokens per block (also the model's max_position_embeddings is 2x this).
    #[arg(long, default_value_t = 64, value_parser = crate::positive())]
    seq: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 3e-3)]
    lr: f32,
    /// Linear warmup steps.
    #[arg(long, default_value_t = 100)]
    warmup: u64,
    /// Tokenizer vocabulary (256 byte symbols + 3 special tokens + merges).
    #[arg(long, default_value_t = 512, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(259..=u64::from(u32::MAX)))]
    vocab: usize,
    /// Model width.
    #[arg(long, default_value_t = 192, value_parser = crate::positive())]
    hidden: usize,
    /// MLP width.
    #[arg(long, default_value_t = 512, value_parser = crate::positive())]
    intermediate: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 4, value_parser = crate::positive())]
    layers: usize,
    /// Attention heads (head_dim = hidden / heads).
    #[arg(long, default_value_t = 6, value_parser = crate::positive())]
    heads: usize,
    /// Key/value heads (grouped-query attention).
    #[arg(long, default_value_t = 2, value_parser = crate::positive())]
    kv_heads: usize,
    /// Blocks held out for the final loss.
    #[arg(long, default_value_t = 64)]
    heldout: usize,
    /// Seed of the initialization and the shuffles.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Element type of the saved weights.
    #[arg(long, value_enum, default_value_t = OutDType::Bf16)]
    dtype: OutDType,
}

fn train_tokenizer(corpus: &Path, vocab: usize) -> Result<Tokenizer> {
    let specials = ["<unk>", "<s>", "</s>"];
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(*s, true))
                .collect(),
        )
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(anyhow::Error::msg)?
        .special_tokens(vec![("<s>", 1)])
        .build()
        .map_err(anyhow::Error::msg)?;
    let mut tok = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(post))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(anyhow::Error::msg)?;
    let files = vec![corpus.to_string_lossy().into_owned()];
    tok.train_from_files(&mut trainer, files)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("training the tokenizer on {}", corpus.display()))?;
    let tok: Tokenizer = tok.into();
    for (id, s) in specials.iter().enumerate() {
        if tok.token_to_id(s) != Some(id as u32) {
            bail!("the tokenizer did not give {s} id {id}");
        }
    }
    Ok(tok)
}

pub(crate) use qadapt_train::run::save::{write_model_files, write_weights};

fn write_tokenizer_files(tmp: &Path, tok: &Tokenizer) -> Result<()> {
    tok.save(tmp.join("tokenizer.json"), false)
        .map_err(anyhow::Error::msg)?;
    let tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": true,
        "model_max_length": 4096,
    });
    std::fs::write(
        tmp.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tc)?,
    )?;
    let gc = serde_json::json!({"bos_token_id": 1, "eos_token_id": 2});
    std::fs::write(
        tmp.join("generation_config.json"),
        serde_json::to_string_pretty(&gc)?,
    )?;
    Ok(())
}

/// The Llama the flags describe, with `vocab` tokens and a context of twice `--seq`.
fn model_config(a: &PretrainArgs, vocab: usize) -> Result<LlamaConfig> {
    Ok(LlamaConfig {
        hidden_size: a.hidden,
        intermediate_size: a.intermediate,
        num_hidden_layers: a.layers,
        num_attention_heads: a.heads,
        num_key_value_heads: a.kv_heads,
        head_dim: a.hidden / a.heads,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::None,
        vocab_size: vocab,
        tie_word_embeddings: false,
        max_position_embeddings: a
            .seq
            .checked_mul(2)
            .with_context(|| format!("--seq {} is too large", a.seq))?,
    })
}

/// The model the flags ask for (at its largest vocabulary), its training state and one batch's
/// activations, checked against the memory budget before the tokenizer or the model is made.
fn check_sizes(a: &PretrainArgs) -> Result<()> {
    use qadapt_train::budget;
    let cfg = model_config(a, a.vocab)?;
    let flags = format!(
        "--vocab {} --hidden {} --intermediate {} --layers {}",
        a.vocab, a.hidden, a.intermediate, a.layers
    );
    cfg.check_sizes()
        .map_err(|e| anyhow::anyhow!("{flags}: {e}"))?;
    // Parameters, gradients and the two AdamW moments, in f32.
    let state = budget::llama_params(&cfg).and_then(|n| n.checked_mul(16));
    budget::check(
        &format!("{flags}: the model, its gradients and AdamW moments"),
        state,
    )
    .map_err(anyhow::Error::msg)?;
    let act = budget::activation_bytes(&cfg, a.batch, a.seq, 4);
    budget::check(
        &format!(
            "--batch {} --seq {}: the activations (with the model's training state)",
            a.batch, a.seq
        ),
        act.zip(state).and_then(|(x, y)| x.checked_add(y)),
    )
    .map_err(anyhow::Error::msg)
}

pub(crate) fn run(a: &PretrainArgs) -> Result<()> {
    if a.out.exists() {
        bail!("{} exists; choose a new output directory", a.out.display());
    }
    if a.heads == 0 || !a.hidden.is_multiple_of(a.heads) {
        bail!(
            "--hidden {} is not a multiple of --heads {}",
            a.hidden,
            a.heads
        );
    }
    if !a.heads.is_multiple_of(a.kv_heads) {
        bail!(
            "--heads {} is not a multiple of --kv-heads {}",
            a.heads,
            a.kv_heads
        );
    }
    check_sizes(a)?;
    let t0 = Instant::now();
    let tok = train_tokenizer(&a.corpus, a.vocab)?;
    let text = std::fs::read_to_string(&a.corpus)
        .with_context(|| format!("reading {}", a.corpus.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let enc = tok
        .encode_batch(lines.clone(), true)
        .map_err(anyhow::Error::msg)?;
    let mut stream = Vec::new();
    for e in &enc {
        stream.extend_from_slice(e.get_ids());
        stream.push(2);
    }
    let blocks: Vec<Sequence> = stream
        .chunks_exact(a.seq)
        .map(|c| Sequence {
            ids: c.to_vec(),
            mask: (0..a.seq).map(|i| i > 0).collect(),
        })
        .collect();
    if blocks.len() <= a.heldout.saturating_add(a.batch) {
        bail!(
            "{}: {} blocks of {} tokens is too little text",
            a.corpus.display(),
            blocks.len(),
            a.seq
        );
    }
    let (train, held) = blocks.split_at(blocks.len() - a.heldout);
    eprintln!(
        "tokenizer: {} tokens ({} lines -> {} tokens, {:.2} per word); {} training blocks of {}",
        tok.get_vocab_size(true),
        lines.len(),
        stream.len(),
        stream.len() as f64 / text.split_whitespace().count().max(1) as f64,
        train.len(),
        a.seq
    );
    let cfg = model_config(a, tok.get_vocab_size(true))?;
    let mut model = Llama::new(cfg.clone(), init_weights(&cfg, 0.02, a.seed))?;
    let params = Selection::Full.num_params(&cfg);
    eprintln!("model: {params} parameters ({cfg:?})");
    let sched = CosineSchedule {
        base_lr: a.lr,
        min_lr: a.lr * 0.1,
        warmup_steps: a.warmup,
        total_steps: a.steps,
    };
    let mut trainer = Trainer::new(
        AdamW {
            lr: a.lr,
            weight_decay: 0.1,
            ..AdamW::default()
        },
        Some(1.0),
    );
    let mut what = Trainable::Base(Selection::Full);
    let mut sampler = Sampler::new(train.len(), a.seed)?;
    let mut bar = crate::progress::Progress::new(a.steps, "pretrain", false);
    for step in 1..=a.steps {
        let idx = sampler.take(a.batch);
        let refs: Vec<&Sequence> = idx.iter().map(|&i| &train[i]).collect();
        let b = pack(&refs, 0)?;
        trainer.accumulate(&model, &what, &b)?;
        let s = trainer.apply(&mut model, &mut what, sched.lr(step), None)?;
        if !s.loss.is_finite() {
            bail!("the loss is {} at step {step}; nothing was written", s.loss);
        }
        bar.set_message(format!("loss {:.3}", s.loss));
        bar.inc();
    }
    bar.finish();
    let h = heldout(&model, None, held, 16, 0)?;
    eprintln!(
        "held-out loss {:.4} (perplexity {:.2}) after {} steps in {:.0?}",
        h.loss,
        h.perplexity(),
        a.steps,
        t0.elapsed()
    );
    let dtype = DType::from(a.dtype);
    new_directory(&a.out, |tmp| {
        write_tokenizer_files(tmp, &tok)?;
        Ok(write_model_files(tmp, &model, dtype, None)?)
    })?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
