//! Sizes decided by input (a config field, an adapter's rank, a flag) and the memory they may
//! take: checked arithmetic on sizes, and one memory budget every allocation sized by input is
//! checked against *before* it is made, so a hostile or careless number is a one-line error
//! instead of an aborted allocation or a machine swapping for minutes.
//!
//! The budget is `QADAPT_MEMORY_BUDGET` (bytes) when set, else the `MemAvailable` of
//! `/proc/meminfo` (what the kernel says can be allocated without swapping), else unlimited.
//! Functions here return the reason as a `String`; callers name the file or flag it came from.

use crate::config::LlamaConfig;

/// The environment variable that sets the budget, in bytes.
pub const ENV: &str = "QADAPT_MEMORY_BUDGET";

/// The memory budget and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Bytes.
    pub bytes: u64,
    /// Where `bytes` came from.
    pub source: Source,
}

/// Where the budget came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `QADAPT_MEMORY_BUDGET`.
    Env,
    /// `/proc/meminfo`'s `MemAvailable`.
    MemAvailable,
    /// Neither: no limit.
    Unlimited,
}

/// The budget now (read on every call: `MemAvailable` changes, and tests set the variable).
pub fn budget() -> Result<Budget, String> {
    if let Some(v) = std::env::var_os(ENV) {
        let s = v.to_string_lossy();
        let bytes = s.trim().parse::<u64>().map_err(|_| {
            format!("{ENV} = {s:?} is not a number of bytes (a non-negative integer)")
        })?;
        return Ok(Budget {
            bytes,
            source: Source::Env,
        });
    }
    Ok(mem_available().map_or(
        Budget {
            bytes: u64::MAX,
            source: Source::Unlimited,
        },
        |bytes| Budget {
            bytes,
            source: Source::MemAvailable,
        },
    ))
}

fn mem_available() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Bytes in a short human form (`1.5 GiB`).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The product of `dims` (`None` on overflow).
pub fn product(dims: &[usize]) -> Option<u64> {
    dims.iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(u64::try_from(d).ok()?))
}

/// `Ok` when `bytes` fit the budget; otherwise why not, starting with `what` (e.g. "r = 4096: the
/// LoRA matrices"). `None` stands for a size that overflowed 64 bits.
pub fn check(what: &str, bytes: Option<u64>) -> Result<(), String> {
    let b = budget()?;
    match bytes {
        None => Err(format!("{what} would need more than 2^64 bytes")),
        Some(n) if n > b.bytes => Err(format!(
            "{what} would need {} ({n} bytes), over the memory budget of {} ({}; set {ENV} in \
             bytes to change it)",
            human(n),
            human(b.bytes),
            match b.source {
                Source::Env => ENV,
                Source::MemAvailable => "MemAvailable",
                Source::Unlimited => "no limit",
            }
        )),
        Some(_) => Ok(()),
    }
}

/// [`check`] for `elements` values of `elem_bytes` bytes each.
pub fn check_elements(what: &str, elements: Option<u64>, elem_bytes: usize) -> Result<(), String> {
    check(
        what,
        elements.and_then(|n| n.checked_mul(elem_bytes as u64)),
    )
}

/// Every parameter of a Llama model under `cfg`, computed without allocating (`None` on
/// overflow).
pub fn llama_params(cfg: &LlamaConfig) -> Option<u64> {
    let c = cfg.hidden_size as u64;
    let i = cfg.intermediate_size as u64;
    let v = cfg.vocab_size as u64;
    let q = product(&[cfg.num_attention_heads, cfg.head_dim])?;
    let kv = product(&[cfg.num_key_value_heads, cfg.head_dim])?;
    // Per layer: two norms, q and o (C x q), k and v (C x kv), gate, up and down (C x I).
    let per_layer = c
        .checked_mul(2)?
        .checked_add(c.checked_mul(q)?.checked_mul(2)?)?
        .checked_add(c.checked_mul(kv)?.checked_mul(2)?)?
        .checked_add(c.checked_mul(i)?.checked_mul(3)?)?;
    let tables = if cfg.tie_word_embeddings { 1 } else { 2 };
    per_layer
        .checked_mul(cfg.num_hidden_layers as u64)?
        .checked_add(v.checked_mul(c)?.checked_mul(tables)?)?
        .checked_add(c)
}

/// A lower estimate of the bytes one forward and backward of `batch` sequences of `seq`
/// positions keep (elements of `elem_bytes`): per layer and token the activations of the
/// projections, the MLP and the attention probabilities, plus the logits and their gradient.
/// `None` on overflow.
pub fn activation_bytes(
    cfg: &LlamaConfig,
    batch: usize,
    seq: usize,
    elem_bytes: usize,
) -> Option<u64> {
    let tokens = product(&[batch, seq])?;
    let c = cfg.hidden_size as u64;
    let per_token_layer = c
        .checked_mul(6)?
        .checked_add(product(&[cfg.num_key_value_heads, cfg.head_dim])?.checked_mul(2)?)?
        .checked_add((cfg.intermediate_size as u64).checked_mul(3)?)?
        .checked_add(product(&[cfg.num_attention_heads, seq])?)?;
    let per_token = per_token_layer
        .checked_mul(cfg.num_hidden_layers as u64)?
        .checked_add((cfg.vocab_size as u64).checked_mul(2)?)?;
    tokens
        .checked_mul(per_token)?
        .checked_mul(elem_bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_are_checked() {
        assert_eq!(product(&[3, 4, 5]), Some(60));
        assert_eq!(product(&[]), Some(1));
        assert_eq!(product(&[1 << 40, 1 << 40]), None);
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(3 << 29), "1.5 GiB");
    }

    #[test]
    fn overflow_is_refused_whatever_the_budget() {
        let e = check("x = 2^40", None).unwrap_err();
        assert!(
            e.starts_with("x = 2^40 would need more than 2^64 bytes"),
            "{e}"
        );
        assert!(check("nothing", Some(0)).is_ok());
    }
}
