//! The Llama decoder on qadapt's CPU ops: forward with saved activations, the loss, and a
//! hand-written backward (llm.c style: each module's backward called in reverse order, no
//! autograd).
//!
//! Shapes: `N = batch * seq` tokens, width `C`, `Q = heads * D`, `K = kv_heads * D`, MLP width `I`,
//! vocabulary `V`; activations are token-major `[N, *]`. One layer, as transformers computes it:
//! ```text
//! xn1 = rmsnorm(x, w_in)                 q = rope(xn1 Wq^T)  k = rope(xn1 Wk^T)  v = xn1 Wv^T
//! a   = attention(q, k, v)               x_mid = x + a Wo^T
//! xn2 = rmsnorm(x_mid, w_post)           h = silu(xn2 Wg^T) * (xn2 Wu^T)
//! out = x_mid + h Wd^T
//! ```
//! then `logits = rmsnorm(x_L, w_final) W_head^T` (`W_head` = the embedding table when tied) and
//! the loss is the mean cross-entropy of each token's logits against the next token (labels =
//! input ids, the last position of each sequence has no target), as `LlamaForCausalLM` computes it
//! with `labels=input_ids`.
//!
//! The backward accumulates into a zeroed [`LlamaWeights`] (for tied weights, the head's gradient
//! lands in `embed_tokens`) and also returns the gradient with respect to the input embeddings
//! (the output of the embedding lookup), which prompt tuning trains. With a [`LoraAdapter`], every
//! targeted projection adds its low-rank term (see [`crate::lora`]) and the backward returns the
//! adapter's gradients; [`BaseGrads::Frozen`] then skips the base weights' gradients (their GEMMs
//! and their memory), which is what LoRA training wants.

use qadapt::Result;
use qadapt::ops::attention::{self, AttentionShape};
use qadapt::ops::linear::{self, LinearShape};
use qadapt::ops::rope::{self, RopeDirection, RopeTable};
use qadapt::ops::{Accumulate, Real, cross_entropy, embedding, rmsnorm, swiglu};

use crate::config::LlamaConfig;
use crate::lora::LoraAdapter;
use crate::weights::{LayerWeights, LlamaWeights, Proj};
use crate::{invalid, shape_err};

/// A Llama model held in `T` (f32 to run, f64 to check gradients).
#[derive(Debug, Clone)]
pub struct Llama<T> {
    /// The architecture.
    pub config: LlamaConfig,
    /// The parameters.
    pub weights: LlamaWeights<T>,
    inv_freq: Vec<f32>,
}

/// Activations one layer's backward needs.
#[derive(Debug, Clone)]
struct LayerCache<T> {
    x: Vec<T>,
    rstd1: Vec<T>,
    xn1: Vec<T>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    p: Vec<T>,
    attn: Vec<T>,
    x_mid: Vec<T>,
    rstd2: Vec<T>,
    xn2: Vec<T>,
    gate: Vec<T>,
    up: Vec<T>,
    h: Vec<T>,
    /// `u = s x A^T` of each adapted projection, by [`Proj::index`].
    lora_u: Vec<Option<Vec<T>>>,
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
    x_final: Vec<T>,
    rstd_final: Vec<T>,
    xn_final: Vec<T>,
    rope: RopeTable<T>,
    with_lora: bool,
}

/// What a projection's backward needs of the adapter: its matrices, their gradients and the
/// forward's saved `u`.
struct LoraBack<'a, T> {
    adapter: &'a LoraAdapter<T>,
    grads: &'a mut LoraAdapter<T>,
    saved: &'a [Option<Vec<T>>],
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

/// Gradients of the loss.
#[derive(Debug, Clone)]
pub struct Gradients<T> {
    /// With respect to every base parameter (same layout as the weights); `None` when frozen.
    pub weights: Option<LlamaWeights<T>>,
    /// With respect to the LoRA matrices, when the forward used an adapter.
    pub lora: Option<LoraAdapter<T>>,
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
        })
    }

    /// The same model in another [`Real`] type.
    pub fn cast<U: Real>(&self) -> Llama<U> {
        Llama {
            config: self.config.clone(),
            weights: self.weights.cast(),
            inv_freq: self.inv_freq.clone(),
        }
    }

    fn head(&self) -> &[T] {
        self.weights
            .lm_head
            .as_deref()
            .unwrap_or(&self.weights.embed_tokens)
    }

    /// Forward from token ids `[batch, seq]`.
    pub fn forward(&self, ids: &[u32], batch: usize, seq: usize) -> Result<Forward<T>> {
        self.forward_with(ids, batch, seq, None)
    }

    /// Forward from token ids with an optional LoRA adapter.
    pub fn forward_with(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        lora: Option<&LoraAdapter<T>>,
    ) -> Result<Forward<T>> {
        let c = &self.config;
        if ids.len() != batch * seq {
            return Err(shape_err(
                "llama forward",
                format!("{batch} x {seq} ids"),
                ids.len(),
            ));
        }
        let mut x = vec![T::ZERO; ids.len() * c.hidden_size];
        embedding::forward(
            ids,
            &self.weights.embed_tokens,
            c.vocab_size,
            c.hidden_size,
            &mut x,
        )?;
        let mut f = self.forward_embeds_with(x, batch, seq, lora)?;
        f.ids = Some(ids.to_vec());
        Ok(f)
    }

    /// Forward from input embeddings `[batch * seq, C]`.
    pub fn forward_embeds(&self, embeds: Vec<T>, batch: usize, seq: usize) -> Result<Forward<T>> {
        self.forward_embeds_with(embeds, batch, seq, None)
    }

    /// Forward from input embeddings with an optional LoRA adapter.
    pub fn forward_embeds_with(
        &self,
        embeds: Vec<T>,
        batch: usize,
        seq: usize,
        lora: Option<&LoraAdapter<T>>,
    ) -> Result<Forward<T>> {
        let c = &self.config;
        if let Some(a) = lora {
            self.check_adapter(a)?;
        }
        let n = batch * seq;
        if n == 0 || embeds.len() != n * c.hidden_size {
            return Err(shape_err(
                "llama forward",
                format!("{batch} x {seq} x {} embeddings (non-empty)", c.hidden_size),
                embeds.len(),
            ));
        }
        if seq > c.max_position_embeddings {
            return Err(invalid(
                "llama forward",
                format!(
                    "{seq} tokens exceed max_position_embeddings {}",
                    c.max_position_embeddings
                ),
            ));
        }
        let rope = RopeTable::new(seq, c.head_dim, &self.inv_freq)?;
        let mut x = embeds;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let (cache, out) = self.layer_forward(l, x, batch, seq, &rope, lora)?;
            layers.push(cache);
            x = out;
        }
        let mut rstd_final = vec![T::ZERO; n];
        let mut xn_final = vec![T::ZERO; x.len()];
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
            with_lora: lora.is_some(),
        })
    }

    fn check_adapter(&self, a: &LoraAdapter<T>) -> Result<()> {
        let c = &self.config;
        let ok = a.pairs.len() == c.num_hidden_layers
            && a.pairs.iter().enumerate().all(|(l, layer)| {
                layer.len() == Proj::ALL.len()
                    && Proj::ALL.iter().zip(layer).all(|(&p, pair)| {
                        let (inp, out) = p.dims(c);
                        pair.as_ref().is_none_or(|pr| {
                            pr.a.len() == a.config.r * inp && pr.b.len() == out * a.config.r
                        }) && (pair.is_some() == a.config.targets(l, p))
                    })
            });
        if ok {
            Ok(())
        } else {
            Err(shape_err(
                "llama lora",
                format!(
                    "an adapter of rank {} for {} layers of this model",
                    a.config.r, c.num_hidden_layers
                ),
                "matrices of other shapes",
            ))
        }
    }

    /// `y (=|+=) x W^T` for projection `p` of layer `l`, plus the LoRA term when adapted; returns
    /// the saved `u = s x A^T`.
    #[allow(clippy::too_many_arguments)]
    fn proj_forward(
        &self,
        l: usize,
        p: Proj,
        n: usize,
        x: &[T],
        y: &mut [T],
        acc: Accumulate,
        lora: Option<&LoraAdapter<T>>,
    ) -> Result<Option<Vec<T>>> {
        let (inp, out) = p.dims(&self.config);
        let w = self.weights.layers[l].proj(p);
        linear::forward(LinearShape { rows: n, inp, out }, x, w, y, acc)?;
        let Some((pair, a)) = lora.and_then(|a| a.pair(l, p).map(|pr| (pr, a))) else {
            return Ok(None);
        };
        let r = a.config.r;
        let mut u = vec![T::ZERO; n * r];
        linear::forward(
            LinearShape {
                rows: n,
                inp,
                out: r,
            },
            x,
            &pair.a,
            &mut u,
            Accumulate::Overwrite,
        )?;
        let s = T::from_f64(a.config.scaling());
        u.iter_mut().for_each(|v| *v *= s);
        linear::forward(
            LinearShape {
                rows: n,
                inp: r,
                out,
            },
            &u,
            &pair.b,
            y,
            Accumulate::Add,
        )?;
        Ok(Some(u))
    }

    /// Backward of [`Self::proj_forward`]: `dx (=|+=)`, base `dW +=` when `dw` is given, and the
    /// adapter's `dA`, `dB +=` when the projection is adapted.
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
        lora: Option<LoraBack<'_, T>>,
    ) -> Result<()> {
        let (inp, out) = p.dims(&self.config);
        let w = self.weights.layers[l].proj(p);
        linear::backward(
            LinearShape { rows: n, inp, out },
            x,
            w,
            dy,
            Some((dx, acc)),
            dw.map(|g| g.proj_mut(p)),
        )?;
        let Some(LoraBack {
            adapter: a,
            grads: ga,
            saved,
        }) = lora
        else {
            return Ok(());
        };
        let (Some(pair), Some(gpair)) = (a.pair(l, p), ga.pairs[l][p.index()].as_mut()) else {
            return Ok(());
        };
        let u = saved[p.index()].as_deref().ok_or_else(|| {
            invalid(
                "llama lora backward",
                "the forward ran without this adapter",
            )
        })?;
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
        // dx += g A, dA += g^T x.
        linear::backward(
            LinearShape {
                rows: n,
                inp,
                out: r,
            },
            x,
            &pair.a,
            &g,
            Some((dx, Accumulate::Add)),
            Some(&mut gpair.a),
        )
    }

    fn attention_shape(&self, batch: usize, seq: usize) -> AttentionShape {
        AttentionShape {
            batch,
            seq,
            heads: self.config.num_attention_heads,
            kv_heads: self.config.num_key_value_heads,
            head_dim: self.config.head_dim,
        }
    }

    fn layer_forward(
        &self,
        l: usize,
        x: Vec<T>,
        batch: usize,
        seq: usize,
        rope: &RopeTable<T>,
        lora: Option<&LoraAdapter<T>>,
    ) -> Result<(LayerCache<T>, Vec<T>)> {
        let lw = &self.weights.layers[l];
        let c = &self.config;
        let n = batch * seq;
        let (cw, qd, kd, id) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let z = |len: usize| vec![T::ZERO; len];
        let ow = Accumulate::Overwrite;
        let mut lora_u: Vec<Option<Vec<T>>> = vec![None; Proj::ALL.len()];

        let (mut xn1, mut rstd1) = (z(n * cw), z(n));
        rmsnorm::forward(
            &x,
            &lw.input_layernorm,
            c.rms_norm_eps,
            &mut xn1,
            &mut rstd1,
        )?;
        let (mut q, mut k, mut v) = (z(n * qd), z(n * kd), z(n * kd));
        lora_u[0] = self.proj_forward(l, Proj::Q, n, &xn1, &mut q, ow, lora)?;
        lora_u[1] = self.proj_forward(l, Proj::K, n, &xn1, &mut k, ow, lora)?;
        lora_u[2] = self.proj_forward(l, Proj::V, n, &xn1, &mut v, ow, lora)?;
        rope.apply(&mut q, c.num_attention_heads, RopeDirection::Forward)?;
        rope.apply(&mut k, c.num_key_value_heads, RopeDirection::Forward)?;
        let ash = self.attention_shape(batch, seq);
        let (mut p, mut attn) = (z(batch * ash.heads * seq * seq), z(n * qd));
        attention::forward(ash, &q, &k, &v, &mut p, &mut attn)?;
        let mut x_mid = x.clone();
        lora_u[3] = self.proj_forward(l, Proj::O, n, &attn, &mut x_mid, Accumulate::Add, lora)?;

        let (mut xn2, mut rstd2) = (z(n * cw), z(n));
        rmsnorm::forward(
            &x_mid,
            &lw.post_attention_layernorm,
            c.rms_norm_eps,
            &mut xn2,
            &mut rstd2,
        )?;
        let (mut gate, mut up, mut h) = (z(n * id), z(n * id), z(n * id));
        lora_u[4] = self.proj_forward(l, Proj::Gate, n, &xn2, &mut gate, ow, lora)?;
        lora_u[5] = self.proj_forward(l, Proj::Up, n, &xn2, &mut up, ow, lora)?;
        swiglu::forward(&gate, &up, &mut h)?;
        let mut out = x_mid.clone();
        lora_u[6] = self.proj_forward(l, Proj::Down, n, &h, &mut out, Accumulate::Add, lora)?;
        Ok((
            LayerCache {
                x,
                rstd1,
                xn1,
                q,
                k,
                v,
                p,
                attn,
                x_mid,
                rstd2,
                xn2,
                gate,
                up,
                h,
                lora_u,
            },
            out,
        ))
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
    /// with respect to every base parameter and the input embeddings.
    pub fn backward(&self, f: &Forward<T>, targets: &[Option<u32>]) -> Result<Gradients<T>> {
        self.backward_with(f, targets, None, BaseGrads::Compute)
    }

    /// The general backward: `lora` must be the adapter the forward used (if any); `base` says
    /// whether the base parameters get gradients.
    pub fn backward_with(
        &self,
        f: &Forward<T>,
        targets: &[Option<u32>],
        lora: Option<&LoraAdapter<T>>,
        base: BaseGrads,
    ) -> Result<Gradients<T>> {
        const OP: &str = "llama backward";
        let c = &self.config;
        if f.with_lora != lora.is_some() {
            return Err(invalid(
                OP,
                "pass the LoRA adapter to the backward exactly when the forward used one",
            ));
        }
        if let Some(a) = lora {
            self.check_adapter(a)?;
        }
        let n = f.batch * f.seq;
        let (cw, qd, kd, id, vocab) = (
            c.hidden_size,
            c.q_dim(),
            c.kv_dim(),
            c.intermediate_size,
            c.vocab_size,
        );
        let z = |len: usize| vec![T::ZERO; len];
        let ow = Accumulate::Overwrite;
        let add = Accumulate::Add;
        let mut g = match base {
            BaseGrads::Compute => Some(LlamaWeights::<T>::zeros(c)),
            BaseGrads::Frozen => None,
        };
        let mut glora = lora.map(LoraAdapter::zeros_like);
        // Norm weight gradients of a frozen base land here and are dropped.
        let mut scratch = z(cw);

        let mut dlogits = z(n * vocab);
        cross_entropy::backward(&f.logits, targets, vocab, T::ONE, &mut dlogits)?;
        let mut dxn = z(n * cw);
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
        let mut dx = z(n * cw);
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

        let ash = self.attention_shape(f.batch, f.seq);
        let (mut dh, mut dgate, mut dup) = (z(n * id), z(n * id), z(n * id));
        let mut dattn = z(n * qd);
        let (mut dq, mut dk, mut dv) = (z(n * qd), z(n * kd), z(n * kd));
        for l in (0..c.num_hidden_layers).rev() {
            let (lw, lc) = (&self.weights.layers[l], &f.layers[l]);
            let mut lg = g.as_mut().map(|g| &mut g.layers[l]);
            let saved = &lc.lora_u;
            macro_rules! proj_back {
                ($p:expr, $x:expr, $dy:expr, $dx:expr, $acc:expr) => {
                    self.proj_backward(
                        l,
                        $p,
                        n,
                        $x,
                        $dy,
                        $dx,
                        $acc,
                        lg.as_deref_mut(),
                        lora.zip(glora.as_mut()).map(|(adapter, grads)| LoraBack {
                            adapter,
                            grads,
                            saved: saved.as_slice(),
                        }),
                    )?
                };
            }
            // MLP branch: dx is the gradient of the layer output (= of x_mid through the residual).
            proj_back!(Proj::Down, &lc.h, &dx, &mut dh, ow);
            swiglu::backward(&lc.gate, &lc.up, &dh, &mut dgate, &mut dup)?;
            proj_back!(Proj::Gate, &lc.xn2, &dgate, &mut dxn, ow);
            proj_back!(Proj::Up, &lc.xn2, &dup, &mut dxn, add);
            let dpost = lg
                .as_deref_mut()
                .map_or(&mut scratch, |g| &mut g.post_attention_layernorm);
            rmsnorm::backward(
                &lc.x_mid,
                &lw.post_attention_layernorm,
                &lc.rstd2,
                &dxn,
                &mut dx,
                add,
                dpost,
            )?;
            // Attention branch: dx is now the gradient of x_mid (= of x through the residual).
            proj_back!(Proj::O, &lc.attn, &dx, &mut dattn, ow);
            attention::backward(
                ash, &lc.q, &lc.k, &lc.v, &lc.p, &dattn, &mut dq, &mut dk, &mut dv,
            )?;
            f.rope
                .apply(&mut dq, c.num_attention_heads, RopeDirection::Backward)?;
            f.rope
                .apply(&mut dk, c.num_key_value_heads, RopeDirection::Backward)?;
            proj_back!(Proj::Q, &lc.xn1, &dq, &mut dxn, ow);
            proj_back!(Proj::K, &lc.xn1, &dk, &mut dxn, add);
            proj_back!(Proj::V, &lc.xn1, &dv, &mut dxn, add);
            let din = lg.map_or(&mut scratch, |g| &mut g.input_layernorm);
            rmsnorm::backward(
                &lc.x,
                &lw.input_layernorm,
                &lc.rstd1,
                &dxn,
                &mut dx,
                add,
                din,
            )?;
        }
        if let (Some(ids), Some(g)) = (f.ids.as_deref(), g.as_mut()) {
            embedding::backward(ids, &dx, vocab, cw, &mut g.embed_tokens)?;
        }
        Ok(Gradients {
            weights: g,
            lora: glora,
            inputs_embeds: dx,
        })
    }

    /// Forward, loss and backward on ids `[batch, seq]` with labels = ids (every base parameter
    /// trained, no adapter).
    pub fn loss_and_grads(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<(T, Forward<T>, Gradients<T>)> {
        self.loss_and_grads_with(ids, batch, seq, None, BaseGrads::Compute)
    }

    /// Forward, loss and backward with labels = ids, an optional adapter and a frozen or trained
    /// base.
    pub fn loss_and_grads_with(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        lora: Option<&LoraAdapter<T>>,
        base: BaseGrads,
    ) -> Result<(T, Forward<T>, Gradients<T>)> {
        let f = self.forward_with(ids, batch, seq, lora)?;
        let targets = causal_targets(ids, batch, seq)?;
        let loss = cross_entropy::forward(&f.logits, &targets, self.config.vocab_size)?;
        let g = self.backward_with(&f, &targets, lora, base)?;
        Ok((loss, f, g))
    }
}
