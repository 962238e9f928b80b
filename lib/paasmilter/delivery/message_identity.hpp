// What makes two SMTP transactions "the same message" for the API route, so that a client
// retrying after a tempfail gets the same request ids and any other message gets different
// ones: the content as the client sent it (header fields minus the trace fields the gateway
// or Postfix add per attempt, and the body), the envelope sender and each request's own
// recipients. Nothing here depends on Message-ID or Date being present.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "paasmilter/crypto.hpp"
#include "paasmilter/result.hpp"

namespace paasmilter {

// Header fields left out of the digest: they differ between two attempts of the same message
// (Postfix's Received carries the queue id; authentication results and delivery traces are
// added per attempt by the MTA or other milters). `extra` are more names to skip, such as the
// milter's own routing header.
bool is_per_attempt_header(std::string_view name, const std::vector<std::string>& extra = {});

// A SHA-256 over the header fields (in order, trace fields skipped) and the body bytes, fed
// as the MTA hands them over. Fields are length-framed so that no two different messages
// hash the same input.
//
// Postfix's cleanup adds a missing Message-Id ("<YYYYMMDDhhmmss.QUEUEID@myhostname>") and,
// right after it, a missing Date when the client is in local_header_rewrite_clients (or
// always_add_missing_headers = yes): new values on every attempt. Given the transaction's
// queue id, such a Message-Id and the Date that follows it are left out too.
class ContentDigest {
  public:
    explicit ContentDigest(std::vector<std::string> skip_headers = {}, std::string queue_id = {});

    void add_header(std::string_view name, std::string_view value);
    void add_body(std::string_view data);
    // Lowercase hex of the digest; the object is spent afterwards.
    Result<std::string> finish();

  private:
    std::vector<std::string> skip_headers_;
    std::string generated_id_marker_;  // ".QUEUEID@" in a Message-Id Postfix made
    bool after_generated_id_ = false;
    Sha256 sha_;
    bool in_body_ = false;
};

// The Operation-Id of one request: a UUIDv5 of the content digest, the envelope sender and
// the request's own recipients (order-insensitive). The same message to the same recipients
// gets the same id on every attempt; anything else gets another.
std::string request_operation_id(std::string_view content_digest, std::string_view sender,
                                 std::vector<std::string> recipients);

}  // namespace paasmilter
