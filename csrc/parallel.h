// Parallel loops of the C++ CPU kernels that tolerate a busy core.
//
// at::parallel_for splits [begin, end) into one static chunk per OpenMP thread, and libgomp's waiting
// threads spin. When another process keeps a core busy, a descheduled thread holds its whole chunk while
// the others spin at the closing barrier, keeping the descheduled thread off the cores: the call takes a
// scheduler quantum (~8 ms) instead of ~1 ms. Here:
//
// - the work is cut into many small tasks. Each thread owns a contiguous block of them (thread k the k-th
//   of `threads` equal blocks, the same rows on every call, so a core finds its block in its own cache on
//   the next call as with a static split); a thread that has finished its block takes the tasks left in
//   the others' blocks, one at a time. A descheduled thread thus holds up at most one small task;
// - never more threads than the CPUs this process may run on; and while the caller has a core to itself,
//   no more threads than the cores that nothing else is running on: the machine's cores less the threads
//   runnable right now besides the caller (the running count of /proc/loadavg, one pread per job). A
//   worker sharing a core with a busy process can be descheduled in the middle of a task for a scheduler
//   slice while the caller waits for it; on a core of its own the caller alone is faster than that. When
//   every core is already shared (more runnable threads than cores), each thread gets a share of a core,
//   and all the threads asked for are used. P2T_CPU_ADAPTIVE_THREADS=0 turns the runnable count off;
// - jobs of fewer than kMinPoolTasks tasks run on the caller alone: waking a sleeping worker costs more;
// - idle workers sleep (condition variable); the caller, once no task is left, spins for a few
//   microseconds for the last tasks in flight, then sleeps, leaving its core to a descheduled worker.
//
// The pool has up to at::get_num_threads() - 1 worker threads, started on first use and asleep between
// calls; the calling thread works too. A call from inside a task (or an OpenMP / at::parallel_for region)
// runs inline, as does a call while another thread of the process holds the pool.
#pragma once

#include <ATen/Parallel.h>

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace p2t {
namespace pool {

// A job of fewer tasks than this runs on the calling thread alone (tasks are ~5-10 us of work each).
constexpr int64_t kMinPoolTasks = 8;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// True while this thread runs a task of the pool (a nested call then runs inline).
inline bool& in_task() {
  static thread_local bool flag = false;
  return flag;
}

// ------------------------------------------------------------------------------------------------
// how many threads a job may use
// ------------------------------------------------------------------------------------------------
inline bool adaptive_enabled() {
  static const bool on = [] {
    const char* v = std::getenv("P2T_CPU_ADAPTIVE_THREADS");
    return v == nullptr || !(std::strcmp(v, "0") == 0 || std::strcmp(v, "false") == 0 || std::strcmp(v, "off") == 0);
  }();
  return on;
}

// CPUs this process may run on (sched_getaffinity), at least 1.
inline int allowed_cpus() {
#ifdef __linux__
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  const long n = sysconf(_SC_NPROCESSORS_ONLN);
  return n > 0 ? static_cast<int>(n) : 1;
}

// Threads of the whole machine that are runnable now (running or waiting for a core), the caller
// included: the "R" of /proc/loadavg's "R/T" field. -1 when unknown.
inline int runnable_now() {
#ifdef __linux__
  static const int fd = [] {  // P2T_CPU_LOADAVG: a file in /proc/loadavg's format to read instead (tests)
    const char* path = std::getenv("P2T_CPU_LOADAVG");
    return ::open(path != nullptr && *path != '\0' ? path : "/proc/loadavg", O_RDONLY | O_CLOEXEC);
  }();
  if (fd < 0) return -1;
  char buf[128];
  const ssize_t n = ::pread(fd, buf, sizeof(buf) - 1, 0);
  if (n <= 0) return -1;
  buf[n] = '\0';
  const char* p = buf;
  for (int field = 0; field < 3; ++field) {  // skip the three load averages
    p = std::strchr(p, ' ');
    if (p == nullptr) return -1;
    ++p;
  }
  char* end = nullptr;
  const long r = std::strtol(p, &end, 10);
  return (end != p && *end == '/' && r > 0) ? static_cast<int>(r) : -1;
#else
  return -1;
#endif
}

inline int online_cpus() {
  static const int n = [] {
    const long v = sysconf(_SC_NPROCESSORS_ONLN);
    return v > 0 ? static_cast<int>(v) : 1;
  }();
  return n;
}

// Threads (the caller included) for a job that asks for `wanted`: never more than the CPUs this process
// may use; (adaptive) when some core is free for the caller, no more than the cores that nothing else
// runs on. `own_awake`: workers of this pool still counted as runnable while they go back to sleep.
inline int usable_threads(int wanted, int own_awake = 0) {
  int t = std::min(wanted, allowed_cpus());
  if (t > 1 && adaptive_enabled()) {
    const int r = runnable_now();
    if (r > 0) {
      const int others = std::max(0, r - 1 - own_awake);  // runnable threads besides ours
      const int free_cores = online_cpus() - others;      // the caller's core included
      if (free_cores >= 1) t = std::min(t, free_cores);
    }
  }
  return std::max(1, t);
}

// ------------------------------------------------------------------------------------------------
// the pool
// ------------------------------------------------------------------------------------------------
struct Block {
  alignas(64) std::atomic<int64_t> next{0};  // next task of the block to hand out (>= end: none left)
  int64_t end = 0;
};

struct Job {
  Job(int64_t n_, int threads_) : n(n_), threads(threads_), blocks(new Block[threads_]) {
    for (int k = 0; k < threads; ++k) {
      blocks[k].next.store(n * k / threads, std::memory_order_relaxed);
      blocks[k].end = n * (k + 1) / threads;
    }
  }
  const std::function<void(int64_t)>* fn = nullptr;  // valid while some task of this job is unfinished
  const int64_t n;
  const int threads;
  std::unique_ptr<Block[]> blocks;
  std::atomic<int64_t> done{0};
};

class Pool {
 public:
  // Runs fn(t) for t in [0, n) on up to `threads` threads (the caller included); returns when all are done.
  void run(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(run_m_, std::try_to_lock);
    if (!busy.owns_lock()) {  // another caller thread holds the pool: run inline
      inline_run(n, fn);
      return;
    }
    auto job = std::make_shared<Job>(n, threads);
    job->fn = &fn;
    {
      std::lock_guard<std::mutex> lk(m_);
      grow(threads - 1);
      job_ = job;
      wanted_ = threads - 1;
      ++gen_;
    }
    cv_work_.notify_all();
    work(*job, 0);
    // The last tasks are in flight on workers. A running worker finishes one in a few microseconds:
    // spin for that long, then sleep, so that a worker descheduled mid-task can get this core.
    const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
    while (job->done.load(std::memory_order_acquire) != n) {
      for (int i = 0; i < 64; ++i) cpu_relax();
      if (std::chrono::steady_clock::now() > spin_until) break;
    }
    std::unique_lock<std::mutex> lk(m_);
    cv_done_.wait(lk, [&] { return job->done.load(std::memory_order_acquire) == n; });
    if (job_ == job) job_.reset();
  }

  // Workers not asleep (finishing a job or about to sleep).
  int awake() const { return awake_.load(std::memory_order_relaxed); }

  static void inline_run(int64_t n, const std::function<void(int64_t)>& fn) {
    const bool outer = in_task();
    in_task() = true;
    for (int64_t t = 0; t < n; ++t) fn(t);
    in_task() = outer;
  }

 private:
  // Thread `slot` takes the tasks of its own block, then those left in the others'. A block handing out an
  // index >= its end has none left: fn is not touched then, so a worker waking up late never calls into a
  // returned caller.
  void work(Job& job, int slot) {
    in_task() = true;
    for (int k = 0; k < job.threads; ++k) {
      Block& b = job.blocks[(slot + k) % job.threads];
      for (;;) {
        if (b.next.load(std::memory_order_relaxed) >= b.end) break;
        const int64_t t = b.next.fetch_add(1, std::memory_order_relaxed);
        if (t >= b.end) break;
        (*job.fn)(t);
        if (job.done.fetch_add(1, std::memory_order_acq_rel) + 1 == job.n) {
          std::lock_guard<std::mutex> lk(m_);
          cv_done_.notify_all();
        }
      }
    }
    in_task() = false;
  }

  void grow(int workers) {  // called with m_ held
    while (static_cast<int>(threads_.size()) < workers) {
      const int id = static_cast<int>(threads_.size());
      awake_.fetch_add(1, std::memory_order_relaxed);
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
        awake_.fetch_sub(1, std::memory_order_relaxed);
        cv_work_.wait(lk, [&] { return gen_ != seen; });
        awake_.fetch_add(1, std::memory_order_relaxed);
        seen = gen_;
        if (id >= wanted_ || !job_) continue;
        job = job_;
      }
      work(*job, id + 1);
    }
  }

  std::mutex run_m_, m_;
  std::condition_variable cv_work_, cv_done_;
  std::vector<std::thread> threads_;
  std::shared_ptr<Job> job_;
  uint64_t gen_ = 0;
  int wanted_ = 0;
  std::atomic<int> awake_{0};
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

// f(t) for every task t in [0, n_tasks), tasks taken dynamically by up to at::get_num_threads() threads
// (fewer when cores are busy, see above).
template <typename F>
void parallel_tasks(int64_t n_tasks, const F& f) {
  if (n_tasks < pool::kMinPoolTasks || at::get_num_threads() <= 1 || pool::in_task() || at::in_parallel_region()) {
    for (int64_t t = 0; t < n_tasks; ++t) f(t);
    return;
  }
  pool::Pool& p = pool::get();
  const int threads =
      pool::usable_threads(static_cast<int>(std::min<int64_t>(at::get_num_threads(), n_tasks)), p.awake());
  const std::function<void(int64_t)> fn = [&f](int64_t t) { f(t); };
  if (threads <= 1) {
    pool::Pool::inline_run(n_tasks, fn);
    return;
  }
  p.run(n_tasks, threads, fn);
}

// f(begin, end) over [0, n) cut into tasks of `grain` items (the last one shorter).
template <typename F>
void parallel_ranges(int64_t n, int64_t grain, const F& f) {
  grain = std::max<int64_t>(grain, 1);
  const int64_t tasks = (n + grain - 1) / grain;
  parallel_tasks(tasks, [&](int64_t t) { f(t * grain, std::min(n, (t + 1) * grain)); });
}

// Items per task so that a task reads about `task_bytes` (at least 1 item).
inline int64_t grain_for_bytes(int64_t bytes_per_item, int64_t task_bytes = 128 * 1024) {
  return std::max<int64_t>(1, task_bytes / std::max<int64_t>(bytes_per_item, 1));
}

}  // namespace p2t
