//! Text generation on the CPU (f32): incremental decoding with a per-layer KV cache, greedy,
//! temperature and nucleus (top-p) sampling, and a batch in which every row may use a different
//! adapter (or none), all rows going through one forward per step.
//!
//! **Decoding.** A [`KvCache`] holds, for every layer, the RoPE'd keys and the values of every
//! position seen so far, `[batch, capacity, kv_heads * D]` each, allocated once by
//! [`Generator::start`]. [`Generator::feed`] appends any number of new tokens to any subset of
//! the rows: the new tokens of all rows are one ragged token-major block `[N, *]` through the
//! projections, RMSNorms and MLP (the same qadapt ops as [`crate::Llama`]'s forward), each token
//! is rotated at its own absolute position `pos` (the row's filled length so far), its key and
//! value are written to `cache[row, pos]`, and its query attends to `cache[row, 0..=pos]`
//! (grouped-query: query head h reads kv head `h / (heads / kv_heads)`; `1/sqrt(D)` scaling;
//! causal because later positions are not written yet, or, within one call, lie beyond `pos`).
//! The prompt is fed once (prefill), then one token per row per step; only each fed row's last
//! position goes through the final norm and the head, so `feed` returns `[batch, V]` logits.
//!
//! **Prompts of different lengths** are not padded: every row keeps its own length, a call
//! carries exactly the rows' real tokens (a ragged batch) and attention reads only the row's own
//! cache, so there is no mask and no wasted compute on padding. Finished rows are simply not fed.
//!
//! **Adapters**, chosen per row from the [`Generator`]'s list (every method runs in this cached
//! path; none falls back to recomputation):
//! - LoRA: per projection, the LoRA adapters of the list are stacked in
//!   [`qadapt::lora::AdapterStack`]'s layout (`A [adapters, r, in]`, `B [adapters, out, r]`, one
//!   scale each, ranks zero-padded to the largest, zeros where an adapter does not target the
//!   projection) and each token carries its row's stack index (-1: none), the contract of
//!   `qadapt::lora`'s fused multi-adapter kernels. Here in f32: `y = x W^T` for all tokens in one
//!   GEMM, then per adapter `y[rows_a] += (s_a x[rows_a] A_a^T) B_a^T` (the grouping the CPU
//!   reference `qadapt::lora::cpu` does). [`LoraStack::to_bf16`] hands the same stack to the
//!   kernels.
//! - (IA)³: the rows' inputs (feed-forward modules) or outputs are scaled by their adapter's
//!   vector around the shared base GEMM.
//! - Houlsby: each row's sublayer output goes through its adapter's bottleneck before the
//!   residual add.
//! - Prefix tuning (and a reparameterized prefix, projected once): [`Generator::start`] writes
//!   the prefix keys and values into the row's cache positions `0..P` as they are (no RoPE: PEFT
//!   passes them as past keys), so the real tokens start at position P, as in
//!   [`crate::prefix_attention`].
//! - Prompt tuning: [`Generator::start`] runs the `P` virtual embeddings through the model at
//!   positions `0..P` (they only attend to each other, so computing them first is the same as
//!   computing them with the prompt); the prompt starts at position P.
//!
//! **Sampling** ([`Sampling`]): greedy takes the first maximal logit; otherwise
//! `p = softmax(logits / T)` (f64), the tokens sorted by decreasing probability (ties by index)
//! are kept up to the smallest prefix whose mass reaches `top_p` (at least one token), and one is
//! drawn from the renormalized kept mass. Row b draws from its own ChaCha8 stream seeded by
//! `seed + b`, so a seed fixes the whole output.

use qadapt::Result;
use qadapt::ops::attention::{CacheShape, attention_cached, kv_cache_write};
use qadapt::ops::linear::{self, LinearShape};
use qadapt::ops::rope::{self, RopeDirection, RopeTable};
use qadapt::ops::{Accumulate, rmsnorm};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::config::LlamaConfig;
use crate::ia3;
use crate::layer::{self, LayerRun, Norm};
use crate::lora::LoraAdapter;
use crate::model::Llama;
use crate::peft::Adapter;
use crate::pool::Buf;
use crate::prompt::PrefixTuning;
use crate::weights::Proj;
use crate::{invalid, shape_err};

/// One projection's LoRA adapters stacked in [`qadapt::lora::AdapterStack`]'s layout, in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraStack {
    /// The largest rank of the stacked adapters (smaller ones are zero-padded: the padding adds
    /// exact zeros to `u` and nothing to `y`).
    pub rank: usize,
    /// Input features.
    pub inp: usize,
    /// Output features.
    pub out: usize,
    /// `A [adapters, rank, inp]`.
    pub a: Vec<f32>,
    /// `B [adapters, out, rank]`.
    pub b: Vec<f32>,
    /// One scale per adapter (`alpha / r` or rsLoRA's `alpha / sqrt(r)`).
    pub scales: Vec<f32>,
    /// Whether each adapter targets this projection (the others hold zeros and are skipped).
    pub targeted: Vec<bool>,
}

/// Reusable buffers of [`LoraStack::forward`] (they grow to the largest call and stay).
#[derive(Debug, Default, Clone)]
pub struct LoraScratch {
    rows: Vec<usize>,
    xg: Vec<f32>,
    u: Vec<f32>,
    yg: Vec<f32>,
}

impl LoraScratch {
    /// One adapter's hook on its own rows of a ragged batch: the rows `t` of `x [*, inp]` where
    /// `mine(t)` are gathered, `f(xg, u, yg)` maps them (`xg [g, inp]` to `yg [g, out]`, with `u`
    /// its scratch), and `yg` is added into those rows of `y [*, out]`. The generator applies
    /// each per-row hook (a LoRA term, a Houlsby adapter) through this, the math itself being the
    /// training model's.
    fn on_rows(
        &mut self,
        x: &[f32],
        (inp, out): (usize, usize),
        mine: impl Fn(usize) -> bool,
        y: &mut [f32],
        f: impl FnOnce(&[f32], &mut Vec<f32>, &mut [f32]) -> Result<()>,
    ) -> Result<()> {
        self.rows.clear();
        self.rows
            .extend((0..x.len() / inp.max(1)).filter(|&t| mine(t)));
        let g = self.rows.len();
        if g == 0 {
            return Ok(());
        }
        let xg = buf(&mut self.xg, g * inp);
        for (dst, &t) in xg.chunks_exact_mut(inp).zip(&self.rows) {
            dst.copy_from_slice(&x[t * inp..][..inp]);
        }
        let yg = buf(&mut self.yg, g * out);
        f(xg, &mut self.u, yg)?;
        for (src, &t) in yg.chunks_exact(out).zip(&self.rows) {
            for (o, v) in y[t * out..][..out].iter_mut().zip(src) {
                *o += *v;
            }
        }
        Ok(())
    }
}

/// `v` resized to `n` zeros, reusing its allocation.
fn buf(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    v.clear();
    v.resize(n, 0.0);
    v
}

impl LoraStack {
    /// Stacks projection `p` of layer `l` of `adapters` (all for `model`).
    pub fn new(
        model: &LlamaConfig,
        adapters: &[&LoraAdapter<f32>],
        l: usize,
        p: Proj,
    ) -> Result<LoraStack> {
        const OP: &str = "lora stack";
        let (inp, out) = p.dims(model);
        let rank = adapters.iter().map(|a| a.config.r).max().unwrap_or(0);
        if rank == 0 {
            return Err(invalid(OP, "no adapter, or a rank of 0"));
        }
        let na = adapters.len();
        let mut st = LoraStack {
            rank,
            inp,
            out,
            a: vec![0.0; na * rank * inp],
            b: vec![0.0; na * out * rank],
            scales: adapters.iter().map(|a| a.config.scaling() as f32).collect(),
            targeted: vec![false; na],
        };
        for (i, ad) in adapters.iter().enumerate() {
            let Some(pair) = ad.pair(l, p) else { continue };
            let r = ad.config.r;
            if pair.a.len() != r * inp || pair.b.len() != out * r {
                return Err(shape_err(
                    OP,
                    format!("{}: A of {r}x{inp}, B of {out}x{r}", p.module(l)),
                    format!("{} and {}", pair.a.len(), pair.b.len()),
                ));
            }
            // A's rows 0..r of the adapter's [rank, inp] block; B's columns 0..r of [out, rank].
            st.a[i * rank * inp..][..r * inp].copy_from_slice(&pair.a);
            for (dst, src) in st.b[i * out * rank..(i + 1) * out * rank]
                .chunks_exact_mut(rank)
                .zip(pair.b.chunks_exact(r))
            {
                dst[..r].copy_from_slice(src);
            }
            st.targeted[i] = true;
        }
        Ok(st)
    }

    /// The same stack in bf16 for `qadapt::lora`'s layers and kernels.
    pub fn to_bf16(&self) -> Result<qadapt::lora::AdapterStack> {
        let h = |v: &[f32]| v.iter().map(|x| half::bf16::from_f32(*x)).collect();
        qadapt::lora::AdapterStack::new(self.rank, h(&self.a), h(&self.b), self.scales.clone())
    }

    /// `y[m] += s_a (x[m] A_a^T) B_a^T` with `a = idx[m]` for every row whose index is a targeted
    /// adapter (-1: nothing); `x [rows, inp]`, `y [rows, out]`.
    pub fn forward(
        &self,
        x: &[f32],
        idx: &[i32],
        y: &mut [f32],
        s: &mut LoraScratch,
    ) -> Result<()> {
        const OP: &str = "lora stack forward";
        let (inp, out, r) = (self.inp, self.out, self.rank);
        let m = idx.len();
        if x.len() != m * inp || y.len() != m * out {
            return Err(shape_err(
                OP,
                format!("x of {m}x{inp}, y of {m}x{out}"),
                format!("{} and {}", x.len(), y.len()),
            ));
        }
        for (ai, &on) in self.targeted.iter().enumerate() {
            if !on {
                continue;
            }
            let mine = |t: usize| idx[t] == ai as i32;
            s.on_rows(x, (inp, out), mine, y, |xg, u, yg| {
                crate::lora::lora_term(
                    xg,
                    &self.a[ai * r * inp..][..r * inp],
                    &self.b[ai * out * r..][..out * r],
                    (inp, r, out),
                    self.scales[ai],
                    buf(u, yg.len() / out * r),
                    yg,
                    Accumulate::Overwrite,
                )
            })?;
        }
        Ok(())
    }
}

/// How the next token is chosen from the logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// The first maximal logit.
    Greedy,
    /// Softmax at `temperature` (> 0), restricted to the top-p nucleus (`0 < top_p <= 1`).
    Nucleus {
        /// Divides the logits.
        temperature: f32,
        /// Probability mass kept.
        top_p: f32,
    },
}

impl Sampling {
    /// Greedy for a temperature of 0, else [`Sampling::Nucleus`]; refuses a negative or non-finite
    /// temperature and a `top_p` outside `(0, 1]`.
    pub fn new(temperature: f32, top_p: f32) -> Result<Sampling> {
        const OP: &str = "sampling";
        if !temperature.is_finite() || temperature < 0.0 {
            return Err(invalid(
                OP,
                format!("temperature {temperature} must be finite and >= 0"),
            ));
        }
        if top_p.is_nan() || top_p <= 0.0 || top_p > 1.0 {
            return Err(invalid(OP, format!("top_p {top_p} must be in (0, 1]")));
        }
        Ok(if temperature == 0.0 {
            Sampling::Greedy
        } else {
            Sampling::Nucleus { temperature, top_p }
        })
    }
}

/// The index of the first maximal value.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// A token sampler: the settings, one ChaCha8 stream per row, and reusable sort buffers.
#[derive(Debug, Clone)]
pub struct Sampler {
    sampling: Sampling,
    streams: Vec<ChaCha8Rng>,
    order: Vec<u32>,
    probs: Vec<f64>,
}

impl Sampler {
    /// A sampler for `rows` rows; row b's stream is seeded by `seed + b`.
    pub fn new(sampling: Sampling, rows: usize, seed: u64) -> Sampler {
        Sampler {
            sampling,
            streams: (0..rows as u64)
                .map(|b| crate::rng::stream(seed.wrapping_add(b)))
                .collect(),
            order: Vec::new(),
            probs: Vec::new(),
        }
    }

    /// The next token of `row` from its logits `[V]`.
    pub fn sample(&mut self, row: usize, logits: &[f32]) -> u32 {
        let Sampling::Nucleus { temperature, top_p } = self.sampling else {
            return argmax(logits);
        };
        let t = f64::from(temperature);
        let m = logits.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
        self.probs.clear();
        self.probs
            .extend(logits.iter().map(|&v| ((f64::from(v) - m) / t).exp()));
        let total: f64 = self.probs.iter().sum();
        self.order.clear();
        self.order.extend(0..logits.len() as u32);
        let probs = &self.probs;
        // Stable: equal probabilities keep increasing index order (the greedy tie-break).
        self.order
            .sort_by(|&i, &j| probs[j as usize].total_cmp(&probs[i as usize]));
        let want = f64::from(top_p) * total;
        let (mut kept, mut mass) = (0, 0.0);
        for &i in &self.order {
            mass += probs[i as usize];
            kept += 1;
            if mass >= want {
                break;
            }
        }
        let u = self.streams[row].random::<f64>() * mass;
        let mut acc = 0.0;
        for &i in &self.order[..kept] {
            acc += probs[i as usize];
            if u < acc {
                return i;
            }
        }
        self.order[kept - 1]
    }
}

/// One prompt of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompt {
    /// Token ids (at least one).
    pub ids: Vec<u32>,
    /// Index into the [`Generator`]'s adapters, or `None` for the base model.
    pub adapter: Option<usize>,
}

/// Settings of [`Generator::generate`].
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Most tokens generated per prompt.
    pub max_new_tokens: usize,
    /// Greedy or sampled.
    pub sampling: Sampling,
    /// Token ids that end a completion (the eos token is kept as its last token).
    pub eos: Vec<u32>,
    /// Seed of the sampler.
    pub seed: u64,
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// It produced an eos token.
    Eos,
    /// It reached `max_new_tokens`.
    Length,
}

/// The generated tokens of one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// New tokens (ending with the eos token when [`Finish::Eos`]).
    pub tokens: Vec<u32>,
    /// Why it stopped.
    pub finish: Finish,
}

/// Keys and values of every position of every row, per layer, and the buffers of a step.
#[derive(Debug, Clone)]
pub struct KvCache {
    batch: usize,
    cap: usize,
    /// Per layer, `[batch, cap, kv_dim]` RoPE'd keys.
    k: Vec<Vec<f32>>,
    /// Per layer, `[batch, cap, kv_dim]` values.
    v: Vec<Vec<f32>>,
    /// Positions filled per row (prefix and virtual tokens included).
    len: Vec<usize>,
    adapter: Vec<Option<usize>>,
    rope: RopeTable<f32>,
    s: Scratch,
}

impl KvCache {
    /// Rows.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Positions filled in row `b` (prefix and virtual tokens included).
    pub fn filled(&self, b: usize) -> usize {
        self.len[b]
    }

    /// Positions each row can hold.
    pub fn capacity(&self) -> usize {
        self.cap
    }
}

/// Activations of one call, `[N, *]` token-major; grown as needed, never shrunk.
#[derive(Debug, Clone, Default)]
struct Scratch {
    owner: Vec<usize>,
    pos: Vec<usize>,
    adapter: Vec<Option<usize>>,
    lora_idx: Vec<i32>,
    x: Vec<f32>,
    xn: Vec<f32>,
    rstd: Vec<f32>,
    tmp: Vec<f32>,
    /// (IA)³'s scaled input.
    xs: Vec<f32>,
    /// `owner` and `pos` as the cache ops take them.
    row32: Vec<u32>,
    pos32: Vec<u32>,
    lora: LoraScratch,
}

/// A model and a list of adapters, ready to decode batches whose rows pick one adapter each.
#[derive(Debug)]
pub struct Generator<'a> {
    model: &'a Llama<f32>,
    adapters: &'a [Adapter<f32>],
    /// The prefix of each adapter that is one (a reparameterized prefix projected once).
    projected: Vec<Option<PrefixTuning<f32>>>,
    /// Per adapter, its slot in the LoRA stacks (-1: not LoRA).
    lora_slot: Vec<i32>,
    /// `[layer][proj]`, when some LoRA adapter targets the projection.
    lora: Vec<Vec<Option<LoraStack>>>,
    inv_freq: Vec<f32>,
}

impl<'a> Generator<'a> {
    /// A generator over `model` whose rows may use any of `adapters` (checked against the model).
    pub fn new(model: &'a Llama<f32>, adapters: &'a [Adapter<f32>]) -> Result<Self> {
        let c = &model.config;
        for a in adapters {
            check_adapter(c, a)?;
        }
        let projected = adapters
            .iter()
            .map(|a| match a {
                Adapter::PrefixMlp(pm) => pm.project(c).map(|(p, _)| Some(p)),
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>>>()?;
        let loras: Vec<&LoraAdapter<f32>> = adapters
            .iter()
            .filter_map(|a| match a {
                Adapter::Lora(l) => Some(l),
                _ => None,
            })
            .collect();
        let mut next = 0;
        let lora_slot = adapters
            .iter()
            .map(|a| match a {
                Adapter::Lora(_) => {
                    next += 1;
                    next - 1
                }
                _ => -1,
            })
            .collect();
        let lora = (0..c.num_hidden_layers)
            .map(|l| {
                Proj::ALL
                    .iter()
                    .map(|&p| {
                        if loras.iter().any(|a| a.pair(l, p).is_some()) {
                            LoraStack::new(c, &loras, l, p).map(Some)
                        } else {
                            Ok(None)
                        }
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let inv_freq = rope::inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)?;
        Ok(Generator {
            model,
            adapters,
            projected,
            lora_slot,
            lora,
            inv_freq,
        })
    }

    /// The model.
    pub fn model(&self) -> &Llama<f32> {
        self.model
    }

    /// Positions adapter `a` puts before the prompt (prefix or virtual tokens).
    pub fn leading_positions(&self, a: Option<usize>) -> usize {
        match a.map(|i| (&self.adapters[i], &self.projected[i])) {
            Some((Adapter::Prefix(p), _)) => p.num_virtual_tokens,
            Some((_, Some(p))) => p.num_virtual_tokens,
            Some((Adapter::Prompt(p), _)) => p.num_virtual_tokens,
            _ => 0,
        }
    }

    fn prefix(&self, a: usize) -> Option<&PrefixTuning<f32>> {
        match (&self.adapters[a], &self.projected[a]) {
            (Adapter::Prefix(p), _) => Some(p),
            (_, Some(p)) => Some(p),
            _ => None,
        }
    }

    /// A cache for one row per entry of `rows` (each an adapter index or `None`), with room for
    /// `tokens` real tokens per row after the adapter's leading positions. Prefix rows get their
    /// prefix keys and values; prompt-tuning rows run their virtual tokens.
    pub fn start(&self, rows: &[Option<usize>], tokens: usize) -> Result<KvCache> {
        const OP: &str = "generate";
        let c = &self.model.config;
        if rows.is_empty() {
            return Err(invalid(OP, "an empty batch"));
        }
        if let Some(bad) = rows.iter().flatten().find(|&&a| a >= self.adapters.len()) {
            return Err(invalid(
                OP,
                format!("adapter {bad} of {}", self.adapters.len()),
            ));
        }
        let lead = rows
            .iter()
            .map(|&a| self.leading_positions(a))
            .max()
            .unwrap_or(0);
        let cap = lead.saturating_add(tokens);
        if cap > c.max_position_embeddings {
            return Err(invalid(
                OP,
                format!(
                    "{cap} positions ({lead} virtual + {tokens}) exceed max_position_embeddings {}",
                    c.max_position_embeddings
                ),
            ));
        }
        let kd = c.kv_dim();
        let batch = rows.len();
        crate::budget::check_elements(
            &format!("a cache of {batch} x {cap} positions"),
            crate::budget::product(&[2, c.num_hidden_layers, batch, cap, kd]),
            4,
        )
        .map_err(|e| invalid(OP, e))?;
        let mut cache = KvCache {
            batch,
            cap,
            k: vec![vec![0.0; batch * cap * kd]; c.num_hidden_layers],
            v: vec![vec![0.0; batch * cap * kd]; c.num_hidden_layers],
            len: vec![0; batch],
            adapter: rows.to_vec(),
            rope: RopeTable::new(cap.max(1), c.head_dim, &self.inv_freq)?,
            s: Scratch::default(),
        };
        for (b, a) in rows.iter().enumerate() {
            let Some(pt) = a.and_then(|a| self.prefix(a)) else {
                continue;
            };
            let p = pt.num_virtual_tokens;
            for l in 0..c.num_hidden_layers {
                let at = b * cap * kd;
                cache.k[l][at..at + p * kd].copy_from_slice(&pt.gather(c, l, 0));
                cache.v[l][at..at + p * kd].copy_from_slice(&pt.gather(c, l, 1));
            }
            cache.len[b] = p;
        }
        let prompted: Vec<(usize, &[f32], usize)> = rows
            .iter()
            .enumerate()
            .filter_map(|(b, a)| match a.map(|a| &self.adapters[a]) {
                Some(Adapter::Prompt(pt)) => Some((b, &pt.embeddings[..], pt.num_virtual_tokens)),
                _ => None,
            })
            .collect();
        if !prompted.is_empty() {
            let cw = c.hidden_size;
            let s = &mut cache.s;
            s.owner.clear();
            s.x.clear();
            for &(b, e, p) in &prompted {
                if e.len() != p * cw {
                    return Err(shape_err(OP, format!("a [{p}, {cw}] soft prompt"), e.len()));
                }
                s.owner.extend(std::iter::repeat_n(b, p));
                s.x.extend_from_slice(e);
            }
            self.run(&mut cache, None)?;
        }
        Ok(cache)
    }

    /// Appends `tokens[b]` to row b (an empty slice leaves the row as it is) and overwrites
    /// `logits[b]` (`[batch, V]`) with the logits after each fed row's last new token.
    pub fn feed(&self, cache: &mut KvCache, tokens: &[&[u32]], logits: &mut [f32]) -> Result<()> {
        const OP: &str = "generate feed";
        let c = &self.model.config;
        let (batch, vocab, cw) = (cache.batch, c.vocab_size, c.hidden_size);
        if tokens.len() != batch || logits.len() != batch * vocab {
            return Err(shape_err(
                OP,
                format!("{batch} token lists and {batch} x {vocab} logits"),
                format!("{} and {}", tokens.len(), logits.len()),
            ));
        }
        if let Some(bad) = tokens
            .iter()
            .flat_map(|t| t.iter())
            .find(|&&t| t as usize >= vocab)
        {
            return Err(invalid(
                OP,
                format!("token id {bad} outside the vocabulary of {vocab}"),
            ));
        }
        let s = &mut cache.s;
        s.owner.clear();
        for (b, t) in tokens.iter().enumerate() {
            s.owner.extend(std::iter::repeat_n(b, t.len()));
        }
        let x = buf(&mut s.x, s.owner.len() * cw);
        for (row, &t) in x
            .chunks_exact_mut(cw)
            .zip(tokens.iter().flat_map(|t| t.iter()))
        {
            row.copy_from_slice(&self.model.weights.embed_tokens[t as usize * cw..][..cw]);
        }
        self.run(cache, Some(logits))
    }

    /// Runs `cache.s.x [N, C]` (the embeddings of the tokens of rows `cache.s.owner`, each row's
    /// tokens in order) through every layer, appending each token to its row's cache; writes the
    /// logits of each fed row's last token when asked.
    fn run(&self, cache: &mut KvCache, logits: Option<&mut [f32]>) -> Result<()> {
        const OP: &str = "generate";
        let c = &self.model.config;
        let KvCache {
            cap,
            k: kc,
            v: vc,
            len,
            adapter,
            rope,
            s,
            ..
        } = cache;
        let n = s.owner.len();
        if n == 0 {
            return Ok(());
        }
        // Positions: each row continues from its filled length.
        s.pos.clear();
        s.adapter.clear();
        s.lora_idx.clear();
        let mut next = len.clone();
        s.row32.clear();
        s.pos32.clear();
        for &b in &s.owner {
            s.pos.push(next[b]);
            s.row32.push(b as u32);
            s.pos32.push(next[b] as u32);
            next[b] += 1;
            s.adapter.push(adapter[b]);
            s.lora_idx
                .push(adapter[b].map_or(-1, |a| self.lora_slot[a]));
        }
        if let Some(b) = (0..len.len()).find(|&b| next[b] > *cap) {
            return Err(invalid(
                OP,
                format!(
                    "row {b} would hold {} positions, the cache has {cap}",
                    next[b]
                ),
            ));
        }
        let cw = c.hidden_size;
        let pool = &self.model.pool;
        let mut x = pool.overwritten(n * cw);
        x.copy_from_slice(&s.x);
        let mut run = CachedRun {
            generator: self,
            cap: *cap,
            k: kc,
            v: vc,
            rope,
            s,
        };
        for l in 0..c.num_hidden_layers {
            x = layer::forward(&mut run, l, x)?.1;
        }
        *len = next;
        let Some(logits) = logits else {
            return Ok(());
        };
        // The last token of each fed row: gather, final norm, head.
        let last: Vec<(usize, usize)> = (0..n)
            .filter(|&t| t + 1 == n || s.owner[t + 1] != s.owner[t])
            .map(|t| (s.owner[t], t))
            .collect();
        let m = last.len();
        let xl = buf(&mut s.tmp, m * cw);
        for (dst, &(_, t)) in xl.chunks_exact_mut(cw).zip(&last) {
            dst.copy_from_slice(&x[t * cw..][..cw]);
        }
        rmsnorm::forward(
            xl,
            &self.model.weights.norm,
            c.rms_norm_eps,
            buf(&mut s.xn, m * cw),
            buf(&mut s.rstd, m),
        )?;
        let vocab = c.vocab_size;
        let head = self
            .model
            .weights
            .lm_head
            .as_deref()
            .unwrap_or(&self.model.weights.embed_tokens);
        let out = buf(&mut s.xs, m * vocab);
        linear::forward(
            LinearShape {
                rows: m,
                inp: cw,
                out: vocab,
            },
            &s.xn,
            head,
            out,
            Accumulate::Overwrite,
        )?;
        for (src, &(b, _)) in out.chunks_exact(vocab).zip(&last) {
            logits[b * vocab..(b + 1) * vocab].copy_from_slice(src);
        }
        Ok(())
    }

    /// `y = x W^T` for projection `p` of layer `l` on every token, with each token's adapter:
    /// (IA)³ scaling of the input or output, and the LoRA term through the stack.
    fn project(&self, l: usize, p: Proj, x: &[f32], y: &mut [f32], s: &mut Scratch) -> Result<()> {
        let (inp, out) = p.dims(&self.model.config);
        let n = s.adapter.len();
        let w = self.model.weights.layers[l].proj(p);
        let adapter = &s.adapter;
        let ia3 = |t: usize| match adapter[t].map(|a| &self.adapters[a]) {
            Some(Adapter::Ia3(a)) => a.hook(l, p),
            _ => None,
        };
        let sh = LinearShape { rows: n, inp, out };
        let ow = Accumulate::Overwrite;
        ia3::hooked_linear(sh, x, w, y, ow, ia3, &mut s.xs, None)?;
        if let Some(st) = &self.lora[l][p.index()] {
            st.forward(x, &s.lora_idx, y, &mut s.lora)?;
        }
        Ok(())
    }

    /// `resid + out(x Wp^T)` for a sublayer's output projection `p` on every token: `out` is the
    /// Houlsby adapter of the projection's site for the tokens whose row has one, else the
    /// identity.
    fn out_project(
        &self,
        l: usize,
        p: Proj,
        x: &[f32],
        resid: &[f32],
        s: &mut Scratch,
    ) -> Result<Buf<f32>> {
        let cw = self.model.config.hidden_size;
        let n = s.adapter.len();
        let mut tmp = self.model.pool.overwritten(n * cw);
        self.project(l, p, x, &mut tmp, s)?;
        let mut out = self.model.pool.overwritten(n * cw);
        out.copy_from_slice(resid);
        for t in 0..n {
            if matches!(
                s.adapter[t].map(|a| &self.adapters[a]),
                Some(Adapter::Houlsby(_))
            ) {
                continue;
            }
            out[t * cw..(t + 1) * cw]
                .iter_mut()
                .zip(&tmp[t * cw..(t + 1) * cw])
                .for_each(|(r, v)| *r += *v);
        }
        for (ai, ad) in self.adapters.iter().enumerate() {
            let Adapter::Houlsby(ha) = ad else { continue };
            let mine = |t: usize| s.adapter[t] == Some(ai);
            s.lora
                .on_rows(&tmp, (cw, cw), mine, &mut out, |yin, z, y| {
                    let z = buf(z, yin.len() / cw * ha.config.bottleneck);
                    ha.forward(l, p, yin, z, y)
                })?;
        }
        Ok(out)
    }

    /// Completes every prompt: one prefill, then one token per unfinished row per step (a row
    /// stops at an eos token or after `max_new_tokens`).
    pub fn generate(&self, prompts: &[Prompt], opts: &GenerateOptions) -> Result<Vec<Completion>> {
        check_prompts(prompts)?;
        let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        let rows: Vec<Option<usize>> = prompts.iter().map(|p| p.adapter).collect();
        let mut cache = self.start(&rows, longest.saturating_add(opts.max_new_tokens))?;
        let vocab = self.model.config.vocab_size;
        decode(prompts, opts, vocab, |tokens, logits| {
            self.feed(&mut cache, tokens, logits)
        })
    }
}

/// Refuses an empty prompt.
pub(crate) fn check_prompts(prompts: &[Prompt]) -> Result<()> {
    match prompts.iter().position(|p| p.ids.is_empty()) {
        Some(i) => Err(invalid("generate", format!("prompt {i} has no tokens"))),
        None => Ok(()),
    }
}

/// The decoding loop of a generator whose `feed` appends `tokens[b]` to row b (none: the row is
/// left as it is) and overwrites `logits [batch, vocab]` with each fed row's next-token logits:
/// the prompts as one prefill, then one sampled token per unfinished row per step, until each
/// row meets an eos token or `max_new_tokens`.
pub(crate) fn decode(
    prompts: &[Prompt],
    opts: &GenerateOptions,
    vocab: usize,
    mut feed: impl FnMut(&[&[u32]], &mut [f32]) -> Result<()>,
) -> Result<Vec<Completion>> {
    let batch = prompts.len();
    let mut logits = vec![0.0; batch * vocab];
    let ids: Vec<&[u32]> = prompts.iter().map(|p| p.ids.as_slice()).collect();
    feed(&ids, &mut logits)?;
    let mut sampler = Sampler::new(opts.sampling, batch, opts.seed);
    let mut out: Vec<Completion> = (0..batch)
        .map(|_| Completion {
            tokens: Vec::with_capacity(opts.max_new_tokens.min(1 << 16)),
            finish: Finish::Length,
        })
        .collect();
    let mut active = vec![opts.max_new_tokens > 0; batch];
    let mut next = vec![0u32; batch];
    while active.iter().any(|&a| a) {
        for b in 0..batch {
            if !active[b] {
                continue;
            }
            let t = sampler.sample(b, &logits[b * vocab..(b + 1) * vocab]);
            out[b].tokens.push(t);
            next[b] = t;
            if opts.eos.contains(&t) {
                out[b].finish = Finish::Eos;
                active[b] = false;
            } else if out[b].tokens.len() == opts.max_new_tokens {
                active[b] = false;
            }
        }
        if !active.iter().any(|&a| a) {
            break;
        }
        let step: Vec<&[u32]> = (0..batch)
            .map(|b| {
                if active[b] {
                    std::slice::from_ref(&next[b])
                } else {
                    &[][..]
                }
            })
            .collect();
        feed(&step, &mut logits)?;
    }
    Ok(out)
}

/// [`Generator`]'s layer ops on one call's new tokens (`s.owner`, `s.pos`: each token's row and
/// absolute position): every layer appends the tokens' keys and values to their rows' cache.
struct CachedRun<'g, 'c> {
    generator: &'g Generator<'g>,
    cap: usize,
    /// Per layer, `[batch, cap, kv_dim]`.
    k: &'c mut [Vec<f32>],
    v: &'c mut [Vec<f32>],
    rope: &'c RopeTable<f32>,
    s: &'c mut Scratch,
}

impl LayerRun for CachedRun<'_, '_> {
    type Act = Buf<f32>;
    type Stats = Buf<f32>;
    /// Nothing: generation has no backward.
    type Att = ();

    fn rmsnorm(&mut self, l: usize, norm: Norm, x: &Buf<f32>) -> Result<(Buf<f32>, Buf<f32>)> {
        self.generator.model.layer_rmsnorm(l, norm, x)
    }

    fn project(&mut self, l: usize, p: Proj, x: &Buf<f32>) -> Result<Buf<f32>> {
        let (g, s) = (self.generator, &mut *self.s);
        let mut y = g
            .model
            .pool
            .overwritten(s.owner.len() * p.dims(&g.model.config).1);
        g.project(l, p, x, &mut y, s)?;
        Ok(y)
    }

    /// RoPE at each token's absolute position in its row.
    fn rope(&mut self, _l: usize, q: &mut Buf<f32>, k: &mut Buf<f32>) -> Result<()> {
        let c = &self.generator.model.config;
        let (pos, fwd) = (&self.s.pos, RopeDirection::Forward);
        self.rope.apply_at(q, c.num_attention_heads, fwd, pos)?;
        self.rope.apply_at(k, c.num_key_value_heads, fwd, pos)
    }

    /// Writes each token's key and value into its row's cache slot, then attends each token's
    /// query over its row's positions `0..=pos` (grouped-query, `1/sqrt(D)` scaling).
    fn attention(
        &mut self,
        l: usize,
        q: &Buf<f32>,
        k: &Buf<f32>,
        v: &Buf<f32>,
    ) -> Result<((), Buf<f32>)> {
        let c = &self.generator.model.config;
        let sh = CacheShape {
            batch: self.k[l].len() / (self.cap * c.kv_dim()).max(1),
            cap: self.cap,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };
        let s = &*self.s;
        kv_cache_write(sh, k, v, &s.row32, &s.pos32, &mut self.k[l], &mut self.v[l])?;
        let mut attn = self.generator.model.pool.overwritten(q.len());
        attention_cached(sh, q, &self.k[l], &self.v[l], &s.row32, &s.pos32, &mut attn)?;
        Ok(((), attn))
    }

    fn residual(&mut self, l: usize, p: Proj, x: &Buf<f32>, resid: &Buf<f32>) -> Result<Buf<f32>> {
        self.generator.out_project(l, p, x, resid, self.s)
    }

    fn swiglu(&mut self, gate: &Buf<f32>, up: &Buf<f32>) -> Result<Buf<f32>> {
        self.generator.model.layer_swiglu(gate, up)
    }
}

/// Shapes of an adapter against the model (loaded adapters are checked on load; this catches one
/// built in code for another model).
fn check_adapter(c: &LlamaConfig, a: &Adapter<f32>) -> Result<()> {
    let ok = match a {
        Adapter::Lora(l) => l.fits(c),
        Adapter::Ia3(a) => a.fits(c),
        Adapter::Prompt(p) => p.fits(c),
        Adapter::Prefix(p) => p.fits(c),
        Adapter::PrefixMlp(p) => p.fits(c),
        Adapter::Houlsby(h) => h.fits(c),
    };
    if ok {
        Ok(())
    } else {
        Err(shape_err(
            "generate",
            format!("a {} adapter shaped for this model", a.peft_type()),
            "tensors of other shapes",
        ))
    }
}
