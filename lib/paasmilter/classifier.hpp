// Classification: which rule, and so which route, a transaction takes. Pure function of an
// immutable Config and the facts the MTA told us, so it is the same in the daemon, in
// `paas-milter query` and in the tests.
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "paasmilter/config.hpp"

namespace paasmilter {

struct HeaderField {
    std::string name;
    std::string value;
};

// What the MTA told us about one message. Certificate facts are only filled in for a
// certificate the MTA verified (Postfix sends them only then; with Sendmail, {verify}=OK).
struct Transaction {
    std::string client_addr;  // textual IP; empty for a non-IP (unix socket) client
    std::string client_name;
    std::string cert_subject;
    std::string cert_issuer;
    std::string cert_fingerprint;
    std::string auth_user;
    std::string sender;  // without angle brackets; empty for the null sender
    std::vector<std::string> recipients;
    std::vector<HeaderField> headers;
};

// One condition that held, and why.
struct ConditionHit {
    Field field;
    std::string key;     // the value that was looked up
    std::string source;  // table that matched ("cidr:/etc/..." or "inline:...")
    std::string where;   // entry that matched ("file:line")
    std::string result;  // its right-hand side ("" for inline entries)
};

struct Decision {
    const Rule* rule = nullptr;    // null: no rule matched
    const Route* route = nullptr;  // null: no route, the message is left alone
    bool default_route = false;    // route came from milter.default_route
    std::vector<ConditionHit> hits;
};

Decision classify(const Config& config, const Transaction& transaction);

// The sender a route's sender_map gives this client, and the entry that gave it; nullopt when
// no table knows the client.
struct SenderChoice {
    std::string address;
    ConditionHit hit;
};
std::optional<SenderChoice> map_sender(const SenderMap& map, const Transaction& transaction);

// "printer-42" from "/C=US/O=Contoso/CN=printer-42" (Sendmail's DN form); empty if none.
std::string common_name_from_dn(std::string_view dn);

// Strips one pair of angle brackets and surrounding blanks: "<a@b>" -> "a@b", "<>" -> "".
std::string strip_angle_brackets(std::string_view address);

}  // namespace paasmilter
