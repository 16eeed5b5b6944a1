//! Bounded parallel maps: [`Zygote::map`] and [`Zygote::map_unordered`].
//!
//! A map is a stream of task futures, at most the zygote's
//! [`max_in_flight`](crate::Builder::max_in_flight) of them polled at once
//! (`futures`' `buffered`), so it never holds more workers than the zygote
//! allows, nor encodes arguments far ahead of the tasks that will take them:
//! inputs are pulled from the iterator only as room frees up. Dropping the
//! stream drops the task futures it holds, which cancels their workers.

use futures_util::{Stream, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Result;
use crate::process::Zygote;

impl Zygote {
    /// Runs `f` on every input, each in its own task, and yields the results
    /// in input order, with at most [`max_in_flight`](Zygote::max_in_flight)
    /// tasks running at once.
    ///
    /// The stream owns a handle to the zygote, so it can outlive `self` and
    /// be moved to another task. Inputs are taken from `args` lazily, as
    /// room frees up. A task that fails yields its `Err` in its place; the
    /// others go on.
    ///
    /// ```no_run
    /// use futures_util::StreamExt;
    ///
    /// fn square(x: u64) -> u64 {
    ///     x * x
    /// }
    ///
    /// # async fn demo(zygote: run_in_process::Zygote) -> run_in_process::Result<()> {
    /// let squares: Vec<u64> = zygote
    ///     .map(square, 1..=100)
    ///     .map(|r| r.expect("square does not fail"))
    ///     .collect()
    ///     .await;
    /// assert_eq!(squares[9], 100);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// Each item is the result of one task, as [`Zygote::run`].
    ///
    /// # Cancel safety
    ///
    /// Dropping the stream cancels the tasks it is running (as dropping
    /// [`Zygote::run`]'s future does); inputs it has not taken yet are never
    /// run.
    pub fn map<F, A, R, I>(&self, f: F, args: I) -> impl Stream<Item = Result<R>> + use<F, A, R, I>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        let limit = self.max_in_flight();
        self.tasks(f, args).buffered(limit)
    }

    /// Like [`map`](Zygote::map), but yields each result as soon as its task
    /// finishes, in no particular order. Pair inputs with an index in the
    /// result if you need to tell them apart.
    ///
    /// # Errors
    ///
    /// As [`map`](Zygote::map).
    ///
    /// # Cancel safety
    ///
    /// As [`map`](Zygote::map).
    pub fn map_unordered<F, A, R, I>(
        &self,
        f: F,
        args: I,
    ) -> impl Stream<Item = Result<R>> + use<F, A, R, I>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        let limit = self.max_in_flight();
        self.tasks(f, args).buffer_unordered(limit)
    }

    /// One future per input, each running `f` on it in its own task once
    /// polled.
    fn tasks<F, A, R, I>(
        &self,
        f: F,
        args: I,
    ) -> impl Stream<Item = impl Future<Output = Result<R>> + use<F, A, R, I>> + use<F, A, R, I>
    where
        F: Fn(A) -> R + Copy + 'static,
        A: Serialize + DeserializeOwned,
        R: Serialize + DeserializeOwned,
        I: IntoIterator<Item = A>,
    {
        let zygote = self.clone();
        futures_util::stream::iter(args).map(move |arg| {
            let zygote = zygote.clone();
            async move { zygote.run(f, arg).await }
        })
    }
}
