//! What the allocator holds: jemalloc's totals and its live allocations by size class, read with
//! `mallctl`, for the memory breakdown of bench/memory.py and the gauges of the metrics page.

use std::collections::HashMap;
use std::ffi::{c_void, CStr, CString};
use std::hash::{BuildHasher, Hash};

/// Gives back most of a map's table once it is under a quarter full: a hash map keeps the table
/// of its largest size for good, and a burst of ids a stranger chose must not stay in memory.
/// Tables of up to `floor` buckets are left as they are.
pub fn shrink_sparse<K: Eq + Hash, V, S: BuildHasher>(map: &mut HashMap<K, V, S>, floor: usize) {
    let len = map.len();
    if map.capacity() > floor && len < map.capacity() / 4 {
        map.shrink_to(len * 2);
    }
}

/// jemalloc's process-wide totals, in bytes (see `man jemalloc`, "stats.*").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AllocatorStats {
    /// Bytes the application asked for and holds (rounded up to size classes).
    pub allocated: u64,
    /// Bytes in pages holding live allocations: `allocated` plus the free slots of those pages.
    pub active: u64,
    /// Bytes jemalloc has resident: active pages, its metadata, and free pages not yet purged.
    pub resident: u64,
    /// jemalloc's own bookkeeping (extent headers, radix tree, per-thread caches' stacks).
    pub metadata: u64,
    /// Address space mapped by jemalloc (resident or not).
    pub mapped: u64,
}

/// Live allocations of one size class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeClass {
    pub size: u64,
    pub count: u64,
}

fn read<T: Copy + Default>(name: &str) -> Option<T> {
    let name = CString::new(name).ok()?;
    read_c(&name)
}

fn read_c<T: Copy + Default>(name: &CStr) -> Option<T> {
    let mut value = T::default();
    let mut len = std::mem::size_of::<T>();
    // SAFETY: `value` is a `T` of `len` bytes, the size jemalloc writes for these names (each is
    // read with its documented type: size_t, uint64_t or unsigned).
    let rc = unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::addr_of_mut!(value).cast::<c_void>(),
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    (rc == 0 && len == std::mem::size_of::<T>()).then_some(value)
}

/// Makes jemalloc refresh the statistics it reports (they are snapshots taken at an epoch).
fn refresh() {
    let mut epoch: u64 = 1;
    let mut len = std::mem::size_of::<u64>();
    // SAFETY: writing "epoch" takes a uint64_t and returns the new one into the same variable.
    unsafe {
        let p = std::ptr::addr_of_mut!(epoch).cast::<c_void>();
        tikv_jemalloc_sys::mallctl(c"epoch".as_ptr(), p, &mut len, p, len);
    }
}

/// The totals now (zeros where jemalloc was built without statistics).
#[must_use]
pub fn stats() -> AllocatorStats {
    refresh();
    let get = |name: &CStr| read_c::<usize>(name).map_or(0, |v| v as u64);
    AllocatorStats {
        allocated: get(c"stats.allocated"),
        active: get(c"stats.active"),
        resident: get(c"stats.resident"),
        metadata: get(c"stats.metadata"),
        mapped: get(c"stats.mapped"),
    }
}

/// Live allocations per size class, over all arenas (small classes, then large ones); allocations
/// in threads' caches count as free.
#[must_use]
pub fn size_classes() -> Vec<SizeClass> {
    refresh();
    // MALLCTL_ARENAS_ALL: the statistics merged over every arena.
    const ALL: u32 = 4096;
    let mut classes = Vec::new();
    let bins: u32 = read("arenas.nbins").unwrap_or(0);
    for bin in 0..bins {
        let size: usize = read(&format!("arenas.bin.{bin}.size")).unwrap_or(0);
        let count: usize = read(&format!("stats.arenas.{ALL}.bins.{bin}.curregs")).unwrap_or(0);
        classes.push(SizeClass { size: size as u64, count: count as u64 });
    }
    let large: u32 = read("arenas.nlextents").unwrap_or(0);
    for class in 0..large {
        let size: usize = read(&format!("arenas.lextent.{class}.size")).unwrap_or(0);
        let count: usize = read(&format!("stats.arenas.{ALL}.lextents.{class}.curlextents")).unwrap_or(0);
        if count > 0 {
            classes.push(SizeClass { size: size as u64, count: count as u64 });
        }
    }
    classes
}

#[cfg(test)]
mod tests {
    /// The bindings make jemalloc the global allocator; here (the core's tests) only SQLite and
    /// direct calls use it, so allocate through it and see the count move.
    #[test]
    fn a_live_allocation_is_counted_in_its_class() {
        let before = super::size_classes();
        // SAFETY: a plain allocation, freed below.
        let p = unsafe { tikv_jemalloc_sys::malloc(200) };
        let after = super::size_classes();
        // SAFETY: allocated above.
        unsafe { tikv_jemalloc_sys::free(p) };
        let class =
            |classes: &[super::SizeClass]| classes.iter().find(|c| c.size == 224).map_or(0, |c| c.count);
        // A thread cache may have handed out a slot already counted as live: at least not fewer.
        assert!(class(&after) >= class(&before), "{before:?} -> {after:?}");
        assert!(super::stats().allocated > 0);
    }

    #[test]
    fn a_table_a_burst_grew_is_given_back_once_sparse() {
        let mut map: std::collections::HashMap<u64, u64> = (0..10_000).map(|i| (i, i)).collect();
        super::shrink_sparse(&mut map, 1024);
        assert!(map.capacity() >= 10_000, "a full table is kept");
        map.retain(|&k, _| k < 100);
        super::shrink_sparse(&mut map, 1024);
        assert!(map.capacity() < 1024, "{} buckets for 100 entries", map.capacity());
        assert_eq!(map.len(), 100);
        let mut small: std::collections::HashMap<u64, u64> = (0..500).map(|i| (i, i)).collect();
        small.clear();
        let capacity = small.capacity();
        super::shrink_sparse(&mut small, 1024);
        assert_eq!(small.capacity(), capacity, "a table under the floor is left alone");
    }
}
