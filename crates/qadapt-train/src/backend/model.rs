//! The Llama decoder with a trainable LoRA adapter over a [`Backend`], the base frozen: the
//! decoder layer is [`crate::layer`]'s (the one sequence the CPU [`crate::Llama`] and the
//! generator also run); this file supplies its ops on the backend and the rest of the model
//! (embedding, final norm, head, loss, LoRA state, AdamW).
//!
//! Precision: base weights (embeddings, norms, head, projections) are bf16 or NF4 (block 64,
//! double quant), activations and their gradients bf16, statistics and sums f32. The trainable
//! tensors are the LoRA matrices: f32 masters (what AdamW updates and what is saved) and bf16
//! working copies inside each projection (what the forward and backward multiply with), rewritten
//! by every AdamW step. Their gradients are f32.
//!
//! Saved per layer for the backward: the layer input `x`, `rstd1`, `xn1`, `q` and `k` after RoPE,
//! `v`, attention's saved statistics, the attention output, `x_mid`, `rstd2`, `xn2`, `gate`, `up`
//! and `h`; plus the final norm's input and `rstd` (the frozen head needs no input). A LoRA
//! projection's backward needs only its input (the fused kernel recomputes `u = s x A^T`).
//!
//! The head and the loss run fused and in row chunks ([`Backend::lm_head_cross_entropy`]): the
//! final norm's output goes through the head, the cross-entropy and back to its own gradient
//! `dxn` a chunk of rows at a time ([`qadapt::plan::loss_chunk_rows`], or
//! [`LoraModel::set_loss_chunk_rows`]), so a step never holds the `[rows, vocab]` logits; the
//! backward starts from `dxn`.
//!
//! The backward runs [`crate::layer`]'s layer backward in reverse, each projection's adding
//! into its LoRA gradients when the projection is adapted.
//!
//! LoRA dropout (training only) follows [`crate::Trainer`]'s keyed masks; each adapted projection
//! then runs as [`proj_forward`] and [`proj_backward`] compose it (the fused layer on the
//! dropped-out input, the base weight alone on the rest), the masks regenerated in the backward.
//!
//! Gradient accumulation follows [`crate::Trainer`]: each micro-batch's backward is seeded with
//! `dloss = ` its number of target tokens, so the accumulators hold the gradient of the summed
//! token losses; [`LoraModel::apply`] divides by the total token count (folded into AdamW's
//! gradient scale together with the clipping coefficient).

use std::borrow::Cow;
use std::path::Path;

use qadapt::Result;
use qadapt::ops::Accumulate;
use qadapt::ops::cross_entropy::{LmHeadShape, RowScore};
use qadapt::ops::dropout::{DropoutMask, MaskCoef};
use qadapt::ops::rope::{self, RopeDirection, RopeTable};
use qadapt::optim::{AdamW, clip_coefficient};

use crate::backend::{BackTerms, Backend, BaseRef, LoraMatrix, LoraRef, MomentPlacement, Terms};
use crate::config::LlamaConfig;
use crate::layer::{self, BackBufs, LayerActs, LayerBackRun, LayerRun, Norm};
use crate::lora::{DropoutKey, LoraAdapter, LoraPair, dropout_base};
use crate::model::Llama;
use crate::nf4::Nf4Projections;
use crate::train::{Batch, StepStats};
use crate::weights::{BaseTensor, Checkpoint, Proj, StoredTensor, random_tensor};
use crate::{invalid, shape_err};
use qadapt::nf4::Nf4Tensor;

/// How the frozen projection weights are held.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaseFormat<'a> {
    /// bf16 (the LoRA method).
    Dense,
    /// These NF4 codes (block 64 and double quantization as [`crate::nf4::quantize_projections`]
    /// makes them, or a bitsandbytes checkpoint's own), one per projection (QLoRA); embeddings,
    /// norms and the head stay bf16 as transformers' `load_in_4bit` leaves them.
    Nf4(&'a Nf4Projections),
    /// The projections' values quantized to NF4 (block 64, double quantization) by the backend,
    /// where it keeps the weights (on a GPU, on the device): QLoRA of a model streamed tensor by
    /// tensor ([`LoraModel::from_tensors`]).
    QuantizeNf4,
}

/// A frozen tensor as a source hands it to [`LoraModel::from_tensors`].
#[derive(Debug)]
pub enum BaseData<'s> {
    /// Values (borrowed from a model in memory, or owned).
    Values(Cow<'s, [f32]>),
    /// NF4 codes as a bitsandbytes checkpoint stores a projection: kept as they are under
    /// [`BaseFormat::QuantizeNf4`], dequantized under [`BaseFormat::Dense`].
    Nf4(Nf4Tensor),
}

impl<'s> BaseData<'s> {
    pub(crate) fn len(&self) -> usize {
        match self {
            BaseData::Values(v) => v.len(),
            BaseData::Nf4(q) => q.numel(),
        }
    }

    /// The values (4-bit codes dequantized).
    pub(crate) fn into_values(self) -> Result<Cow<'s, [f32]>> {
        match self {
            BaseData::Values(v) => Ok(v),
            BaseData::Nf4(q) => Ok(Cow::Owned(crate::nf4::dequantize(&q)?)),
        }
    }
}

/// The frozen tensors of `model` in memory, borrowed, as a tensor source of
/// [`LoraModel::from_tensors`] (and of the device generator's).
pub(crate) fn model_tensors<'m>(
    model: &'m Llama<f32>,
    op: &'static str,
) -> impl FnMut(BaseTensor) -> Result<BaseData<'m>> + 'm {
    let w = &model.weights;
    move |t| {
        Ok(BaseData::Values(Cow::Borrowed(match t {
            BaseTensor::Embed => &w.embed_tokens,
            BaseTensor::Head => w
                .lm_head
                .as_deref()
                .ok_or_else(|| invalid(op, "the model has no lm_head"))?,
            BaseTensor::FinalNorm => &w.norm,
            BaseTensor::InputNorm(l) => &w.layers[l].input_layernorm,
            BaseTensor::PostNorm(l) => &w.layers[l].post_attention_layernorm,
            BaseTensor::Proj(l, p) => w.layers[l].proj(p),
        })))
    }
}

/// `tensor` with each tensor's length checked against `config`'s shape for it.
pub(crate) fn checked_source<'s, 'f>(
    op: &'static str,
    config: &'f LlamaConfig,
    tensor: &'f mut dyn FnMut(BaseTensor) -> Result<BaseData<'s>>,
) -> impl FnMut(BaseTensor) -> Result<BaseData<'s>> + 'f {
    move |t| {
        let v = tensor(t)?;
        if v.len() != t.len(config) {
            return Err(shape_err(
                op,
                format!("{} of {}", t.name(), t.len(config)),
                v.len(),
            ));
        }
        Ok(v)
    }
}

/// The frozen tensors of a checkpoint, read one at a time ([`Checkpoint::tensor`]), as a tensor
/// source: values widened to f32, a bitsandbytes 4-bit projection as its codes.
pub(crate) fn checkpoint_tensors(
    ck: &mut Checkpoint,
) -> impl FnMut(BaseTensor) -> Result<BaseData<'static>> + '_ {
    move |t| {
        Ok(match ck.tensor(t)? {
            StoredTensor::Values(v) => BaseData::Values(Cow::Owned(v)),
            StoredTensor::Nf4(q) => BaseData::Nf4(q),
        })
    }
}

struct Layer<B: Backend> {
    input_norm: B::Act,
    post_norm: B::Act,
    /// By [`Proj::index`].
    projs: Vec<B::Proj>,
}

/// One adapted projection's trainable state.
struct Trainable<B: Backend> {
    layer: usize,
    proj: Proj,
    /// Lengths of A and B.
    len: (usize, usize),
    /// f32 masters, A `[r, in]` and B `[out, r]`.
    a: B::F32,
    b: B::F32,
    /// Accumulated gradients (of the summed token losses).
    ga: B::F32,
    gb: B::F32,
    /// AdamW moments of A and B, allocated by the first step.
    moments: Option<(B::Moments, B::Moments)>,
}

/// One layer's saved activations (`att`: attention's saved statistics).
type LayerCache<B> = LayerActs<<B as Backend>::Act, <B as Backend>::F32, <B as Backend>::F32>;

/// What the forward keeps of each decoder layer for the backward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    /// Every activation of every layer: the backward reads them (the fastest step).
    #[default]
    None,
    /// Only each layer's input: the backward first runs the layer's forward again from it (the
    /// same ops on the same values and dropout masks, so the same activations bit for bit), then
    /// its backward. One more forward per step; the saved activations shrink to `L` inputs plus
    /// one layer's at a time.
    Layers,
}

impl Checkpointing {
    /// The spelling of `--checkpointing` and run.toml.
    pub fn name(self) -> &'static str {
        match self {
            Checkpointing::None => "none",
            Checkpointing::Layers => "layers",
        }
    }
}

impl std::str::FromStr for Checkpointing {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Checkpointing, String> {
        match s {
            "none" => Ok(Checkpointing::None),
            "layers" => Ok(Checkpointing::Layers),
            _ => Err(format!("unknown checkpointing {s:?} (none or layers)")),
        }
    }
}

/// What a forward keeps of each layer: what the model's [`Checkpointing`] says, for a training
/// step's backward, or nothing (an evaluation: the peak is one layer's activations).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keep {
    ForBackward,
    Nothing,
}

/// How a forward runs: a training step's (its dropout key, activations kept for the backward)
/// or an evaluation's (nothing kept, with or without the LoRA terms).
#[derive(Debug, Clone, Copy)]
struct Pass {
    key: Option<DropoutKey>,
    keep: Keep,
    adapter: bool,
}

impl Pass {
    fn train(key: Option<DropoutKey>) -> Pass {
        Pass {
            key,
            keep: Keep::ForBackward,
            adapter: true,
        }
    }

    fn eval(adapter: bool) -> Pass {
        Pass {
            key: None,
            keep: Keep::Nothing,
            adapter,
        }
    }
}

/// One layer's part of [`Saved`].
enum LayerSaved<B: Backend> {
    All(LayerCache<B>),
    /// The layer input `x` ([`Checkpointing::Layers`]).
    Input(B::Act),
}

/// What a forward keeps for the backward.
struct Saved<B: Backend> {
    batch: usize,
    seq: usize,
    /// The dropout key of a training forward (`None`: no dropout).
    key: Option<DropoutKey>,
    layers: Vec<LayerSaved<B>>,
    x_final: B::Act,
    rstd_final: B::F32,
    rope: B::Rope,
    /// Packed rows' sequence starts (`None`: one sequence per row).
    segments: Option<B::Segments>,
    /// What the backend kept of each layer's projections for their backward
    /// ([`Backend::proj_forward`] with [`Terms::Adapted`]; `[layer][Proj::index]`, empty when nothing is kept).
    kept: Vec<Kept<B>>,
}

/// What the backend kept of one layer's projections ([`Backend::proj_forward`] with [`Terms::Adapted`]), by
/// [`Proj::index`].
type Kept<B> = [Option<<B as Backend>::Act>; 7];

/// A frozen Llama base with one trainable LoRA adapter on a [`Backend`], with its AdamW state.
pub struct LoraModel<B: Backend> {
    backend: B,
    config: LlamaConfig,
    adapter: crate::lora::LoraConfig,
    /// Whether the projections are NF4.
    nf4: bool,
    embed: B::Act,
    /// `None` when the head is tied to `embed`.
    head: Option<B::Act>,
    norm: B::Act,
    layers: Vec<Layer<B>>,
    inv_freq: Vec<f32>,
    /// In [`LoraAdapter::named`] order (layer, then [`Proj::ALL`]).
    trainable: Vec<Trainable<B>>,
    /// `slot[layer][proj.index()]`: index into `trainable`.
    slot: Vec<Vec<Option<usize>>>,
    placement: MomentPlacement,
    checkpointing: Checkpointing,
    /// Token rows per chunk of the fused head and loss (`None`: [`qadapt::plan::loss_chunk_rows`]).
    loss_chunk_rows: Option<usize>,
    /// LoRA dropout's seed (see [`Self::set_dropout_seed`]) and the micro-batch counter of the
    /// step being accumulated: the [`DropoutKey`] of [`crate::Trainer`].
    dropout_seed: Option<u64>,
    micro: u64,
    acc_tokens: usize,
    acc_loss: f64,
    steps: u64,
}

impl<B: Backend> std::fmt::Debug for LoraModel<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraModel")
            .field("backend", &self.backend.describe())
            .field("nf4", &self.nf4)
            .field("adapted", &self.trainable.len())
            .field("steps", &self.steps)
            .finish()
    }
}

impl<B: Backend> LoraModel<B> {
    /// Puts `model`'s weights on `backend` (the projections as `base` says: `model`'s own in
    /// bf16, or the NF4 codes given, `model`'s projection values unused) and `adapter` as the
    /// trainable LoRA tensors; AdamW moments go where `placement` says.
    pub fn new(
        backend: B,
        model: &Llama<f32>,
        base: BaseFormat<'_>,
        adapter: &LoraAdapter<f32>,
        placement: MomentPlacement,
    ) -> Result<Self> {
        let mut tensor = model_tensors(model, "lora model");
        Self::from_tensors(
            backend,
            &model.config,
            &mut tensor,
            base,
            adapter,
            placement,
        )
    }

    /// A model of `config`'s shape with random frozen weights ([`random_tensor`] of `seed`),
    /// made one tensor at a time (with [`BaseFormat::QuantizeNf4`], quantized where the backend
    /// keeps them): benchmarks at real shapes without a checkpoint. `base` must not be
    /// [`BaseFormat::Nf4`] (there are no codes of a random model).
    pub fn random(
        backend: B,
        config: &LlamaConfig,
        seed: u64,
        base: BaseFormat<'_>,
        adapter: &LoraAdapter<f32>,
        placement: MomentPlacement,
    ) -> Result<Self> {
        no_given_codes(base, "a random lora model")?;
        let mut tensor = |t| Ok(BaseData::Values(Cow::Owned(random_tensor(config, seed, t))));
        Self::from_tensors(backend, config, &mut tensor, base, adapter, placement)
    }

    /// The model of the HF checkpoint `dir` streamed to `backend` one tensor at a time
    /// ([`Checkpoint`]: one shard in host memory at a time, one tensor widened to f32): with
    /// [`BaseFormat::QuantizeNf4`] each projection is quantized where the backend keeps it (a
    /// bitsandbytes 4-bit checkpoint's codes are kept as stored), so a model larger than the
    /// host's or the device's memory in f32 or bf16 can be trained with QLoRA. `base` must not be
    /// [`BaseFormat::Nf4`].
    pub fn from_checkpoint(
        backend: B,
        dir: &Path,
        base: BaseFormat<'_>,
        adapter: &LoraAdapter<f32>,
        placement: MomentPlacement,
    ) -> Result<Self> {
        no_given_codes(base, "a lora model from a checkpoint")?;
        let mut ck = Checkpoint::open(dir)?;
        let config = ck.config.clone();
        let mut tensor = checkpoint_tensors(&mut ck);
        Self::from_tensors(backend, &config, &mut tensor, base, adapter, placement)
    }

    /// [`Self::new`] from a source of tensors rather than a model in memory: `tensor` is asked
    /// for each frozen tensor once, in model order (embedding, then per layer its norms and
    /// projections, then the final norm and an untied head), and what it returns is on the
    /// backend before the next is asked for. With [`BaseFormat::QuantizeNf4`] a GPU backend
    /// quantizes each projection on the device, so the dense model never exists whole, on the
    /// host or on the device: a loader streams a checkpoint through this, and
    /// [`crate::weights::random_tensor`] makes a random model of any shape
    /// ([`Self::random`]). With [`BaseFormat::Nf4`] projections are not asked for.
    pub fn from_tensors<'s>(
        backend: B,
        config: &LlamaConfig,
        tensor: &mut dyn FnMut(BaseTensor) -> Result<BaseData<'s>>,
        base: BaseFormat<'_>,
        adapter: &LoraAdapter<f32>,
        placement: MomentPlacement,
    ) -> Result<Self> {
        const OP: &str = "lora model";
        let c = config;
        let r = adapter.config.r;
        if adapter.pairs.len() != c.num_hidden_layers
            || adapter.pairs.iter().any(|l| l.len() != Proj::ALL.len())
        {
            return Err(shape_err(
                OP,
                format!("{} layers of {} projections", c.num_hidden_layers, 7),
                "an adapter for another model",
            ));
        }
        let mut fetch = checked_source(OP, c, tensor);
        // Norms, embedding and head go as values (a 4-bit one dequantized).
        let embed = backend.upload(&fetch(BaseTensor::Embed)?.into_values()?)?;
        let scale = adapter.config.scaling() as f32;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        let mut trainable = Vec::new();
        let mut slot = vec![vec![None; Proj::ALL.len()]; c.num_hidden_layers];
        for (l, slot_l) in slot.iter_mut().enumerate() {
            let input_norm = backend.upload(&fetch(BaseTensor::InputNorm(l))?.into_values()?)?;
            let post_norm = backend.upload(&fetch(BaseTensor::PostNorm(l))?.into_values()?)?;
            let mut projs = Vec::with_capacity(Proj::ALL.len());
            for p in Proj::ALL {
                let (inp, out) = p.dims(c);
                let pair = adapter.pairs[l][p.index()].as_ref();
                if let Some(pr) = pair
                    && (pr.a.len() != r * inp || pr.b.len() != out * r)
                {
                    return Err(shape_err(
                        OP,
                        format!("{}: A of {r}x{inp}, B of {out}x{r}", p.module(l)),
                        format!("{} and {}", pr.a.len(), pr.b.len()),
                    ));
                }
                let lora = pair.map(|pr| LoraRef {
                    rank: r,
                    a: &pr.a,
                    b: &pr.b,
                    scale,
                });
                let data = match base {
                    BaseFormat::Nf4(_) => None,
                    BaseFormat::Dense => Some(BaseData::Values(
                        fetch(BaseTensor::Proj(l, p))?.into_values()?,
                    )),
                    BaseFormat::QuantizeNf4 => Some(fetch(BaseTensor::Proj(l, p))?),
                };
                let base_ref = match (base, &data) {
                    (BaseFormat::Dense, Some(BaseData::Values(w))) => BaseRef::Dense(w),
                    (BaseFormat::QuantizeNf4, Some(BaseData::Values(w))) => BaseRef::QuantizeNf4(w),
                    // A checkpoint's own codes stay as they are.
                    (BaseFormat::QuantizeNf4, Some(BaseData::Nf4(q))) => BaseRef::Nf4(q),
                    (BaseFormat::Nf4(codes), _) => match codes.get(l, p) {
                        Some(q) if q.shape == [out, inp] => BaseRef::Nf4(q),
                        q => {
                            return Err(shape_err(
                                OP,
                                format!("NF4 codes of {} [{out}, {inp}]", p.module(l)),
                                q.map_or("none".to_string(), |q| format!("{:?}", q.shape)),
                            ));
                        }
                    },
                    _ => unreachable!("values are fetched for every other format"),
                };
                projs.push(backend.proj(out, inp, base_ref, lora)?);
                drop(data);
                if let Some(pr) = pair {
                    slot_l[p.index()] = Some(trainable.len());
                    trainable.push(Trainable {
                        layer: l,
                        proj: p,
                        len: (pr.a.len(), pr.b.len()),
                        a: backend.upload_f32(&pr.a)?,
                        b: backend.upload_f32(&pr.b)?,
                        ga: backend.zeros_f32(pr.a.len())?,
                        gb: backend.zeros_f32(pr.b.len())?,
                        moments: None,
                    });
                }
            }
            layers.push(Layer {
                input_norm,
                post_norm,
                projs,
            });
        }
        if trainable.is_empty() {
            return Err(invalid(OP, "the adapter targets no projection"));
        }
        let norm = backend.upload(&fetch(BaseTensor::FinalNorm)?.into_values()?)?;
        let head = if c.tie_word_embeddings {
            None
        } else {
            Some(backend.upload(&fetch(BaseTensor::Head)?.into_values()?)?)
        };
        Ok(LoraModel {
            embed,
            head,
            norm,
            inv_freq: rope::inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)?,
            config: c.clone(),
            adapter: adapter.config.clone(),
            nf4: !matches!(base, BaseFormat::Dense),
            layers,
            trainable,
            slot,
            placement,
            checkpointing: Checkpointing::None,
            loss_chunk_rows: None,
            dropout_seed: None,
            micro: 0,
            acc_tokens: 0,
            acc_loss: 0.0,
            steps: 0,
            backend,
        })
    }

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// AdamW steps applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Number of trainable parameters (the LoRA matrices).
    pub fn num_params(&self) -> usize {
        let r = self.adapter.r;
        self.trainable
            .iter()
            .map(|t| {
                let (inp, out) = t.proj.dims(&self.config);
                r * (inp + out)
            })
            .sum()
    }

    fn head(&self) -> &B::Act {
        self.head.as_ref().unwrap_or(&self.embed)
    }

    /// Forward on ids `[batch, seq]`: the saved activations and the final norm's output `[N, C]`
    /// (the head's input). With a `key` (training), LoRA dropout applies to the adapters' inputs.
    fn forward(&self, b: &Batch, pass: Pass) -> Result<(Saved<B>, B::Act)> {
        let (ids, batch, seq) = (&b.ids[..], b.batch, b.seq);
        const OP: &str = "lora model forward";
        let c = &self.config;
        let be = &self.backend;
        let n = batch * seq;
        if n == 0 || ids.len() != n {
            return Err(shape_err(
                OP,
                format!("{batch} x {seq} ids (non-empty)"),
                ids.len(),
            ));
        }
        if seq > c.max_position_embeddings {
            return Err(invalid(
                OP,
                format!(
                    "{seq} positions exceed max_position_embeddings {}",
                    c.max_position_embeddings
                ),
            ));
        }
        // Packed rows: attention within each sequence, RoPE positions from each sequence's start
        // (a table row per token).
        let segments = match &b.segments {
            Some(s) => Some(be.segments(batch, seq, s)?),
            None => None,
        };
        let table = match &b.segments {
            Some(_) => RopeTable::at_positions(&b.positions(), c.head_dim, &self.inv_freq)?,
            None => RopeTable::new(seq, c.head_dim, &self.inv_freq)?,
        };
        let rope = be.rope(&table)?;
        let mut x = be.zeros(n * c.hidden_size)?;
        be.embedding(ids, &self.embed, c.vocab_size, c.hidden_size, &mut x)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        let mut run = BackendRun {
            be,
            config: c,
            layers: &self.layers,
            slot: &self.slot,
            dropout: self.adapter.dropout,
            rows: n,
            batch,
            seq,
            rope: &rope,
            segments: segments.as_ref(),
            key: pass.key,
            base_only: !pass.adapter,
            // Kept only for a backward that will not run the layer again (checkpointing keeps
            // its inputs alone and recomputes).
            keep: pass.keep == Keep::ForBackward && self.checkpointing == Checkpointing::None,
            kept: Vec::new(),
        };
        for l in 0..c.num_hidden_layers {
            let (acts, out) = layer::forward(&mut run, l, x)?;
            // What is not kept is freed here, before the next layer runs.
            match (pass.keep, self.checkpointing) {
                (Keep::Nothing, _) => {}
                (Keep::ForBackward, Checkpointing::None) => layers.push(LayerSaved::All(acts)),
                (Keep::ForBackward, Checkpointing::Layers) => {
                    layers.push(LayerSaved::Input(acts.x))
                }
            }
            x = out;
        }
        let mut xn_final = be.zeros(n * c.hidden_size)?;
        let mut rstd_final = be.zeros_f32(n)?;
        be.rmsnorm_forward(
            &x,
            &self.norm,
            c.rms_norm_eps,
            &mut xn_final,
            &mut rstd_final,
        )?;
        let kept = std::mem::take(&mut run.kept);
        Ok((
            Saved {
                batch,
                seq,
                key: pass.key,
                layers,
                x_final: x,
                rstd_final,
                rope,
                segments,
                kept,
            },
            xn_final,
        ))
    }

    /// Backward from `dxn` (the gradient of the loss with respect to the final norm's output):
    /// adds the LoRA gradients into the accumulators.
    fn backward(&mut self, f: &mut Saved<B>, dxn: B::Act) -> Result<()> {
        let dropout = &self.adapter.dropout;
        let LoraModel {
            backend: be,
            config: c,
            norm,
            layers,
            trainable,
            slot,
            ..
        } = self;
        let n = f.batch * f.seq;
        let (cw, qd, kd, id) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let ow = Accumulate::Overwrite;
        // Gradients of the frozen norm weights land here and are dropped.
        let mut scratch = be.zeros_f32(cw)?;
        let mut dx = be.zeros(n * cw)?;
        be.rmsnorm_backward(
            &f.x_final,
            norm,
            &f.rstd_final,
            &dxn,
            &mut dx,
            ow,
            &mut scratch,
        )?;

        let mut bufs = BackBufs {
            dh: be.zeros(n * id)?,
            dgate: be.zeros(n * id)?,
            dup: be.zeros(n * id)?,
            dattn: be.zeros(n * qd)?,
            dq: be.zeros(n * qd)?,
            dk: be.zeros(n * kd)?,
            dv: be.zeros(n * kd)?,
            dxn,
        };
        let (layers, slot): (&[Layer<B>], &[Vec<Option<usize>>]) = (layers, slot);
        let mut kept = std::mem::take(&mut f.kept);
        let f: &Saved<B> = f;
        let mut run = BackendBackRun {
            be,
            config: c,
            layers,
            trainable,
            slot,
            dropout: *dropout,
            f,
            scratch: &mut scratch,
            kept: Default::default(),
        };
        for l in (0..c.num_hidden_layers).rev() {
            let recomputed;
            let acts = match &f.layers[l] {
                LayerSaved::All(acts) => acts,
                LayerSaved::Input(x) => {
                    let mut fwd = BackendRun {
                        be,
                        config: c,
                        layers,
                        slot,
                        dropout: *dropout,
                        rows: n,
                        batch: f.batch,
                        seq: f.seq,
                        rope: &f.rope,
                        segments: f.segments.as_ref(),
                        key: f.key,
                        base_only: false,
                        keep: true,
                        kept: Vec::new(),
                    };
                    recomputed = layer::forward(&mut fwd, l, be.duplicate(x)?)?.0;
                    run.kept = fwd.kept.pop().unwrap_or_default();
                    &recomputed
                }
            };
            if let LayerSaved::All(_) = &f.layers[l] {
                run.kept = kept.get_mut(l).map(std::mem::take).unwrap_or_default();
            }
            layer::backward(&mut run, l, acts, &mut dx, &mut bufs)?;
        }
        Ok(())
    }

    /// The logits `[batch * seq, vocab]` (bf16 values widened to f32) of a batch's ids (its
    /// targets unused).
    pub fn logits(&self, b: &Batch) -> Result<Vec<f32>> {
        let c = &self.config;
        let n = b.ids.len();
        let (_, xn) = self.forward(b, Pass::eval(true))?;
        let mut logits = self.backend.zeros(n * c.vocab_size)?;
        self.backend.matmul_wt(
            &xn,
            self.head(),
            (n, c.hidden_size, c.vocab_size),
            &mut logits,
        )?;
        self.backend.download(&logits)
    }

    /// The mean cross-entropy of a batch's targets (no gradient).
    pub fn loss(&self, b: &Batch) -> Result<f32> {
        let (_, xn) = self.forward(b, Pass::eval(true))?;
        self.head_loss(&xn, &b.targets, 1.0, None)
    }

    /// Each target row's loss and whether its target is the first argmax of its logits
    /// ([`Backend::lm_head_scores`]), for a batch (no gradient, no dropout, no activation kept
    /// past its layer): an evaluation without the logits ([`crate::fit::heldout_scored`]).
    /// With `adapter` false every projection runs as its frozen base alone: the model before
    /// fine-tuning, whatever the adapter holds now.
    pub fn scores(&self, b: &Batch, adapter: bool) -> Result<Vec<RowScore<f32>>> {
        let (_, xn) = self.forward(b, Pass::eval(adapter))?;
        let (shape, chunk) = self.head_shape(b.targets.len());
        self.backend
            .lm_head_scores(&xn, self.head(), shape, &b.targets, chunk)
    }

    /// The head's shape on `rows` token rows and its chunk of rows (see
    /// [`Self::set_loss_chunk_rows`]).
    fn head_shape(&self, rows: usize) -> (LmHeadShape, usize) {
        let c = &self.config;
        let shape = LmHeadShape {
            rows,
            hidden: c.hidden_size,
            vocab: c.vocab_size,
        };
        let chunk = self
            .loss_chunk_rows
            .unwrap_or_else(|| qadapt::plan::loss_chunk_rows(rows, c.vocab_size));
        (shape, chunk)
    }

    /// The fused head and cross-entropy of the final norm's output `xn` (see the module doc).
    fn head_loss(
        &self,
        xn: &B::Act,
        targets: &[Option<u32>],
        dloss: f32,
        dxn: Option<&mut B::Act>,
    ) -> Result<f32> {
        let (shape, chunk) = self.head_shape(targets.len());
        self.backend
            .lm_head_cross_entropy(xn, self.head(), shape, targets, chunk, dloss, dxn)
    }

    /// Token rows per chunk of the fused head and loss: `None` (the default) takes
    /// [`qadapt::plan::loss_chunk_rows`] (2^26 logits per chunk); a smaller chunk saves memory at
    /// a large vocabulary, a larger one launches fewer GEMMs. Every row's loss and gradient are
    /// the same whatever the chunk.
    pub fn set_loss_chunk_rows(&mut self, rows: Option<usize>) {
        self.loss_chunk_rows = rows;
    }

    /// LoRA dropout's seed: training steps draw the masks of [`crate::Trainer`] with the same
    /// `dropout_seed` (keyed by seed, step and micro-batch, [`crate::lora::dropout_mask`]), so
    /// both paths drop the same elements. Needed when the adapter's `dropout` is positive.
    pub fn set_dropout_seed(&mut self, seed: u64) {
        self.dropout_seed = Some(seed);
    }

    /// What the training forward keeps for the backward (default: every activation).
    pub fn set_checkpointing(&mut self, c: Checkpointing) {
        self.checkpointing = c;
    }

    /// What the training forward keeps for the backward.
    pub fn checkpointing(&self) -> Checkpointing {
        self.checkpointing
    }

    /// The dropout key of the next micro-batch (`None` without dropout).
    fn dropout_key(&self) -> Result<Option<DropoutKey>> {
        if self.adapter.dropout == 0.0 {
            return Ok(None);
        }
        let seed = self.dropout_seed.ok_or_else(|| {
            invalid(
                "lora model step",
                format!(
                    "lora_dropout = {} needs a dropout seed (set_dropout_seed)",
                    self.adapter.dropout
                ),
            )
        })?;
        Ok(Some(DropoutKey {
            seed,
            step: self.steps + 1,
            micro: self.micro,
        }))
    }

    /// Forward and backward of one micro-batch, adding its gradient (weighted by its target
    /// tokens, as [`crate::Trainer::accumulate`] does) to the accumulators; returns its mean loss.
    /// LoRA dropout applies as in [`crate::Trainer`] (see [`Self::set_dropout_seed`]).
    pub fn accumulate(&mut self, b: &Batch) -> Result<f32> {
        const OP: &str = "lora model step";
        let tokens = b.num_targets();
        if tokens == 0 {
            return Err(invalid(OP, "a micro-batch without target tokens"));
        }
        if b.targets.len() != b.ids.len() {
            return Err(shape_err(OP, b.ids.len(), b.targets.len()));
        }
        let key = self.dropout_key()?;
        let (mut saved, xn) = self.forward(b, Pass::train(key))?;
        let mut dxn = self.backend.zeros(b.ids.len() * self.config.hidden_size)?;
        let loss = self.head_loss(&xn, &b.targets, tokens as f32, Some(&mut dxn))?;
        drop(xn);
        self.backward(&mut saved, dxn)?;
        self.micro += 1;
        self.acc_tokens += tokens;
        self.acc_loss += f64::from(loss) * tokens as f64;
        Ok(loss)
    }

    fn download_pairs(
        &self,
        pick: impl Fn(&Trainable<B>) -> (&B::F32, &B::F32),
        scale: f32,
    ) -> Result<LoraAdapter<f32>> {
        let mut pairs = vec![vec![None; Proj::ALL.len()]; self.config.num_hidden_layers];
        for t in &self.trainable {
            let (a, b) = pick(t);
            let s = |v: Vec<f32>| v.into_iter().map(|x| x * scale).collect();
            pairs[t.layer][t.proj.index()] = Some(LoraPair {
                a: s(self.backend.download_f32(a)?),
                b: s(self.backend.download_f32(b)?),
            });
        }
        Ok(LoraAdapter {
            config: self.adapter.clone(),
            pairs,
        })
    }

    /// The mean-loss gradient accumulated so far (the accumulators divided by their token count),
    /// shaped as the adapter.
    pub fn grads(&self) -> Result<LoraAdapter<f32>> {
        if self.acc_tokens == 0 {
            return Err(invalid("lora model grads", "nothing accumulated"));
        }
        self.download_pairs(|t| (&t.ga, &t.gb), 1.0 / self.acc_tokens as f32)
    }

    /// The current f32 masters, as a [`LoraAdapter`] (save it with [`LoraAdapter::save`]).
    pub fn adapter(&self) -> Result<LoraAdapter<f32>> {
        self.download_pairs(|t| (&t.a, &t.b), 1.0)
    }

    /// Writes the adapter in PEFT's format (the CPU writer, from the downloaded masters).
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.adapter()?.save(dir, &self.config)
    }

    /// One AdamW step from the accumulated gradient at learning rate `lr`, clipped to
    /// `max_grad_norm` by global norm when given; clears the accumulators. The moments are
    /// allocated (zero) by the first step, where the model's [`MomentPlacement`] says.
    pub fn apply(&mut self, opt: &AdamW, max_grad_norm: Option<f64>, lr: f32) -> Result<StepStats> {
        if self.acc_tokens == 0 {
            return Err(invalid("lora model step", "nothing accumulated"));
        }
        let be = &self.backend;
        let inv = 1.0 / self.acc_tokens as f64;
        let grads: Vec<&B::F32> = self.trainable.iter().flat_map(|t| [&t.ga, &t.gb]).collect();
        let sq = be.sum_squares(&grads)?;
        let stats = StepStats {
            loss: (self.acc_loss * inv) as f32,
            grad_norm: sq.sqrt() * inv,
            tokens: self.acc_tokens,
        };
        let clip = max_grad_norm.map_or(1.0, |m| clip_coefficient(stats.grad_norm, m));
        // AdamW multiplies each gradient by this first: the mean over tokens, then the clip.
        let step = opt.step(self.steps + 1, lr, clip * inv as f32)?;
        for t in &mut self.trainable {
            if t.moments.is_none() {
                let ma = be.moments(t.len.0, self.placement)?;
                let mb = be.moments(t.len.1, self.placement)?;
                t.moments = Some((ma, mb));
            }
            let (ma, mb) = t.moments.as_mut().expect("allocated above");
            let proj = &mut self.layers[t.layer].projs[t.proj.index()];
            be.adamw(&mut t.a, proj, LoraMatrix::A, &t.ga, ma, &step)?;
            be.adamw(&mut t.b, proj, LoraMatrix::B, &t.gb, mb, &step)?;
        }
        self.steps += 1;
        self.clear_accumulators()?;
        Ok(stats)
    }

    fn clear_accumulators(&mut self) -> Result<()> {
        for t in &mut self.trainable {
            t.ga = self.backend.zeros_f32(t.len.0)?;
            t.gb = self.backend.zeros_f32(t.len.1)?;
        }
        self.micro = 0;
        self.acc_tokens = 0;
        self.acc_loss = 0.0;
        Ok(())
    }

    /// The AdamW moments `(m, v)` of every trainable tensor in [`LoraAdapter::named`] order (A
    /// then B of each adapted projection), downloaded: the layout of
    /// [`crate::Trainer::moments`], so that a checkpoint holds the same tensors whichever path
    /// wrote it. Empty before the first step.
    pub fn moments(&self) -> Result<Vec<(Vec<f32>, Vec<f32>)>> {
        let mut out = Vec::with_capacity(2 * self.trainable.len());
        for (ma, mb) in self.trainable.iter().filter_map(|t| t.moments.as_ref()) {
            out.push(self.backend.download_moments(ma)?);
            out.push(self.backend.download_moments(mb)?);
        }
        Ok(out)
    }

    /// Continues a run: `steps` AdamW steps taken and the moments [`Self::moments`] (or
    /// [`crate::Trainer::moments`] on the same adapter) returned, empty for none yet. The masters
    /// are the adapter the model was built with; the accumulators are cleared.
    pub fn restore(&mut self, steps: u64, moments: &[(Vec<f32>, Vec<f32>)]) -> Result<()> {
        const OP: &str = "lora model restore";
        if !moments.is_empty() {
            let want: Vec<usize> = self
                .trainable
                .iter()
                .flat_map(|t| [t.len.0, t.len.1])
                .collect();
            let got: Vec<usize> = moments.iter().map(|(m, _)| m.len()).collect();
            if want != got || moments.iter().any(|(m, v)| m.len() != v.len()) {
                return Err(shape_err(
                    OP,
                    format!("moments of {} tensors of lengths {want:?}", want.len()),
                    format!("{} of lengths {got:?}", got.len()),
                ));
            }
        }
        for (i, t) in self.trainable.iter_mut().enumerate() {
            t.moments = match moments.get(2 * i..2 * i + 2) {
                Some([(ma, va), (mb, vb)]) => Some((
                    self.backend.moments_from(ma, va, self.placement)?,
                    self.backend.moments_from(mb, vb, self.placement)?,
                )),
                _ => None,
            };
        }
        self.steps = steps;
        self.clear_accumulators()
    }

    /// One step on a batch: [`Self::accumulate`] then [`Self::apply`]; returns the loss before the
    /// update.
    pub fn step(
        &mut self,
        b: &Batch,
        opt: &AdamW,
        max_grad_norm: Option<f64>,
        lr: f32,
    ) -> Result<f32> {
        self.accumulate(b)?;
        Ok(self.apply(opt, max_grad_norm, lr)?.loss)
    }
}

/// [`LoraModel`]'s forward ops on a batch of `rows = batch * seq` tokens, LoRA dropout drawn
/// under `key` (training) or none. It borrows the model's parts, not the model, so that the
/// backward can run it (recomputing a checkpointed layer) while it adds into the gradients.
struct BackendRun<'m, B: Backend> {
    be: &'m B,
    config: &'m LlamaConfig,
    layers: &'m [Layer<B>],
    slot: &'m [Vec<Option<usize>>],
    dropout: f64,
    rows: usize,
    batch: usize,
    seq: usize,
    rope: &'m B::Rope,
    segments: Option<&'m B::Segments>,
    key: Option<DropoutKey>,
    /// Every projection as its frozen base alone (no LoRA term): the model before fine-tuning.
    base_only: bool,
    /// Whether the projections keep what their backward reuses (in `kept`).
    keep: bool,
    /// What they kept, a layer at a time as the layers run.
    kept: Vec<Kept<B>>,
}

impl<B: Backend> BackendRun<'_, B> {
    fn mask(&self, l: usize, p: Proj) -> Result<Option<(DropoutMask, f32)>> {
        let adapted = self.slot[l][p.index()].is_some();
        dropout_mask(self.dropout, self.key, adapted, l, p)
    }

    /// `out (=|+=) x W^T (+ the LoRA term)` of projection `p` in layer `l`: the base alone for a
    /// base-only pass, and where the run keeps what the backward reuses, kept in `kept[l]`.
    fn apply(
        &mut self,
        l: usize,
        p: Proj,
        x: &B::Act,
        out: &mut B::Act,
        acc: Accumulate,
    ) -> Result<()> {
        let (be, n) = (self.be, self.rows);
        let pj = &self.layers[l].projs[p.index()];
        if self.base_only {
            return be.proj_forward(pj, x, n, out, acc, Terms::Base);
        }
        let mask = self.mask(l, p)?;
        let inp = p.dims(self.config).0;
        let len = if self.keep {
            be.proj_keep_len(pj, n)
        } else {
            0
        };
        if len == 0 {
            return proj_forward(be, pj, mask, x, n, inp, out, acc, None);
        }
        let mut keep = be.zeros(len)?;
        proj_forward(be, pj, mask, x, n, inp, out, acc, Some(&mut keep))?;
        if self.kept.len() <= l {
            self.kept.resize_with(l + 1, Default::default);
        }
        self.kept[l][p.index()] = Some(keep);
        Ok(())
    }
}

impl<B: Backend> LayerRun for BackendRun<'_, B> {
    type Act = B::Act;
    type Stats = B::F32;
    type Att = B::F32;

    fn rmsnorm(&mut self, l: usize, norm: Norm, x: &B::Act) -> Result<(B::Act, B::F32)> {
        let (be, c, n) = (self.be, self.config, self.rows);
        let lw = &self.layers[l];
        let w = match norm {
            Norm::Input => &lw.input_norm,
            Norm::Post => &lw.post_norm,
        };
        let (mut y, mut rstd) = (be.zeros(n * c.hidden_size)?, be.zeros_f32(n)?);
        be.rmsnorm_forward(x, w, c.rms_norm_eps, &mut y, &mut rstd)?;
        Ok((y, rstd))
    }

    fn project(&mut self, l: usize, p: Proj, x: &B::Act) -> Result<B::Act> {
        let mut y = self.be.zeros(self.rows * p.dims(self.config).1)?;
        self.apply(l, p, x, &mut y, Accumulate::Overwrite)?;
        Ok(y)
    }

    fn rope(&mut self, _l: usize, q: &mut B::Act, k: &mut B::Act) -> Result<()> {
        let (be, c) = (self.be, self.config);
        be.rope_apply(self.rope, q, c.num_attention_heads, RopeDirection::Forward)?;
        be.rope_apply(self.rope, k, c.num_key_value_heads, RopeDirection::Forward)
    }

    fn attention(
        &mut self,
        _l: usize,
        q: &B::Act,
        k: &B::Act,
        v: &B::Act,
    ) -> Result<(B::F32, B::Act)> {
        let (be, c) = (self.be, self.config);
        let sh = c.attention_shape(self.batch, self.seq);
        let mut att = be.zeros_f32(be.attention_saved_len(sh))?;
        let mut attn = be.zeros(self.rows * c.q_dim())?;
        be.attention_forward(sh, q, k, v, self.segments, &mut att, &mut attn)?;
        Ok((att, attn))
    }

    fn residual(&mut self, l: usize, p: Proj, x: &B::Act, resid: &B::Act) -> Result<B::Act> {
        let mut out = self.be.duplicate(resid)?;
        self.apply(l, p, x, &mut out, Accumulate::Add)?;
        Ok(out)
    }

    fn swiglu(&mut self, gate: &B::Act, up: &B::Act) -> Result<B::Act> {
        let mut h = self.be.zeros(self.rows * self.config.intermediate_size)?;
        self.be.swiglu_forward(gate, up, &mut h)?;
        Ok(h)
    }
}

/// [`LoraModel`]'s backward ops for the forward `f`: the LoRA gradients add into `trainable`'s
/// accumulators (the frozen norms' land in `scratch`), the dropout masks regenerated from the
/// forward's key.
struct BackendBackRun<'m, B: Backend> {
    be: &'m B,
    config: &'m LlamaConfig,
    layers: &'m [Layer<B>],
    trainable: &'m mut [Trainable<B>],
    slot: &'m [Vec<Option<usize>>],
    dropout: f64,
    f: &'m Saved<B>,
    scratch: &'m mut B::F32,
    /// What the current layer's forward kept ([`Saved::kept`], or the recomputed layer's).
    kept: Kept<B>,
}

impl<B: Backend> LayerBackRun for BackendBackRun<'_, B> {
    type Act = B::Act;
    type Stats = B::F32;
    type Att = B::F32;

    fn rmsnorm_backward(
        &mut self,
        l: usize,
        norm: Norm,
        x: &B::Act,
        rstd: &B::F32,
        dy: &B::Act,
        dx: &mut B::Act,
        acc: Accumulate,
    ) -> Result<()> {
        let lw = &self.layers[l];
        let w = match norm {
            Norm::Input => &lw.input_norm,
            Norm::Post => &lw.post_norm,
        };
        self.be
            .rmsnorm_backward(x, w, rstd, dy, dx, acc, &mut *self.scratch)
    }

    fn project_backward(
        &mut self,
        l: usize,
        p: Proj,
        x: &B::Act,
        dy: &B::Act,
        dx: &mut B::Act,
        acc: Accumulate,
    ) -> Result<()> {
        let adapted = self.slot[l][p.index()];
        let mask = dropout_mask(self.dropout, self.f.key, adapted.is_some(), l, p)?;
        let grads = adapted.map(|i| {
            let t = &mut self.trainable[i];
            (&mut t.ga, &mut t.gb)
        });
        let pj = &self.layers[l].projs[p.index()];
        let rows = self.f.batch * self.f.seq;
        let inp = p.dims(self.config).0;
        let kept = self.kept[p.index()].as_ref();
        proj_backward(self.be, pj, mask, x, dy, rows, inp, dx, acc, grads, kept)
    }

    /// No Houlsby adapters on this path: `out` is the identity.
    fn out_backward(&mut self, _l: usize, _p: Proj, _dres: &B::Act) -> Result<Option<B::Act>> {
        Ok(None)
    }

    fn swiglu_backward(
        &mut self,
        gate: &B::Act,
        up: &B::Act,
        dh: &B::Act,
        dgate: &mut B::Act,
        dup: &mut B::Act,
    ) -> Result<()> {
        self.be.swiglu_backward(gate, up, dh, dgate, dup)
    }

    fn attention_backward(
        &mut self,
        _l: usize,
        a: &LayerCache<B>,
        dattn: &B::Act,
        dq: &mut B::Act,
        dk: &mut B::Act,
        dv: &mut B::Act,
    ) -> Result<()> {
        let sh = self.config.attention_shape(self.f.batch, self.f.seq);
        self.be.attention_backward(
            sh,
            &a.q,
            &a.k,
            &a.v,
            self.f.segments.as_ref(),
            &a.att,
            &a.attn,
            dattn,
            dq,
            dk,
            dv,
        )
    }

    fn rope_backward(&mut self, dq: &mut B::Act, dk: &mut B::Act) -> Result<()> {
        let (be, c, rope) = (self.be, self.config, &self.f.rope);
        be.rope_apply(rope, dq, c.num_attention_heads, RopeDirection::Backward)?;
        be.rope_apply(rope, dk, c.num_key_value_heads, RopeDirection::Backward)
    }
}

/// Refuses [`BaseFormat::Nf4`] where the source makes its own codes (a random model, a
/// checkpoint: [`BaseFormat::QuantizeNf4`] is the NF4 base there).
fn no_given_codes(base: BaseFormat<'_>, op: &'static str) -> Result<()> {
    match base {
        BaseFormat::Nf4(_) => Err(invalid(
            op,
            "the codes come from the source: use BaseFormat::QuantizeNf4",
        )),
        _ => Ok(()),
    }
}

/// The dropout mask of projection `p` of layer `l` in a training forward under `key`, with the
/// kept elements' multiplier `k = 1 / (1 - prob)`: `None` without a key (evaluation), without
/// dropout, or where the projection is not adapted.
fn dropout_mask(
    prob: f64,
    key: Option<DropoutKey>,
    adapted: bool,
    l: usize,
    p: Proj,
) -> Result<Option<(DropoutMask, f32)>> {
    match key {
        Some(key) if adapted && prob > 0.0 => {
            let mask = DropoutMask::new(dropout_base(key, l, p), prob)?;
            Ok(Some((mask, (1.0 / (1.0 - prob)) as f32)))
        }
        _ => Ok(None),
    }
}

/// A projection's forward. With a dropout mask m (multipliers 0 or k), PEFT's
/// `W x + s B A (m x)` is the fused layer on `x~ = m x` plus the base weight alone on the
/// complement: `(W x~ + s B A x~) + W (x - x~)`, one more base GEMM than without dropout.
#[allow(clippy::too_many_arguments)]
fn proj_forward<B: Backend>(
    be: &B,
    pj: &B::Proj,
    mask: Option<(DropoutMask, f32)>,
    x: &B::Act,
    rows: usize,
    inp: usize,
    y: &mut B::Act,
    acc: Accumulate,
    keep: Option<&mut B::Act>,
) -> Result<()> {
    // The fused call on x (or x~), keeping what its backward reuses where asked.
    let fused =
        |x: &B::Act, y: &mut B::Act| be.proj_forward(pj, x, rows, y, acc, Terms::Adapted { keep });
    let Some((mask, k)) = mask else {
        return fused(x, y);
    };
    let mut xd = be.zeros(rows * inp)?;
    be.mask_mix(mask, x, MaskCoef::new(k, 0.0), None, &mut xd)?;
    fused(&xd, y)?;
    be.mask_mix(mask, x, MaskCoef::new(1.0 - k, 1.0), None, &mut xd)?;
    be.proj_forward(pj, &xd, rows, y, Accumulate::Add, Terms::Base)
}

/// Backward of [`proj_forward`]. With a dropout mask, the fused backward on `x~` forms the
/// adapter gradients (which see `x~`) and `d1 = dy W + s (dy B) A`; the base alone gives
/// `d0 = dy W`; the input gradient `dy W + m ⊙ s (dy B) A` is then `d0 + m ⊙ (d1 - d0)`, i.e.
/// `(1 - k) d0 + k d1` where kept and `d0` where dropped (the mask regenerated, not stored).
#[allow(clippy::too_many_arguments)]
fn proj_backward<B: Backend>(
    be: &B,
    pj: &B::Proj,
    mask: Option<(DropoutMask, f32)>,
    x: &B::Act,
    dy: &B::Act,
    rows: usize,
    inp: usize,
    dx: &mut B::Act,
    acc: Accumulate,
    grads: Option<(&mut B::F32, &mut B::F32)>,
    kept: Option<&B::Act>,
) -> Result<()> {
    // The fused backward on x (or x~), from what its forward kept where it did.
    let fused = |x: &B::Act, dx: &mut B::Act, acc, grads| {
        be.proj_backward(pj, x, dy, rows, dx, acc, BackTerms::Adapted { kept, grads })
    };
    let Some((mask, k)) = mask else {
        return fused(x, dx, acc, grads);
    };
    let mut xd = be.zeros(rows * inp)?;
    be.mask_mix(mask, x, MaskCoef::new(k, 0.0), None, &mut xd)?;
    let (mut d1, mut d0) = (be.zeros(rows * inp)?, be.zeros(rows * inp)?);
    fused(&xd, &mut d1, Accumulate::Overwrite, grads)?;
    be.proj_backward(
        pj,
        &xd,
        dy,
        rows,
        &mut d0,
        Accumulate::Overwrite,
        BackTerms::Base,
    )?;
    let (ca, cb) = (MaskCoef::new(1.0 - k, 1.0), MaskCoef::new(k, 0.0));
    match acc {
        Accumulate::Overwrite => be.mask_mix(mask, &d0, ca, Some((&d1, cb)), dx),
        Accumulate::Add => {
            be.mask_mix(mask, &d0, ca, Some((&d1, cb)), &mut xd)?;
            be.add_assign(dx, &xd)
        }
    }
}
