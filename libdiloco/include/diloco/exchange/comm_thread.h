// The communication thread: where exchanges that are sequences of blocking collectives run, so
// that inner steps go on while they travel (Streaming DiLoCo's overlap).
//
// Jobs run one at a time, in the order they were submitted, which is how collectives keep the
// same order on every rank (c10d's rule): every rank submits the same jobs in the same order.
// A job that fails (a lost peer, a malformed payload, islands that agree to stop) stops the queue:
// the jobs behind it fail with the same error without running, so that no rank issues a collective
// that the others skipped, until clear_error(). A sequence of collectives is all or nothing.
//
// Background or inline: a background CommThread runs jobs on its own thread as soon as they are
// queued; an inline one (overlap tau = 0, where nothing would run in between) runs them on the
// thread that waits for them, when it waits, so no thread is involved at all.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

namespace diloco {

class CommThread {
 public:
  explicit CommThread(bool background);
  // Waits for the jobs already running or queued (a failed queue drops them); collectives fail
  // within the group's timeout, so this is bounded.
  ~CommThread();
  CommThread(const CommThread&) = delete;
  CommThread& operator=(const CommThread&) = delete;

  bool background() const { return background_; }

  class Job {
   public:
    Job() = default;
    // Blocks until the job ran (an inline thread runs it, and every job queued before it, now)
    // and rethrows its exception, or the one that stopped the queue before it. Idempotent.
    void wait();
    // Whether the job has run (or failed: wait() throws), so that wait() returns at once. Never
    // blocks; a job of an inline thread runs only in wait(), so it is not ready before. An
    // empty Job is ready.
    bool ready() const;
    bool valid() const { return state_ != nullptr; }

   private:
    friend class CommThread;
    struct State;
    std::shared_ptr<State> state_;
  };

  // The job runs under the PayloadContext of the submitting thread (diloco/comm/auth.h).
  Job submit(std::function<void()> work);
  // After a failure: later jobs run again.
  void clear_error();
  // Drops the jobs that have not started (their wait() throws); one running finishes. For a
  // caller that gives up on what it queued: an inline thread then sends nothing more.
  void discard_queued();

 private:
  void run_loop();
  // Runs queued jobs up to and including `until` (inline threads; the lock is held on entry).
  void run_until(const std::shared_ptr<Job::State>& until, std::unique_lock<std::mutex>& lock);
  // Runs one job outside the lock and records its outcome.
  void run_one(const std::shared_ptr<Job::State>& job, std::unique_lock<std::mutex>& lock);

  const bool background_;
  std::mutex mutex_;
  std::condition_variable changed_;
  std::deque<std::shared_ptr<Job::State>> queue_;
  std::exception_ptr failed_;  // what stopped the queue, until clear_error()
  bool running_ = false;       // an inline job is running on some waiting thread
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace diloco
