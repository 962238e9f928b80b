// What the gateway knows about the requests it posted to a service lately:
// - whether it posted a request at all: when the service cannot be asked whether it has a
//   request (its status endpoint is down or unreachable), one never posted -- a message's
//   first attempt -- is certainly not at the service, and the failure policy (relay, hold)
//   may send it elsewhere; one that was posted stays unresolved and tempfails;
// - the repeatability headers of a request whose last attempt ended without knowing whether
//   the service carried it out, so that a client's quick retry repeats that very request
//   (the service answers 409 while the original still runs, or replays its answer)
//   instead of posting a new one while the original may still complete;
// - which requests a transaction is delivering right now, so that a second transaction of
//   the same message (a client that gave up and resent) does not post it concurrently.
//
// With a journal (open_journal) the first two survive a restart or a crash: every request
// is written down and flushed to disk before it goes out, and one whose attempt never
// finished (the process died during it) counts as left open. Without one they are kept in
// memory only. Either way they belong to one gateway: several gateways sharing clients do
// not see each other's requests (see the README).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "paasmilter/result.hpp"
#include "paasmilter/unique_fd.hpp"

namespace paasmilter {

class PostedRequests {
  public:
    // At most `capacity` ids, each for at most `retention` (Postfix's maximal_queue_lifetime
    // is 5 days by default: a client retries no longer). The journal is rewritten with the
    // live records once more than `rewrite_after` lines, and as many as there are live
    // records, were appended since the last rewrite.
    explicit PostedRequests(size_t capacity = 500'000,
                            std::chrono::hours retention = std::chrono::hours(24 * 6),
                            size_t rewrite_after = 100'000);

    struct Repeatability {
        std::string request_id;
        std::chrono::system_clock::time_point first_sent;
    };

    struct JournalSummary {
        size_t requests = 0;    // live records read back
        size_t left_open = 0;   // of those, requests whose fate was left open
        size_t unreadable = 0;  // lines skipped (a torn last line after a crash)
        // The journal was empty or absent: see knows_every_post().
        bool fresh = false;
    };
    // Reads back the journal at `path` (created if absent, mode 0600), rewrites it with the
    // live records only, and from then on records every request in it. The file is locked:
    // a second process cannot use it. Call before any other member; on an error nothing of
    // the journal is kept (not even the lock), and it may be called again.
    Result<JournalSummary> open_journal(const std::string& path);

    // Called before the first post of a request in a transaction, and whenever it gets new
    // repeatability headers; the request then counts as in flight. With a journal, returns
    // only once the record is on disk; an error means the request must not go out.
    Result<void> remember(const std::string& operation_id, const Repeatability& repeatability);
    // Called when the transaction's attempt ends (before end()): whether it left the
    // request's fate open. A request still in flight when the process dies counts as open.
    void set_uncertain(const std::string& operation_id, bool uncertain);
    // Called instead when the attempt ended with the service's acceptance (for a service
    // that cannot be asked later, a client's retry is then answered from this record).
    void set_accepted(const std::string& operation_id);
    bool was_accepted(const std::string& operation_id);
    // The repeatability headers of a request whose fate was left open, if any.
    std::optional<Repeatability> uncertain_repeatability(const std::string& operation_id);
    // True when the gateway posted it within the retention, or records were dropped for
    // room within the retention (an unknown id may then be one of them: the safe side).
    bool maybe_posted(const std::string& operation_id);
    // Whether an unknown id is certainly one this gateway never posted, so that asking the
    // service first can be skipped (lookup_before_post = "own-attempts"): false for a
    // retention after a journal was started afresh, which a first start cannot tell apart
    // from a deleted or restored journal or a changed state directory. (maybe_posted()
    // does not count that: it decides whether a failure policy may send a message
    // elsewhere when the service cannot be asked, and a first start must not lose the
    // relay fallback for days; that risk is the one it always had with a lost journal.)
    bool knows_every_post();

    // Marks the request as being delivered by one transaction; false if another one is.
    // Every begin() is paired with an end(), whatever it returned.
    bool begin(const std::string& operation_id);
    void end(const std::string& operation_id);

  private:
    enum class Fate { in_flight, settled, open, accepted };
    using Clock = std::chrono::system_clock;
    struct Entry {
        Clock::time_point posted;
        Repeatability repeatability;
        Fate fate = Fate::in_flight;
    };
    // With mutex_ held.
    void expire(Clock::time_point now);
    void record(const std::string& operation_id, Entry entry);
    void replay(std::string_view line, JournalSummary& summary);
    std::string live_records() const;
    // With journal_mutex_ held: writes the line at the end of the file, not flushed.
    Result<void> append(std::string_view line);
    // With journal_mutex_ held by `lock`: appends the line and returns once a flush that
    // started after the write has completed (group commit: one flush serves every line
    // written before it started). The mutex is released while this thread waits or flushes.
    Result<void> append_durably(std::unique_lock<std::mutex>& lock, std::string_view line);
    // With journal_mutex_ held by `lock` (it takes mutex_ for the records); waits until no
    // flush is in progress, so the file is never swapped under a flushing thread.
    Result<void> rewrite_journal(std::unique_lock<std::mutex>& lock);
    // With journal_mutex_ held by `lock`; does nothing while a flush is in progress (the
    // flushing thread does it when done), so that a non-durable append never waits for one.
    void rewrite_if_due(std::unique_lock<std::mutex>& lock);

    size_t capacity_;
    std::chrono::hours retention_;
    size_t rewrite_after_;

    std::mutex mutex_;  // the records in memory
    std::unordered_map<std::string, Entry> entries_;
    std::deque<std::pair<Clock::time_point, std::string>> order_;
    std::unordered_map<std::string, int> delivering_;
    // When records were last dropped for room: for a retention after that, an unknown id
    // may be one of them.
    std::optional<Clock::time_point> dropped_at_;
    // When the journal was started afresh ("N" line), within the retention.
    std::optional<Clock::time_point> started_at_;

    // The file. Taken before mutex_ when both are needed. Not held during a flush to disk:
    // other lines are appended meanwhile, and the next flush covers them all.
    std::mutex journal_mutex_;
    std::string journal_path_;
    UniqueFd journal_;
    UniqueFd journal_lock_;     // flock()ed for the process's lifetime
    size_t journal_lines_ = 0;  // appended since the last rewrite
    // Lines are numbered as they are appended; every line up to flushed_up_to_ is on disk.
    uint64_t appended_ = 0;
    uint64_t flushed_up_to_ = 0;
    bool flushing_ = false;  // one thread at a time flushes, without journal_mutex_
    std::condition_variable flushed_;
    // Set when a flush failed: see append_durably.
    std::optional<Error> broken_;
    // The flush of the journal, and how many ran (replaced and read by the unit tests).
    std::function<int(int)> flush_ = ::fdatasync;
    size_t flushes_ = 0;
    friend struct PostedRequestsProbe;
};

// One transaction delivering one request (PostedRequests::begin/end as a scope); without a
// record of posted requests every transaction is alone.
class DeliveringRequest {
  public:
    DeliveringRequest(PostedRequests* posted, std::string id)
        : posted_(posted), id_(std::move(id)), alone_(!posted_ || posted_->begin(id_)) {}
    ~DeliveringRequest() {
        if (posted_) posted_->end(id_);
    }
    DeliveringRequest(const DeliveringRequest&) = delete;
    DeliveringRequest& operator=(const DeliveringRequest&) = delete;

    // False when another transaction of the same message is delivering it right now.
    bool alone() const { return alone_; }
    // Records whether this transaction's attempt left the request's fate open, before
    // another transaction may take the request over.
    void finish(bool left_open, bool accepted = false) {
        if (!posted_) return;
        if (accepted) {
            posted_->set_accepted(id_);
        } else {
            posted_->set_uncertain(id_, left_open);
        }
    }

  private:
    PostedRequests* posted_;
    std::string id_;
    bool alone_;
};

}  // namespace paasmilter
