// Parallel loops of the C++ CPU kernels that tolerate a busy core.
//
// at::parallel_for splits [begin, end) into one static chunk per OpenMP thread, and libgomp's waiting
// threads spin. When another process keeps a core busy, a descheduled thread holds its whole chunk while
// the others spin at the closing barrier, keeping the descheduled thread off the cores: the call takes a
// scheduler quantum (~8 ms) instead of ~1 ms. Here the work is cut into many small tasks taken one at a
// time by whichever thread is running (dynamic scheduling), and a thread with nothing left to take
// sleeps (condition variable) instead of spinning, so a descheduled thread gets a core back at once and
// holds up at most one small task.
//
// The pool has at::get_num_threads() - 1 worker threads, started on first use and asleep between
// calls; the calling thread works too. Small jobs (fewer than two tasks, one thread, or a call from
// inside a parallel region) run inline on the calling thread.
#pragma once

#include <ATen/Parallel.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace p2t {
namespace pool {

struct Job {
  const std::function<void(int64_t)>* fn;  // valid while some task of this job is unfinished
  int64_t n;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

class Pool {
 public:
  // Runs fn(t) for t in [0, n) on up to `threads` threads (the caller included); returns when all are done.
  void run(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(run_m_, std::try_to_lock);
    if (!busy.owns_lock()) {  // another caller thread holds the pool: run inline
      for (int64_t t = 0; t < n; ++t) fn(t);
      return;
    }
    auto job = std::make_shared<Job>();
    job->fn = &fn;
    job->n = n;
    {
      std::lock_guard<std::mutex> lk(m_);
      grow(threads - 1);
      job_ = job;
      wanted_ = threads - 1;
      ++gen_;
    }
    cv_work_.notify_all();
    work(*job);
    std::unique_lock<std::mutex> lk(m_);
    cv_done_.wait(lk, [&] { return job->done.load(std::memory_order_acquire) == n; });
    if (job_ == job) job_.reset();
  }

 private:
  // A task index >= n means the job is finished (or being finished by others): fn is not touched then,
  // so a worker waking up late never calls into a returned caller.
  void work(Job& job) {
    for (;;) {
      const int64_t t = job.next.fetch_add(1, std::memory_order_relaxed);
      if (t >= job.n) return;
      (*job.fn)(t);
      if (job.done.fetch_add(1, std::memory_order_acq_rel) + 1 == job.n) {
        std::lock_guard<std::mutex> lk(m_);
        cv_done_.notify_all();
      }
    }
  }

  void grow(int workers) {  // called with m_ held
    while (static_cast<int>(threads_.size()) < workers) {
      const int id = static_cast<int>(threads_.size());
      threads_.emplace_back([this, id] { loop(id); });
      threads_.back().detach();
    }
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lk(m_);
        cv_work_.wait(lk, [&] { return gen_ != seen; });
        seen = gen_;
        if (id >= wanted_ || !job_) continue;
        job = job_;
      }
      work(*job);
    }
  }

  std::mutex run_m_, m_;
  std::condition_variable cv_work_, cv_done_;
  std::vector<std::thread> threads_;
  std::shared_ptr<Job> job_;
  uint64_t gen_ = 0;
  int wanted_ = 0;
};

// One pool per process; a forked child (e.g. a data-loader worker) gets a new one: the parent's worker
// threads do not exist there.
inline Pool*& instance() {
  static Pool* p = nullptr;
  return p;
}

inline void forget_after_fork() { instance() = nullptr; }  // the old pool is leaked in the child

inline Pool& get() {
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(nullptr, nullptr, &forget_after_fork); });
  static std::mutex m;
  std::lock_guard<std::mutex> lk(m);
  if (instance() == nullptr) instance() = new Pool();
  return *instance();
}

}  // namespace pool

// f(t) for every task t in [0, n_tasks), tasks taken dynamically by at::get_num_threads() threads.
template <typename F>
void parallel_tasks(int64_t n_tasks, const F& f) {
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), n_tasks));
  if (threads <= 1 || at::in_parallel_region()) {
    for (int64_t t = 0; t < n_tasks; ++t) f(t);
    return;
  }
  const std::function<void(int64_t)> fn = [&f](int64_t t) { f(t); };
  pool::get().run(n_tasks, threads, fn);
}

// f(begin, end) over [0, n) cut into tasks of `grain` items (the last one shorter).
template <typename F>
void parallel_ranges(int64_t n, int64_t grain, const F& f) {
  grain = std::max<int64_t>(grain, 1);
  const int64_t tasks = (n + grain - 1) / grain;
  parallel_tasks(tasks, [&](int64_t t) { f(t * grain, std::min(n, (t + 1) * grain)); });
}

}  // namespace p2t
