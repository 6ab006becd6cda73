//! Id-range numbers: each machine of a driver gets a number *n* and with it
//! its own band of host uids/gids (the driver maps *n* to a base). Two
//! machines sharing a band would share file ownership and could signal each
//! other's processes, so numbers are reserved under a lock and written at
//! once (`<machine dir>/.id-<kind>`), before the slow root preparation that
//! precedes the driver's own record. `apply` creates machines in parallel:
//! without the reservation, concurrent creates read the same free number.
//!
//! The reservation lives in the machine's folder, so destroying the machine
//! frees it. Records written before reservations existed still count (the
//! `recorded` callback reads a folder's driver record).

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::Path;

fn read(p: &Path) -> Option<u32> {
    fs::read_to_string(p).ok()?.trim().parse().ok()
}

/// The id number of machine `full_name` (folder `machines/<full_name>`, which
/// must exist): its reservation or record if it has one, else the lowest
/// number no other machine folder holds, reserved before returning.
pub(crate) fn reserve(
    machines: &Path,
    full_name: &str,
    kind: &str,
    recorded: impl Fn(&Path) -> Option<u32>,
) -> io::Result<u32> {
    let file = format!(".id-{kind}");
    let mine = machines.join(full_name).join(&file);
    // Beside `machines/`, not in it: everything in there is a machine folder.
    let lock_dir = machines.parent().unwrap_or(machines);
    let lock = fs::File::create(lock_dir.join(format!("ids-{kind}.lock")))?;
    lock.lock()?;
    if let Some(n) = read(&mine).or_else(|| recorded(&machines.join(full_name))) {
        fs::write(&mine, n.to_string())?;
        return Ok(n);
    }
    let mut used = BTreeSet::new();
    for e in fs::read_dir(machines)?.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy() == full_name || !p.is_dir() {
            continue;
        }
        if let Some(n) = read(&p.join(&file)).or_else(|| recorded(&p)) {
            used.insert(n);
        }
    }
    let n = (1..).find(|n| !used.contains(n)).unwrap_or(1);
    fs::write(&mine, n.to_string())?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_reservations_get_distinct_numbers() {
        let t = tempfile::tempdir().unwrap();
        let d = &t.path().join("machines");
        let names: Vec<String> = (0..16).map(|i| format!("m{i}")).collect();
        for n in &names {
            fs::create_dir_all(d.join(n)).unwrap();
        }
        let got: Vec<u32> = std::thread::scope(|s| {
            let hs: Vec<_> = names
                .iter()
                .map(|n| s.spawn(|| reserve(d, n, "t", |_| None).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let set: BTreeSet<u32> = got.iter().copied().collect();
        assert_eq!(set.len(), names.len(), "{got:?}");
        // Stable: asking again gives the same number.
        assert_eq!(reserve(d, "m3", "t", |_| None).unwrap(), got[3]);
        // The lock is not in the machines folder.
        assert!(fs::read_dir(d)
            .unwrap()
            .flatten()
            .all(|e| e.path().is_dir()));
    }

    #[test]
    fn records_count_and_destroyed_machines_free_their_number() {
        let d = tempfile::tempdir().unwrap();
        for n in ["old", "new", "other"] {
            fs::create_dir_all(d.path().join(n)).unwrap();
        }
        // "old" has a driver record (number 1) but no reservation file.
        let rec = |p: &Path| p.ends_with("old").then_some(1);
        assert_eq!(reserve(d.path(), "new", "t", rec).unwrap(), 2);
        // Another kind has its own numbers.
        assert_eq!(reserve(d.path(), "other", "u", |_| None).unwrap(), 1);
        fs::remove_dir_all(d.path().join("old")).unwrap();
        fs::create_dir_all(d.path().join("again")).unwrap();
        assert_eq!(reserve(d.path(), "again", "t", |_| None).unwrap(), 1);
    }
}
