//! Text generation on a CUDA device: [`crate::generate`]'s incremental decoding with the KV
//! cache, the weights and every activation on the device, and a batch whose rows may each use a
//! different LoRA adapter (or none) through the fused multi-adapter kernels.
//!
//! **The same layer and the same loop.** Each call runs [`crate::layer::forward`] (the decoder
//! layer the CPU model, the trainer and the CPU generator run) over one ragged block of new
//! tokens, with this file's ops: RMSNorm, SwiGLU and RoPE kernels, the projections as
//! `qadapt::lora::CudaLoraLinear` (bf16 or NF4 base), the tokens' keys and values appended to
//! their rows' cache (`kv_cache_write_bf16`) and each token's query attending to its row's cache
//! up to its own position (`attention_cached_bf16`). The sampling loop is
//! [`crate::generate`]'s: only the logits of each fed row's last token come back to the host
//! (gathered on the device, through the final norm and the head there).
//!
//! **Adapters.** LoRA only (the other methods generate on the CPU): per projection, the
//! adapters that target it are stacked as the CPU generator stacks them
//! ([`crate::generate::LoraStack`], ranks zero-padded, scales folded per adapter) and rounded
//! to bf16; each token carries its row's stack index (-1: the base alone). A projection no
//! adapter targets runs the base kernels only.
//!
//! **Precision** (as the CUDA trainer): bf16 weights (or NF4 codes) and activations, f32
//! accumulation and statistics; logits are the bf16 head GEMM's, widened to f32.

use half::bf16;
use qadapt::Result;
use qadapt::cuda::DeviceBuffer as CudaSlice;
use qadapt::cuda::ops::{self, CudaCacheTokens, CudaRopeTable};
use qadapt::cuda::{CudaDevice, Op};
use qadapt::lora::{AdapterStack, BaseWeight, CudaLoraLinear, LoraLinear, LoraTerm};
use qadapt::ops::Accumulate;
use qadapt::ops::attention::CacheShape;
use qadapt::ops::rope::{self, RopeDirection, RopeTable};

use std::path::Path;

use qadapt::lora::CudaBaseWeight;
use qadapt::nf4::{CudaNf4, Statistics};

use crate::backend::{BaseData, BaseFormat, checked_source, checkpoint_tensors, model_tensors};
use crate::config::LlamaConfig;
use crate::generate::{Completion, GenerateOptions, LoraStack, Prompt, check_prompts, decode};
use crate::layer::{self, LayerRun, Norm};
use crate::lora::LoraAdapter;
use crate::model::Llama;
use crate::peft::Adapter;
use crate::weights::{BaseTensor, Checkpoint, Proj};
use crate::{invalid, shape_err};

/// One projection on the device: the base and, when some adapter targets it, the stack.
struct GenProj {
    layer: CudaLoraLinear,
    adapted: bool,
}

struct GenLayer {
    input_norm: CudaSlice<bf16>,
    post_norm: CudaSlice<bf16>,
    projs: Vec<GenProj>,
}

/// A model and a list of LoRA adapters on a CUDA device, ready to decode batches whose rows pick
/// one adapter each (see the module doc).
pub struct CudaGenerator {
    dev: CudaDevice,
    config: LlamaConfig,
    embed: CudaSlice<bf16>,
    /// `None` when tied to `embed`.
    head: Option<CudaSlice<bf16>>,
    norm: CudaSlice<bf16>,
    layers: Vec<GenLayer>,
    inv_freq: Vec<f32>,
    adapters: usize,
}

impl std::fmt::Debug for CudaGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaGenerator")
            .field("device", &self.dev.describe())
            .field("layers", &self.layers.len())
            .field("adapters", &self.adapters)
            .finish()
    }
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

impl CudaGenerator {
    /// Puts `model` on `dev`, its projections as `base` says (bf16, the NF4 codes given, or
    /// quantized to NF4 on the device), with `adapters`, which must all be LoRA adapters of the
    /// model; rows refer to them by index.
    pub fn new(
        dev: CudaDevice,
        model: &Llama<f32>,
        base: BaseFormat<'_>,
        adapters: &[Adapter<f32>],
    ) -> Result<Self> {
        let mut tensor = model_tensors(model, "cuda generator");
        Self::from_tensors(dev, &model.config, &mut tensor, base, adapters)
    }

    /// The model of the HF checkpoint `dir` streamed to `dev` one tensor at a time
    /// ([`Checkpoint`]: one shard in host memory; with [`BaseFormat::QuantizeNf4`] each
    /// projection quantized on the device, a bitsandbytes checkpoint's codes kept): no copy of
    /// the model on the host. `base` must not be [`BaseFormat::Nf4`].
    pub fn from_checkpoint(
        dev: CudaDevice,
        dir: &Path,
        base: BaseFormat<'_>,
        adapters: &[Adapter<f32>],
    ) -> Result<Self> {
        if matches!(base, BaseFormat::Nf4(_)) {
            return Err(invalid(
                "cuda generator from a checkpoint",
                "a checkpoint has no codes to pass: use BaseFormat::QuantizeNf4",
            ));
        }
        let mut ck = Checkpoint::open(dir)?;
        let config = ck.config.clone();
        let mut tensor = checkpoint_tensors(&mut ck);
        Self::from_tensors(dev, &config, &mut tensor, base, adapters)
    }

    /// [`Self::new`] from a source of tensors, asked for each frozen tensor once in model order
    /// (as [`crate::backend::LoraModel::from_tensors`] asks; with [`BaseFormat::Nf4`]
    /// projections are not asked for), each on the device before the next is asked for.
    pub fn from_tensors<'s>(
        dev: CudaDevice,
        config: &LlamaConfig,
        tensor: &mut dyn FnMut(BaseTensor) -> Result<BaseData<'s>>,
        base: BaseFormat<'_>,
        adapters: &[Adapter<f32>],
    ) -> Result<Self> {
        const OP: &str = "cuda generator";
        let c = config;
        let loras = adapters
            .iter()
            .map(|a| match a {
                Adapter::Lora(l) => Ok(l),
                other => Err(invalid(
                    OP,
                    format!(
                        "an adapter of type {}: the device generates with LoRA adapters (the \
                         CPU generator takes every method)",
                        other.peft_type()
                    ),
                )),
            })
            .collect::<Result<Vec<&LoraAdapter<f32>>>>()?;
        for a in &loras {
            if a.pairs.len() != c.num_hidden_layers {
                return Err(shape_err(
                    OP,
                    format!("an adapter of {} layers", c.num_hidden_layers),
                    a.pairs.len(),
                ));
            }
        }
        let mut fetch = checked_source(OP, c, tensor);
        let up = |d: BaseData<'s>| -> Result<CudaSlice<bf16>> {
            dev.upload(&to_bf16(&d.into_values()?))
        };
        let embed = up(fetch(BaseTensor::Embed)?)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let input_norm = up(fetch(BaseTensor::InputNorm(l))?)?;
            let post_norm = up(fetch(BaseTensor::PostNorm(l))?)?;
            let mut projs = Vec::with_capacity(Proj::ALL.len());
            for p in Proj::ALL {
                let (inp, out) = p.dims(c);
                let adapted = loras.iter().any(|a| a.pair(l, p).is_some());
                // A projection no adapter targets keeps a rank-1 zero stack it never runs.
                let stack = if adapted {
                    LoraStack::new(c, &loras, l, p)?.to_bf16()?
                } else {
                    AdapterStack::new(1, vec![bf16::ZERO; inp], vec![bf16::ZERO; out], vec![0.0])?
                };
                let host = |weight| -> Result<CudaLoraLinear> {
                    CudaLoraLinear::upload(
                        &dev,
                        &LoraLinear::new(out, inp, weight, None, stack.clone())?,
                    )
                };
                let layer = match base {
                    BaseFormat::Nf4(codes) => match codes.get(l, p) {
                        Some(q) if q.shape == [out, inp] => host(BaseWeight::Nf4(q.clone()))?,
                        q => {
                            return Err(shape_err(
                                OP,
                                format!("NF4 codes of {} [{out}, {inp}]", p.module(l)),
                                q.map_or("none".to_string(), |q| format!("{:?}", q.shape)),
                            ));
                        }
                    },
                    BaseFormat::Dense => {
                        let w = fetch(BaseTensor::Proj(l, p))?.into_values()?;
                        host(BaseWeight::Dense(to_bf16(&w)))?
                    }
                    BaseFormat::QuantizeNf4 => match fetch(BaseTensor::Proj(l, p))? {
                        // A checkpoint's own codes stay as they are.
                        BaseData::Nf4(q) => host(BaseWeight::Nf4(q))?,
                        // The f32 values cross once; the codes are made on the device.
                        BaseData::Values(w) => {
                            let dense = dev.upload(&w[..])?;
                            let q = CudaNf4::quantize(
                                &dev,
                                &dense,
                                qadapt::nf4::DEFAULT_BLOCKSIZE,
                                Statistics::DoubleQuant,
                            )?;
                            drop(dense);
                            CudaLoraLinear::from_device(
                                &dev,
                                out,
                                inp,
                                CudaBaseWeight::Nf4(q),
                                &stack,
                            )?
                        }
                    },
                };
                projs.push(GenProj { layer, adapted });
            }
            layers.push(GenLayer {
                input_norm,
                post_norm,
                projs,
            });
        }
        let norm = up(fetch(BaseTensor::FinalNorm)?)?;
        let head = if c.tie_word_embeddings {
            None
        } else {
            Some(up(fetch(BaseTensor::Head)?)?)
        };
        Ok(CudaGenerator {
            embed,
            head,
            norm,
            layers,
            inv_freq: rope::inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)?,
            adapters: loras.len(),
            config: c.clone(),
            dev,
        })
    }

    /// The device.
    pub fn device(&self) -> &CudaDevice {
        &self.dev
    }

    fn cache_shape(&self, batch: usize, cap: usize) -> CacheShape {
        let c = &self.config;
        CacheShape {
            batch,
            cap,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        }
    }

    /// An empty cache of `rows.len()` rows (row b uses adapter `rows[b]`, `None`: the base) of
    /// `tokens` positions each, allocated on the device once.
    pub fn start(&self, rows: &[Option<usize>], tokens: usize) -> Result<CudaKvCache> {
        const OP: &str = "cuda generator start";
        if rows.is_empty() || tokens == 0 {
            return Err(invalid(OP, "no rows, or no room for a token"));
        }
        if let Some(a) = rows.iter().flatten().find(|&&a| a >= self.adapters) {
            return Err(invalid(
                OP,
                format!("adapter {a} of {} given", self.adapters),
            ));
        }
        let max = self.config.max_position_embeddings;
        if tokens > max {
            return Err(invalid(
                OP,
                format!("{tokens} positions exceed max_position_embeddings {max}"),
            ));
        }
        let sh = self.cache_shape(rows.len(), tokens);
        let layers = self.config.num_hidden_layers;
        let alloc = || -> Result<Vec<CudaSlice<bf16>>> {
            (0..layers)
                .map(|_| self.dev.zeros(sh.cache_len()))
                .collect()
        };
        Ok(CudaKvCache {
            shape: sh,
            k: alloc()?,
            v: alloc()?,
            len: vec![0; rows.len()],
            adapter: rows.to_vec(),
        })
    }

    /// Appends `tokens[b]` to row b (an empty slice leaves the row as it is) and overwrites
    /// `logits[b]` (`[batch, V]`) with the logits after each fed row's last new token.
    pub fn feed(
        &self,
        cache: &mut CudaKvCache,
        tokens: &[&[u32]],
        logits: &mut [f32],
    ) -> Result<()> {
        const OP: &str = "cuda generator feed";
        let c = &self.config;
        let (batch, vocab, cw) = (cache.shape.batch, c.vocab_size, c.hidden_size);
        if tokens.len() != batch || logits.len() != batch * vocab {
            return Err(shape_err(
                OP,
                format!("{batch} token lists and {batch} x {vocab} logits"),
                format!("{} and {}", tokens.len(), logits.len()),
            ));
        }
        // Each token's row, absolute position and stack index; the rows continue from their
        // filled lengths.
        let (mut row, mut pos, mut idx, mut ids) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut next = cache.len.clone();
        for (b, t) in tokens.iter().enumerate() {
            for &id in *t {
                row.push(b as u32);
                pos.push(next[b] as u32);
                idx.push(cache.adapter[b].map_or(-1, |a| a as i32));
                ids.push(id);
                next[b] += 1;
            }
        }
        let n = ids.len();
        if n == 0 {
            return Ok(());
        }
        if let Some(b) = (0..batch).find(|&b| next[b] > cache.shape.cap) {
            return Err(invalid(
                OP,
                format!(
                    "row {b} would hold {} positions, the cache has {}",
                    next[b], cache.shape.cap
                ),
            ));
        }
        let dev = &self.dev;
        let positions = RopeTable::at_positions(&pos, c.head_dim, &self.inv_freq)?;
        let mut x = dev.zeros::<bf16>(n * cw)?;
        ops::embedding_forward(dev, &ids, &self.embed, vocab, cw, &mut x)?;
        let mut run = DeviceCachedRun {
            g: self,
            n,
            tokens: CudaCacheTokens::new(dev, cache.shape, &row, &pos)?,
            rope: CudaRopeTable::new(dev, &positions)?,
            idx: dev.upload(&idx)?,
            k: &mut cache.k,
            v: &mut cache.v,
        };
        for l in 0..c.num_hidden_layers {
            x = layer::forward(&mut run, l, x)?.1;
        }
        cache.len = next;
        // The last new token of each fed row: gathered (the embedding kernel over the rows of
        // x), through the final norm and the head.
        let last: Vec<(usize, u32)> = (0..n)
            .filter(|&t| t + 1 == n || row[t + 1] != row[t])
            .map(|t| (row[t] as usize, t as u32))
            .collect();
        let m = last.len();
        let picks: Vec<u32> = last.iter().map(|&(_, t)| t).collect();
        let mut xl = dev.zeros::<bf16>(m * cw)?;
        ops::embedding_forward(dev, &picks, &x, n, cw, &mut xl)?;
        let (mut xn, mut rstd) = (dev.zeros::<bf16>(m * cw)?, dev.zeros::<f32>(m)?);
        ops::rmsnorm_forward(dev, &xl, &self.norm, c.rms_norm_eps, &mut xn, &mut rstd)?;
        let mut z = dev.zeros::<bf16>(m * vocab)?;
        let head = self.head.as_ref().unwrap_or(&self.embed);
        dev.gemm_bf16(&xn, Op::N, head, Op::T, &mut z, (m, vocab, cw), 1.0, 0.0)?;
        let z = dev.download(&z)?;
        for (src, &(b, _)) in z.chunks_exact(vocab).zip(&last) {
            for (d, s) in logits[b * vocab..(b + 1) * vocab].iter_mut().zip(src) {
                *d = s.to_f32();
            }
        }
        Ok(())
    }

    /// Completes every prompt as [`crate::Generator::generate`] does: one prefill, then one
    /// token per unfinished row per step.
    pub fn generate(&self, prompts: &[Prompt], opts: &GenerateOptions) -> Result<Vec<Completion>> {
        check_prompts(prompts)?;
        let longest = prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0);
        let rows: Vec<Option<usize>> = prompts.iter().map(|p| p.adapter).collect();
        let mut cache = self.start(&rows, longest.saturating_add(opts.max_new_tokens))?;
        decode(prompts, opts, self.config.vocab_size, |tokens, logits| {
            self.feed(&mut cache, tokens, logits)
        })
    }
}

/// The keys and values of every row on the device, per layer `[batch, cap, kv_heads * D]` bf16,
/// with each row's filled length and adapter.
pub struct CudaKvCache {
    shape: CacheShape,
    k: Vec<CudaSlice<bf16>>,
    v: Vec<CudaSlice<bf16>>,
    len: Vec<usize>,
    adapter: Vec<Option<usize>>,
}

impl std::fmt::Debug for CudaKvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaKvCache")
            .field("shape", &self.shape)
            .field("len", &self.len)
            .finish()
    }
}

impl CudaKvCache {
    /// Positions filled in row `b`.
    pub fn filled(&self, b: usize) -> usize {
        self.len[b]
    }

    /// Positions each row can hold.
    pub fn capacity(&self) -> usize {
        self.shape.cap
    }
}

/// [`CudaGenerator`]'s layer ops on one call's `n` new tokens.
struct DeviceCachedRun<'g, 'c> {
    g: &'g CudaGenerator,
    n: usize,
    tokens: CudaCacheTokens,
    /// A table row per token: its absolute position.
    rope: CudaRopeTable,
    /// Each token's adapter in the stacks (-1: the base alone).
    idx: CudaSlice<i32>,
    k: &'c mut [CudaSlice<bf16>],
    v: &'c mut [CudaSlice<bf16>],
}

impl DeviceCachedRun<'_, '_> {
    /// `x W^T` (+ each token's LoRA term) of projection `p` of layer `l`, into `y` as `acc` says.
    fn proj_into(
        &self,
        l: usize,
        p: Proj,
        x: &CudaSlice<bf16>,
        y: &mut CudaSlice<bf16>,
        acc: Accumulate,
    ) -> Result<()> {
        let pj = &self.g.layers[l].projs[p.index()];
        let term = if pj.adapted {
            LoraTerm::adapted(Some(&self.idx))
        } else {
            LoraTerm::Base
        };
        pj.layer.forward(x, self.n, y, acc, term)
    }
}

impl LayerRun for DeviceCachedRun<'_, '_> {
    type Act = CudaSlice<bf16>;
    type Stats = CudaSlice<f32>;
    /// Nothing: generation has no backward.
    type Att = ();

    fn rmsnorm(
        &mut self,
        l: usize,
        norm: Norm,
        x: &CudaSlice<bf16>,
    ) -> Result<(CudaSlice<bf16>, CudaSlice<f32>)> {
        let (dev, c) = (&self.g.dev, &self.g.config);
        let lw = &self.g.layers[l];
        let w = match norm {
            Norm::Input => &lw.input_norm,
            Norm::Post => &lw.post_norm,
        };
        let (mut y, mut rstd) = (dev.zeros(x.len())?, dev.zeros(self.n)?);
        ops::rmsnorm_forward(dev, x, w, c.rms_norm_eps, &mut y, &mut rstd)?;
        Ok((y, rstd))
    }

    fn project(&mut self, l: usize, p: Proj, x: &CudaSlice<bf16>) -> Result<CudaSlice<bf16>> {
        let mut y = self.g.dev.zeros(self.n * p.dims(&self.g.config).1)?;
        self.proj_into(l, p, x, &mut y, Accumulate::Overwrite)?;
        Ok(y)
    }

    /// RoPE at each token's absolute position (a table row per token).
    fn rope(&mut self, _l: usize, q: &mut CudaSlice<bf16>, k: &mut CudaSlice<bf16>) -> Result<()> {
        let (dev, c) = (&self.g.dev, &self.g.config);
        self.rope
            .apply(dev, q, c.num_attention_heads, RopeDirection::Forward)?;
        self.rope
            .apply(dev, k, c.num_key_value_heads, RopeDirection::Forward)
    }

    /// Appends the tokens' keys and values to their rows' cache, then attends each query over
    /// its row's cache up to its own position.
    fn attention(
        &mut self,
        l: usize,
        q: &CudaSlice<bf16>,
        k: &CudaSlice<bf16>,
        v: &CudaSlice<bf16>,
    ) -> Result<((), CudaSlice<bf16>)> {
        let dev = &self.g.dev;
        ops::kv_cache_write(dev, &self.tokens, k, v, &mut self.k[l], &mut self.v[l])?;
        let mut out = dev.zeros(q.len())?;
        ops::attention_cached(dev, &self.tokens, q, &self.k[l], &self.v[l], &mut out)?;
        Ok(((), out))
    }

    /// `resid + x Wp^T`, the projection adding into a copy of the residual in its epilogue.
    fn residual(
        &mut self,
        l: usize,
        p: Proj,
        x: &CudaSlice<bf16>,
        resid: &CudaSlice<bf16>,
    ) -> Result<CudaSlice<bf16>> {
        let mut out = self.g.dev.zeros(resid.len())?;
        self.g.dev.copy(resid, &mut out)?;
        self.proj_into(l, p, x, &mut out, Accumulate::Add)?;
        Ok(out)
    }

    fn swiglu(&mut self, gate: &CudaSlice<bf16>, up: &CudaSlice<bf16>) -> Result<CudaSlice<bf16>> {
        let mut h = self.g.dev.zeros(gate.len())?;
        ops::swiglu_forward(&self.g.dev, gate, up, &mut h)?;
        Ok(h)
    }
}
