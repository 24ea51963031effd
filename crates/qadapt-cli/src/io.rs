//! File plumbing of the CLI: reading a whole safetensors file with a clear error, and writing
//! outputs so that nothing is destroyed and nothing half-written is left behind.
//!
//! The rules every output follows (issue 12):
//! - a temporary beside the target, created with `O_EXCL` under an unpredictable name
//!   (`.NAME.<12 random alphanumerics>.partial`, `tempfile`), so a planted symlink or file is never followed
//!   or reused; it is synced, then renamed over the target, and removed on any error;
//! - an output that is the same file as an input of the command (another spelling, a symlink, a
//!   hard link: same device and inode) is refused, as is an output that exists and is not a
//!   regular file (a FIFO, a device, a directory), and an existing regular file is only replaced
//!   with `--force`;
//! - a directory is filled as a temporary directory and renamed into place; replacing one
//!   (the training checkpoint) moves the old one aside first, so a crash at any point leaves the
//!   old or the new one, which [`qadapt_train::run::fs::recover_directory`] sorts out on the next start.
//!
//! The writers themselves (atomic files and directories, the checkpoint swap, recovery and the
//! `QADAPT_FAULT_AT` crash points) live in [`qadapt_train::run::fs`], shared with the training
//! run so that one process numbers its crash points in one sequence; this file re-exports them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use qadapt::nf4::bnb::OnDiskTensor;
use safetensors::SafeTensors;

pub(crate) use qadapt_train::run::fs::Metadata;
use qadapt_train::run::fs::{self as run_fs, kind_of, parent_dir, serialize};

/// [`run_fs::write_file`] with this crate's errors.
pub(crate) fn write_file(
    target: &Path,
    fill: impl FnOnce(&mut fs::File) -> Result<()>,
) -> Result<()> {
    run_fs::write_file(target, fill)
}

/// [`run_fs::new_directory`] with this crate's errors.
pub(crate) fn new_directory<T>(output: &Path, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    run_fs::new_directory(output, fill)
}

/// [`run_fs::write_safetensors`] with this crate's errors.
pub(crate) fn write_safetensors(
    path: &Path,
    tensors: &[OnDiskTensor],
    metadata: Metadata,
) -> Result<()> {
    Ok(run_fs::write_safetensors(path, tensors, metadata)?)
}

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

/// Whether `a` and `b` name the same file (same device and inode; symlinks followed).
fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Checks, before any work is done, that writing the file `output` destroys nothing: it is not
/// one of `inputs` (nor a file directly inside an input directory), it is not something other
/// than a regular file, and if it exists `force` allows replacing it.
pub(crate) fn check_output_file(output: &Path, inputs: &[&Path], force: bool) -> Result<()> {
    let dir = parent_dir(output);
    if !dir.is_dir() {
        bail!("the output directory {} does not exist", dir.display());
    }
    for input in inputs {
        let clash = if input.is_dir() {
            fs::read_dir(input)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| same_file(&e.path(), output))
        } else {
            same_file(input, output)
        };
        if clash {
            bail!(
                "the output {} is an input of this command ({}); choose another path",
                output.display(),
                input.display()
            );
        }
    }
    match fs::metadata(output) {
        Err(_) => Ok(()),
        Ok(m) if !m.is_file() => bail!(
            "the output {} is {}; refusing to replace it",
            output.display(),
            kind_of(m.file_type())
        ),
        Ok(_) if !force => bail!(
            "the output {} already exists; pass --force to replace it",
            output.display()
        ),
        Ok(_) => Ok(()),
    }
}

/// An output file that was checked before any work was done and is written atomically at the
/// end.
pub(crate) struct Output {
    target: PathBuf,
}

impl Output {
    /// See [`check_output_file`].
    pub(crate) fn new(output: &Path, inputs: &[&Path], force: bool) -> Result<Output> {
        check_output_file(output, inputs, force)?;
        Ok(Output {
            target: output.to_path_buf(),
        })
    }

    /// Serializes `tensors` into the target (see [`write_file`]).
    pub(crate) fn write(&self, tensors: &[OnDiskTensor], metadata: Metadata) -> Result<()> {
        let bytes = serialize(tensors, metadata)?;
        write_file(&self.target, |f| Ok(f.write_all(&bytes)?))
    }
}

/// Copies the files of `from` into `to`, except those `skip` names (tokenizer, generation config
/// and the like travel with a converted model). Symlinks are followed (the Hugging Face cache
/// keeps a snapshot's files as links into its blobs), so the copy is self-contained.
pub(crate) fn copy_other_files(from: &Path, to: &Path, skip: impl Fn(&str) -> bool) -> Result<()> {
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if !skip(&file) && fs::metadata(entry.path())?.is_file() {
            fs::copy(entry.path(), to.join(&file)).with_context(|| format!("copying {file}"))?;
        }
    }
    Ok(())
}
