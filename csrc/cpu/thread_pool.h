// The CPU library's worker threads (used by csrc/api.cpp nvrm_cpu_launch).
//
// Why not OpenMP: a libgomp team spins after every parallel region (GOMP_SPINCOUNT, up to
// milliseconds) and forks on every launch, even for a handful of elements; next to torch's own
// threads or another busy process on the same cores, that costs far more than the step itself.
// Workers here sleep on a condition variable between launches (no spinning), the calling thread
// always works too, and work is handed out one block at a time, so a worker that is slow to wake
// (its core is busy) delays nothing: the others take its share. Which thread runs which block
// never changes a result (blocks write disjoint elements).
//
// Raw pthread mutex and condition variables, not std::mutex / std::condition_variable / call_once:
// those bind to GLIBCXX_3.4.30 / GLIBC_2.34 symbol versions when built on a new system, which
// would raise the glibc floor of the wheel (issue 11 section 4); these are GLIBC_2.3.2.
#pragma once

#include <pthread.h>

#include <atomic>
#include <system_error>
#include <thread>

namespace nvrm {
namespace cpu {

class WorkerPool {
 public:
  using Work = void (*)(void*);

  // The process's pool, created on first use; a forked child gets a fresh one (the parent's
  // workers do not exist there). Never destroyed: detached workers may still sleep in it at exit.
  static WorkerPool& instance() {
    WorkerPool* pool = current().load(std::memory_order_acquire);
    if (pool != nullptr) return *pool;
    static std::atomic<bool> registered{false};
    if (!registered.exchange(true)) {
      pthread_atfork(nullptr, nullptr, [] { current().store(nullptr); });
    }
    WorkerPool* created = new WorkerPool();
    if (!current().compare_exchange_strong(pool, created)) {
      delete created;  // another thread won; it has no workers yet
      return *pool;
    }
    return *created;
  }

  // Runs work(context) on the calling thread and on up to `helpers` workers at once; returns when
  // every thread that started it has returned. `work` must be safe to run concurrently and must
  // finish the whole job whatever subset of threads runs it: workers may join late or not at all.
  // A launch from a second thread while one is in flight runs on its own thread only.
  void run(int helpers, Work work, void* context) {
    pthread_mutex_lock(&mutex_);
    if (busy_ || helpers < 1) {
      helpers = 0;
    } else {
      helpers = grow(helpers);
      busy_ = helpers > 0;
      work_ = work;
      context_ = context;
      slots_ = helpers;
    }
    pthread_mutex_unlock(&mutex_);
    for (int i = 0; i < helpers; ++i) pthread_cond_signal(&wake_);
    work(context);
    if (helpers == 0) return;
    pthread_mutex_lock(&mutex_);
    slots_ = 0;  // the job is done: workers not started yet stay asleep
    while (active_ != 0) pthread_cond_wait(&done_, &mutex_);
    busy_ = false;
    pthread_mutex_unlock(&mutex_);
  }

 private:
  static std::atomic<WorkerPool*>& current() {
    static std::atomic<WorkerPool*> pool{nullptr};
    return pool;
  }

  // Starts workers until there are `wanted` (mutex_ held); returns how many there are, fewer
  // than wanted only if the system refuses a thread.
  int grow(int wanted) {
    while (workers_ < wanted) {
      try {
        std::thread([this] { serve(); }).detach();
      } catch (const std::system_error&) {
        break;
      }
      ++workers_;
    }
    return workers_ < wanted ? workers_ : wanted;
  }

  void serve() {
    pthread_mutex_lock(&mutex_);
    for (;;) {
      while (slots_ == 0) pthread_cond_wait(&wake_, &mutex_);
      --slots_;
      ++active_;
      const Work work = work_;
      void* const context = context_;
      pthread_mutex_unlock(&mutex_);
      work(context);
      pthread_mutex_lock(&mutex_);
      if (--active_ == 0) pthread_cond_signal(&done_);
    }
  }

  pthread_mutex_t mutex_ = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t wake_ = PTHREAD_COND_INITIALIZER, done_ = PTHREAD_COND_INITIALIZER;
  bool busy_ = false;  // a launch is in flight
  int workers_ = 0;    // threads started
  int slots_ = 0;      // workers that may still join the launch in flight
  int active_ = 0;     // workers inside work()
  Work work_ = nullptr;
  void* context_ = nullptr;
};

}  // namespace cpu
}  // namespace nvrm
