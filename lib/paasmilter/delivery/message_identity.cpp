#include "paasmilter/delivery/message_identity.hpp"

#include <algorithm>
#include <array>

#include <fmt/format.h>

#include "paasmilter/text.hpp"

namespace paasmilter {

namespace {

// RFC 5321 section 4.4 trace fields, the delivery-time fields Postfix adds (local(8)), and
// the per-attempt results other filters add (RFC 8601, RFC 7208, RFC 8617).
constexpr std::array<std::string_view, 9> kPerAttemptHeaders = {
    "Received",
    "Return-Path",
    "Delivered-To",
    "X-Original-To",
    "Authentication-Results",
    "Received-SPF",
    "ARC-Seal",
    "ARC-Message-Signature",
    "ARC-Authentication-Results",
};

void frame(Sha256& sha, char tag, std::string_view data) {
    sha.update(fmt::format("{}{}:", tag, data.size()));
    sha.update(data);
}

}  // namespace

bool is_per_attempt_header(std::string_view name, const std::vector<std::string>& extra) {
    auto same = [&](std::string_view other) { return iequals(name, other); };
    return std::any_of(kPerAttemptHeaders.begin(), kPerAttemptHeaders.end(), same) ||
           std::any_of(extra.begin(), extra.end(), same);
}

ContentDigest::ContentDigest(std::vector<std::string> skip_headers, std::string queue_id)
    : skip_headers_(std::move(skip_headers)),
      generated_id_marker_(queue_id.empty() ? std::string() : "." + queue_id + "@") {}

void ContentDigest::add_header(std::string_view name, std::string_view value) {
    if (is_per_attempt_header(name, skip_headers_)) return;
    // Postfix cleanup's own Message-Id (and the Date it adds right after it): see the header.
    if (!generated_id_marker_.empty() && iequals(name, "Message-Id") &&
        value.find(generated_id_marker_) != std::string_view::npos) {
        after_generated_id_ = true;
        return;
    }
    bool generated_date = after_generated_id_ && iequals(name, "Date");
    after_generated_id_ = false;
    if (generated_date) return;
    std::string lower(name);
    std::transform(lower.begin(), lower.end(), lower.begin(), ascii_lower);
    frame(sha_, 'N', lower);
    // The MTA may hand folded values over with LF or CRLF: hash them the same way.
    std::string unfolded;
    unfolded.reserve(value.size());
    for (char c : value) {
        if (c != '\r') unfolded += c;
    }
    frame(sha_, 'V', unfolded);
}

void ContentDigest::add_body(std::string_view data) {
    if (!in_body_) {
        sha_.update("B:");
        in_body_ = true;
    }
    sha_.update(data);
}

Result<std::string> ContentDigest::finish() {
    auto raw = sha_.finish();
    if (!raw) return raw.error();
    return hex_encode(*raw);
}

std::string request_operation_id(std::string_view content_digest, std::string_view sender,
                                 std::vector<std::string> recipients) {
    // A fixed namespace for paas-milter request ids (itself a v5 UUID of the URL namespace).
    static constexpr const char* kNamespace = "7b0a8d0e-1c5e-5b7a-9a46-5f1c0c7e4d21";
    std::sort(recipients.begin(), recipients.end());
    std::string name = fmt::format("v2\n{}\n{}", content_digest, sender);
    for (const auto& r : recipients) {
        name += '\n';
        name += r;
    }
    auto id = uuid_v5(kNamespace, name);
    return id ? *id : std::string();  // only fails for an invalid namespace; ours is fixed
}

}  // namespace paasmilter
