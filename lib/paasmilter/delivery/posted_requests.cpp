#include "paasmilter/delivery/posted_requests.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <vector>

#include <fmt/format.h>

#include "paasmilter/log.hpp"

namespace paasmilter {

namespace {

// The journal: one line per event, appended.
//   P <operation-id> <posted, unix ms> <repeatability request id or -> <first sent, unix ms>
//       the request is about to go out (flushed to disk before it does); until an S or U
//       line follows, its fate counts as left open -- the process died during the attempt
//   S <operation-id>   the attempt settled the request's fate
//   U <operation-id>   the attempt left it open
//   A <operation-id>   the service accepted it
//   D <when, unix ms>  records were dropped for room: for a retention after that, unknown
//                      ids count as posted
using Clock = std::chrono::system_clock;

long long to_ms(Clock::time_point t) {
    return std::chrono::duration_cast<std::chrono::milliseconds>(t.time_since_epoch()).count();
}
Clock::time_point from_ms(long long ms) {
    return Clock::time_point(std::chrono::milliseconds(ms));
}

std::string errno_text() {
    return std::strerror(errno);
}

std::vector<std::string_view> fields_of(std::string_view line) {
    std::vector<std::string_view> fields;
    while (!line.empty()) {
        size_t space = line.find(' ');
        fields.push_back(line.substr(0, space));
        if (space == std::string_view::npos) break;
        line.remove_prefix(space + 1);
    }
    return fields;
}

std::optional<long long> number(std::string_view text) {
    long long value = 0;
    auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (error != std::errc() || end != text.data() + text.size()) return std::nullopt;
    return value;
}

bool plain_token(std::string_view text) {
    return !text.empty() && text.find_first_of(" \n\r") == std::string_view::npos;
}

std::string posted_line(const std::string& operation_id, Clock::time_point posted,
                        const PostedRequests::Repeatability& r) {
    return fmt::format("P {} {} {} {}\n", operation_id, to_ms(posted),
                       r.request_id.empty() ? "-" : r.request_id, to_ms(r.first_sent));
}

Result<void> write_all(int fd, std::string_view data) {
    // A partial write is undone by the caller (append) or leaves a file that is not used.
    while (!data.empty()) {
        ssize_t n = ::write(fd, data.data(), data.size());
        if (n < 0) {
            if (errno == EINTR) continue;
            return make_error(errno_text());
        }
        data.remove_prefix(static_cast<size_t>(n));
    }
    return {};
}

}  // namespace

PostedRequests::PostedRequests(size_t capacity, std::chrono::hours retention, size_t rewrite_after)
    : capacity_(capacity), retention_(retention), rewrite_after_(rewrite_after) {}

void PostedRequests::expire(Clock::time_point now) {
    while (!order_.empty() &&
           (order_.front().first + retention_ < now || order_.size() > capacity_)) {
        if (order_.size() > capacity_) dropped_at_ = now;
        auto found = entries_.find(order_.front().second);
        // Only the newest order entry of an id owns its record.
        if (found != entries_.end() && found->second.posted == order_.front().first) {
            entries_.erase(found);
        }
        order_.pop_front();
    }
}

void PostedRequests::record(const std::string& operation_id, Entry entry) {
    order_.emplace_back(entry.posted, operation_id);
    entries_[operation_id] = std::move(entry);
}

std::string PostedRequests::live_records() const {
    std::string text;
    if (dropped_at_ && *dropped_at_ + retention_ > Clock::now()) {
        text += fmt::format("D {}\n", to_ms(*dropped_at_));
    }
    // Always: a journal rewritten without live records must not look new when read back.
    if (started_at_) text += fmt::format("N {}\n", to_ms(*started_at_));
    for (const auto& [posted, id] : order_) {
        auto found = entries_.find(id);
        if (found == entries_.end() || found->second.posted != posted) continue;
        text += posted_line(id, posted, found->second.repeatability);
        // A request still in flight gets no line: if the process dies now, it is open.
        if (found->second.fate == Fate::settled) text += fmt::format("S {}\n", id);
        if (found->second.fate == Fate::open) text += fmt::format("U {}\n", id);
        if (found->second.fate == Fate::accepted) text += fmt::format("A {}\n", id);
    }
    return text;
}

Result<void> PostedRequests::append(std::string_view line) {
    if (!journal_) return {};
    struct stat before {};
    if (::fstat(journal_.get(), &before) != 0) {
        return make_error(fmt::format("cannot stat {}: {}", journal_path_, errno_text()));
    }
    if (auto written = write_all(journal_.get(), line); !written) {
        // Cut off what part of the line got in, or the next record would be glued to it.
        [[maybe_unused]] int ignored = ::ftruncate(journal_.get(), before.st_size);
        return make_error(
            fmt::format("cannot write {}: {}", journal_path_, written.error().message));
    }
    ++appended_;
    ++journal_lines_;
    return {};
}

Result<void> PostedRequests::append_durably(std::unique_lock<std::mutex>& lock,
                                            std::string_view line) {
    if (!journal_) return {};
    // Only the record that lets a request go out must be on disk first; a lost S or U line
    // leaves the request open after a crash, which is the safe side.
    //
    // After a failed flush the file cannot be trusted: Linux may drop the dirty pages it
    // failed to write and report the error only once, so a later flush that succeeds does
    // not prove that earlier lines are on disk. Until a rewrite (from the records in memory,
    // flushed as a new file) succeeds, no request may go out on this file's word.
    if (broken_) {
        const std::string why = broken_->message;
        if (auto rewritten = rewrite_journal(lock); !rewritten) {
            return make_error(
                fmt::format("{} (and cannot rewrite it: {})", why, rewritten.error().message));
        }
    }
    if (auto written = append(line); !written) return written;
    const uint64_t mine = appended_;
    for (;;) {
        if (flushed_up_to_ >= mine) return {};
        // Every line not yet flushed when a flush failed: its outcome is unknown.
        if (broken_) return *broken_;
        if (flushing_) {
            // The flush in progress may have started before this line was written.
            flushed_.wait(lock);
            continue;
        }
        // This thread flushes for every line written so far, its own included.
        flushing_ = true;
        const uint64_t covered = appended_;
        const int fd = journal_.get();  // not replaced while flushing_ (see rewrite_journal)
        lock.unlock();
        const int flushed = flush_(fd);
        const int error = errno;
        lock.lock();
        flushing_ = false;
        ++flushes_;
        if (flushed == 0) {
            flushed_up_to_ = std::max(flushed_up_to_, covered);
        } else {
            broken_ =
                make_error(fmt::format("cannot flush {}: {}", journal_path_, std::strerror(error)));
        }
        flushed_.notify_all();
        // Skipped by the appends while this thread flushed.
        rewrite_if_due(lock);
    }
}

void PostedRequests::replay(std::string_view line, JournalSummary& summary) {
    auto fields = fields_of(line);
    if (fields.size() == 2 && (fields[0] == "D" || fields[0] == "N")) {
        if (auto when = number(fields[1])) {
            (fields[0] == "D" ? dropped_at_ : started_at_) = from_ms(*when);
            return;
        }
    }
    if (fields.size() == 5 && fields[0] == "P" && plain_token(fields[1]) &&
        plain_token(fields[3])) {
        auto posted = number(fields[2]);
        auto first_sent = number(fields[4]);
        if (posted && first_sent) {
            Repeatability r{fields[3] == "-" ? std::string() : std::string(fields[3]),
                            from_ms(*first_sent)};
            // Until an S or U line says otherwise: the process died during the attempt.
            record(std::string(fields[1]), Entry{from_ms(*posted), std::move(r), Fate::open});
            return;
        }
    }
    if (fields.size() == 2 && (fields[0] == "S" || fields[0] == "U" || fields[0] == "A")) {
        if (auto found = entries_.find(std::string(fields[1])); found != entries_.end()) {
            found->second.fate = fields[0] == "U"   ? Fate::open
                                 : fields[0] == "A" ? Fate::accepted
                                                    : Fate::settled;
        }
        return;
    }
    ++summary.unreadable;
}

Result<void> PostedRequests::rewrite_journal(std::unique_lock<std::mutex>& lock) {
    flushed_.wait(lock, [this] { return !flushing_; });
    // Every line appended so far is of a record in memory (remember() records before it
    // appends), so the new file holds them all: once it is on disk, they are.
    std::string text;
    {
        std::lock_guard records(mutex_);
        text = live_records();
    }
    const std::string fresh = journal_path_ + ".new";
    auto fail = [&fresh](std::string message) {
        ::unlink(fresh.c_str());
        return make_error(std::move(message));
    };
    UniqueFd out(::open(fresh.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    if (!out) return fail(fmt::format("cannot create {}: {}", fresh, errno_text()));
    if (auto written = write_all(out.get(), text); !written) {
        return fail(fmt::format("cannot write {}: {}", fresh, written.error().message));
    }
    if (::fsync(out.get()) != 0) {
        return fail(fmt::format("cannot flush {}: {}", fresh, errno_text()));
    }
    UniqueFd appending(::open(fresh.c_str(), O_WRONLY | O_APPEND | O_CLOEXEC));
    if (!appending) return fail(fmt::format("cannot open {}: {}", fresh, errno_text()));
    if (::rename(fresh.c_str(), journal_path_.c_str()) != 0) {
        return fail(fmt::format("cannot rename {} to {}: {}", fresh, journal_path_, errno_text()));
    }
    // The old file is gone from the path: appending to it from now on would be lost.
    journal_ = std::move(appending);
    journal_lines_ = 0;
    // The rename itself must be on disk before anything is appended to the new file only;
    // if it is not, lines not yet flushed to the old file may be lost with it.
    const auto slash = journal_path_.find_last_of('/');
    const std::string directory =
        slash == std::string::npos ? std::string(".") : journal_path_.substr(0, slash + 1);
    UniqueFd dir(::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (!dir || ::fsync(dir.get()) != 0) {
        broken_ =
            make_error(fmt::format("cannot flush the directory {}: {}", directory, errno_text()));
        flushed_.notify_all();
        return *broken_;
    }
    flushed_up_to_ = appended_;
    broken_.reset();
    flushed_.notify_all();
    return {};
}

void PostedRequests::rewrite_if_due(std::unique_lock<std::mutex>& lock) {
    size_t live = 0;
    {
        std::lock_guard records(mutex_);
        live = entries_.size();
    }
    // The file stays within a few lines per live record (plus rewrite_after_).
    if (!journal_ || flushing_ || journal_lines_ < rewrite_after_ + live) return;
    if (auto rewritten = rewrite_journal(lock); !rewritten) {
        // Not fatal: appending goes on (to the old file, or to the new one marked broken if
        // only the directory flush failed); try again after as many lines.
        log_warning("cannot rewrite the journal of posted requests: {}", rewritten.error().message);
        journal_lines_ = 0;
    }
}

Result<PostedRequests::JournalSummary> PostedRequests::open_journal(const std::string& path) {
    std::unique_lock journal_lock(journal_mutex_);
    // A lock beside the journal (the journal itself is replaced when rewritten): two
    // processes appending to one journal would each miss the other's requests.
    const std::string lock_path = path + ".lock";
    UniqueFd lock_file(::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0600));
    if (!lock_file) return make_error(fmt::format("cannot open {}: {}", lock_path, errno_text()));
    if (::flock(lock_file.get(), LOCK_EX | LOCK_NB) != 0) {
        return make_error(
            fmt::format("{} is locked: another paas-milter uses {}", lock_path, path));
    }

    auto forget = [this](Error error) {
        std::lock_guard lock(mutex_);
        entries_.clear();
        order_.clear();
        dropped_at_.reset();
        started_at_.reset();
        journal_.reset();
        journal_path_.clear();
        broken_.reset();
        return error;
    };
    std::string text;
    {
        UniqueFd in(::open(path.c_str(), O_RDONLY | O_CREAT | O_CLOEXEC, 0600));
        if (!in) return make_error(fmt::format("cannot open {}: {}", path, errno_text()));
        char buffer[65536];
        for (;;) {
            ssize_t n = ::read(in.get(), buffer, sizeof buffer);
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) return make_error(fmt::format("cannot read {}: {}", path, errno_text()));
            if (n == 0) break;
            text.append(buffer, static_cast<size_t>(n));
        }
    }
    JournalSummary summary;
    {
        std::lock_guard lock(mutex_);
        std::string_view rest = text;
        while (!rest.empty()) {
            size_t end = rest.find('\n');
            if (end == std::string_view::npos) {  // torn by a crash during the write
                ++summary.unreadable;
                break;
            }
            replay(rest.substr(0, end), summary);
            rest.remove_prefix(end + 1);
        }
        if (text.empty()) {
            // Kept in the journal as its "N" line, so a restart within the retention does
            // not take the new journal for a complete one.
            summary.fresh = true;
            started_at_ = Clock::now();
        } else if (!started_at_) {
            // Written before journals had an "N" line: complete for as long as it ran.
            started_at_ = Clock::time_point{};
        }
        expire(Clock::now());
        for (const auto& [id, entry] : entries_) {
            if (entry.fate == Fate::open) ++summary.left_open;
        }
        summary.requests = entries_.size();
    }
    journal_path_ = path;
    if (auto rewritten = rewrite_journal(journal_lock); !rewritten) {
        return forget(rewritten.error());
    }
    journal_lock_ = std::move(lock_file);
    return summary;
}

Result<void> PostedRequests::remember(const std::string& operation_id,
                                      const Repeatability& repeatability) {
    const auto now = Clock::now();
    std::optional<Entry> previous;
    bool dropped_now = false;
    {
        // In memory first: a rewrite between this and the append below then keeps it.
        std::lock_guard lock(mutex_);
        if (auto found = entries_.find(operation_id); found != entries_.end()) {
            previous = found->second;
        }
        record(operation_id, Entry{now, repeatability, Fate::in_flight});
        const auto dropped_before = dropped_at_;
        expire(now);
        dropped_now = dropped_at_ != dropped_before;
    }
    std::unique_lock journal_lock(journal_mutex_);
    if (auto written = append_durably(journal_lock, posted_line(operation_id, now, repeatability));
        !written) {
        std::lock_guard lock(mutex_);
        if (previous) {
            entries_[operation_id] = *previous;
        } else {
            entries_.erase(operation_id);
        }
        return written;
    }
    if (dropped_now) (void)append(fmt::format("D {}\n", to_ms(now)));
    rewrite_if_due(journal_lock);
    return {};
}

void PostedRequests::set_uncertain(const std::string& operation_id, bool uncertain) {
    {
        std::lock_guard lock(mutex_);
        auto found = entries_.find(operation_id);
        if (found == entries_.end()) return;
        found->second.fate = uncertain ? Fate::open : Fate::settled;
    }
    std::unique_lock journal_lock(journal_mutex_);
    // Not flushed: if this line is lost, the request counts as open (the safe side).
    (void)append(fmt::format("{} {}\n", uncertain ? 'U' : 'S', operation_id));
    rewrite_if_due(journal_lock);
}

void PostedRequests::set_accepted(const std::string& operation_id) {
    {
        std::lock_guard lock(mutex_);
        auto found = entries_.find(operation_id);
        if (found == entries_.end()) return;
        found->second.fate = Fate::accepted;
    }
    std::unique_lock journal_lock(journal_mutex_);
    // Not flushed: if this line is lost, the request counts as open (the safe side).
    (void)append(fmt::format("A {}\n", operation_id));
    rewrite_if_due(journal_lock);
}

bool PostedRequests::was_accepted(const std::string& operation_id) {
    std::lock_guard lock(mutex_);
    auto found = entries_.find(operation_id);
    return found != entries_.end() && found->second.fate == Fate::accepted;
}

std::optional<PostedRequests::Repeatability> PostedRequests::uncertain_repeatability(
    const std::string& operation_id) {
    std::lock_guard lock(mutex_);
    auto found = entries_.find(operation_id);
    if (found == entries_.end() || found->second.fate != Fate::open) return std::nullopt;
    return found->second.repeatability;
}

bool PostedRequests::knows_every_post() {
    std::lock_guard lock(mutex_);
    return !started_at_ || *started_at_ + retention_ <= Clock::now();
}

bool PostedRequests::maybe_posted(const std::string& operation_id) {
    std::lock_guard lock(mutex_);
    const auto now = Clock::now();
    expire(now);
    return (dropped_at_ && *dropped_at_ + retention_ > now) || entries_.count(operation_id) > 0;
}

bool PostedRequests::begin(const std::string& operation_id) {
    std::lock_guard lock(mutex_);
    return ++delivering_[operation_id] == 1;
}

void PostedRequests::end(const std::string& operation_id) {
    std::lock_guard lock(mutex_);
    if (auto found = delivering_.find(operation_id);
        found != delivering_.end() && --found->second <= 0) {
        delivering_.erase(found);
    }
}

}  // namespace paasmilter
