// The record of posted API requests, and its journal that survives a restart.
#include <doctest/doctest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <latch>
#include <mutex>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "paasmilter/delivery/posted_requests.hpp"
#include "temp_dir.hpp"
#include "test_support.hpp"

using namespace paasmilter;
using namespace std::chrono_literals;
using testing::TempDir;

namespace paasmilter {

// The test seam of PostedRequests: how many flushes ran, and the flush itself (replaced
// only while no other thread uses the object).
struct PostedRequestsProbe {
    static size_t flushes(PostedRequests& posted) {
        std::lock_guard lock(posted.journal_mutex_);
        return posted.flushes_;
    }
    static void set_flush(PostedRequests& posted, std::function<int(int)> flush) {
        std::lock_guard lock(posted.journal_mutex_);
        posted.flush_ = std::move(flush);
    }
};

}  // namespace paasmilter

namespace {

using Probe = PostedRequestsProbe;

PostedRequests::Repeatability repeatability(const std::string& id) {
    return {id, std::chrono::system_clock::now() - 10s};
}

// Runs `body(thread, call)` for `calls` calls on each of `threads` threads started together.
void concurrently(int threads, int calls, const std::function<void(int, int)>& body) {
    std::latch start(threads);
    std::vector<std::thread> running;
    for (int t = 0; t < threads; ++t) {
        running.emplace_back([&, t] {
            start.arrive_and_wait();
            for (int i = 0; i < calls; ++i) body(t, i);
        });
    }
    for (auto& thread : running) thread.join();
}

std::string id_of(int thread, int call) {
    return fmt::format("op-{}-{}", thread, call);
}

}  // namespace

TEST_CASE("posted requests: remembered, expired by count (then unknown ids count as posted)") {
    PostedRequests posted(2);
    CHECK_FALSE(posted.maybe_posted("a"));
    CHECK(posted.remember("a", {}));
    CHECK(posted.remember("b", {}));
    CHECK(posted.maybe_posted("a"));
    CHECK_FALSE(posted.maybe_posted("c"));
    CHECK(posted.remember("c", {}));  // "a" is dropped for room
    CHECK(posted.maybe_posted("x"));
}

TEST_CASE("posted requests: a transaction at a time delivers a request") {
    PostedRequests posted;
    CHECK(posted.begin("a"));
    CHECK_FALSE(posted.begin("a"));
    CHECK(posted.begin("b"));
    posted.end("a");
    posted.end("a");
    CHECK(posted.begin("a"));
}

// A journal started longer ago than the default retention (6 days): complete, not fresh.
std::string established_journal(TempDir& dir) {
    const auto week_ago = std::chrono::system_clock::now() - std::chrono::hours(24 * 7);
    return dir.write("posted-requests.journal",
                     fmt::format("N {}\n", std::chrono::duration_cast<std::chrono::milliseconds>(
                                               week_ago.time_since_epoch())
                                               .count()));
}

TEST_CASE("posted requests: the journal survives a restart") {
    TempDir dir;
    const std::string path = established_journal(dir);
    const auto open = repeatability("rep-open");
    {
        PostedRequests before;
        auto summary = before.open_journal(path);
        REQUIRE(summary);
        CHECK(summary->requests == 0);
        CHECK_FALSE(summary->fresh);
        CHECK(before.remember("settled", repeatability("rep-settled")));
        before.set_uncertain("settled", false);
        CHECK(before.remember("left-open", open));
        before.set_uncertain("left-open", true);
        // The process dies while this one is in flight: no S or U line follows.
        CHECK(before.remember("in-flight", repeatability("rep-in-flight")));
    }
    // The file is 0600: request ids are not secrets, but nobody else has business there.
    struct stat info {};
    REQUIRE(::stat(path.c_str(), &info) == 0);
    CHECK((info.st_mode & 0777) == 0600);

    PostedRequests after;
    auto summary = after.open_journal(path);
    REQUIRE(summary);
    CHECK(summary->requests == 3);
    CHECK(summary->left_open == 2);
    CHECK(summary->unreadable == 0);
    CHECK(after.maybe_posted("settled"));
    CHECK_FALSE(after.maybe_posted("never"));
    CHECK_FALSE(after.uncertain_repeatability("settled"));
    auto repeated = after.uncertain_repeatability("left-open");
    REQUIRE(repeated);
    CHECK(repeated->request_id == "rep-open");
    CHECK(std::chrono::abs(repeated->first_sent - open.first_sent) < 1ms);
    // A crash during the attempt leaves its fate open: the next attempt repeats it.
    REQUIRE(after.uncertain_repeatability("in-flight"));
    CHECK(after.uncertain_repeatability("in-flight")->request_id == "rep-in-flight");
}

TEST_CASE("posted requests: a new journal cannot know earlier requests, for a retention") {
    TempDir dir;
    const std::string path = (dir.path() / "posted-requests.journal").string();
    {
        // Absent, as after a first start, a deleted journal or a changed state directory:
        // asking the service first cannot be skipped...
        PostedRequests first;
        auto summary = first.open_journal(path);
        REQUIRE(summary);
        CHECK(summary->fresh);
        CHECK_FALSE(first.knows_every_post());
        // ...but an unknown id does not count as posted: when the service cannot be asked,
        // a first attempt may still take its relay fallback.
        CHECK_FALSE(first.maybe_posted("posted-before-the-journal"));
    }
    {
        // A restart within the retention still knows the journal is not complete.
        PostedRequests restarted;
        auto summary = restarted.open_journal(path);
        REQUIRE(summary);
        CHECK_FALSE(summary->fresh);
        CHECK_FALSE(restarted.knows_every_post());
    }
    // An empty file is as new as an absent one.
    PostedRequests emptied;
    auto summary = emptied.open_journal(dir.write("empty.journal", ""));
    REQUIRE(summary);
    CHECK(summary->fresh);
    CHECK_FALSE(emptied.knows_every_post());
    // Older than the retention: complete. It stays so when it had no live records to keep,
    // and a journal written before the "N" line existed counts as complete too.
    const std::string established = established_journal(dir);
    for (int restart = 0; restart < 2; ++restart) {
        PostedRequests old;
        auto reopened = old.open_journal(established);
        REQUIRE(reopened);
        CHECK_FALSE(reopened->fresh);
        CHECK(old.knows_every_post());
    }
    PostedRequests older_format;
    REQUIRE(older_format.open_journal(dir.write("v1.journal", "garbage\n")));
    CHECK(older_format.knows_every_post());
}

TEST_CASE("posted requests: a torn or foreign line in the journal is skipped, not fatal") {
    TempDir dir;
    const std::string path = dir.write("journal",
                                       "P a 1700000000000 rep-a 1700000000000\n"
                                       "garbage that is not a record\n"
                                       "S a\n"
                                       "P b 1700000000000 - 17000");
    // Old enough to be past a one-hour retention: dropped when read back.
    PostedRequests expired_soon(500'000, std::chrono::hours(1));
    auto summary = expired_soon.open_journal(path);
    REQUIRE(summary);
    CHECK(summary->unreadable == 2);
    CHECK(summary->requests == 0);
    CHECK_FALSE(expired_soon.maybe_posted("a"));
}

TEST_CASE("posted requests: records past the retention are dropped, recent ones kept") {
    TempDir dir;
    const auto now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count();
    const std::string path = dir.write(
        "journal", fmt::format("P old {} - {}\nP new {} - {}\nS new\n", now_ms - 2 * 3600'000,
                               now_ms - 2 * 3600'000, now_ms, now_ms));
    PostedRequests posted(500'000, std::chrono::hours(1));
    auto summary = posted.open_journal(path);
    REQUIRE(summary);
    CHECK(summary->requests == 1);
    CHECK_FALSE(posted.maybe_posted("old"));
    CHECK(posted.maybe_posted("new"));
    // Rewritten with the live records only.
    CHECK(testing::read_all(path) == fmt::format("N 0\nP new {} - {}\nS new\n", now_ms, now_ms));
}

TEST_CASE("posted requests: records dropped for room are remembered as such across a restart") {
    TempDir dir;
    const std::string path = (dir.path() / "journal").string();
    {
        PostedRequests small(1);
        REQUIRE(small.open_journal(path));
        CHECK(small.remember("a", {}));
        CHECK(small.remember("b", {}));  // "a" dropped
    }
    PostedRequests after(10);
    REQUIRE(after.open_journal(path));
    CHECK(after.maybe_posted("a"));
    CHECK(after.maybe_posted("unknown"));
}

TEST_CASE("posted requests: a drop for room older than the retention no longer counts") {
    TempDir dir;
    const auto now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::system_clock::now().time_since_epoch())
                            .count();
    const std::string path = dir.write(
        "journal",
        fmt::format("D {}\nP kept {} - {}\nS kept\n", now_ms - 2 * 3600'000, now_ms, now_ms));
    PostedRequests posted(10, std::chrono::hours(1));
    REQUIRE(posted.open_journal(path));
    CHECK(posted.maybe_posted("kept"));
    CHECK_FALSE(posted.maybe_posted("unknown"));
    CHECK(testing::read_all(path).find("D ") == std::string::npos);
}

TEST_CASE(
    "posted requests: a rewrite keeps a request in flight open and keeps the one being "
    "recorded") {
    TempDir dir;
    const std::string path = (dir.path() / "journal").string();
    {
        // Rewritten as often as possible: whenever as many lines as live records were added.
        PostedRequests busy(100, std::chrono::hours(24), 0);
        REQUIRE(busy.open_journal(path));
        CHECK(busy.remember("settled", repeatability("rep-settled")));  // rewrites at once
        busy.set_uncertain("settled", false);
        CHECK(busy.remember("in-flight", repeatability("rep-in-flight")));
        for (int i = 0; i < 20; ++i) {
            const std::string id = fmt::format("other-{}", i);
            CHECK(busy.remember(id, repeatability("rep-" + id)));
            busy.set_uncertain(id, false);
        }
        CHECK(busy.remember("last", repeatability("rep-last")));
        // The process dies with "in-flight" and "last" still going out.
    }
    PostedRequests after;
    auto summary = after.open_journal(path);
    REQUIRE(summary);
    CHECK(summary->requests == 23);
    CHECK(summary->left_open == 2);
    CHECK_FALSE(after.uncertain_repeatability("settled"));
    REQUIRE(after.uncertain_repeatability("in-flight"));
    CHECK(after.uncertain_repeatability("in-flight")->request_id == "rep-in-flight");
    REQUIRE(after.uncertain_repeatability("last"));
    CHECK_FALSE(after.uncertain_repeatability("other-7"));
}

TEST_CASE("posted requests: a failed write leaves no fragment for the next record to stick to") {
    TempDir dir;
    const std::string path = established_journal(dir);
    {
        PostedRequests posted;
        REQUIRE(posted.open_journal(path));
        CHECK(posted.remember("first", repeatability("rep-first")));
        const auto size = std::filesystem::file_size(path);
        {
            testing::FileSizeLimit nearly_full(size + 10);  // part of the next line fits
            CHECK_FALSE(posted.remember("refused", repeatability("rep-refused")));
        }
        CHECK(std::filesystem::file_size(path) == size);
        CHECK(posted.remember("second", repeatability("rep-second")));
    }
    PostedRequests after;
    auto summary = after.open_journal(path);
    REQUIRE(summary);
    CHECK(summary->unreadable == 0);
    CHECK(after.maybe_posted("first"));
    CHECK(after.maybe_posted("second"));
    CHECK_FALSE(after.maybe_posted("refused"));
}

TEST_CASE("posted requests: a journal that cannot be opened keeps neither the lock nor records") {
    TempDir dir;
    const std::string path = (dir.path() / "journal").string();
    std::filesystem::create_directory(path);  // a directory where the journal should be
    PostedRequests posted;
    auto refused = posted.open_journal(path);
    REQUIRE_FALSE(refused);
    CHECK(refused.error().message.find("another paas-milter") == std::string::npos);
    std::filesystem::remove(path);
    // Fixed by the operator: the next attempt (a reload) works.
    REQUIRE(posted.open_journal(path));
}

TEST_CASE("posted requests: one process at a time uses a journal") {
    TempDir dir;
    const std::string path = (dir.path() / "journal").string();
    PostedRequests first;
    REQUIRE(first.open_journal(path));
    PostedRequests second;
    auto refused = second.open_journal(path);
    REQUIRE_FALSE(refused);
    CHECK(refused.error().message.find("another paas-milter") != std::string::npos);
}

TEST_CASE("posted requests: a journal that cannot be written refuses the request") {
    TempDir dir;
    const std::string path = established_journal(dir);
    PostedRequests posted;
    REQUIRE(posted.open_journal(path));
    {
        testing::FileSizeLimit full_disk(0);  // every write fails, as on a full disk
        auto refused = posted.remember("a", repeatability("rep"));
        REQUIRE_FALSE(refused);
        CHECK(refused.error().message.find("cannot write " + path) == 0);
    }
    CHECK_FALSE(posted.maybe_posted("a"));
    CHECK(posted.remember("b", repeatability("rep")));
    CHECK(posted.maybe_posted("b"));
}

TEST_CASE("posted requests: a state directory that does not exist is a clear error") {
    TempDir dir;
    PostedRequests nowhere;
    auto refused = nowhere.open_journal((dir.path() / "missing" / "journal").string());
    REQUIRE_FALSE(refused);
    CHECK(refused.error().message.find("missing/journal.lock") != std::string::npos);
}

TEST_CASE("posted requests: an accepted request is remembered as such across a restart") {
    TempDir dir;
    const std::string path = (dir.path() / "journal").string();
    {
        PostedRequests before;
        REQUIRE(before.open_journal(path));
        CHECK(before.remember("sent", repeatability("rep")));
        CHECK_FALSE(before.was_accepted("sent"));
        before.set_accepted("sent");
        CHECK(before.was_accepted("sent"));
        CHECK_FALSE(before.uncertain_repeatability("sent"));
    }
    PostedRequests after;
    REQUIRE(after.open_journal(path));
    CHECK(after.was_accepted("sent"));
    CHECK_FALSE(after.was_accepted("unknown"));
}

TEST_CASE("posted requests: concurrent remembers each return once their own line is on disk") {
    TempDir dir;
    const std::string path = established_journal(dir);
    constexpr int threads = 16;
    constexpr int calls = 25;
    std::atomic<int> failures = 0;
    {
        PostedRequests posted;
        REQUIRE(posted.open_journal(path));
        // How much of the file is known to be on disk: what it held when a flush started.
        std::mutex flushed_mutex;
        off_t flushed_size = 0;
        Probe::set_flush(posted, [&](int fd) {
            struct stat before {};
            if (::fstat(fd, &before) != 0) return -1;
            const int result = ::fdatasync(fd);
            std::lock_guard lock(flushed_mutex);
            if (result == 0) flushed_size = std::max(flushed_size, before.st_size);
            return result;
        });
        concurrently(threads, calls, [&](int t, int i) {
            const std::string id = id_of(t, i);
            if (!posted.remember(id, repeatability("rep-" + id))) {
                ++failures;
                return;
            }
            off_t on_disk = 0;
            {
                std::lock_guard lock(flushed_mutex);
                on_disk = flushed_size;
            }
            const std::string text = testing::read_all(path);
            const auto line = text.find("P " + id + " ");
            const auto line_end = text.find('\n', line);
            if (line == std::string::npos || line_end == std::string::npos ||
                static_cast<off_t>(line_end) >= on_disk) {
                ++failures;
            }
            posted.set_uncertain(id, i % 2 == 0);
        });
    }
    CHECK(failures == 0);
    // Appended in the order each thread made its calls, a request's fate after its P line.
    const std::string text = testing::read_all(path);
    for (int t = 0; t < threads; ++t) {
        size_t previous = 0;
        for (int i = 0; i < calls; ++i) {
            const std::string id = id_of(t, i);
            const auto posted_at = text.find("P " + id + " ");
            const auto fate_at = text.find(fmt::format("{} {}\n", i % 2 == 0 ? 'U' : 'S', id));
            REQUIRE(posted_at != std::string::npos);
            REQUIRE(fate_at != std::string::npos);
            CHECK(posted_at >= previous);
            CHECK(fate_at > posted_at);
            previous = posted_at;
        }
    }
    PostedRequests after;
    auto summary = after.open_journal(path);
    REQUIRE(summary);
    CHECK(summary->requests == threads * calls);
    CHECK(summary->left_open == threads * calls / 2 + threads / 2);
    CHECK(summary->unreadable == 0);
    for (int t = 0; t < threads; ++t) {
        for (int i = 0; i < calls; ++i) {
            const std::string id = id_of(t, i);
            CHECK(after.maybe_posted(id));
            if (i % 2 == 0) {
                REQUIRE(after.uncertain_repeatability(id));
                CHECK(after.uncertain_repeatability(id)->request_id == "rep-" + id);
            } else {
                CHECK_FALSE(after.uncertain_repeatability(id));
            }
        }
    }
}

TEST_CASE("posted requests: one flush serves the remembers that wait for it together") {
    TempDir dir;
    const std::string path = (dir.path() / "journal").string();
    constexpr int threads = 16;
    constexpr int calls = 20;
    PostedRequests posted;
    REQUIRE(posted.open_journal(path));
    // A disk this slow makes the others' lines pile up behind every flush.
    Probe::set_flush(posted, [](int fd) {
        std::this_thread::sleep_for(2ms);
        return ::fdatasync(fd);
    });
    std::atomic<int> failures = 0;
    concurrently(threads, calls, [&](int t, int i) {
        if (!posted.remember(id_of(t, i), repeatability("rep"))) ++failures;
    });
    CHECK(failures == 0);
    const size_t flushes = Probe::flushes(posted);
    CHECK(flushes > 0);
    CHECK(flushes < threads * calls / 2);
}

TEST_CASE("posted requests: lines that need no flush do not wait for one in progress") {
    TempDir dir;
    const std::string path = (dir.path() / "journal").string();
    PostedRequests posted;
    REQUIRE(posted.open_journal(path));
    REQUIRE(posted.remember("settling", repeatability("rep-settling")));
    const size_t flushes_before = Probe::flushes(posted);
    std::atomic<bool> flushing = false;
    std::atomic<bool> release = false;
    Probe::set_flush(posted, [&](int fd) {
        flushing = true;
        // Bounded: if the test is wrong, it fails instead of hanging.
        for (int i = 0; i < 1000 && !release; ++i) std::this_thread::sleep_for(10ms);
        flushing = false;
        return ::fdatasync(fd);
    });
    std::thread leader([&] { CHECK(posted.remember("slow", repeatability("rep-slow"))); });
    for (int i = 0; i < 10'000 && !flushing; ++i) std::this_thread::sleep_for(1ms);
    CHECK(flushing);
    posted.set_uncertain("settling", true);
    posted.set_accepted("settling");
    CHECK(posted.maybe_posted("slow"));
    CHECK(flushing);  // all of that while the flush went on
    // A remember written during the flush waits for the next one.
    std::thread follower([&] { CHECK(posted.remember("next", repeatability("rep-next"))); });
    std::this_thread::sleep_for(20ms);
    release = true;
    leader.join();
    follower.join();
    CHECK(Probe::flushes(posted) - flushes_before == 2);
    CHECK(testing::read_all(path).find("A settling\n") != std::string::npos);
}

TEST_CASE("posted requests: after a failed flush no request goes out until a rewrite works") {
    TempDir dir;
    const std::string path = established_journal(dir);
    {
        PostedRequests posted;
        REQUIRE(posted.open_journal(path));
        REQUIRE(posted.remember("before", repeatability("rep-before")));
        Probe::set_flush(posted, [](int) {
            errno = EIO;
            return -1;
        });
        auto failed = posted.remember("a", repeatability("rep-a"));
        REQUIRE_FALSE(failed);
        CHECK(failed.error().message == "cannot flush " + path + ": " + std::strerror(EIO));
        CHECK_FALSE(posted.maybe_posted("a"));
        // The disk works again, but the file may have lost what the failed flush did not
        // write: only a new file from the records in memory can be trusted. Here that fails.
        Probe::set_flush(posted, ::fdatasync);
        std::filesystem::create_directory(path + ".new");
        auto still = posted.remember("b", repeatability("rep-b"));
        REQUIRE_FALSE(still);
        CHECK(still.error().message.find("cannot flush " + path) == 0);
        CHECK(still.error().message.find("cannot rewrite it: cannot create " + path + ".new") !=
              std::string::npos);
        CHECK_FALSE(posted.maybe_posted("b"));
        CHECK(testing::read_all(path).find("P b ") == std::string::npos);  // never written
        posted.set_uncertain("before", false);  // appended as usual: not needed on disk
        std::filesystem::remove(path + ".new");
        CHECK(posted.remember("c", repeatability("rep-c")));
        CHECK(posted.remember("d", repeatability("rep-d")));
    }
    PostedRequests after;
    auto summary = after.open_journal(path);
    REQUIRE(summary);
    CHECK(summary->requests == 3);
    CHECK(after.maybe_posted("before"));
    CHECK_FALSE(after.uncertain_repeatability("before"));
    CHECK(after.maybe_posted("c"));
    CHECK(after.maybe_posted("d"));
    CHECK_FALSE(after.maybe_posted("b"));
}

TEST_CASE("posted requests: a failed flush fails every remember waiting for it") {
    TempDir dir;
    const std::string path = established_journal(dir);
    constexpr int threads = 8;
    {
        PostedRequests posted;
        REQUIRE(posted.open_journal(path));
        // Fails once every thread's line is in the file, so that all of them wait for it.
        std::atomic<int> calls = 0;
        Probe::set_flush(posted, [&](int fd) {
            if (calls++ > 0) return ::fdatasync(fd);
            for (int i = 0; i < 1000; ++i) {
                const std::string text = testing::read_all(path);
                if (std::count(text.begin(), text.end(), '\n') >= threads) break;
                std::this_thread::sleep_for(5ms);
            }
            errno = EIO;
            return -1;
        });
        std::atomic<int> failures = 0;
        concurrently(threads, 1, [&](int t, int i) {
            if (!posted.remember(id_of(t, i), repeatability("rep"))) ++failures;
        });
        CHECK(failures == threads);
        CHECK(calls == 1);
        for (int t = 0; t < threads; ++t) CHECK_FALSE(posted.maybe_posted(id_of(t, 0)));
        CHECK(posted.remember("later", repeatability("rep-later")));  // rewritten first
    }
    PostedRequests after;
    auto summary = after.open_journal(path);
    REQUIRE(summary);
    CHECK(summary->requests == 1);
    CHECK(after.maybe_posted("later"));
}

TEST_CASE("posted requests: a rewrite while remembers wait for flushes loses nothing") {
    TempDir dir;
    const std::string path = established_journal(dir);
    constexpr int threads = 8;
    constexpr int calls = 50;
    std::atomic<int> failures = 0;
    {
        // Rewritten whenever as many lines as live records were appended.
        PostedRequests busy(100'000, std::chrono::hours(24), 0);
        REQUIRE(busy.open_journal(path));
        struct stat opened {};
        REQUIRE(::stat(path.c_str(), &opened) == 0);
        std::atomic<int> flushes_of_a_rewritten_file = 0;
        Probe::set_flush(busy, [&](int fd) {
            struct stat flushed {};
            if (::fstat(fd, &flushed) == 0 && flushed.st_ino != opened.st_ino) {
                ++flushes_of_a_rewritten_file;
            }
            std::this_thread::sleep_for(1ms);
            return ::fdatasync(fd);
        });
        concurrently(threads, calls, [&](int t, int i) {
            const std::string id = id_of(t, i);
            if (!busy.remember(id, repeatability("rep-" + id))) {
                ++failures;
                return;
            }
            if (i % 3 == 0) {
                busy.set_accepted(id);
            } else {
                busy.set_uncertain(id, i % 3 == 1);
            }
        });
        CHECK(flushes_of_a_rewritten_file > 0);
        // The last requests of each thread are still going out when the process dies.
        concurrently(threads, 1, [&](int t, int) {
            if (!busy.remember(id_of(t, calls), repeatability("rep-last"))) ++failures;
        });
    }
    CHECK(failures == 0);
    PostedRequests after;
    auto summary = after.open_journal(path);
    REQUIRE(summary);
    CHECK(summary->requests == threads * (calls + 1));
    CHECK(summary->unreadable == 0);
    for (int t = 0; t < threads; ++t) {
        for (int i = 0; i < calls; ++i) {
            const std::string id = id_of(t, i);
            CHECK(after.was_accepted(id) == (i % 3 == 0));
            CHECK(static_cast<bool>(after.uncertain_repeatability(id)) == (i % 3 == 1));
        }
        REQUIRE(after.uncertain_repeatability(id_of(t, calls)));
        CHECK(after.uncertain_repeatability(id_of(t, calls))->request_id == "rep-last");
    }
}
