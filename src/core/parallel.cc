// The thread pool behind parallel_for: persistent workers that pull chunk numbers from an
// atomic counter. Which thread runs a chunk varies; what a chunk computes does not.
#include "edgefuse/core/parallel.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "edgefuse/core/error.h"

namespace edgefuse {
namespace {

thread_local bool t_inside_parallel = false;

std::size_t hardware_threads() noexcept {
  const unsigned h = std::thread::hardware_concurrency();
  return h == 0 ? 1 : h;
}

// A wait first spins this long (a loop's hand-off is a few microseconds; a futex sleep and
// wake-up costs tens on a VM), and only then sleeps. Not when the pool has more threads
// than the machine: a spinning thread would take a core another one needs.
constexpr auto kSpin = std::chrono::microseconds(50);

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Spins until done() or kSpin has passed.
template <typename F>
void spin_until(F done) {
  const auto until = std::chrono::steady_clock::now() + kSpin;
  for (;;) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= until) return;
  }
}

std::size_t initial_threads() noexcept {
  if (const char* env = std::getenv("EDGEFUSE_NUM_THREADS")) {
    char* end = nullptr;
    const unsigned long v = std::strtoul(env, &end, 10);
    if (end != env && *end == '\0' && v > 0 && v <= 4096) return v;
  }
  return hardware_threads();
}

struct Job {
  std::size_t n = 0;
  std::size_t grain = 1;
  std::size_t num_chunks = 0;
  detail::ChunkFn fn = nullptr;
  void* ctx = nullptr;
  std::atomic<std::size_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::size_t error_chunk = 0;
  std::exception_ptr error;

  void run_chunks() noexcept {
    const bool was_inside = t_inside_parallel;
    t_inside_parallel = true;
    // A claimed chunk always runs: chunks are claimed in increasing order, so every chunk
    // below a failing one runs too, and the lowest failing chunk is always the one reported.
    while (!failed.load(std::memory_order_relaxed)) {
      const std::size_t k = next.fetch_add(1, std::memory_order_relaxed);
      if (k >= num_chunks) break;
      const std::size_t b = k * grain;
      const std::size_t e = std::min(n, b + grain);
      try {
        fn(ctx, b, e);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error || k < error_chunk) {
          error = std::current_exception();
          error_chunk = k;
        }
        failed.store(true, std::memory_order_relaxed);
      }
    }
    t_inside_parallel = was_inside;
  }
};

class Pool {
 public:
  Pool() : threads_wanted_(initial_threads()) {}
  ~Pool() { stop_workers(); }

  std::size_t threads() const noexcept { return threads_wanted_.load(); }

  void set_threads(std::size_t n) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    threads_wanted_ = n == 0 ? hardware_threads() : n;
    stop_workers();
  }

  void run(Job& job) {
    std::lock_guard<std::mutex> run_lock(run_mutex_);
    const std::size_t helpers = std::min(threads_wanted_.load(), job.num_chunks) - 1;
    if (helpers == 0) {
      job.run_chunks();
      return;
    }
    if (workers_.size() + 1 != threads_wanted_) {
      stop_workers();
      start_workers(threads_wanted_ - 1);
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &job;
      busy_ = workers_.size();
      busy_now_.store(busy_, std::memory_order_relaxed);
      ++generation_;
      posted_.store(generation_, std::memory_order_release);
    }
    work_cv_.notify_all();
    job.run_chunks();
    if (spin_) spin_until([&] { return busy_now_.load(std::memory_order_acquire) == 0; });
    std::unique_lock<std::mutex> lock(mutex_);
    done_cv_.wait(lock, [&] { return busy_ == 0; });
    job_ = nullptr;
  }

 private:
  void start_workers(std::size_t count) {
    std::uint64_t generation;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = false;
      stopping_.store(false, std::memory_order_relaxed);
      generation = generation_;
    }
    spin_ = count + 1 <= hardware_threads();
    // A worker must know the generation it was born in: reading it on its own, after the
    // first job was posted, would make it wait for a job that already came.
    for (std::size_t i = 0; i < count; ++i) {
      workers_.emplace_back([this, generation] { worker_loop(generation); });
    }
  }

  void stop_workers() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      stopping_.store(true, std::memory_order_relaxed);
    }
    work_cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  void worker_loop(std::uint64_t seen) {
    for (;;) {
      Job* job;
      if (spin_) {
        spin_until([&] {
          return posted_.load(std::memory_order_acquire) != seen ||
                 stopping_.load(std::memory_order_relaxed);
        });
      }
      {
        std::unique_lock<std::mutex> lock(mutex_);
        work_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        job = job_;
      }
      job->run_chunks();
      std::lock_guard<std::mutex> lock(mutex_);
      busy_now_.fetch_sub(1, std::memory_order_release);
      if (--busy_ == 0) done_cv_.notify_one();
    }
  }

  std::atomic<std::size_t> threads_wanted_;
  std::mutex run_mutex_;  // one loop at a time per pool
  std::mutex mutex_;
  std::condition_variable work_cv_;
  std::condition_variable done_cv_;
  std::vector<std::thread> workers_;
  Job* job_ = nullptr;
  std::size_t busy_ = 0;
  std::uint64_t generation_ = 0;
  bool stop_ = false;
  // Lock-free copies of generation_, busy_ and stop_ for the spins (the mutex-guarded
  // fields stay the ones that decide; a spin only saves a sleep).
  std::atomic<std::uint64_t> posted_{0};
  std::atomic<std::size_t> busy_now_{0};
  std::atomic<bool> stopping_{false};
  bool spin_ = false;  // set with the workers: threads <= hardware threads
};

Pool& pool() {
  static Pool p;
  return p;
}

}  // namespace

std::size_t num_threads() noexcept { return pool().threads(); }

void set_num_threads(std::size_t n) {
  // The running loop holds the pool; resizing it from one of its own chunks would wait forever.
  if (t_inside_parallel) detail::fail("set_num_threads: called from inside a parallel_for chunk");
  pool().set_threads(n);
}

namespace detail {

void parallel_for_impl(std::size_t n, std::size_t grain, ChunkFn fn, void* ctx) {
  if (grain == 0) fail("parallel_for: grain must be positive, got 0");
  if (n == 0) return;
  const std::size_t num_chunks = n / grain + (n % grain != 0);
  if (t_inside_parallel || num_chunks == 1) {
    // Serially, in chunk order, without the job's set-up and atomics (kernels called per
    // row inside a tile come here). The first failing chunk is the lowest, as in a pool run.
    struct Inside {
      bool was = t_inside_parallel;
      Inside() { t_inside_parallel = true; }
      ~Inside() { t_inside_parallel = was; }
    } inside;
    for (std::size_t k = 0; k < num_chunks; ++k) {
      const std::size_t b = k * grain;
      fn(ctx, b, b + std::min(grain, n - b));
    }
    return;
  }
  Job job;
  job.n = n;
  job.grain = grain;
  job.num_chunks = num_chunks;
  job.fn = fn;
  job.ctx = ctx;
  pool().run(job);
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace detail
}  // namespace edgefuse
