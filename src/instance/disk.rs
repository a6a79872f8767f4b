//! The VM's raw, sparse disk image.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::MetadataExt;

use super::{InstanceError, Layout, io_err};
use crate::units::ByteSize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DiskError {
    #[error(
        "--disk-size {requested} is smaller than the existing disk ({current}); shrinking would destroy data. \
         Use --disk-size {current} or larger, or `darwin-vz-nix destroy` to start from a blank disk"
    )]
    WouldShrink { requested: ByteSize, current: ByteSize },
    #[error("--disk-size {0} is not a multiple of 512 bytes")]
    Unaligned(ByteSize),
}

/// What `prepare` will do; decided before anything is written so bad input changes nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskPlan {
    Create(ByteSize),
    Grow { from: ByteSize, to: ByteSize },
    Keep(ByteSize),
}

pub fn plan(layout: &Layout, requested: ByteSize) -> Result<Result<DiskPlan, DiskError>, InstanceError> {
    if !requested.0.is_multiple_of(512) {
        return Ok(Err(DiskError::Unaligned(requested)));
    }
    let path = layout.disk();
    let current = match fs::metadata(&path) {
        Ok(meta) => ByteSize(meta.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Ok(DiskPlan::Create(requested))),
        Err(e) => return Err(io_err(&path)(e)),
    };
    Ok(match requested.cmp(&current) {
        std::cmp::Ordering::Less => Err(DiskError::WouldShrink { requested, current }),
        std::cmp::Ordering::Equal => Ok(DiskPlan::Keep(current)),
        std::cmp::Ordering::Greater => Ok(DiskPlan::Grow { from: current, to: requested }),
    })
}

/// Carries out a plan. Growing only extends the file (sparse); the guest grows its file system at boot.
pub fn apply(layout: &Layout, plan: DiskPlan) -> Result<(), InstanceError> {
    let path = layout.disk();
    match plan {
        DiskPlan::Keep(_) => Ok(()),
        DiskPlan::Create(size) | DiskPlan::Grow { to: size, .. } => {
            use std::os::unix::fs::OpenOptionsExt;
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io_err(&path))?;
            // Never shrink, whatever the plan said: the file may have grown since it was made.
            if file.metadata().map_err(io_err(&path))?.len() >= size.0 {
                return Ok(());
            }
            file.set_len(size.0).map_err(io_err(&path))?;
            file.sync_all().map_err(io_err(&path))
        }
    }
}

/// Deletes the image, for `--ephemeral` and `destroy`.
pub fn remove(layout: &Layout) -> Result<(), InstanceError> {
    super::remove_path(&layout.disk())
}

/// (bytes allocated on the host, apparent size).
pub fn usage(layout: &Layout) -> Option<(u64, u64)> {
    let meta = fs::metadata(layout.disk()).ok()?;
    Some((meta.blocks() * 512, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_grow_keep_and_refuse_shrink() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let g = |n: u64| ByteSize(n << 30);
        assert_eq!(plan(&layout, g(2)).unwrap(), Ok(DiskPlan::Create(g(2))));
        apply(&layout, DiskPlan::Create(g(2))).unwrap();
        let (allocated, size) = usage(&layout).unwrap();
        assert_eq!(size, 2 << 30);
        assert!(allocated < 1 << 20, "sparse: {allocated} bytes allocated");
        assert_eq!(plan(&layout, g(2)).unwrap(), Ok(DiskPlan::Keep(g(2))));
        assert_eq!(plan(&layout, g(4)).unwrap(), Ok(DiskPlan::Grow { from: g(2), to: g(4) }));
        apply(&layout, DiskPlan::Grow { from: g(2), to: g(4) }).unwrap();
        assert_eq!(usage(&layout).unwrap().1, 4 << 30);
        let refused = plan(&layout, g(1)).unwrap().unwrap_err();
        assert_eq!(refused, DiskError::WouldShrink { requested: g(1), current: g(4) });
        assert!(refused.to_string().contains("--disk-size 4G or larger"), "{refused}");
        assert_eq!(plan(&layout, ByteSize(1000)).unwrap(), Err(DiskError::Unaligned(ByteSize(1000))));
        // A stale plan (made before another start grew the disk) never shrinks it.
        apply(&layout, DiskPlan::Grow { from: g(1), to: g(3) }).unwrap();
        assert_eq!(usage(&layout).unwrap().1, 4 << 30);
        apply(&layout, DiskPlan::Create(g(1))).unwrap();
        assert_eq!(usage(&layout).unwrap().1, 4 << 30);
    }
}
