//! The pieces of a training run between the data and the [`crate::Trainer`]: micro-batches from
//! tokenized sequences, a resumable shuffling sampler, held-out metrics, and random
//! initialization for pretraining.
//!
//! Batches are right-padded: row b holds its sequence at positions `0..len_b` and the pad id after
//! it. With a causal mask, position i only attends to positions ≤ i, so the padding never changes
//! a real position's logits, and padded positions carry no target. A row's target at position i
//! is `ids[i + 1]` when `mask[i + 1]` (the loss trains "predict token i+1 from tokens ≤ i").

use qadapt::Result;
use qadapt::ops::cross_entropy::RowScore;

use crate::config::LlamaConfig;
use crate::dataset::Sequence;
use crate::invalid;
use crate::model::Llama;
use crate::peft::{Adapter, Grads, evaluate};
use crate::train::Batch;
use crate::weights::{LlamaWeights, layout};
use rand::seq::SliceRandom;
use rand_distr::{Distribution, StandardNormal};

/// A right-padded micro-batch of `seqs` (see the module doc), one per row; `seq` is the longest
/// length.
pub fn pack(seqs: &[&Sequence], pad: u32) -> Result<Batch> {
    let rows: Vec<Vec<&Sequence>> = seqs.iter().map(|&s| vec![s]).collect();
    pack_rows(&rows, pad)
}

/// A right-padded micro-batch whose row b holds the sequences `rows[b]` one after another
/// (packing): each sequence keeps its own targets (the last token of one never predicts the
/// first of the next), and the batch's `segments` hold where each starts, so attention and RoPE
/// positions stay within it ([`Batch::segments`]). The padding after a row's last sequence
/// counts as one more (target-free) sequence. `seq` is the longest row; with one sequence per
/// row the batch has no segments.
pub fn pack_rows(rows: &[Vec<&Sequence>], pad: u32) -> Result<Batch> {
    let fill = |r: &Vec<&Sequence>| r.iter().map(|s| s.ids.len()).sum::<usize>();
    let seq = rows.iter().map(fill).max().unwrap_or(0);
    if rows.is_empty() || seq == 0 {
        return Err(invalid("batch", "no tokens"));
    }
    let packed = rows.iter().any(|r| r.len() > 1);
    let mut ids = Vec::with_capacity(rows.len() * seq);
    let mut targets = Vec::with_capacity(rows.len() * seq);
    let mut segments = Vec::with_capacity(rows.len() * seq);
    for row in rows {
        let mut start = 0;
        for s in row {
            if s.mask.len() != s.ids.len() {
                return Err(invalid(
                    "batch",
                    "a sequence whose mask and ids differ in length",
                ));
            }
            let n = s.ids.len();
            ids.extend_from_slice(&s.ids);
            targets.extend((0..n).map(|i| (i + 1 < n && s.mask[i + 1]).then(|| s.ids[i + 1])));
            segments.extend(std::iter::repeat_n(start as u32, n));
            start += n;
        }
        ids.extend(std::iter::repeat_n(pad, seq - start));
        targets.extend(std::iter::repeat_n(None, seq - start));
        segments.extend(std::iter::repeat_n(start as u32, seq - start));
    }
    let mut b = Batch::new(ids, rows.len(), seq, targets)?;
    if packed {
        b.segments = Some(segments);
    }
    Ok(b)
}

/// Epochs of seeded shuffles over `n` items, drawn `k` at a time; its position is two numbers,
/// so a resumed run draws exactly the batches the uninterrupted run would have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sampler {
    n: usize,
    seed: u64,
    epoch: u64,
    cursor: usize,
    order: Vec<usize>,
}

impl Sampler {
    /// Starts at epoch 0.
    pub fn new(n: usize, seed: u64) -> Result<Sampler> {
        if n == 0 {
            return Err(invalid("sampler", "no training examples"));
        }
        let mut s = Sampler {
            n,
            seed,
            epoch: 0,
            cursor: 0,
            order: Vec::new(),
        };
        s.shuffle();
        Ok(s)
    }

    /// Epoch e's order: a Fisher-Yates shuffle from the stream of `seed ^ e * G`.
    fn shuffle(&mut self) {
        let mut rng =
            crate::rng::stream(self.seed ^ self.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        self.order = (0..self.n).collect();
        self.order.shuffle(&mut rng);
    }

    /// The next `k` indices, wrapping into a new shuffled epoch when one ends.
    pub fn take(&mut self, k: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        while out.len() < k {
            if self.cursor == self.n {
                self.epoch += 1;
                self.cursor = 0;
                self.shuffle();
            }
            out.push(self.order[self.cursor]);
            self.cursor += 1;
        }
        out
    }

    /// The index [`Self::take`] would return next (starting the next epoch when one ends).
    pub fn peek(&mut self) -> usize {
        if self.cursor == self.n {
            self.epoch += 1;
            self.cursor = 0;
            self.shuffle();
        }
        self.order[self.cursor]
    }

    /// Up to `rows` rows of items for [`pack_rows`], each holding items whose `len`s add up to
    /// at most `row_len`, filled in draw order: the next item goes into the current row when it
    /// fits, else into a new row; the draw stops before the first item that fits no row left.
    /// Every item must be at most `row_len` long.
    pub fn take_packed(
        &mut self,
        len: impl Fn(usize) -> usize,
        rows: usize,
        row_len: usize,
    ) -> Result<Vec<Vec<usize>>> {
        let mut out: Vec<Vec<usize>> = vec![Vec::new()];
        let mut fill = 0;
        loop {
            let i = self.peek();
            let n = len(i);
            if n > row_len {
                return Err(invalid(
                    "packing",
                    format!("a sequence of {n} tokens is longer than a row ({row_len})"),
                ));
            }
            if fill + n > row_len {
                if out.len() == rows.max(1) {
                    return Ok(out);
                }
                out.push(Vec::new());
                fill = 0;
            }
            self.take(1);
            out.last_mut().expect("one row at least").push(i);
            fill += n;
        }
    }

    /// `(epoch, cursor)`: completed epochs and the position in the current one.
    pub fn position(&self) -> (u64, usize) {
        (self.epoch, self.cursor)
    }

    /// Moves to a position [`Self::position`] returned.
    pub fn seek(&mut self, epoch: u64, cursor: usize) -> Result<()> {
        if cursor > self.n {
            return Err(invalid("sampler", format!("cursor {cursor} > {}", self.n)));
        }
        self.epoch = epoch;
        self.cursor = cursor;
        self.shuffle();
        Ok(())
    }
}

/// Held-out metrics of [`heldout`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Heldout {
    /// Mean cross-entropy per target token.
    pub loss: f64,
    /// Sequences whose every target token is the argmax of its logits: what greedy decoding
    /// produces exactly the target completion (and stops, when the eos is a target).
    pub exact: usize,
    /// Sequences evaluated.
    pub total: usize,
}

impl Heldout {
    /// `exact / total`.
    pub fn accuracy(&self) -> f64 {
        self.exact as f64 / self.total.max(1) as f64
    }

    /// `exp(loss)`.
    pub fn perplexity(&self) -> f64 {
        self.loss.exp()
    }
}

/// Loss and exact-match accuracy of `model` (+ `adapter`) on `seqs`, `batch` at a time.
pub fn heldout(
    model: &Llama<f32>,
    adapter: Option<&Adapter<f32>>,
    seqs: &[Sequence],
    batch: usize,
    pad: u32,
) -> Result<Heldout> {
    let v = model.config.vocab_size;
    let (mut loss_sum, mut tokens, mut exact) = (0.0f64, 0usize, 0usize);
    for chunk in seqs.chunks(batch.max(1)) {
        let refs: Vec<&Sequence> = chunk.iter().collect();
        let b = pack(&refs, pad)?;
        let ev = evaluate(model, &b, adapter, Grads::None, None)?;
        let n = b.num_targets();
        loss_sum += f64::from(ev.loss) * n as f64;
        tokens += n;
        // Prompt tuning puts its virtual positions first; the real ones follow.
        let offset = ev.positions - b.seq;
        for r in 0..b.batch {
            let ok = (0..b.seq).all(|i| match b.targets[r * b.seq + i] {
                None => true,
                Some(t) => {
                    let row = &ev.logits[(r * ev.positions + offset + i) * v..][..v];
                    argmax(row) == t as usize
                }
            });
            exact += usize::from(ok);
        }
    }
    Ok(Heldout {
        loss: loss_sum / tokens.max(1) as f64,
        exact,
        total: seqs.len(),
    })
}

/// [`heldout`] on a model that scores batches itself: `score` returns each row's loss and argmax
/// test ([`qadapt::ops::cross_entropy::RowScore`]) for the micro-batch it is given, as
/// [`crate::backend::LoraModel::scores`] does on its backend (bf16 logits on a GPU, so a near tie can
/// break the other way than in f32). `batch` sequences at a time.
pub fn heldout_scored(
    seqs: &[Sequence],
    batch: usize,
    pad: u32,
    mut score: impl FnMut(&Batch) -> Result<Vec<RowScore<f32>>>,
) -> Result<Heldout> {
    let (mut loss_sum, mut tokens, mut exact) = (0.0f64, 0usize, 0usize);
    for chunk in seqs.chunks(batch.max(1)) {
        let refs: Vec<&Sequence> = chunk.iter().collect();
        let b = pack(&refs, pad)?;
        let rows = score(&b)?;
        if rows.len() != b.targets.len() {
            return Err(invalid(
                "held-out scores",
                format!("{} row scores for {} rows", rows.len(), b.targets.len()),
            ));
        }
        for (r, t) in rows.iter().zip(&b.targets) {
            if t.is_some() {
                loss_sum += f64::from(r.loss);
                tokens += 1;
            }
        }
        exact += rows
            .chunks(b.seq)
            .zip(b.targets.chunks(b.seq))
            .filter(|(r, t)| r.iter().zip(*t).all(|(r, t)| t.is_none() || r.top))
            .count();
    }
    Ok(Heldout {
        loss: loss_sum / tokens.max(1) as f64,
        exact,
        total: seqs.len(),
    })
}

/// Index of the largest value (the first on ties, as torch's argmax).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// Fresh weights for pretraining, as transformers initializes a Llama: every matrix
/// N(0, std²) (`initializer_range`, 0.02 by default), every norm weight 1. Deterministic in
/// `seed`.
pub fn init_weights(cfg: &LlamaConfig, std: f64, seed: u64) -> LlamaWeights<f32> {
    let mut w = LlamaWeights::<f32>::zeros(cfg);
    let mut rng = crate::rng::stream(seed);
    for ((name, _), slot) in layout(cfg).iter().zip(w.slots_mut()) {
        if name.ends_with("norm.weight") {
            slot.iter_mut().for_each(|v| *v = 1.0);
        } else {
            slot.iter_mut().for_each(|v| {
                let z: f64 = StandardNormal.sample(&mut rng);
                *v = (std * z) as f32;
            });
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(ids: &[u32], mask: &[bool]) -> Sequence {
        Sequence {
            ids: ids.to_vec(),
            mask: mask.to_vec(),
        }
    }

    #[test]
    fn pack_right_pads_and_shifts_the_masked_targets() {
        let a = seq(&[1, 10, 11, 12], &[false, false, true, true]);
        let b = seq(&[1, 20], &[false, true]);
        let batch = pack(&[&a, &b], 0).unwrap();
        assert_eq!((batch.batch, batch.seq), (2, 4));
        assert_eq!(batch.ids, [1, 10, 11, 12, 1, 20, 0, 0]);
        assert_eq!(
            batch.targets,
            [None, Some(11), Some(12), None, Some(20), None, None, None]
        );
    }

    #[test]
    fn sampler_covers_each_epoch_once_and_resumes_exactly() {
        let mut s = Sampler::new(7, 3).unwrap();
        let mut first: Vec<usize> = s.take(7);
        first.sort_unstable();
        assert_eq!(first, (0..7).collect::<Vec<_>>());
        let _ = s.take(3);
        let (e, c) = s.position();
        assert_eq!((e, c), (1, 3));
        let next = s.take(9);
        let mut t = Sampler::new(7, 3).unwrap();
        t.seek(e, c).unwrap();
        assert_eq!(t.take(9), next);
        // Another epoch, another order.
        let mut u = Sampler::new(7, 3).unwrap();
        let e0 = u.take(7);
        let e1 = u.take(7);
        assert_ne!(e0, e1);
    }

    #[test]
    fn argmax_takes_the_first_of_ties() {
        assert_eq!(argmax(&[0.0, 2.0, 2.0, -1.0]), 1);
    }

    #[test]
    fn init_has_the_requested_spread_and_unit_norms() {
        let cfg = LlamaConfig {
            hidden_size: 16,
            intermediate_size: 32,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 8,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: qadapt::ops::rope::RopeScaling::None,
            vocab_size: 64,
            tie_word_embeddings: false,
            max_position_embeddings: 32,
        };
        let w = init_weights(&cfg, 0.02, 7);
        assert!(w.norm.iter().all(|&v| v == 1.0));
        let e = &w.embed_tokens;
        let var = e.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / e.len() as f64;
        assert!((var.sqrt() - 0.02).abs() < 0.002, "std {}", var.sqrt());
        assert_eq!(w, init_weights(&cfg, 0.02, 7));
    }
}
