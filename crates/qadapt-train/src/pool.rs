//! Recycled activation buffers for the CPU model.
//!
//! A training step allocates the same few dozen buffers every time: each layer's saved
//! activations (the forward) and the backward's gradient temporaries, from a few hundred KB to a
//! few MB each. Left to the allocator, every step gets fresh pages: buffers this large are
//! `mmap`ed or sit at the top of the heap, which `free` hands back to the kernel, so the next
//! step takes a page fault and a kernel-side zeroing per 4 KB page, and with two threads each
//! unmap also interrupts the other core to flush its TLB. That was about a tenth of a 2-thread
//! LoRA step (BENCHMARKS.md). A [`Pool`] keeps the buffers of one step for the next: a [`Buf`]
//! is a `Vec` that goes back to its pool when dropped, and [`Pool::overwritten`] hands out the
//! smallest kept buffer that fits. The pool keeps no more memory than the most that was in use
//! at once, dropping its oldest buffers first.
//!
//! Every buffer the model takes is overwritten whole by the op that fills it, so buffers are
//! handed out without zero-filling (that memset was the next 3 % of the step); debug builds fill
//! them with NaN so a read before the write cannot go unnoticed. The pool holds at most
//! [`MAX_KEPT`] buffers and none larger than twice what is asked (so one huge buffer is not spent
//! on a small request, and shapes that change from batch to batch cannot make it grow without
//! bound).

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use qadapt::ops::Real;

/// Buffers a pool keeps at most; a Llama step of L layers uses about 15 L + 15.
const MAX_KEPT: usize = 1024;

/// Free buffers shared by the model's forward and backward (held in an `Arc`: clones of a model
/// share one pool).
pub(crate) struct Pool<T> {
    state: Mutex<State<T>>,
}

/// The kept buffers, oldest first, and the element counts (capacities) that bound them: the pool
/// never keeps more than the most that was ever handed out at once (one step's activations), so
/// batches whose shapes change from step to step cannot make it hold more than one more step's
/// worth of memory; the oldest buffers go first.
struct State<T> {
    free: Vec<Vec<T>>,
    kept: usize,
    in_use: usize,
    peak_in_use: usize,
}

impl<T> std::fmt::Debug for Pool<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kept = self.state.lock().map_or(0, |s| s.free.len());
        f.debug_struct("Pool").field("kept", &kept).finish()
    }
}

impl<T: Real> Pool<T> {
    pub(crate) fn new() -> Arc<Pool<T>> {
        Arc::new(Pool {
            state: Mutex::new(State {
                free: Vec::new(),
                kept: 0,
                in_use: 0,
                peak_in_use: 0,
            }),
        })
    }

    /// A zero-filled buffer of `len` elements: the smallest kept one whose capacity fits (and is
    /// at most twice `len`), else a new allocation.
    #[cfg(test)]
    pub(crate) fn zeros(self: &Arc<Self>, len: usize) -> Buf<T> {
        self.take(len, T::ZERO)
    }

    /// A buffer of `len` elements for an op that overwrites every element before anything reads
    /// one: its contents are whatever a previous step left (no zero-fill). Debug builds fill it
    /// with NaN instead, so a read before the write poisons every result downstream and the
    /// tests see it.
    pub(crate) fn overwritten(self: &Arc<Self>, len: usize) -> Buf<T> {
        if cfg!(debug_assertions) {
            return self.take(len, T::from_f64(f64::NAN));
        }
        let mut b = self.take_unfilled(len);
        // Only a new allocation or a shorter reused buffer needs elements added.
        b.v.resize(len, T::ZERO);
        b
    }

    fn take(self: &Arc<Self>, len: usize, fill: T) -> Buf<T> {
        let mut b = self.take_unfilled(len);
        b.v.clear();
        b.v.resize(len, fill);
        b
    }

    /// The best-fitting kept buffer (its old length and contents), or an empty vector.
    fn take_unfilled(self: &Arc<Self>, len: usize) -> Buf<T> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let best = st
            .free
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len && v.capacity() <= 2 * len.max(1))
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        let mut v = match best {
            Some(i) => {
                let v = st.free.remove(i);
                st.kept -= v.capacity();
                v
            }
            None => Vec::with_capacity(len),
        };
        v.truncate(len);
        st.in_use += v.capacity();
        st.peak_in_use = st.peak_in_use.max(st.in_use);
        drop(st);
        Buf {
            v,
            pool: Some(self.clone()),
        }
    }

    /// `v` as a buffer of this pool (it joins the pool when dropped).
    pub(crate) fn adopt(self: &Arc<Self>, v: Vec<T>) -> Buf<T> {
        Buf {
            v,
            pool: Some(self.clone()),
        }
    }
}

impl<T> Pool<T> {
    fn give(&self, v: Vec<T>) {
        if v.capacity() == 0 {
            return;
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        // Adopted and cloned buffers were never counted as handed out.
        st.in_use = st.in_use.saturating_sub(v.capacity());
        st.kept += v.capacity();
        st.free.push(v);
        // The oldest go first: shapes that are no longer used age out.
        while st.free.len() > MAX_KEPT || (st.kept > st.peak_in_use && st.free.len() > 1) {
            let old = st.free.remove(0);
            st.kept -= old.capacity();
        }
    }
}

/// A `Vec<T>` borrowed from a [`Pool`]: derefs to `[T]` and returns to the pool when dropped.
pub(crate) struct Buf<T> {
    v: Vec<T>,
    pool: Option<Arc<Pool<T>>>,
}

impl<T> Buf<T> {
    /// The buffer as a plain `Vec`, leaving the pool for good (for values handed to the caller).
    pub(crate) fn into_vec(mut self) -> Vec<T> {
        self.pool = None;
        std::mem::take(&mut self.v)
    }
}

impl<T> Drop for Buf<T> {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.give(std::mem::take(&mut self.v));
        }
    }
}

impl<T> Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.v
    }
}

impl<T> DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.v
    }
}

impl<T: Clone> Clone for Buf<T> {
    /// A copy in a new buffer of the same pool (the copy is fresh memory, not a pooled buffer).
    fn clone(&self) -> Self {
        Buf {
            v: self.v.clone(),
            pool: self.pool.clone(),
        }
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Buf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.v.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_zeroed_and_are_reused() {
        let pool = Pool::<f32>::new();
        let mut a = pool.zeros(1000);
        a.iter_mut().for_each(|v| *v = 7.0);
        let ptr = a.as_ptr();
        drop(a);
        // Same size: the same memory, zero-filled again.
        let b = pool.zeros(1000);
        assert_eq!(b.as_ptr(), ptr);
        assert_eq!(b.len(), 1000);
        assert!(b.iter().all(|&v| v == 0.0));
        // A smaller request may reuse it only while it is at most twice the size.
        drop(b);
        let c = pool.zeros(600);
        assert_eq!((c.as_ptr(), c.len()), (ptr, 600));
        drop(c);
        let d = pool.zeros(100);
        assert_ne!(d.as_ptr(), ptr);
        // Leaving the pool: the vector is the caller's, nothing goes back.
        let e = pool.zeros(1000).into_vec();
        assert_eq!(e.len(), 1000);
        assert_eq!(pool.state.lock().unwrap().free.len(), 0);
    }

    #[test]
    fn overwritten_buffers_have_the_length_asked_and_poison_in_debug() {
        let pool = Pool::<f32>::new();
        let mut a = pool.zeros(100);
        a.iter_mut().for_each(|v| *v = 3.0);
        drop(a);
        // The kept 100-element buffer serves a request of 60 (cut) ...
        let b = pool.overwritten(60);
        assert_eq!(b.len(), 60);
        drop(b);
        // ... and then one of 90 (its 60 kept elements, and a tail added).
        let c = pool.overwritten(90);
        assert_eq!(c.len(), 90);
        if cfg!(debug_assertions) {
            assert!(c.iter().all(|v| v.is_nan()));
        } else {
            // Old contents untouched, the new tail zero.
            assert!(c[..60].iter().all(|&v| v == 3.0));
            assert!(c[60..].iter().all(|&v| v == 0.0));
        }
    }

    #[test]
    fn the_pool_keeps_no_more_than_its_peak_in_use() {
        let pool = Pool::<f32>::new();
        // One "step" holds 3 x 100 elements at once; later steps use other shapes one at a time.
        drop([pool.zeros(100), pool.zeros(100), pool.zeros(100)]);
        for n in [150, 160, 170, 180, 190, 400, 410] {
            drop(pool.zeros(n));
            let st = pool.state.lock().unwrap();
            assert!(
                st.kept <= st.peak_in_use,
                "{} > {}",
                st.kept,
                st.peak_in_use
            );
            assert_eq!(st.in_use, 0);
        }
        let st = pool.state.lock().unwrap();
        assert_eq!(st.peak_in_use, 410);
        // 410 alone fits the peak; the older 100s and 150..190s were dropped, oldest first.
        assert!(st.kept <= 410);
    }

    #[test]
    fn the_pool_stays_bounded() {
        let pool = Pool::<f32>::new();
        let bufs: Vec<_> = (1..=MAX_KEPT + 10).map(|n| pool.zeros(n)).collect();
        drop(bufs);
        assert_eq!(pool.state.lock().unwrap().free.len(), MAX_KEPT);
    }
}
