#include "paasmilter/api_delivery.hpp"
#include "paasmilter/text.hpp"

#include <algorithm>
#include <ctime>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "paasmilter/acs_auth.hpp"
#include "paasmilter/acs_json.hpp"
#include "paasmilter/crypto.hpp"

namespace paasmilter {

const char* to_string(ApiOutcome::Kind kind) {
    switch (kind) {
        case ApiOutcome::Kind::accepted:
            return "accepted";
        case ApiOutcome::Kind::transient:
            return "transient-failure";
        case ApiOutcome::Kind::permanent:
            return "permanent-failure";
        case ApiOutcome::Kind::oversize:
            return "oversize";
    }
    return "?";
}

ApiHooks default_api_hooks(const ApiSettings& api) {
    ApiHooks hooks;
    auto http = api.http;
    hooks.send = [http](const HttpRequest& request, std::chrono::milliseconds timeout) {
        return http->send(request, timeout);
    };
    hooks.sleep = [](std::chrono::milliseconds how_long) { std::this_thread::sleep_for(how_long); };
    hooks.now = [] { return std::chrono::system_clock::now(); };
    hooks.progress = [] {};
    return hooks;
}

std::vector<EmailMessage> split_recipients(const EmailMessage& message, size_t limit) {
    if (message.recipient_count() <= limit) return {message};
    std::vector<EmailMessage> chunks;
    EmailMessage current = message;
    current.to.clear();
    current.cc.clear();
    current.bcc.clear();
    auto flush = [&] {
        chunks.push_back(current);
        current.to.clear();
        current.cc.clear();
        current.bcc.clear();
    };
    for (auto [list, target] :
         {std::pair{&message.to, &EmailMessage::to}, std::pair{&message.cc, &EmailMessage::cc},
          std::pair{&message.bcc, &EmailMessage::bcc}}) {
        for (const auto& address : *list) {
            if (current.recipient_count() == limit) flush();
            (current.*target).push_back(address);
        }
    }
    if (current.recipient_count() > 0) flush();
    return chunks;
}

std::string operation_id(const std::string& idempotency_key, size_t index, size_t count) {
    // A fixed namespace for paas-milter operation ids (itself a v5 UUID of the URL namespace).
    static constexpr const char* kNamespace = "7b0a8d0e-1c5e-5b7a-9a46-5f1c0c7e4d21";
    auto id = uuid_v5(kNamespace, fmt::format("{}#{}/{}", idempotency_key, index, count));
    return id ? *id : std::string();  // only fails for an invalid namespace, ours is fixed
}

std::optional<std::chrono::seconds> parse_retry_after(const std::string& value,
                                                      std::chrono::system_clock::time_point now) {
    if (value.empty()) return std::nullopt;
    if (std::all_of(value.begin(), value.end(), [](char c) { return c >= '0' && c <= '9'; })) {
        if (value.size() > 6) return std::chrono::seconds(999999);
        return std::chrono::seconds(std::stol(value));
    }
    std::tm tm{};
    if (!strptime(value.c_str(), "%a, %d %b %Y %H:%M:%S GMT", &tm)) return std::nullopt;
    auto when = std::chrono::system_clock::from_time_t(timegm(&tm));
    auto delta = std::chrono::duration_cast<std::chrono::seconds>(when - now);
    return std::max(delta, std::chrono::seconds(0));
}

namespace {

// "HTTP 400 InvalidSenderUserName: ..." from ACS's error body {"error":{"code","message"}}.
std::string describe_failure(const HttpResponse& response) {
    std::string text = fmt::format("HTTP {}", response.status);
    auto body = nlohmann::json::parse(response.body, nullptr, false);
    if (body.is_object() && body.contains("error") && body["error"].is_object()) {
        const auto& error = body["error"];
        if (error.contains("code") && error["code"].is_string()) {
            text += " " + error["code"].get<std::string>();
        }
        if (error.contains("message") && error["message"].is_string()) {
            std::string message = error["message"].get<std::string>();
            if (message.size() > 300) message = message.substr(0, 300) + "...";
            text += ": " + message;
        }
    }
    return text;
}

std::vector<std::string> addresses_of(const EmailMessage& message) {
    std::vector<std::string> out;
    for (const auto* list : {&message.to, &message.cc, &message.bcc}) {
        for (const auto& address : *list) out.push_back(address.address);
    }
    return out;
}

using Clock = std::chrono::system_clock;

// One request of the message, retried within the deadline.
struct ChunkResult {
    ApiOutcome::Kind kind;
    std::string detail;
    std::string operation_id;
};

ChunkResult submit_chunk(const ApiSettings& api, const std::string& body, const std::string& op_id,
                         Clock::time_point deadline, const ApiHooks& hooks, int& requests) {
    using namespace std::chrono;
    std::string url = fmt::format("{}/emails:send?api-version={}", api.endpoint, api.api_version);
    std::string last_failure = "no attempt made";
    milliseconds backoff{1000};
    for (int attempt = 1; attempt <= api.max_attempts; ++attempt) {
        auto now = hooks.now();
        if (now >= deadline) break;
        auto remaining = duration_cast<milliseconds>(deadline - now);
        auto request_id = uuid_v4();
        HttpRequest request;
        request.method = "POST";
        request.url = url;
        request.body = body;
        request.headers = {{"Content-Type", "application/json"},
                           {"Operation-Id", op_id},
                           {"x-ms-client-request-id", request_id ? *request_id : std::string()}};
        if (api.entra) {
            auto token = api.entra->token(
                std::min(remaining, duration_cast<milliseconds>(api.request_timeout)));
            if (!token) {
                // No token is a configuration or identity-platform problem: retry later.
                return {ApiOutcome::Kind::transient, "Entra ID token: " + token.error().message,
                        op_id};
            }
            request.headers.emplace_back("Authorization", "Bearer " + *token);
        } else {
            auto signature =
                sign_acs_request(request.method, request.url, request.body, api.access_key, now);
            if (!signature) {
                return {ApiOutcome::Kind::transient, "signing: " + signature.error().message,
                        op_id};
            }
            request.headers.insert(request.headers.end(), signature->begin(), signature->end());
        }
        ++requests;
        auto response = hooks.send(
            request, std::min(remaining, duration_cast<milliseconds>(api.request_timeout)));
        hooks.progress();
        milliseconds wait = backoff;
        if (!response) {
            last_failure = response.error().message;
        } else if (response->status == 202) {
            return {ApiOutcome::Kind::accepted, "HTTP 202", op_id};
        } else if (response->status == 413) {
            return {ApiOutcome::Kind::oversize, describe_failure(*response), op_id};
        } else if (response->status == 429) {
            last_failure = describe_failure(*response);
            auto retry_after =
                parse_retry_after(response->header("Retry-After").value_or(""), hooks.now());
            wait = retry_after ? duration_cast<milliseconds>(*retry_after) : backoff;
        } else if (response->status == 401 || response->status == 403) {
            // The key or the app's role is wrong: not the message's fault, so never a bounce;
            // retrying now will not help either.
            return {ApiOutcome::Kind::transient, describe_failure(*response), op_id};
        } else if (response->status >= 500 || response->status == 408) {
            last_failure = describe_failure(*response);
        } else {
            return {ApiOutcome::Kind::permanent, describe_failure(*response), op_id};
        }
        if (attempt == api.max_attempts) break;
        if (hooks.now() + wait >= deadline) {
            last_failure += fmt::format(" (retry in {} s would exceed the time budget)",
                                        duration_cast<seconds>(wait).count());
            break;
        }
        // Sleep in slices so the MTA hears from us (smfi_progress) while we wait.
        for (milliseconds left = wait; left.count() > 0;) {
            milliseconds slice = std::min(left, milliseconds(5000));
            hooks.sleep(slice);
            hooks.progress();
            left -= slice;
        }
        backoff = std::min(backoff * 2, milliseconds(16000));
    }
    return {ApiOutcome::Kind::transient, last_failure, op_id};
}

}  // namespace

ApiOutcome submit_to_acs(const ApiSettings& api, const EmailMessage& message,
                         const std::string& idempotency_key, const ApiHooks& hooks) {
    ApiOutcome outcome;
    auto deadline = hooks.now() + api.time_budget;
    auto chunks = split_recipients(message, api.max_recipients_per_request);
    // Render and size-check every request before sending any, so an oversize message is
    // refused whole instead of half-delivered.
    std::vector<std::string> bodies;
    for (const auto& chunk : chunks) {
        bodies.push_back(to_acs_json(chunk));
        if (bodies.back().size() > api.max_request_bytes) {
            outcome.kind = ApiOutcome::Kind::oversize;
            outcome.detail = fmt::format("request of {} bytes exceeds max_request_bytes {}",
                                         bodies.back().size(), api.max_request_bytes);
            return outcome;
        }
    }
    for (size_t i = 0; i < chunks.size(); ++i) {
        std::string op_id = operation_id(idempotency_key, i, chunks.size());
        ChunkResult result = submit_chunk(api, bodies[i], op_id, deadline, hooks, outcome.requests);
        if (result.kind != ApiOutcome::Kind::accepted) {
            outcome.kind = result.kind;
            outcome.detail = chunks.size() > 1 ? fmt::format("request {}/{}: {}", i + 1,
                                                             chunks.size(), result.detail)
                                               : result.detail;
            return outcome;
        }
        outcome.operation_ids.push_back(result.operation_id);
        auto accepted = addresses_of(chunks[i]);
        outcome.accepted_recipients.insert(outcome.accepted_recipients.end(), accepted.begin(),
                                           accepted.end());
    }
    outcome.kind = ApiOutcome::Kind::accepted;
    outcome.detail = fmt::format("HTTP 202 x{}", chunks.size());
    return outcome;
}

bool address_in_domains(std::string_view address, const std::vector<std::string>& domains) {
    auto at = address.rfind('@');
    if (at == std::string_view::npos) return false;
    std::string_view domain = address.substr(at + 1);
    return std::any_of(domains.begin(), domains.end(),
                       [&](const std::string& d) { return iequals(d, domain); });
}

std::string idempotency_key(const Transaction& tx, std::vector<std::string> api_recipients) {
    auto header = [&](std::string_view name) -> std::string {
        for (const auto& h : tx.headers) {
            if (iequals(h.name, name)) {
                return h.value;
            }
        }
        return {};
    };
    std::string id = header("Message-ID");
    if (id.empty()) {
        id = fmt::format("date={}|subject={}|from={}", header("Date"), header("Subject"),
                         header("From"));
    }
    std::sort(api_recipients.begin(), api_recipients.end());
    std::string key = fmt::format("{}|{}", id, tx.sender);
    for (const auto& r : api_recipients) key += "|" + r;
    return key;
}

std::string header_block(const std::vector<HeaderField>& headers) {
    std::string out;
    for (const auto& h : headers) {
        out += h.name;
        out += ": ";
        // Folded values arrive with bare LF (or CRLF); normalise to CRLF.
        for (size_t i = 0; i < h.value.size(); ++i) {
            char c = h.value[i];
            if (c == '\r') continue;
            if (c == '\n') {
                out += "\r\n";
                continue;
            }
            out += c;
        }
        out += "\r\n";
    }
    out += "\r\n";
    return out;
}

}  // namespace paasmilter
