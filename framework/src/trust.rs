//! What ferry trusts on disk. Plugins run as ferry (root), and an image is trusted
//! input to a root restore, so both must be files nobody but root (or the user running
//! ferry) could have put there or changed.

use std::{os::unix::fs::MetadataExt, path::Path};

/// Why `path` could have been changed by someone other than root or the caller, if it
/// could: owned by another user, writable by group or others, or below a directory
/// others can change (a sticky directory such as /tmp still stops them replacing it).
pub fn changeable_by_others(path: &Path) -> Option<String> {
    // A symbolic link is followed, and both its directory and its target's are checked.
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) => return Some(e.to_string()),
    };
    let me = nix::unistd::geteuid().as_raw();
    let trusted = |uid: u32| uid == 0 || uid == me;
    if !trusted(meta.uid()) {
        return Some(format!("owned by uid {}, neither root nor the caller", meta.uid()));
    }
    let sticky_dir = meta.is_dir() && meta.mode() & 0o1000 != 0;
    if meta.mode() & 0o022 != 0 && !sticky_dir {
        return Some(format!("writable by group or others (mode {:o})", meta.mode() & 0o7777));
    }
    // Every directory above it too, as sudo and ssh check: whoever can change one can
    // replace what is below.
    let real = std::fs::canonicalize(path).ok();
    let given = path.parent().and_then(|p| std::path::absolute(p).ok());
    let parents = [given.as_deref(), real.as_deref().and_then(Path::parent)];
    for dir in parents.into_iter().flatten().flat_map(Path::ancestors) {
        let Ok(dmeta) = std::fs::metadata(dir) else { continue };
        if !trusted(dmeta.uid()) || (dmeta.mode() & 0o022 != 0 && dmeta.mode() & 0o1000 == 0) {
            return Some(format!("its directory {} can be changed by others", dir.display()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn only_files_nobody_else_could_change_are_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(changeable_by_others(&file), None);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o620)).unwrap();
        assert!(changeable_by_others(&file).unwrap().contains("writable by group or others (mode 620)"));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(changeable_by_others(&file).unwrap().contains("can be changed by others"));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(changeable_by_others(&file), None, "a sticky directory keeps others from replacing it");
        // A link is as trusted as what it leads to, and where.
        let other = tempfile::tempdir().unwrap();
        let link = other.path().join("l");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(changeable_by_others(&link), None);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(changeable_by_others(&link).unwrap().contains("can be changed by others"));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        // Any directory above counts, not only the file's own.
        let deep = dir.path().join("a/b");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::write(deep.join("f"), b"x").unwrap();
        std::fs::set_permissions(deep.join("f"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(changeable_by_others(&deep.join("f")), None);
        std::fs::set_permissions(dir.path().join("a"), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(changeable_by_others(&deep.join("f")).unwrap().contains("/a can be changed by others"));
        std::fs::set_permissions(dir.path().join("a"), std::fs::Permissions::from_mode(0o755)).unwrap();
        // A file another user owns: tests/tests/manager.rs and cli.rs (only root can
        // give a file away, and a skip there is loud).
    }
}
