//! Unit tests of the plugin's page bookkeeping.

use super::*;
use crate::shmem::once_per_object;

#[test]
fn an_object_mapped_twice_sends_each_of_its_pages_once() {
    let shm = |start: u64, end: u64, offset: u64| Area {
        start,
        end,
        prot: 3,
        shared: true,
        kind: AreaKind::Shmem,
        path: None,
        offset,
        growsdown: false,
        file: None,
        object: Some(7),
        flags: vec![],
        guards: vec![],
    };
    let mut sent = Vec::new();
    // Pages 0-7 of the object at 0x10000, then pages 2-5 again at 0x40000 and pages
    // 6-9 at 0x50000: only what no area before sent goes.
    assert_eq!(once_per_object(&mut sent, &shm(0x10000, 0x18000, 0), vec![(0x10000, 5), (0x16000, 2)]), vec![(0x10000, 5), (0x16000, 2)]);
    assert!(once_per_object(&mut sent, &shm(0x40000, 0x44000, 0x2000), vec![(0x40000, 3)]).is_empty());
    assert_eq!(once_per_object(&mut sent, &shm(0x50000, 0x54000, 0x6000), vec![(0x50000, 4)]), vec![(0x52000, 2)]);
}

#[test]
fn chunks_split_runs_at_the_limit() {
    let mut todo: VecDeque<(u64, u64)> = [(0x1000, 3), (0x10000, 10)].into_iter().collect();
    assert_eq!(take_chunk(&mut todo, 5 * PAGE), vec![(0x1000, 3), (0x10000, 2)]);
    assert_eq!(take_chunk(&mut todo, 5 * PAGE), vec![(0x12000, 5)]);
    assert_eq!(take_chunk(&mut todo, 5 * PAGE), vec![(0x17000, 3)]);
    assert!(take_chunk(&mut todo, 5 * PAGE).is_empty());
}
