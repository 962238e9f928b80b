#include <doctest/doctest.h>

#include <filesystem>
#include <string>

#include "paasmilter/mime_convert.hpp"
#include "paasmilter/spool.hpp"
#include "temp_dir.hpp"

using namespace paasmilter;

namespace {

const std::string kMessage =
    "From: app@contoso.com\nTo: a@example.net\nSubject: spooled\nMIME-Version: 1.0\n"
    "Content-Type: text/plain\n\nline one\n";

ConversionOptions options() {
    ConversionOptions o;
    o.sender = "DoNotReply@contoso.azurecomm.net";
    o.verified_domains = {"contoso.com"};
    return o;
}

}  // namespace

TEST_CASE("spool: a spilled spool leaves no file in its directory and still converts") {
    paasmilter::testing::TempDir dir;
    const Envelope envelope{"", {"a@example.net"}};
    MessageSpool spool(16, dir.path().string(), 1 << 20);
    REQUIRE(spool.append(kMessage).ok());
    REQUIRE_FALSE(spool.in_memory());
    REQUIRE(spool.fd() >= 0);
    // Nothing to outlive a crash: the file has no name from the moment it exists.
    CHECK(std::filesystem::is_empty(dir.path()));

    auto converted = convert_message_fd(spool.fd(), envelope, options());
    REQUIRE(converted.ok());
    CHECK(converted->subject == "spooled");
    CHECK(converted->plain_text == "line one\n");

    // The conversion moved the shared file offset: appends still go to the end, and a second
    // conversion reads from the start again.
    REQUIRE(spool.append("line two\n").ok());
    converted = convert_message_fd(spool.fd(), envelope, options());
    REQUIRE(converted.ok());
    CHECK(converted->plain_text == "line one\nline two\n");
    CHECK(spool.size() == kMessage.size() + 9);

    // path() still opens it (what older callers use).
    converted = convert_message_file(spool.path(), envelope, options());
    REQUIRE(converted.ok());
    CHECK(converted->plain_text == "line one\nline two\n");
    CHECK(std::filesystem::is_empty(dir.path()));
}

TEST_CASE("spool: a spool in memory has no file descriptor") {
    paasmilter::testing::TempDir dir;
    MessageSpool spool(1 << 20, dir.path().string(), 1 << 20);
    REQUIRE(spool.append(kMessage).ok());
    CHECK(spool.in_memory());
    CHECK(spool.fd() < 0);
    CHECK(std::filesystem::is_empty(dir.path()));
}
