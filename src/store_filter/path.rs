//! Store paths as the filter accepts them, and the case-hack walk over a path's tree on the host.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::sync::Mutex;

/// The logical store directory on both sides: the guest's lower store is the host's `/nix/store`, seen through
/// the virtio-fs share (a test's chroot store still reports `/nix/store` paths).
pub const STORE_DIR: &str = "/nix/store";
const HASH_LEN: usize = 32;
const MAX_NAME: usize = 211;
/// Nix's base-32 alphabet (no e, o, u, t).
const NIXBASE32: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
/// What a Nix store on a case-insensitive file system appends to names that differ only by case.
pub const CASE_HACK: &str = "~nix~case~hack~";

/// The most directory entries one path's walk visits; a larger tree counts as not clean (the guest uploads it).
pub const MAX_WALK_ENTRIES: u64 = 2_000_000;
/// The most paths in the clean-closure cache; when full it is emptied (facts are recomputed, never wrong).
pub const MAX_CACHE: usize = 200_000;

pub fn is_hash_part(s: &str) -> bool {
    s.len() == HASH_LEN && s.bytes().all(|c| NIXBASE32.contains(&c))
}

/// Nix's `checkName`: 1..=211 characters from `[A-Za-z0-9+-._?=]`, and the first dash-separated component is
/// not `.` or `..` (so no name can walk out of the store directory).
pub fn is_valid_name(name: &str) -> bool {
    let ok_chars = name.bytes().all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c));
    let first = name.split('-').next().unwrap_or("");
    ok_chars && !name.is_empty() && name.len() <= MAX_NAME && first != "." && first != ".."
}

/// The base name (`<hash>-<name>`) of `/nix/store/<hash>-<name>`, if the whole string is a valid store path.
pub fn base_name(path: &str) -> Option<&str> {
    let base = path.strip_prefix(STORE_DIR)?.strip_prefix('/')?;
    let (hash, name) = (base.get(..HASH_LEN)?, base.get(HASH_LEN..)?);
    let name = name.strip_prefix('-')?;
    (is_hash_part(hash) && is_valid_name(name)).then_some(base)
}

pub fn is_store_path(path: &str) -> bool {
    base_name(path).is_some()
}

/// Why a path's own tree is not usable by the guest as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    Clean,
    /// A name in the tree carries the case-hack suffix.
    CaseHacked,
    /// Not on the host's disk (or unreadable): the guest would not see it through the share either.
    Missing,
    /// More than `MAX_WALK_ENTRIES` entries: not walked to the end, so not trusted.
    TooLarge,
}

/// Walks `<store_dir>/<base>` without following any symbolic link (a link's name counts, its target never
/// matters), one directory open at a time.
pub fn walk(store_dir: &Path, base: &str) -> Tree {
    let top = store_dir.join(base);
    let Ok(meta) = fs::symlink_metadata(&top) else { return Tree::Missing };
    if !meta.is_dir() {
        return Tree::Clean; // a file or a symlink: its own name was validated, it has no case-hack suffix
    }
    let mut stack = vec![top];
    let mut seen: u64 = 0;
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else { return Tree::Missing };
        for entry in entries {
            let Ok(entry) = entry else { return Tree::Missing };
            seen += 1;
            if seen > MAX_WALK_ENTRIES {
                return Tree::TooLarge;
            }
            if entry.file_name().to_string_lossy().contains(CASE_HACK) {
                return Tree::CaseHacked;
            }
            // DirEntry::file_type does not follow symlinks: only real directories are entered.
            let Ok(ft) = entry.file_type() else { return Tree::Missing };
            if ft.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Tree::Clean
}

/// Base names whose whole closure was found clean on the host. Store paths are immutable, so the fact holds
/// for as long as the path exists; existence itself is never cached (each report checks it again).
#[derive(Default)]
pub struct CleanCache {
    set: Mutex<HashSet<String>>,
}

impl CleanCache {
    pub fn contains(&self, base: &str) -> bool {
        self.set.lock().map(|s| s.contains(base)).unwrap_or(false)
    }

    pub fn insert_all<I: IntoIterator<Item = String>>(&self, bases: I) {
        if let Ok(mut s) = self.set.lock() {
            for b in bases {
                if s.len() >= MAX_CACHE {
                    s.clear();
                }
                s.insert(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "0123456789abcdfghijklmnpqrsvwxyz";

    #[test]
    fn store_paths_are_checked_like_nix() {
        assert_eq!(base_name(&format!("/nix/store/{H}-hello-2.12")), Some(&*format!("{H}-hello-2.12")));
        for bad in [
            format!("/nix/store/{H}"),
            format!("/nix/store/{H}-"),
            format!("/nix/store/{H}-a/b"),
            format!("/nix/store/{H}-.."),
            format!("/nix/store/{H}-..-x"),
            format!("/nix/store/{H}-."),
            format!("/nix/store/{H}-a b"),
            format!("/nix/store/{}-x", &H.replace('0', "e")),
            format!("/nix/store/{}-x", &H[1..]),
            format!("/nix/store//{H}-x"),
            format!("/nix/storex/{H}-x"),
            format!("/tmp/{H}-x"),
            format!("/nix/store/{H}-{}", "a".repeat(212)),
        ] {
            assert!(!is_store_path(&bad), "{bad}");
        }
        assert!(is_store_path(&format!("/nix/store/{H}-{}", "a".repeat(211))));
        assert!(is_store_path(&format!("/nix/store/{H}-.x")));
        assert!(is_hash_part(H));
        assert!(!is_hash_part("0123456789abcdfghijklmnpqrsvwxyZ"));
    }

    #[test]
    fn walk_finds_case_hack_names_without_following_links() {
        let t = tempfile::tempdir().unwrap();
        let s = t.path();
        fs::create_dir_all(s.join("a/share/doc")).unwrap();
        fs::write(s.join("a/share/doc/README"), "x").unwrap();
        assert_eq!(walk(s, "a"), Tree::Clean);

        fs::write(s.join("a/share/doc/README~nix~case~hack~1"), "x").unwrap();
        assert_eq!(walk(s, "a"), Tree::CaseHacked);

        // A link pointing at a hacked tree does not make a path hacked...
        fs::create_dir_all(s.join("b")).unwrap();
        std::os::unix::fs::symlink(s.join("a/share"), s.join("b/share")).unwrap();
        assert_eq!(walk(s, "b"), Tree::Clean);
        // ...but a link named with the suffix does.
        std::os::unix::fs::symlink("nowhere", s.join("b/x~nix~case~hack~2")).unwrap();
        assert_eq!(walk(s, "b"), Tree::CaseHacked);

        fs::write(s.join("f"), "file").unwrap();
        assert_eq!(walk(s, "f"), Tree::Clean);
        assert_eq!(walk(s, "missing"), Tree::Missing);
    }
}
