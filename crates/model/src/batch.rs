//! Splitting writes that grow with the cluster into transactions the store accepts.

/// Pack `groups` (writes that must commit together, in order) into batches of at most `limit`
/// items, never splitting a group; a group larger than `limit` is a batch of its own (the
/// store then refuses it, naming the size, rather than ferrynet committing half of it).
pub fn pack<T>(groups: Vec<Vec<T>>, limit: usize) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut current: Vec<T> = Vec::new();
    for g in groups {
        if g.is_empty() {
            continue;
        }
        if !current.is_empty() && current.len() + g.len() > limit {
            out.push(std::mem::take(&mut current));
        }
        current.extend(g);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::pack;

    #[test]
    fn groups_stay_whole_and_batches_stay_within_the_limit() {
        // 500 endpoints with an IPv4 and an IPv6 address: 3 deletes each.
        let groups: Vec<Vec<u32>> = (0..500)
            .map(|i| vec![i * 3, i * 3 + 1, i * 3 + 2])
            .collect();
        let batches = pack(groups, 128);
        assert!(batches.iter().all(|b| b.len() <= 128 && b.len() % 3 == 0));
        let flat: Vec<u32> = batches.concat();
        assert_eq!(flat, (0..1500).collect::<Vec<_>>());
        assert_eq!(batches.len(), 1500usize.div_ceil(126));
    }

    #[test]
    fn empty_and_oversized_groups() {
        assert!(pack::<u8>(vec![], 4).is_empty());
        assert!(pack::<u8>(vec![vec![], vec![]], 4).is_empty());
        let b = pack(vec![vec![1], vec![2, 3, 4, 5, 6], vec![7]], 4);
        assert_eq!(b, vec![vec![1], vec![2, 3, 4, 5, 6], vec![7]]);
        let b = pack(vec![vec![1, 2], vec![3, 4], vec![5]], 4);
        assert_eq!(b, vec![vec![1, 2, 3, 4], vec![5]]);
    }
}
