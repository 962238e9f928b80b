// The record of posted API requests, and its journal that survives a restart.
#include <doctest/doctest.h>
#include <sys/stat.h>

#include <chrono>
#include <filesystem>
#include <fstream>

#include <fmt/format.h>

#include "paasmilter/delivery/posted_requests.hpp"
#include "temp_dir.hpp"
#include "test_support.hpp"

using namespace paasmilter;
using namespace std::chrono_literals;
using testing::TempDir;

namespace {

PostedRequests::Repeatability repeatability(const std::string& id) {
    return {id, std::chrono::system_clock::now() - 10s};
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

TEST_CASE("posted requests: the journal survives a restart") {
    TempDir dir;
    const std::string path = (dir.path() / "posted-requests.journal").string();
    const auto open = repeatability("rep-open");
    {
        PostedRequests before;
        auto summary = before.open_journal(path);
        REQUIRE(summary);
        CHECK(summary->requests == 0);
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
    CHECK(testing::read_all(path) == fmt::format("P new {} - {}\nS new\n", now_ms, now_ms));
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
    const std::string path =
        dir.write("journal", fmt::format("D {}\nP kept {} - {}\nS kept\n",
                                         now_ms - 2 * 3600'000, now_ms, now_ms));
    PostedRequests posted(10, std::chrono::hours(1));
    REQUIRE(posted.open_journal(path));
    CHECK(posted.maybe_posted("kept"));
    CHECK_FALSE(posted.maybe_posted("unknown"));
    CHECK(testing::read_all(path).find("D ") == std::string::npos);
}

TEST_CASE("posted requests: a rewrite keeps a request in flight open and keeps the one being "
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
    const std::string path = (dir.path() / "journal").string();
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
    const std::string path = (dir.path() / "journal").string();
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
