// The communication thread (see comm_thread.h).
#include "diloco/exchange/comm_thread.h"

#include "diloco/comm/auth.h"

#include <stdexcept>
#include <utility>

namespace diloco {

struct CommThread::Job::State {
  std::function<void()> work;
  CommThread* owner = nullptr;
  bool done = false;
  std::exception_ptr error;
};

CommThread::CommThread(bool background) : background_(background) {
  if (background_) thread_ = std::thread([this] { run_loop(); });
}

CommThread::~CommThread() {
  {
    std::unique_lock<std::mutex> lock(mutex_);
    stopping_ = true;
    if (!background_) {
      // Nothing waits for the queued inline jobs any more: dropping them sends nothing, since
      // an inline job has not started a collective before it runs.
      for (auto& job : queue_) {
        job->done = true;
        job->error = std::make_exception_ptr(std::runtime_error("communication thread closed"));
      }
      queue_.clear();
    }
  }
  changed_.notify_all();
  if (thread_.joinable()) thread_.join();
}

CommThread::Job CommThread::submit(std::function<void()> work) {
  auto state = std::make_shared<Job::State>();
  // The job issues its collectives under the outer step and fragment it was submitted for.
  state->work = [context = payload_context(), work = std::move(work)] {
    ScopedPayloadContext scope(context);
    work();
  };
  state->owner = this;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(state);
  }
  changed_.notify_all();
  Job job;
  job.state_ = std::move(state);
  return job;
}

void CommThread::clear_error() {
  std::lock_guard<std::mutex> lock(mutex_);
  failed_ = nullptr;
}

void CommThread::discard_queued() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& job : queue_) {
      job->work = nullptr;
      job->done = true;
      job->error = std::make_exception_ptr(
          std::runtime_error("communication job discarded before it ran"));
    }
    queue_.clear();
  }
  changed_.notify_all();
}

void CommThread::run_one(const std::shared_ptr<Job::State>& job,
                         std::unique_lock<std::mutex>& lock) {
  std::exception_ptr error = failed_;
  if (!error) {
    lock.unlock();
    try {
      job->work();
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    if (error && !failed_) failed_ = error;
  }
  job->work = nullptr;  // release what the job captured
  job->error = error;
  job->done = true;
  changed_.notify_all();
}

void CommThread::run_loop() {
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    changed_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, and everything queued has run
    auto job = queue_.front();
    queue_.pop_front();
    run_one(job, lock);
  }
}

void CommThread::run_until(const std::shared_ptr<Job::State>& until,
                           std::unique_lock<std::mutex>& lock) {
  while (!until->done) {
    if (running_) {  // another waiter is running a job: it will run ours or hand over
      changed_.wait(lock);
      continue;
    }
    if (queue_.empty()) return;  // cannot happen for a job of this thread
    running_ = true;
    auto job = queue_.front();
    queue_.pop_front();
    run_one(job, lock);
    running_ = false;
    changed_.notify_all();
  }
}

bool CommThread::Job::ready() const {
  if (!state_) return true;
  std::lock_guard<std::mutex> lock(state_->owner->mutex_);
  return state_->done;
}

void CommThread::Job::wait() {
  if (!state_) return;
  CommThread& owner = *state_->owner;
  std::unique_lock<std::mutex> lock(owner.mutex_);
  if (owner.background_) {
    owner.changed_.wait(lock, [this] { return state_->done; });
  } else {
    owner.run_until(state_, lock);
  }
  if (state_->error) std::rethrow_exception(state_->error);
}

}  // namespace diloco
