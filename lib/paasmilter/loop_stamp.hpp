// Loop protection: the stamp header every message the gateway routes carries, and the count
// of the stamps a message arrives with. A stamp names the gateway, the route and the hop, and
// is signed (HMAC-SHA256) with a secret the gateways of one fleet share, over those fields and
// the message's Message-ID: a stamp that does not verify comes from an unknown party (or
// belongs to another message) and never counts.
//
//   X-PaaS-Milter-Loop: gw=gw1; route=acs-smtp; hop=1; sig=<base64url HMAC-SHA256>
//
// A stamp is a function of its message (no clock): a client's retry of the same message gets
// the same stamp, so an API request carrying it is byte for byte the same request (ACS's
// repeatable requests refuse the same request id with another body). Its hop (the valid stamps
// the message arrived with, plus one) keeps the stamps of two passes through one gateway and
// route apart. One header field holds one stamp, or several separated by ',' (ACS takes one
// value per custom header name, so an API submission folds them into one field).
//
// Pure: no I/O, no clock, nothing from libmilter; key material never reaches an error text.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "paasmilter/result.hpp"

namespace paasmilter {

inline constexpr std::string_view kLoopHeader = "X-PaaS-Milter-Loop";

// What happens to a message that arrives with max_hops valid stamps, instead of its route.
enum class LoopAction {
    pass,      // Postfix's normal path, without any route
    reject,    // 550 5.4.6 to the client
    tempfail,  // 451 4.4.6 to the client
    hold,      // Postfix's hold queue (smfi_quarantine)
};
const char* to_string(LoopAction action);

// [loop] in the configuration.
struct LoopSettings {
    std::string secret;      // the fleet's HMAC key, from secret_file; never logged
    std::string gateway_id;  // this gateway in its stamps (default: the host name)
    int max_hops = 1;        // valid stamps at which a message is no longer routed
    LoopAction on_loop = LoopAction::hold;
};

struct LoopStamp {
    std::string gateway;
    std::string route;
    int hop = 0;
    std::string signature;  // base64url without padding, 43 characters
};

// Gateway ids and route names in a stamp: 1-255 letters, digits, '.', '_', '-' (route names
// have no other limit; [loop] gateway_id keeps to 64).
bool valid_loop_name(std::string_view name);

// "gw=gw1; route=acs-smtp; hop=1; sig=..."
std::string format_loop_stamp(const LoopStamp& stamp);

// The stamps of one header field value (folding and surrounding white space allowed); nullopt
// when any part of it is not a well-formed stamp.
std::optional<std::vector<LoopStamp>> parse_loop_field(std::string_view value);

// The Message-ID as a stamp binds it: every white space character (folding) removed.
std::string loop_message_id(std::string_view raw_message_id);

// This gateway's stamp for a message of `route` that arrived with `hop - 1` valid stamps.
// `message_id` as loop_message_id() made it.
Result<LoopStamp> sign_loop_stamp(const LoopSettings& settings, std::string_view route, int hop,
                                  std::string_view message_id);

// Whether `stamp` was signed with the fleet's secret for the message `message_id`
// (constant-time comparison).
bool verify_loop_stamp(const LoopSettings& settings, const LoopStamp& stamp,
                       std::string_view message_id);

// The stamp fields a message arrived with, judged.
struct LoopCheck {
    std::string message_id;        // loop_message_id() of the first Message-ID ("" without)
    std::vector<LoopStamp> valid;  // the distinct valid stamps, in order of appearance
    // The fields whose every stamp verifies (kept in the MTA's copy), in canonical form
    // (format_loop_stamp, several joined by ", "): what an API submission carries on.
    std::vector<std::string> kept_fields;
    // 1-based indexes, among the stamp fields, of those holding anything that does not verify:
    // from an unknown party, removed like a forged routing header. Last first, so deleting
    // them in this order leaves the indexes of the others in place.
    std::vector<int> forged_fields;
};

// At most this many stamp fields are judged; the MTA's later ones count as forged.
inline constexpr size_t kMaxLoopFields = 64;
// A longer field counts as forged without being read.
inline constexpr size_t kMaxLoopFieldBytes = 4096;

// `fields`: each stamp header field of the message as the MTA passed it, in order; nullopt
// for one the glue did not keep (past kMaxLoopFields or kMaxLoopFieldBytes): forged.
// `raw_message_id`: the value of the message's first Message-ID field ("" without one).
LoopCheck check_loop_stamps(const LoopSettings& settings,
                            const std::vector<std::optional<std::string>>& fields,
                            std::string_view raw_message_id);

// "gw1/acs-smtp, gw2/acs-smtp": the valid stamps for a log line.
std::string describe_loop_stamps(const std::vector<LoopStamp>& stamps);

}  // namespace paasmilter
