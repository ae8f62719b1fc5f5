"""A pool of threads that stays awake between the calls of one decode step: shared C++ of the CPU kernels whose
work is many short calls (``linear.py``, ``gguf.py``; pasted inside their anonymous namespace).

At decode a step runs ~200 linears of 5-50 us each. An OpenMP team pays a futex wake-up per call once its threads
sleep, which libgomp makes them do almost at once when a process has more threads than cores (measured for the GGUF
kernel in sglite's engine on 2 cores: 8.9 ms per token of kernel time under OpenMP against 3.3 ms in a loop of the
same calls, docs/PERFORMANCE.md), and its barrier waits for a thread the OS has not scheduled. This pool's threads
poll for the next call for ``spin_us``, and the caller claims chunks from the same counter as them, so a thread
that is late takes no work. ``PoolHandle`` registers a pool for ``fork()`` (a child gets new threads).

Needs ``<pthread.h> <sched.h> <algorithm> <atomic> <chrono> <condition_variable> <functional> <memory> <mutex>
<thread> <vector>``.
"""

POOL_CPP = r"""
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

using RowFn = std::function<void(int64_t, int64_t)>;

// A pool of T-1 threads plus the caller. run() publishes a task; every thread, the caller included, claims
// chunks of output rows from one atomic counter until none is left, so a pool thread that the OS has not
// scheduled (a loaded machine) takes no work and the caller does it: never slower than one thread, and no
// call waits for a thread to wake up. The counter carries the task's generation in its high half, so a late
// thread cannot claim rows of the next task with the previous one's arguments. Idle threads poll for spin_us,
// yielding the core after the first tenth of it, then sleep on the condition.
class Pool {
 public:
  Pool(int threads, int64_t spin_us) : threads_(std::max(1, threads)), spin_us_(spin_us) { start(); }
  ~Pool() {
    { std::lock_guard<std::mutex> g(*mu_); stop_ = true; gen_.fetch_add(1); }
    cv_->notify_all();
    for (auto& th : workers_) th.join();
  }
  int threads() const { return threads_; }

  // Calls rows(n0, n1) over [0, n) in chunks of chunk_rows rows, on this thread and the pool's.
  void run(int64_t n, int64_t chunk_rows, const RowFn& rows) {
    const int64_t chunks = (n + chunk_rows - 1) / chunk_rows;
    if (threads_ == 1 || chunks <= 1) { rows(0, n); return; }
    // Close the previous task's counter before chunks_ changes: a pool thread still in work() for it holds that
    // counter's last value, and with a larger chunks_ its claim would succeed on the old word (the hang of
    // 2026-12-02: a phantom chunk counted twice). The closed word fails that claim and stops the loop.
    claim_.store((claim_.load(std::memory_order_relaxed) & ~uint64_t{0xffffffffu}) | 0xffffffffu,
                 std::memory_order_seq_cst);
    rows_ = &rows;
    n_ = n;
    chunk_rows_ = chunk_rows;
    chunks_.store(chunks, std::memory_order_seq_cst);
    finished_.store(0, std::memory_order_relaxed);
    uint32_t g;
    { std::lock_guard<std::mutex> lk(*mu_); g = gen_.fetch_add(1, std::memory_order_relaxed) + 1; }
    claim_.store(static_cast<uint64_t>(g) << 32, std::memory_order_release);
    if (sleepers_.load(std::memory_order_acquire) > 0) cv_->notify_all();
    work(g);
    for (int64_t it = 1; finished_.load(std::memory_order_acquire) != chunks; ++it) {
      if ((it & 1023) == 0) sched_yield();  // a thread holding a chunk may have been preempted
      else cpu_relax();
    }
  }

  // After fork() the child has only the forking thread: give it new threads and new locks.
  void restart_in_child() {
    new (&workers_) std::vector<std::thread>();  // the old handles name threads that do not exist here
    mu_.release(); cv_.release();                // their state may be mid-operation: never touch them again
    gen_.store(0); claim_.store(0); finished_.store(0); sleepers_.store(0);
    start();
  }

 private:
  void start() {
    mu_ = std::make_unique<std::mutex>();
    cv_ = std::make_unique<std::condition_variable>();
    for (int i = 1; i < threads_; ++i) workers_.emplace_back([this] { loop(); });
  }
  // Claim and run chunks of generation g until none is left (or the task is no longer g).
  void work(uint32_t g) {
    uint64_t v = claim_.load(std::memory_order_acquire);
    while (static_cast<uint32_t>(v >> 32) == g &&
           static_cast<int64_t>(v & 0xffffffffu) < chunks_.load(std::memory_order_seq_cst)) {
      if (!claim_.compare_exchange_weak(v, v + 1, std::memory_order_acq_rel)) continue;
      // claimed: the caller waits for this chunk, so rows_ stays this task's until it is done
      const int64_t n0 = static_cast<int64_t>(v & 0xffffffffu) * chunk_rows_;
      (*rows_)(n0, std::min(n0 + chunk_rows_, n_));
      finished_.fetch_add(1, std::memory_order_acq_rel);
      v = claim_.load(std::memory_order_acquire);
    }
  }
  uint32_t wait_next(uint32_t seen) {
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    for (int64_t it = 0;; ++it) {
      uint32_t g = gen_.load(std::memory_order_acquire);
      if (g != seen) return g;
      if ((it & 63) == 0) {
        const auto us = std::chrono::duration_cast<std::chrono::microseconds>(clock::now() - t0).count();
        if (us >= spin_us_) break;
        if (us * 10 >= spin_us_) sched_yield();
      }
      cpu_relax();
    }
    std::unique_lock<std::mutex> lk(*mu_);
    sleepers_.fetch_add(1);
    cv_->wait(lk, [&] { return gen_.load() != seen; });
    sleepers_.fetch_sub(1);
    return gen_.load();
  }
  void loop() {
    uint32_t seen = 0;  // gen_ as start() left it: a task published before this thread runs is still seen
    while (true) {
      seen = wait_next(seen);
      if (stop_) return;
      // gen_ moves before claim_ is published: wait for this generation's counter, unless a newer task came
      while (static_cast<uint32_t>(claim_.load(std::memory_order_acquire) >> 32) != seen &&
             gen_.load(std::memory_order_acquire) == seen)
        cpu_relax();
      work(seen);
    }
  }

  const int threads_;
  const int64_t spin_us_;
  std::vector<std::thread> workers_;
  std::unique_ptr<std::mutex> mu_;
  std::unique_ptr<std::condition_variable> cv_;
  const RowFn* rows_ = nullptr;  // the task: its function, rows and chunk size
  int64_t n_ = 0;
  int64_t chunk_rows_ = 1;
  std::atomic<int64_t> chunks_{0};
  std::atomic<uint32_t> gen_{0};    // wraps around: only compared for equality
  std::atomic<uint64_t> claim_{0};  // (generation << 32) | next chunk
  std::atomic<int64_t> finished_{0};
  std::atomic<int> sleepers_{0};
  bool stop_ = false;
};

std::mutex g_pools_mu;
std::vector<Pool*> g_pools;  // every live pool, so that a forked child can restart them all

void restart_pools_in_child() {
  new (&g_pools_mu) std::mutex();
  for (Pool* p : g_pools) p->restart_in_child();
}

// A pool owned by a Python object, known to the fork handler while it lives.
struct PoolHandle {
  std::unique_ptr<Pool> pool;
  PoolHandle(int64_t threads, int64_t spin_us) : pool(new Pool(static_cast<int>(threads), spin_us)) {
    static const int registered = pthread_atfork(nullptr, nullptr, restart_pools_in_child);
    (void)registered;
    std::lock_guard<std::mutex> g(g_pools_mu);
    g_pools.push_back(pool.get());
  }
  ~PoolHandle() {
    std::lock_guard<std::mutex> g(g_pools_mu);
    g_pools.erase(std::remove(g_pools.begin(), g_pools.end(), pool.get()), g_pools.end());
  }
};
"""
