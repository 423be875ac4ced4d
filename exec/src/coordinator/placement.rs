//! Placement: where an attempt runs each partition ([`Layout`]), sticky
//! within a generation, and where a lost worker's partitions move.

use super::*;

impl Layout {
    /// Sticky placement over `workers`: reduce partition `r` on slot
    /// `r mod W`, then input stage `s`'s partition `p` on slot
    /// `(offset_s + p) mod W`, where `offset_s` counts the partitions of the
    /// stages before `s`.
    pub(super) fn spread(
        workers: Vec<Placed>,
        map_partitions: &[u32],
        reduce_partitions: u32,
    ) -> Self {
        let w = workers.len().max(1);
        let reduces = (0..reduce_partitions as usize).map(|r| r % w).collect();
        let mut offset = 0usize;
        let maps = map_partitions
            .iter()
            .map(|&n| {
                let slots = (0..n as usize).map(|p| (offset + p) % w).collect();
                offset += n as usize;
                slots
            })
            .collect();
        Self {
            workers,
            maps,
            reduces,
        }
    }

    /// The layout after some workers were lost: `keep[slot]` says whether a
    /// slot survived (it keeps every partition it holds), `take[slot]`
    /// whether it may take lost partitions. Returns the new layout and the
    /// number of partitions moved, or `None` when partitions must move and
    /// no survivor may take them.
    pub(super) fn after_loss(&self, keep: &[bool], take: &[bool]) -> Option<(Self, u32)> {
        let (maps, reduces, moved) = reassign(keep, take, &self.maps, &self.reduces)?;
        // Renumber the surviving slots.
        let mut slot_of = vec![usize::MAX; self.workers.len()];
        let mut workers = Vec::new();
        for (i, w) in self.workers.iter().enumerate() {
            if keep.get(i).copied().unwrap_or(false) {
                slot_of[i] = workers.len();
                workers.push(w.clone());
            }
        }
        let renumber = |s: &usize| slot_of[*s];
        Some((
            Self {
                workers,
                maps: maps
                    .iter()
                    .map(|slots| slots.iter().map(renumber).collect())
                    .collect(),
                reduces: reduces.iter().map(renumber).collect(),
            },
            moved,
        ))
    }

    /// Worker ids owning each map partition, input stages in order.
    pub(super) fn map_owners(&self) -> Vec<u32> {
        self.maps
            .iter()
            .flatten()
            .map(|&slot| self.workers[slot].id.0)
            .collect()
    }

    /// Partitions (map and reduce) in all.
    pub(super) fn partitions(&self) -> usize {
        self.maps.iter().map(Vec::len).sum::<usize>() + self.reduces.len()
    }
}

/// Moves every partition of a slot that is not kept to the least loaded slot
/// that may take partitions, reduce partitions first (consumers are placed
/// before producers), so the replay is spread over all survivors. Kept slots
/// keep every partition they hold. Returns the new slots per partition and
/// how many moved, or `None` when some partition has nowhere to go.
pub(super) fn reassign(
    keep: &[bool],
    take: &[bool],
    maps: &[Vec<usize>],
    reduces: &[usize],
) -> Option<(Vec<Vec<usize>>, Vec<usize>, u32)> {
    let kept = |s: usize| keep.get(s).copied().unwrap_or(false);
    let mut load = vec![0usize; keep.len()];
    for &s in reduces.iter().chain(maps.iter().flatten()) {
        if kept(s) {
            load[s] += 1;
        }
    }
    let mut moved = 0u32;
    let mut place = |s: usize| -> Option<usize> {
        if kept(s) {
            return Some(s);
        }
        let to = (0..keep.len())
            .filter(|&t| kept(t) && take.get(t).copied().unwrap_or(false))
            .min_by_key(|&t| (load[t], t))?;
        load[to] += 1;
        moved += 1;
        Some(to)
    };
    let reduces = reduces
        .iter()
        .map(|&s| place(s))
        .collect::<Option<Vec<_>>>()?;
    let maps = maps
        .iter()
        .map(|slots| slots.iter().map(|&s| place(s)).collect::<Option<Vec<_>>>())
        .collect::<Option<Vec<_>>>()?;
    Some((maps, reduces, moved))
}
