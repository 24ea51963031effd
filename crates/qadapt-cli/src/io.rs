//! File plumbing of the CLI: reading a whole safetensors file with a clear error, and writing an
//! output atomically (a temporary file in the same directory, synced, then renamed over the
//! target), so an interrupted or failed run never leaves a partial output behind.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use qadapt::nf4::bnb::OnDiskTensor;
use safetensors::SafeTensors;

/// The `__metadata__` map of a safetensors header.
pub(crate) type Metadata = Option<HashMap<String, String>>;

/// Reads `path` and checks that it is a whole safetensors file (header and every tensor's byte
/// range); returns the bytes and the header's `__metadata__`.
pub(crate) fn read_safetensors(path: &Path) -> Result<(Vec<u8>, Metadata)> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() < 8 {
        bail!(
            "{}: not a safetensors file ({} bytes, shorter than the 8-byte header length)",
            path.display(),
            bytes.len()
        );
    }
    let not_st = |e: safetensors::SafeTensorError| {
        anyhow::anyhow!("{}: not a safetensors file ({e})", path.display())
    };
    let metadata = SafeTensors::read_metadata(&bytes)
        .map_err(not_st)?
        .1
        .metadata()
        .clone();
    SafeTensors::deserialize(&bytes).map_err(not_st)?;
    Ok((bytes, metadata))
}

/// An output path that is checked before any work is done and written atomically at the end.
pub(crate) struct Output {
    target: PathBuf,
}

impl Output {
    /// Refuses an output that is the input (also through another spelling of the same path) or
    /// that lives in a directory that does not exist.
    pub(crate) fn new(input: &Path, output: &Path) -> Result<Output> {
        let same = match (fs::canonicalize(input), fs::canonicalize(output)) {
            (Ok(a), Ok(b)) => a == b,
            _ => input == output,
        };
        if same {
            bail!(
                "the output {} is the input file; choose another path",
                output.display()
            );
        }
        let dir = parent_dir(output);
        if !dir.is_dir() {
            bail!("the output directory {} does not exist", dir.display());
        }
        Ok(Output {
            target: output.to_path_buf(),
        })
    }

    /// Serializes `tensors` to a temporary file beside the target, syncs it, renames it over the
    /// target. On any error the temporary file is removed.
    pub(crate) fn write(&self, tensors: &[OnDiskTensor], metadata: Metadata) -> Result<()> {
        let file_name = self
            .target
            .file_name()
            .context("the output path has no file name")?
            .to_string_lossy();
        let tmp =
            parent_dir(&self.target).join(format!(".{file_name}.partial-{}", std::process::id()));
        let result = (|| -> Result<()> {
            write_safetensors(&tmp, tensors, metadata)?;
            fs::rename(&tmp, &self.target)
                .with_context(|| format!("renaming {} to {}", tmp.display(), self.target.display()))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

fn parent_dir(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Serializes `tensors` into `path` and syncs it to disk.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[OnDiskTensor],
    metadata: Metadata,
) -> Result<()> {
    let bytes = safetensors::serialize(tensors.iter().map(|t| (t.name.as_str(), t)), metadata)
        .context("serializing the output")?;
    let mut f =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(&bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// Creates the directory `output` atomically: `fill` writes into a temporary directory beside it,
/// which is renamed to `output` only when `fill` succeeds, and removed otherwise. An existing
/// `output` is refused, never overwritten.
pub(crate) fn new_directory<T>(output: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    if output.exists() {
        bail!(
            "{} already exists; choose another output directory or remove it",
            output.display()
        );
    }
    let parent = parent_dir(output);
    if !parent.is_dir() {
        bail!(
            "the output directory's parent {} does not exist",
            parent.display()
        );
    }
    let name = output
        .file_name()
        .context("the output path has no name")?
        .to_string_lossy();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let result = fs::create_dir(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))
        .and_then(|()| fill(&tmp))
        .and_then(|v| {
            fs::rename(&tmp, output)
                .with_context(|| format!("renaming {} to {}", tmp.display(), output.display()))?;
            Ok(v)
        });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// Replaces the directory `output` (created if absent) atomically: `fill` writes a new one
/// beside it; then the old one is moved aside, the new one renamed into place, and the old one
/// removed. A crash leaves `output` either old or new (or, between the two renames, the old one
/// at `<output>.old`, which [`recover_directory`] moves back).
pub(crate) fn replace_directory(
    output: &Path,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    recover_directory(output)?;
    let next = sibling(output, "next")?;
    let old = sibling(output, "old")?;
    let _ = fs::remove_dir_all(&next);
    new_directory(&next, fill)?;
    if output.exists() {
        fs::rename(output, &old).with_context(|| format!("moving {} aside", output.display()))?;
    }
    fs::rename(&next, output).with_context(|| format!("renaming into {}", output.display()))?;
    let _ = fs::remove_dir_all(&old);
    Ok(())
}

/// `<output>.<suffix>` beside `output`.
fn sibling(output: &Path, suffix: &str) -> Result<PathBuf> {
    let name = output
        .file_name()
        .context("the output path has no name")?
        .to_string_lossy();
    Ok(parent_dir(output).join(format!("{name}.{suffix}")))
}

/// Undoes a [`replace_directory`] cut off between its renames.
pub(crate) fn recover_directory(output: &Path) -> Result<()> {
    let old = sibling(output, "old")?;
    if !output.exists() && old.is_dir() {
        fs::rename(&old, output).with_context(|| format!("restoring {}", output.display()))?;
    }
    Ok(())
}

/// Copies the plain files of `from` into `to`, except those `skip` names (tokenizer, generation
/// config and the like travel with a converted model).
pub(crate) fn copy_other_files(from: &Path, to: &Path, skip: impl Fn(&str) -> bool) -> Result<()> {
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if !skip(&file) && entry.file_type()?.is_file() {
            fs::copy(entry.path(), to.join(&file)).with_context(|| format!("copying {file}"))?;
        }
    }
    Ok(())
}
