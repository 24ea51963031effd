//! The Llama decoder on qadapt's CPU ops: forward with saved activations, the loss, and a
//! hand-written backward (llm.c style: each module's backward called in reverse order, no
//! autograd).
//!
//! Shapes: `N = batch * seq` tokens, width `C`, `Q = heads * D`, `K = kv_heads * D`, MLP width `I`,
//! vocabulary `V`; activations are token-major `[N, *]`. The layers are [`crate::layer`]'s (one
//! definition, shared with the generator and the backend model); this file supplies their CPU ops
//! with every adapter method's hooks. Then `logits = rmsnorm(x_L, w_final) W_head^T` (`W_head` = the embedding table when tied) and
//! the loss is the mean cross-entropy of each token's logits against the next token (labels =
//! input ids, the last position of each sequence has no target), as `LlamaForCausalLM` computes it
//! with `labels=input_ids`.
//!
//! The backward accumulates into a zeroed [`LlamaWeights`] (for tied weights, the head's gradient
//! lands in `embed_tokens`) and also returns the gradient with respect to the input embeddings
//! (the output of the embedding lookup), which prompt tuning trains. An [`Attached`] adapter
//! changes the layers: LoRA adds its low-rank term to each targeted projection (see
//! [`crate::lora`]; [`Attached::LoraTrain`] also applies its dropout), (IA)³ scales a
//! projection's output or input ([`crate::ia3`]), a prefix adds keys and values to every
//! attention and shifts the real tokens' RoPE positions by its length
//! ([`crate::prefix_attention`], [`crate::prompt`]), and Houlsby adapters wrap the outputs of
//! `o_proj` and `down_proj` before their residual adds ([`crate::houlsby`]). The backward returns
//! the adapter's gradients; [`BaseGrads::Frozen`] then skips the base weights' gradients (their
//! GEMMs and their memory), which is what adapter training wants.

use std::sync::Arc;

use qadapt::Result;
use qadapt::ops::attention;
use qadapt::ops::linear::{self, LinearShape};
use qadapt::ops::rope::{self, RopeDirection, RopeTable};
use qadapt::ops::{Accumulate, Real, cross_entropy, embedding, rmsnorm, swiglu};

use qadapt::bottleneck::{self, BottleneckShape};

use crate::config::LlamaConfig;
use crate::houlsby::HoulsbyAdapter;
use crate::ia3::{self, Ia3Adapter, Ia3Side, scale_rows};
use crate::layer::{self, BackBufs, LayerActs, LayerBackRun, LayerRun, Norm};
use crate::lora::{DropoutKey, LoraAdapter, dropout_mask, lora_term};
use crate::pool::{Buf, Pool};
use crate::prefix_attention::{self, PrefixShape};
use crate::prompt::PrefixTuning;
use crate::train::Batch;
use crate::weights::{LayerWeights, LlamaWeights, Proj};
use crate::{invalid, shape_err};

/// The adapter attached inside the decoder layers for one forward/backward (prompt tuning acts
/// on the input embeddings only and needs none: see [`crate::peft`]).
#[derive(Debug, Clone, Copy)]
pub enum Attached<'a, T> {
    /// The base model.
    None,
    /// LoRA on the targeted projections (PEFT's eval mode: no dropout).
    Lora(&'a LoraAdapter<T>),
    /// LoRA in training mode: its `lora_dropout` on the adapter's inputs, with the masks of this
    /// key (see [`crate::lora`]); the backward must be given the same key.
    LoraTrain(&'a LoraAdapter<T>, DropoutKey),
    /// (IA)³ scaling vectors on the targeted projections.
    Ia3(&'a Ia3Adapter<T>),
    /// Prefix keys and values in every layer's attention.
    Prefix(&'a PrefixTuning<T>),
    /// Houlsby bottleneck adapters after attention and after the MLP.
    Houlsby(&'a HoulsbyAdapter<T>),
}

impl<T> Attached<'_, T> {
    fn kind(&self) -> &'static str {
        match self {
            Attached::None => "no adapter",
            Attached::Lora(_) => "a LoRA adapter",
            Attached::LoraTrain(..) => "a LoRA adapter in training mode",
            Attached::Ia3(_) => "an (IA)3 adapter",
            Attached::Prefix(_) => "a prefix",
            Attached::Houlsby(_) => "Houlsby adapters",
        }
    }

    /// The LoRA adapter and, in training mode, its dropout key.
    fn lora(&self) -> Option<(&LoraAdapter<T>, Option<DropoutKey>)> {
        match *self {
            Attached::Lora(a) => Some((a, None)),
            Attached::LoraTrain(a, k) => Some((a, Some(k))),
            _ => None,
        }
    }

    fn prefix_len(&self) -> usize {
        match self {
            Attached::Prefix(p) => p.num_virtual_tokens,
            _ => 0,
        }
    }
}

impl<'a, T> From<&'a LoraAdapter<T>> for Attached<'a, T> {
    fn from(l: &'a LoraAdapter<T>) -> Self {
        Attached::Lora(l)
    }
}

impl<'a, T> From<Option<&'a LoraAdapter<T>>> for Attached<'a, T> {
    fn from(l: Option<&'a LoraAdapter<T>>) -> Self {
        l.map_or(Attached::None, Attached::Lora)
    }
}

/// What a Houlsby site's backward needs: its input (the sublayer output) and the bottleneck
/// pre-activation.
type HoulsbySaved<T> = (Vec<T>, Vec<T>);

/// An output projection's saved values: the projection's own ([`LayerCache::saved`]) and the
/// Houlsby site's.
type OutProjSaved<T> = (Option<Vec<T>>, Option<HoulsbySaved<T>>);

/// Adapter gradients being accumulated by a backward.
struct AdapterGrads<T> {
    lora: Option<LoraAdapter<T>>,
    ia3: Option<Ia3Adapter<T>>,
    prefix: Option<PrefixTuning<T>>,
    houlsby: Option<HoulsbyAdapter<T>>,
}

/// A Llama model held in `T` (f32 to run, f64 to check gradients).
#[derive(Debug, Clone)]
pub struct Llama<T> {
    /// The architecture.
    pub config: LlamaConfig,
    /// The parameters.
    pub weights: LlamaWeights<T>,
    inv_freq: Vec<f32>,
    /// Activation buffers kept from one forward/backward for the next (see [`crate::pool`]);
    /// the generator's too.
    pub(crate) pool: Arc<Pool<T>>,
}

/// Activations one layer's backward needs.
#[derive(Debug, Clone)]
struct LayerCache<T> {
    /// The layer's activations (`att`: attention's probabilities).
    acts: LayerActs<Buf<T>, Buf<T>, Buf<T>>,
    /// Per projection (by [`Proj::index`]): LoRA's `u = s x A^T`, or (IA)³'s unscaled output
    /// `x W^T` for output scaling.
    saved: Vec<Option<Vec<T>>>,
    /// Houlsby: each site's input (the sublayer output) and its bottleneck pre-activation.
    houlsby: Option<[HoulsbySaved<T>; 2]>,
}

/// The result of a forward pass: the logits and every activation the backward needs.
#[derive(Debug, Clone)]
pub struct Forward<T> {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub seq: usize,
    /// The token ids, when the forward started from ids (the embedding gradient needs them).
    pub ids: Option<Vec<u32>>,
    /// `[N, V]` (`[batch, seq, vocab]` row-major).
    pub logits: Vec<T>,
    layers: Vec<LayerCache<T>>,
    x_final: Buf<T>,
    rstd_final: Buf<T>,
    xn_final: Buf<T>,
    rope: RopeTable<T>,
    kind: &'static str,
    dropout: Option<DropoutKey>,
}

/// Whether the backward computes the base weights' gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseGrads {
    /// Every base parameter is trained.
    Compute,
    /// The base is frozen (adapter training): no weight gradients, only activations' and the
    /// adapter's.
    Frozen,
}

/// How a forward and its backward run.
#[derive(Debug, Clone, Copy)]
pub struct Options<'a, T> {
    /// The adapter inside the layers (the backward must be given the same).
    pub adapter: Attached<'a, T>,
    /// Whether the backward computes the base weights' gradients.
    pub base: BaseGrads,
    /// Whether the forward keeps every activation for a backward; evaluation turns it off and
    /// holds one layer's activations at a time.
    pub keep_activations: bool,
}

impl<T> Default for Options<'_, T> {
    /// The base model, every parameter trained.
    fn default() -> Self {
        Options {
            adapter: Attached::None,
            base: BaseGrads::Compute,
            keep_activations: true,
        }
    }
}

impl<'a, T> Options<'a, T> {
    /// Adapter training: `adapter` attached, the base frozen.
    pub fn adapter(adapter: impl Into<Attached<'a, T>>) -> Self {
        Options {
            adapter: adapter.into(),
            base: BaseGrads::Frozen,
            keep_activations: true,
        }
    }

    /// The same with the base's gradients computed or not.
    pub fn with_base(self, base: BaseGrads) -> Self {
        Options { base, ..self }
    }

    /// The same for evaluation: the forward keeps only the logits (no backward possible).
    pub fn eval(self) -> Self {
        Options {
            keep_activations: false,
            ..self
        }
    }
}

/// What a forward starts from.
#[derive(Debug, Clone)]
pub enum Input<'a, T> {
    /// Token ids, row-major `[batch, seq]` (the embedding gradient and [`Llama::loss`] use them).
    Ids {
        /// The ids.
        ids: &'a [u32],
        /// Rows.
        batch: usize,
        /// Positions per row.
        seq: usize,
    },
    /// Input embeddings `[batch * seq, C]` (prompt tuning's virtual tokens, gradient checks).
    Embeds {
        /// The embeddings.
        embeds: Vec<T>,
        /// Rows.
        batch: usize,
        /// Positions per row.
        seq: usize,
    },
}

impl<'a, T> Input<'a, T> {
    /// Token ids `[batch, seq]`.
    pub fn ids(ids: &'a [u32], batch: usize, seq: usize) -> Self {
        Input::Ids { ids, batch, seq }
    }

    /// Input embeddings `[batch * seq, C]`.
    pub fn embeds(embeds: Vec<T>, batch: usize, seq: usize) -> Self {
        Input::Embeds { embeds, batch, seq }
    }
}

impl<'a, T> From<&'a Batch> for Input<'a, T> {
    fn from(b: &'a Batch) -> Self {
        Input::ids(&b.ids, b.batch, b.seq)
    }
}

/// Gradients of the loss.
#[derive(Debug, Clone)]
pub struct Gradients<T> {
    /// With respect to every base parameter (same layout as the weights); `None` when frozen.
    pub weights: Option<LlamaWeights<T>>,
    /// With respect to the LoRA matrices, when the forward used a LoRA adapter.
    pub lora: Option<LoraAdapter<T>>,
    /// With respect to the (IA)³ vectors, when the forward used them.
    pub ia3: Option<Ia3Adapter<T>>,
    /// With respect to the prefix (PEFT's `prompt_embeddings` layout), for prefix tuning.
    pub prefix: Option<PrefixTuning<T>>,
    /// With respect to the Houlsby adapters, when the forward used them.
    pub houlsby: Option<HoulsbyAdapter<T>>,
    /// With respect to the input embeddings, `[N, C]`.
    pub inputs_embeds: Vec<T>,
}

/// Next-token targets of a causal LM: `t[b, i] = ids[b, i + 1]`, none at the last position.
pub fn causal_targets(ids: &[u32], batch: usize, seq: usize) -> Result<Vec<Option<u32>>> {
    if ids.len() != batch * seq || seq == 0 {
        return Err(shape_err(
            "causal targets",
            format!("{batch} x {seq} ids"),
            ids.len(),
        ));
    }
    Ok(ids
        .chunks_exact(seq)
        .flat_map(|s| s[1..].iter().map(|&t| Some(t)).chain([None]))
        .collect())
}

impl<T: Real> Llama<T> {
    /// A model from its config and parameters (shapes are checked against the config).
    pub fn new(config: LlamaConfig, weights: LlamaWeights<T>) -> Result<Self> {
        let specs = crate::weights::layout(&config);
        let slots = weights.slots();
        if specs.len() != slots.len() {
            return Err(shape_err(
                "llama weights",
                format!("{} tensors", specs.len()),
                slots.len(),
            ));
        }
        for ((name, shape), v) in specs.iter().zip(&slots) {
            let n: usize = shape.iter().product();
            if v.len() != n {
                return Err(shape_err(
                    "llama weights",
                    format!("{name} of {n} elements"),
                    v.len(),
                ));
            }
        }
        let inv_freq = rope::inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)?;
        Ok(Llama {
            config,
            weights,
            inv_freq,
            pool: Pool::new(),
        })
    }

    /// The same model in another [`Real`] type.
    pub fn cast<U: Real>(&self) -> Llama<U> {
        Llama {
            config: self.config.clone(),
            weights: self.weights.cast(),
            inv_freq: self.inv_freq.clone(),
            pool: Pool::new(),
        }
    }

    /// A pooled copy of `x`.
    fn copy(&self, x: &[T]) -> Buf<T> {
        let mut y = self.pool.overwritten(x.len());
        y.copy_from_slice(x);
        y
    }

    fn head(&self) -> &[T] {
        self.weights
            .lm_head
            .as_deref()
            .unwrap_or(&self.weights.embed_tokens)
    }

    /// The forward pass: the logits and, unless `opts` asks for evaluation only, every activation
    /// the backward needs.
    pub fn forward<'i>(
        &self,
        input: impl Into<Input<'i, T>>,
        opts: Options<'_, T>,
    ) -> Result<Forward<T>>
    where
        T: 'i,
    {
        let (embeds, ids, batch, seq) = match input.into() {
            Input::Ids { ids, batch, seq } => {
                if ids.len() != batch * seq {
                    return Err(shape_err(
                        "llama forward",
                        format!("{batch} x {seq} ids"),
                        ids.len(),
                    ));
                }
                (self.embed(ids)?, Some(ids.to_vec()), batch, seq)
            }
            Input::Embeds { embeds, batch, seq } => (embeds, None, batch, seq),
        };
        let mut f = self.forward_embeds(embeds, batch, seq, opts)?;
        f.ids = ids;
        Ok(f)
    }

    /// The embedding rows of `ids`, `[ids.len(), C]`.
    pub fn embed(&self, ids: &[u32]) -> Result<Vec<T>> {
        let c = &self.config;
        let mut x = vec![T::ZERO; ids.len() * c.hidden_size];
        embedding::forward(
            ids,
            &self.weights.embed_tokens,
            c.vocab_size,
            c.hidden_size,
            &mut x,
        )?;
        Ok(x)
    }

    fn forward_embeds(
        &self,
        embeds: Vec<T>,
        batch: usize,
        seq: usize,
        opts: Options<'_, T>,
    ) -> Result<Forward<T>> {
        let att = opts.adapter;
        let c = &self.config;
        self.check_attached(att)?;
        let n = batch * seq;
        if n == 0 || embeds.len() != n * c.hidden_size {
            return Err(shape_err(
                "llama forward",
                format!("{batch} x {seq} x {} embeddings (non-empty)", c.hidden_size),
                embeds.len(),
            ));
        }
        let prefix = att.prefix_len();
        if seq.saturating_add(prefix) > c.max_position_embeddings {
            return Err(invalid(
                "llama forward",
                format!(
                    "{} positions exceed max_position_embeddings {}",
                    seq.saturating_add(prefix),
                    c.max_position_embeddings
                ),
            ));
        }
        crate::budget::check(
            &format!(
                "a batch of {batch} x {} positions: the activations",
                seq + prefix
            ),
            crate::budget::activation_bytes(c, batch, seq + prefix, std::mem::size_of::<T>()),
        )
        .map_err(|e| invalid("llama forward", e))?;
        // Real tokens sit at positions prefix..prefix+seq (a prefix is a past of that length).
        let full = RopeTable::new(seq + prefix, c.head_dim, &self.inv_freq)?;
        let half = c.head_dim / 2;
        let rope = RopeTable {
            seq,
            head_dim: c.head_dim,
            cos: full.cos[prefix * half..].to_vec(),
            sin: full.sin[prefix * half..].to_vec(),
        };
        let mut x = self.pool.adopt(embeds);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        let mut run = CpuRun {
            model: self,
            batch,
            seq,
            rope: &rope,
            att,
            saved: vec![None; Proj::ALL.len()],
            houlsby: [None, None],
        };
        for l in 0..c.num_hidden_layers {
            let (acts, out) = layer::forward(&mut run, l, x)?;
            let [h0, h1] = std::mem::take(&mut run.houlsby);
            let saved = std::mem::replace(&mut run.saved, vec![None; Proj::ALL.len()]);
            // Evaluation drops each layer's activations as soon as the next layer has its input.
            if opts.keep_activations {
                layers.push(LayerCache {
                    acts,
                    saved,
                    houlsby: h0.zip(h1).map(|(a, b)| [a, b]),
                });
            }
            x = out;
        }
        let mut rstd_final = self.pool.overwritten(n);
        let mut xn_final = self.pool.overwritten(x.len());
        rmsnorm::forward(
            &x,
            &self.weights.norm,
            c.rms_norm_eps,
            &mut xn_final,
            &mut rstd_final,
        )?;
        let mut logits = vec![T::ZERO; n * c.vocab_size];
        linear::forward(
            LinearShape {
                rows: n,
                inp: c.hidden_size,
                out: c.vocab_size,
            },
            &xn_final,
            self.head(),
            &mut logits,
            Accumulate::Overwrite,
        )?;
        Ok(Forward {
            batch,
            seq,
            ids: None,
            logits,
            layers,
            x_final: x,
            rstd_final,
            xn_final,
            rope,
            kind: att.kind(),
            dropout: att.lora().and_then(|(_, k)| k),
        })
    }

    /// `rmsnorm(x)` with layer `l`'s weight of `norm`, and its `1 / rms` per token, in buffers
    /// of the model's pool: the op of every CPU runner of [`layer::forward`].
    pub(crate) fn layer_rmsnorm(
        &self,
        l: usize,
        norm: Norm,
        x: &Buf<T>,
    ) -> Result<(Buf<T>, Buf<T>)> {
        let lw = &self.weights.layers[l];
        let w = match norm {
            Norm::Input => &lw.input_layernorm,
            Norm::Post => &lw.post_attention_layernorm,
        };
        // Both are overwritten whole by the op.
        let (mut y, mut rstd) = (
            self.pool.overwritten(x.len()),
            self.pool.overwritten(x.len() / self.config.hidden_size),
        );
        rmsnorm::forward(x, w, self.config.rms_norm_eps, &mut y, &mut rstd)?;
        Ok((y, rstd))
    }

    /// `silu(gate) * up` in a buffer of the model's pool (every CPU runner's SwiGLU).
    pub(crate) fn layer_swiglu(&self, gate: &Buf<T>, up: &Buf<T>) -> Result<Buf<T>> {
        let mut h = self.pool.overwritten(gate.len());
        swiglu::forward(gate, up, &mut h)?;
        Ok(h)
    }

    fn check_attached(&self, att: Attached<'_, T>) -> Result<()> {
        let c = &self.config;
        let ok = match att {
            Attached::None => true,
            Attached::Lora(a) | Attached::LoraTrain(a, _) => a.fits(c),
            Attached::Ia3(a) => a.fits(c),
            Attached::Prefix(p) => p.fits(c),
            Attached::Houlsby(h) => h.fits(c),
        };
        if ok {
            Ok(())
        } else {
            Err(shape_err(
                "llama adapter",
                format!("{} shaped for this model", att.kind()),
                "tensors of other shapes",
            ))
        }
    }

    /// `y (=|+=) x W^T` for projection `p` of layer `l`, with the LoRA term or the (IA)³ scaling
    /// when the projection is adapted; returns what the backward needs (LoRA's `u = s x A^T`,
    /// (IA)³'s unscaled output for output scaling).
    #[allow(clippy::too_many_arguments)]
    fn proj_forward(
        &self,
        l: usize,
        p: Proj,
        n: usize,
        x: &[T],
        y: &mut [T],
        acc: Accumulate,
        att: Attached<'_, T>,
    ) -> Result<Option<Vec<T>>> {
        let (inp, out) = p.dims(&self.config);
        let sh = LinearShape { rows: n, inp, out };
        let w = self.weights.layers[l].proj(p);
        if let Attached::Ia3(a) = att
            && let Some(hook) = a.hook(l, p)
        {
            let (mut xs, mut y0) = (Vec::new(), Vec::new());
            let keep = Some(&mut y0);
            let scaled_output =
                ia3::hooked_linear(sh, x, w, y, acc, |_| Some(hook), &mut xs, keep)?;
            return Ok(scaled_output.then_some(y0));
        }
        linear::forward(sh, x, w, y, acc)?;
        let Some((a, key)) = att.lora() else {
            return Ok(None);
        };
        let Some(pair) = a.pair(l, p) else {
            return Ok(None);
        };
        let r = a.config.r;
        let dropped = lora_dropout(a, key, l, p, x)?;
        let mut u = vec![T::ZERO; n * r];
        lora_term(
            dropped.as_ref().map_or(x, |(xd, _)| xd),
            &pair.a,
            &pair.b,
            (inp, r, out),
            T::from_f64(a.config.scaling()),
            &mut u,
            y,
            Accumulate::Add,
        )?;
        Ok(Some(u))
    }

    /// Backward of [`Self::proj_forward`]: `dx (=|+=)`, base `dW +=` when `dw` is given, and the
    /// adapter's gradients `+=` when the projection is adapted.
    #[allow(clippy::too_many_arguments)]
    fn proj_backward(
        &self,
        l: usize,
        p: Proj,
        n: usize,
        x: &[T],
        dy: &[T],
        dx: &mut [T],
        acc: Accumulate,
        dw: Option<&mut LayerWeights<T>>,
        att: Attached<'_, T>,
        ga: &mut AdapterGrads<T>,
        saved: &[Option<Vec<T>>],
    ) -> Result<()> {
        const OP: &str = "llama adapter backward";
        let (inp, out) = p.dims(&self.config);
        let sh = LinearShape { rows: n, inp, out };
        let w = self.weights.layers[l].proj(p);
        let dw = dw.map(|g| g.proj_mut(p));
        if let (Attached::Ia3(a), Some(gi)) = (att, ga.ia3.as_mut())
            && let Some((side, s)) = a.hook(l, p)
        {
            let gs = gi.scales[l][p.index()]
                .as_mut()
                .ok_or_else(|| invalid(OP, "gradient buffers do not match the adapter"))?;
            if side == Ia3Side::Input {
                let mut xs = x.to_vec();
                scale_rows(&mut xs, s);
                let mut dxs = vec![T::ZERO; n * inp];
                linear::backward(sh, &xs, w, dy, Some((&mut dxs, Accumulate::Overwrite)), dw)?;
                for ((xr, dr), dxr) in x
                    .chunks_exact(inp)
                    .zip(dxs.chunks_exact(inp))
                    .zip(dx.chunks_exact_mut(inp))
                {
                    for k in 0..inp {
                        gs[k] += xr[k] * dr[k];
                        acc.store(&mut dxr[k], dr[k] * s[k]);
                    }
                }
                return Ok(());
            }
            let y0 = saved[p.index()]
                .as_deref()
                .ok_or_else(|| invalid(OP, "the forward ran without this adapter"))?;
            let mut dy0 = dy.to_vec();
            for (dr, yr) in dy0.chunks_exact_mut(out).zip(y0.chunks_exact(out)) {
                for k in 0..out {
                    gs[k] += yr[k] * dr[k];
                    dr[k] *= s[k];
                }
            }
            return linear::backward(sh, x, w, &dy0, Some((dx, acc)), dw);
        }
        linear::backward(sh, x, w, dy, Some((dx, acc)), dw)?;
        let (Some((a, key)), Some(glora)) = (att.lora(), ga.lora.as_mut()) else {
            return Ok(());
        };
        let (Some(pair), Some(gpair)) = (a.pair(l, p), glora.pairs[l][p.index()].as_mut()) else {
            return Ok(());
        };
        let u = saved[p.index()]
            .as_deref()
            .ok_or_else(|| invalid(OP, "the forward ran without this adapter"))?;
        let r = a.config.r;
        // g = dy B (then scaled by s), dB += dy^T u.
        let mut g = vec![T::ZERO; n * r];
        linear::backward(
            LinearShape {
                rows: n,
                inp: r,
                out,
            },
            u,
            &pair.b,
            dy,
            Some((&mut g, Accumulate::Overwrite)),
            Some(&mut gpair.b),
        )?;
        let s = T::from_f64(a.config.scaling());
        g.iter_mut().for_each(|v| *v *= s);
        let sa = LinearShape {
            rows: n,
            inp,
            out: r,
        };
        // dx += g A, dA += g^T x; with dropout x is d(x) = x ⊙ m and dx += (g A) ⊙ m.
        let Some((xd, m)) = lora_dropout(a, key, l, p, x)? else {
            return linear::backward(
                sa,
                x,
                &pair.a,
                &g,
                Some((dx, Accumulate::Add)),
                Some(&mut gpair.a),
            );
        };
        let mut dxd = vec![T::ZERO; n * inp];
        linear::backward(
            sa,
            &xd,
            &pair.a,
            &g,
            Some((&mut dxd, Accumulate::Overwrite)),
            Some(&mut gpair.a),
        )?;
        dx.iter_mut()
            .zip(dxd.iter().zip(&m))
            .for_each(|(d, (v, k))| *d += *v * *k);
        Ok(())
    }

    fn prefix_shape(&self, batch: usize, seq: usize, prefix: usize) -> PrefixShape {
        PrefixShape {
            batch,
            seq,
            prefix,
            heads: self.config.num_attention_heads,
            kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// A sublayer's output projection into the residual stream `resid`, through the Houlsby
    /// adapter of its site when attached; returns the adapter's saved (input, pre-activation).
    #[allow(clippy::too_many_arguments)]
    fn out_proj_forward(
        &self,
        l: usize,
        p: Proj,
        n: usize,
        x: &[T],
        resid: &mut [T],
        att: Attached<'_, T>,
    ) -> Result<OutProjSaved<T>> {
        let Attached::Houlsby(h) = att else {
            let saved = self.proj_forward(l, p, n, x, resid, Accumulate::Add, att)?;
            return Ok((saved, None));
        };
        let cw = self.config.hidden_size;
        let mut yin = vec![T::ZERO; n * cw];
        self.proj_forward(l, p, n, x, &mut yin, Accumulate::Overwrite, att)?;
        let mut z = vec![T::ZERO; n * h.config.bottleneck];
        let mut y = vec![T::ZERO; n * cw];
        h.forward(l, p, &yin, &mut z, &mut y)?;
        resid.iter_mut().zip(&y).for_each(|(r, v)| *r += *v);
        Ok((None, Some((yin, z))))
    }

    /// The mean next-token cross-entropy of a forward that started from ids.
    pub fn loss(&self, f: &Forward<T>) -> Result<T> {
        let ids = f.ids.as_deref().ok_or_else(|| {
            invalid(
                "llama loss",
                "the forward started from embeddings; pass targets",
            )
        })?;
        let targets = causal_targets(ids, f.batch, f.seq)?;
        cross_entropy::forward(&f.logits, &targets, self.config.vocab_size)
    }

    /// Gradients of `loss = mean cross-entropy(logits, targets)` (targets `[N]`, `None` ignored)
    /// with respect to the input embeddings, the attached adapter's tensors, and every base
    /// parameter unless `opts.base` is [`BaseGrads::Frozen`]. `opts.adapter` must be what the
    /// forward used (checked, dropout key included).
    pub fn backward(
        &self,
        f: &Forward<T>,
        targets: &[Option<u32>],
        opts: Options<'_, T>,
    ) -> Result<Gradients<T>> {
        let (att, base) = (opts.adapter, opts.base);
        const OP: &str = "llama backward";
        let c = &self.config;
        if f.kind != att.kind() {
            return Err(invalid(
                OP,
                format!(
                    "the forward ran with {}, the backward was given {}",
                    f.kind,
                    att.kind()
                ),
            ));
        }
        if f.dropout != att.lora().and_then(|(_, k)| k) {
            return Err(invalid(OP, "the forward drew other LoRA dropout masks"));
        }
        if f.layers.len() != c.num_hidden_layers {
            return Err(invalid(
                OP,
                "the forward kept no activations (Options::keep_activations was off)",
            ));
        }
        self.check_attached(att)?;
        let n = f.batch * f.seq;
        let (cw, qd, kd, id, vocab) = (
            c.hidden_size,
            c.q_dim(),
            c.kv_dim(),
            c.intermediate_size,
            c.vocab_size,
        );
        // The activation gradients below are each overwritten whole by their first op (an
        // `Overwrite` store or an op that always overwrites) before anything adds to them.
        let o = |len: usize| self.pool.overwritten(len);
        let ow = Accumulate::Overwrite;
        let mut g = match base {
            BaseGrads::Compute => Some(LlamaWeights::<T>::zeros(c)),
            BaseGrads::Frozen => None,
        };
        let mut ga = AdapterGrads {
            lora: None,
            ia3: None,
            prefix: None,
            houlsby: None,
        };
        match att {
            Attached::None => {}
            Attached::Lora(a) | Attached::LoraTrain(a, _) => ga.lora = Some(a.zeros_like()),
            Attached::Ia3(a) => ga.ia3 = Some(a.zeros_like()),
            Attached::Prefix(p) => {
                ga.prefix = Some(PrefixTuning {
                    num_virtual_tokens: p.num_virtual_tokens,
                    values: vec![T::ZERO; p.values.len()],
                })
            }
            Attached::Houlsby(h) => ga.houlsby = Some(h.zeros_like()),
        }
        // Norm weight gradients of a frozen base land here and are dropped.
        let mut scratch = vec![T::ZERO; cw];

        let mut dlogits = o(n * vocab);
        cross_entropy::backward(&f.logits, targets, vocab, T::ONE, &mut dlogits)?;
        let mut dxn = o(n * cw);
        let dhead = g.as_mut().map(|g| match g.lm_head.as_mut() {
            Some(h) => h.as_mut_slice(),
            None => g.embed_tokens.as_mut_slice(),
        });
        linear::backward(
            LinearShape {
                rows: n,
                inp: cw,
                out: vocab,
            },
            &f.xn_final,
            self.head(),
            &dlogits,
            Some((&mut dxn, ow)),
            dhead,
        )?;
        let mut dx = o(n * cw);
        let dnorm = g.as_mut().map_or(&mut scratch, |g| &mut g.norm);
        rmsnorm::backward(
            &f.x_final,
            &self.weights.norm,
            &f.rstd_final,
            &dxn,
            &mut dx,
            ow,
            dnorm,
        )?;

        let mut bufs = BackBufs {
            dh: o(n * id),
            dgate: o(n * id),
            dup: o(n * id),
            dattn: o(n * qd),
            dq: o(n * qd),
            dk: o(n * kd),
            dv: o(n * kd),
            dxn,
        };
        let mut run = CpuBackRun {
            model: self,
            f,
            att,
            g: g.as_mut(),
            ga: &mut ga,
            scratch: &mut scratch,
        };
        for l in (0..c.num_hidden_layers).rev() {
            layer::backward(&mut run, l, &f.layers[l].acts, &mut dx, &mut bufs)?;
        }
        if let (Some(ids), Some(g)) = (f.ids.as_deref(), g.as_mut()) {
            embedding::backward(ids, &dx, vocab, cw, &mut g.embed_tokens)?;
        }
        Ok(Gradients {
            weights: g,
            lora: ga.lora,
            ia3: ga.ia3,
            prefix: ga.prefix,
            houlsby: ga.houlsby,
            inputs_embeds: dx.into_vec(),
        })
    }

    /// Forward, loss (the mean cross-entropy of the batch's targets) and backward.
    pub fn loss_and_grads(
        &self,
        b: &Batch,
        opts: Options<'_, T>,
    ) -> Result<(T, Forward<T>, Gradients<T>)> {
        let f = self.forward(b, opts)?;
        let loss = cross_entropy::forward(&f.logits, &b.targets, self.config.vocab_size)?;
        let g = self.backward(&f, &b.targets, opts)?;
        Ok((loss, f, g))
    }
}

/// [`Llama`]'s forward ops on one batch with one adapter attached; the adapter's per-layer saved
/// values collect in `saved` and `houlsby` (taken by the forward after each layer).
struct CpuRun<'m, 'a, T> {
    model: &'m Llama<T>,
    batch: usize,
    seq: usize,
    rope: &'m RopeTable<T>,
    att: Attached<'a, T>,
    saved: Vec<Option<Vec<T>>>,
    houlsby: [Option<HoulsbySaved<T>>; 2],
}

impl<T: Real> LayerRun for CpuRun<'_, '_, T> {
    type Act = Buf<T>;
    type Stats = Buf<T>;
    type Att = Buf<T>;

    fn rmsnorm(&mut self, l: usize, norm: Norm, x: &Buf<T>) -> Result<(Buf<T>, Buf<T>)> {
        self.model.layer_rmsnorm(l, norm, x)
    }

    fn project(&mut self, l: usize, p: Proj, x: &Buf<T>) -> Result<Buf<T>> {
        let m = self.model;
        let n = self.batch * self.seq;
        let mut y = m.pool.overwritten(n * p.dims(&m.config).1);
        self.saved[p.index()] =
            m.proj_forward(l, p, n, x, &mut y, Accumulate::Overwrite, self.att)?;
        Ok(y)
    }

    fn rope(&mut self, _l: usize, q: &mut Buf<T>, k: &mut Buf<T>) -> Result<()> {
        let c = &self.model.config;
        self.rope
            .apply(q, c.num_attention_heads, RopeDirection::Forward)?;
        self.rope
            .apply(k, c.num_key_value_heads, RopeDirection::Forward)
    }

    fn attention(
        &mut self,
        l: usize,
        q: &Buf<T>,
        k: &Buf<T>,
        v: &Buf<T>,
    ) -> Result<(Buf<T>, Buf<T>)> {
        let m = self.model;
        let (c, batch, seq) = (&m.config, self.batch, self.seq);
        // The probabilities and the output are overwritten whole by the op.
        let mut attn = m.pool.overwritten(batch * seq * c.q_dim());
        if let Attached::Prefix(pt) = self.att {
            let sh = m.prefix_shape(batch, seq, pt.num_virtual_tokens);
            let mut p = m.pool.overwritten(batch * sh.heads * seq * sh.cols());
            let (pk, pv) = (pt.gather(c, l, 0), pt.gather(c, l, 1));
            prefix_attention::forward(sh, q, k, v, &pk, &pv, &mut p, &mut attn)?;
            return Ok((p, attn));
        }
        let ash = c.attention_shape(batch, seq);
        let mut p = m.pool.overwritten(batch * ash.heads * seq * seq);
        attention::forward(ash, q, k, v, None, &mut p, &mut attn)?;
        Ok((p, attn))
    }

    fn residual(&mut self, l: usize, p: Proj, x: &Buf<T>, resid: &Buf<T>) -> Result<Buf<T>> {
        let m = self.model;
        let mut out = m.copy(resid);
        let site = layer::site(p);
        let (saved, h) = m.out_proj_forward(l, p, self.batch * self.seq, x, &mut out, self.att)?;
        self.saved[p.index()] = saved;
        self.houlsby[site] = h;
        Ok(out)
    }

    fn swiglu(&mut self, gate: &Buf<T>, up: &Buf<T>) -> Result<Buf<T>> {
        self.model.layer_swiglu(gate, up)
    }
}

/// [`Llama`]'s backward ops for the forward `f`: base weight gradients into `g` (none when the
/// base is frozen; a frozen norm's lands in `scratch`), the adapter's into `ga`.
struct CpuBackRun<'m, 'a, T> {
    model: &'m Llama<T>,
    f: &'m Forward<T>,
    att: Attached<'a, T>,
    g: Option<&'m mut LlamaWeights<T>>,
    ga: &'m mut AdapterGrads<T>,
    scratch: &'m mut Vec<T>,
}

impl<T: Real> LayerBackRun for CpuBackRun<'_, '_, T> {
    type Act = Buf<T>;
    type Stats = Buf<T>;
    type Att = Buf<T>;

    fn rmsnorm_backward(
        &mut self,
        l: usize,
        norm: Norm,
        x: &Buf<T>,
        rstd: &Buf<T>,
        dy: &Buf<T>,
        dx: &mut Buf<T>,
        acc: Accumulate,
    ) -> Result<()> {
        let lw = &self.model.weights.layers[l];
        let lg = self.g.as_deref_mut().map(|g| &mut g.layers[l]);
        let (w, dw) = match norm {
            Norm::Input => (
                &lw.input_layernorm,
                lg.map_or(&mut *self.scratch, |g| &mut g.input_layernorm),
            ),
            Norm::Post => (
                &lw.post_attention_layernorm,
                lg.map_or(&mut *self.scratch, |g| &mut g.post_attention_layernorm),
            ),
        };
        rmsnorm::backward(x, w, rstd, dy, dx, acc, dw)
    }

    fn project_backward(
        &mut self,
        l: usize,
        p: Proj,
        x: &Buf<T>,
        dy: &Buf<T>,
        dx: &mut Buf<T>,
        acc: Accumulate,
    ) -> Result<()> {
        let n = self.f.batch * self.f.seq;
        let lg = self.g.as_deref_mut().map(|g| &mut g.layers[l]);
        let saved = self.f.layers[l].saved.as_slice();
        self.model
            .proj_backward(l, p, n, x, dy, dx, acc, lg, self.att, self.ga, saved)
    }

    fn out_backward(&mut self, l: usize, p: Proj, dres: &Buf<T>) -> Result<Option<Buf<T>>> {
        let (Attached::Houlsby(ha), Some(hc), Some(gh)) = (
            self.att,
            self.f.layers[l].houlsby.as_ref(),
            self.ga.houlsby.as_mut(),
        ) else {
            return Ok(None);
        };
        let site = layer::site(p);
        let (yin, zb) = &hc[site];
        let cw = self.model.config.hidden_size;
        let bs = BottleneckShape {
            rows: self.f.batch * self.f.seq,
            hidden: cw,
            bottleneck: ha.config.bottleneck,
        };
        let mut dsub = self.model.pool.overwritten(dres.len());
        bottleneck::backward(
            bs,
            ha.config.activation,
            yin,
            zb,
            &ha.layers[l][site],
            dres,
            &mut dsub,
            Accumulate::Overwrite,
            &mut gh.layers[l][site],
        )?;
        Ok(Some(dsub))
    }

    fn swiglu_backward(
        &mut self,
        gate: &Buf<T>,
        up: &Buf<T>,
        dh: &Buf<T>,
        dgate: &mut Buf<T>,
        dup: &mut Buf<T>,
    ) -> Result<()> {
        swiglu::backward(gate, up, dh, dgate, dup)
    }

    fn attention_backward(
        &mut self,
        l: usize,
        a: &LayerActs<Buf<T>, Buf<T>, Buf<T>>,
        dattn: &Buf<T>,
        dq: &mut Buf<T>,
        dk: &mut Buf<T>,
        dv: &mut Buf<T>,
    ) -> Result<()> {
        let (m, f) = (self.model, self.f);
        let c = &m.config;
        if let (Attached::Prefix(pt), Some(gp)) = (self.att, self.ga.prefix.as_mut()) {
            let sh = m.prefix_shape(f.batch, f.seq, pt.num_virtual_tokens);
            let (pk, pv) = (pt.gather(c, l, 0), pt.gather(c, l, 1));
            let (mut dpk, mut dpv) = (vec![T::ZERO; pk.len()], vec![T::ZERO; pv.len()]);
            prefix_attention::backward(
                sh, &a.q, &a.k, &a.v, &pk, &pv, &a.att, dattn, dq, dk, dv, &mut dpk, &mut dpv,
            )?;
            gp.scatter_add(c, l, 0, &dpk);
            gp.scatter_add(c, l, 1, &dpv);
            return Ok(());
        }
        let ash = c.attention_shape(f.batch, f.seq);
        attention::backward(ash, &a.q, &a.k, &a.v, &a.att, dattn, dq, dk, dv)
    }

    fn rope_backward(&mut self, dq: &mut Buf<T>, dk: &mut Buf<T>) -> Result<()> {
        let c = &self.model.config;
        self.f
            .rope
            .apply(dq, c.num_attention_heads, RopeDirection::Backward)?;
        self.f
            .rope
            .apply(dk, c.num_key_value_heads, RopeDirection::Backward)
    }
}

/// LoRA's dropped-out input `(x ⊙ m, m)` for projection `p` of layer `l` in training mode with
/// a positive `lora_dropout`; `None` where the adapter sees `x` itself.
fn lora_dropout<T: Real>(
    a: &LoraAdapter<T>,
    key: Option<DropoutKey>,
    l: usize,
    p: Proj,
    x: &[T],
) -> Result<Option<(Vec<T>, Vec<T>)>> {
    let prob = a.config.dropout;
    let Some(key) = key.filter(|_| prob != 0.0) else {
        return Ok(None);
    };
    let m = dropout_mask::<T>(key, prob, l, p, x.len())?;
    let xd = x.iter().zip(&m).map(|(v, k)| *v * *k).collect();
    Ok(Some((xd, m)))
}
