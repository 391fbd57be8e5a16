//! Sets of address ranges, `(start, end)` with `end` exclusive, kept sorted and
//! merged: what pre-copy has tracked and sent and what the destination holds (the
//! memory plugin), what soft-dirty tracking has found and not yet reported (the
//! framework).

pub type Ranges = Vec<(u64, u64)>;

/// Sorts and merges overlapping or touching ranges; drops empty ones.
pub fn normalize(mut v: Ranges) -> Ranges {
    v.retain(|r| r.0 < r.1);
    v.sort_unstable();
    let mut out: Ranges = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

pub fn union(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    normalize(a.iter().chain(b).copied().collect())
}

/// `a ∩ b`, both normalized.
pub fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            out.push((s, e));
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// `a − b`, both normalized.
pub fn subtract(a: &[(u64, u64)], b: &[(u64, u64)]) -> Ranges {
    let mut out = Vec::new();
    let mut j = 0;
    for &(s, e) in a {
        let mut at = s;
        while j < b.len() && b[j].1 <= at {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].0 < e {
            if b[k].0 > at {
                out.push((at, b[k].0));
            }
            at = at.max(b[k].1);
            k += 1;
        }
        if at < e {
            out.push((at, e));
        }
    }
    out
}

/// Whether every byte of `inner` lies in `outer` (normalized).
pub fn covers(outer: &[(u64, u64)], inner: (u64, u64)) -> bool {
    subtract(&[inner], outer).is_empty()
}

/// Runs of pages `(address, pages)` as ranges.
pub fn from_runs(runs: &[(u64, u64)], page: u64) -> Ranges {
    normalize(runs.iter().map(|&(a, n)| (a, a + n * page)).collect())
}

/// Ranges as runs of pages `(address, pages)`.
pub fn to_runs(ranges: &[(u64, u64)], page: u64) -> Vec<(u64, u64)> {
    ranges.iter().map(|&(s, e)| (s, (e - s) / page)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_operations_agree_with_a_page_by_page_model() {
        let a = normalize(vec![(0, 10), (8, 20), (30, 40), (40, 45), (50, 50)]);
        assert_eq!(a, vec![(0, 20), (30, 45)]);
        let b = normalize(vec![(5, 12), (18, 33), (44, 60)]);
        let model = |r: &[(u64, u64)]| -> Vec<u64> { (0..64).filter(|x| r.iter().any(|&(s, e)| s <= *x && *x < e)).collect() };
        let (ma, mb) = (model(&a), model(&b));
        let and: Vec<u64> = ma.iter().copied().filter(|x| mb.contains(x)).collect();
        let minus: Vec<u64> = ma.iter().copied().filter(|x| !mb.contains(x)).collect();
        let or: Vec<u64> = (0..64).filter(|x| ma.contains(x) || mb.contains(x)).collect();
        assert_eq!(model(&intersect(&a, &b)), and);
        assert_eq!(model(&subtract(&a, &b)), minus);
        assert_eq!(model(&union(&a, &b)), or);
        assert_eq!(subtract(&a, &b), vec![(0, 5), (12, 18), (33, 44)]);
        assert!(covers(&a, (2, 19)) && !covers(&a, (19, 31)));
        assert_eq!(to_runs(&from_runs(&[(0x1000, 2), (0x3000, 1)], 0x1000), 0x1000), vec![(0x1000, 3)]);
    }
}
