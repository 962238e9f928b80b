#include "paasmilter/acs_auth.hpp"
#include "paasmilter/text.hpp"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "paasmilter/crypto.hpp"
#include "paasmilter/log.hpp"
#include "paasmilter/metrics.hpp"

namespace paasmilter {
namespace {

using namespace std::chrono_literals;

std::string_view trim(std::string_view s) {
    const auto space = [](char c) { return std::isspace(static_cast<unsigned char>(c)) != 0; };
    while (!s.empty() && space(s.front())) s.remove_prefix(1);
    while (!s.empty() && space(s.back())) s.remove_suffix(1);
    return s;
}

// The parts of an http(s) URL that request signing needs, taken verbatim from the text so
// they match what goes on the wire.
struct UrlParts {
    std::string host;            // authority as in the Host header: port only when not default
    std::string path_and_query;  // "/" when the URL has no path; no fragment
};

Result<UrlParts> split_url(std::string_view url) {
    std::string_view default_port;
    if (istarts_with(url, "https://")) {
        default_port = "443";
        url.remove_prefix(8);
    } else if (istarts_with(url, "http://")) {
        default_port = "80";
        url.remove_prefix(7);
    } else {
        return make_error("URL is not http(s)");
    }
    const size_t authority_end = std::min(url.find_first_of("/?#"), url.size());
    std::string_view authority = url.substr(0, authority_end);
    std::string_view rest = url.substr(authority_end);
    if (authority.find('@') != std::string_view::npos) return make_error("URL has user info");
    // The port follows the last ':' outside an IPv6 literal's brackets.
    std::string_view host = authority;
    std::string_view port;
    const size_t bracket = authority.rfind(']');
    const size_t colon = authority.rfind(':');
    if (colon != std::string_view::npos && (bracket == std::string_view::npos || colon > bracket)) {
        host = authority.substr(0, colon);
        port = authority.substr(colon + 1);
        if (!std::all_of(port.begin(), port.end(), [](char c) { return c >= '0' && c <= '9'; }))
            return make_error("URL has an invalid port");
    }
    if (host.empty()) return make_error("URL has no host");
    UrlParts parts;
    parts.host = std::string(host);
    if (!port.empty() && port != default_port) parts.host += ":" + std::string(port);
    rest = rest.substr(0, std::min(rest.find('#'), rest.size()));
    parts.path_and_query =
        rest.empty() || rest.front() != '/' ? "/" + std::string(rest) : std::string(rest);
    return parts;
}

// application/x-www-form-urlencoded value: everything but RFC 3986 unreserved characters is
// percent-encoded (a secret may contain '+', '&' or '=').
std::string form_encode(std::string_view value) {
    static constexpr char kHex[] = "0123456789ABCDEF";
    std::string out;
    for (unsigned char c : value) {
        if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
            out += static_cast<char>(c);
        } else {
            out += '%';
            out += kHex[c >> 4];
            out += kHex[c & 15];
        }
    }
    return out;
}

// One line of server-supplied text for an error message: control characters become spaces,
// runs of spaces collapse, the length is capped, and `secret` (if it somehow appears) is
// masked.
std::string one_line(std::string_view text, const std::string& secret, size_t limit = 400) {
    std::string out;
    for (unsigned char c : text) {
        const char ch = (c < 0x20 || c == 0x7f) ? ' ' : static_cast<char>(c);
        if (ch == ' ' && (out.empty() || out.back() == ' ')) continue;
        out += ch;
    }
    while (!out.empty() && out.back() == ' ') out.pop_back();
    if (!secret.empty()) {
        for (size_t at = out.find(secret); at != std::string::npos; at = out.find(secret, at))
            out.replace(at, secret.size(), "***");
    }
    if (out.size() > limit) out = out.substr(0, limit) + "...";
    return out;
}

bool valid_tenant(std::string_view tenant) {
    return !tenant.empty() && std::all_of(tenant.begin(), tenant.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' || c == '_';
    });
}

struct FetchedToken {
    std::string access_token;
    std::chrono::milliseconds lifetime{};
};

Result<std::string> read_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in)
        return make_error("cannot read certificate file: " + std::string(std::strerror(errno)),
                          path);
    std::ostringstream content;
    content << in.rdbuf();
    return content.str();
}

// Why a token request was refused, from the OAuth error body ({"error", "error_description"});
// AADSTS codes are in the description.
std::string describe_token_failure(const HttpResponse& response, const std::string& secret) {
    std::string text = "HTTP " + std::to_string(response.status);
    const auto json = nlohmann::json::parse(response.body, nullptr, false);
    if (json.is_object()) {
        const auto field = [&](const char* name) -> std::string {
            const auto it = json.find(name);
            return it != json.end() && it->is_string() ? it->get<std::string>() : std::string();
        };
        const std::string error = field("error");
        const std::string description = field("error_description");
        if (!error.empty()) text += ": " + one_line(error, secret, 100);
        if (!description.empty()) text += ": " + one_line(description, secret);
    }
    return text;
}

Result<FetchedToken> parse_token_response(const std::string& body) {
    const auto json = nlohmann::json::parse(body, nullptr, false);
    if (!json.is_object()) return make_error("token response is not a JSON object");
    const auto token = json.find("access_token");
    if (token == json.end() || !token->is_string() || token->get<std::string>().empty())
        return make_error("token response has no access_token");
    // Usually a number; some endpoints send it as a string.
    double seconds = -1;
    if (const auto it = json.find("expires_in"); it != json.end()) {
        if (it->is_number()) {
            seconds = it->get<double>();
        } else if (it->is_string()) {
            const std::string text = it->get<std::string>();
            char* end = nullptr;
            seconds = std::strtod(text.c_str(), &end);
            if (text.empty() || *end != '\0') seconds = -1;
        }
    }
    if (!(seconds > 0) || !std::isfinite(seconds) || seconds > 366.0 * 24 * 3600)
        return make_error("token response has no valid expires_in");
    return FetchedToken{token->get<std::string>(),
                        std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000))};
}

Result<FetchedToken> request_token(const EntraCredentials& credentials, HttpClient& http,
                                   std::chrono::milliseconds timeout) {
    if (!istarts_with(credentials.authority, "https://"))
        return make_error("Entra ID authority must be an https:// URL");
    if (!valid_tenant(credentials.tenant_id))
        return make_error(
            "Entra ID tenant id is empty or has characters not allowed in a URL path");
    if (credentials.client_id.empty()) return make_error("Entra ID client id is empty");
    const bool use_secret = !credentials.client_secret.empty();
    const bool use_certificate = !credentials.certificate_file.empty();
    if (use_secret == use_certificate)
        return make_error(
            "Entra ID credentials need exactly one of client_secret, certificate_file");

    const std::string url = entra_token_url(credentials);
    std::string form =
        "grant_type=client_credentials&client_id=" + form_encode(credentials.client_id) +
        "&scope=" + form_encode(credentials.scope);
    if (use_secret) {
        form += "&client_secret=" + form_encode(credentials.client_secret);
    } else {
        // Read at every refresh so that a renewed certificate is picked up without a restart.
        auto pem = read_file(credentials.certificate_file);
        if (!pem) return pem.error();
        auto assertion = make_client_assertion(*pem, credentials.client_id, url,
                                               std::chrono::system_clock::now(),
                                               credentials.assertion_algorithm);
        if (!assertion) {
            return make_error("certificate credentials: " + assertion.error().message,
                              credentials.certificate_file);
        }
        form += "&client_assertion_type=" +
                form_encode("urn:ietf:params:oauth:client-assertion-type:jwt-bearer") +
                "&client_assertion=" + form_encode(*assertion);
    }

    HttpRequest request;
    request.method = "POST";
    request.url = url;
    request.headers = {{"Content-Type", "application/x-www-form-urlencoded"},
                       {"Accept", "application/json"}};
    request.body = std::move(form);
    auto response = http.send(request, timeout);
    if (!response) return make_error("Entra ID token request failed: " + response.error().message);
    if (response->status != 200) {
        return make_error("Entra ID token request refused: " +
                          describe_token_failure(*response, credentials.client_secret));
    }
    auto token = parse_token_response(response->body);
    if (!token) return make_error("Entra ID token request: " + token.error().message);
    return token;
}

}  // namespace

Result<AcsConnectionString> parse_connection_string(std::string_view text) {
    AcsConnectionString result;
    bool have_endpoint = false;
    bool have_key = false;
    size_t index = 0;
    for (size_t start = 0; start <= text.size(); ++index) {
        const size_t end = std::min(text.find(';', start), text.size());
        const std::string_view segment = trim(text.substr(start, end - start));
        start = end + 1;
        if (segment.empty()) continue;
        const size_t equals = segment.find('=');
        // Never quote a segment: a mistyped one may be (part of) the key.
        if (equals == std::string_view::npos)
            return make_error("connection string: part " + std::to_string(index + 1) +
                              " has no '='");
        const std::string name = ascii_lowercase(trim(segment.substr(0, equals)));
        const std::string_view value = trim(segment.substr(equals + 1));
        if (name == "endpoint") {
            if (have_endpoint) return make_error("connection string: endpoint given twice");
            have_endpoint = true;
            std::string_view endpoint = value;
            while (!endpoint.empty() && endpoint.back() == '/') endpoint.remove_suffix(1);
            if (!istarts_with(endpoint, "https://"))
                return make_error("connection string: endpoint must start with https://");
            const std::string_view authority = endpoint.substr(8);
            if (authority.empty() || authority.find_first_of("/?#@ ") != std::string_view::npos)
                return make_error("connection string: endpoint must be https://host[:port]");
            result.endpoint = "https://" + std::string(authority);
        } else if (name == "accesskey") {
            if (have_key) return make_error("connection string: accesskey given twice");
            have_key = true;
            auto decoded = base64_decode(value);
            if (value.empty() || !decoded || decoded->empty())
                return make_error("connection string: accesskey is not valid base64");
            result.access_key = std::string(value);
        }
        // Other keys are ignored, as the Azure SDKs do.
    }
    if (!have_endpoint) return make_error("connection string: no endpoint");
    if (!have_key) return make_error("connection string: no accesskey");
    return result;
}

Result<HttpHeaders> sign_acs_request(std::string_view method, std::string_view url,
                                     const HttpBody& body, std::string_view access_key_base64,
                                     std::chrono::system_clock::time_point now) {
    auto parts = split_url(url);
    if (!parts) return make_error("cannot sign request: " + parts.error().message);
    auto key = base64_decode(access_key_base64);
    if (!key) return make_error("cannot sign request: the access key is not valid base64");
    Sha256 hash;
    for (const HttpBody::Piece& piece : body.pieces()) hash.update(*piece);
    auto body_hash = hash.finish();
    if (!body_hash) return body_hash.error();
    const std::string date = rfc1123_date(now);
    const std::string content_hash = base64_encode(*body_hash);
    std::string verb(method);
    for (char& c : verb) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    const std::string string_to_sign =
        verb + "\n" + parts->path_and_query + "\n" + date + ";" + parts->host + ";" + content_hash;
    auto mac = hmac_sha256(*key, string_to_sign);
    if (!mac) return mac.error();
    return HttpHeaders{
        {"x-ms-date", date},
        {"x-ms-content-sha256", content_hash},
        {"Authorization",
         "HMAC-SHA256 SignedHeaders=x-ms-date;host;x-ms-content-sha256&Signature=" +
             base64_encode(*mac)},
    };
}

std::string rfc1123_date(std::chrono::system_clock::time_point when) {
    // Fixed English names: strftime's %a/%b would follow the locale.
    static constexpr const char* kDays[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static constexpr const char* kMonths[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                              "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    const std::time_t seconds =
        std::chrono::system_clock::to_time_t(std::chrono::floor<std::chrono::seconds>(when));
    std::tm tm{};
    gmtime_r(&seconds, &tm);
    char out[40];
    std::snprintf(out, sizeof out, "%s, %02d %s %04d %02d:%02d:%02d GMT", kDays[tm.tm_wday % 7],
                  tm.tm_mday, kMonths[tm.tm_mon % 12], tm.tm_year + 1900, tm.tm_hour, tm.tm_min,
                  tm.tm_sec);
    return out;
}

std::string entra_token_url(const EntraCredentials& credentials) {
    std::string_view authority = credentials.authority;
    while (!authority.empty() && authority.back() == '/') authority.remove_suffix(1);
    return std::string(authority) + "/" + credentials.tenant_id + "/oauth2/v2.0/token";
}

std::string_view to_string(ClientAssertionAlgorithm algorithm) {
    return algorithm == ClientAssertionAlgorithm::rs256 ? "RS256" : "PS256";
}

std::optional<ClientAssertionAlgorithm> parse_client_assertion_algorithm(std::string_view text) {
    const std::string name = ascii_lowercase(text);
    if (name == "ps256") return ClientAssertionAlgorithm::ps256;
    if (name == "rs256") return ClientAssertionAlgorithm::rs256;
    return std::nullopt;
}

Result<void> check_client_certificate(std::string_view certificate_pem) {
    auto type = certificate_key_type(certificate_pem);
    if (!type) return type.error();
    if (*type != "RSA") {
        return make_error("the certificate's key is " + *type +
                          ", not RSA: Microsoft Entra ID documents client assertions signed "
                          "with RSA keys only (PS256, RS256); use an RSA certificate");
    }
    return check_private_key_matches_certificate(certificate_pem);
}

Result<std::string> make_client_assertion(std::string_view certificate_pem,
                                          std::string_view client_id, std::string_view audience,
                                          std::chrono::system_clock::time_point now,
                                          ClientAssertionAlgorithm algorithm) {
    if (auto usable = check_client_certificate(certificate_pem); !usable) return usable.error();
    const bool pss = algorithm == ClientAssertionAlgorithm::ps256;
    auto thumbprint = pss ? certificate_sha256_thumbprint(certificate_pem)
                          : certificate_sha1_thumbprint(certificate_pem);
    if (!thumbprint) return thumbprint.error();
    auto jti = uuid_v4();
    if (!jti) return jti.error();
    const int64_t issued =
        std::chrono::duration_cast<std::chrono::seconds>(now.time_since_epoch()).count();
    const nlohmann::json header = {
        {"alg", std::string(to_string(algorithm))},
        {"typ", "JWT"},
        {pss ? "x5t#S256" : "x5t", base64url_encode(*thumbprint)},
    };
    const nlohmann::json claims = {
        {"aud", std::string(audience)},
        {"iss", std::string(client_id)},
        {"sub", std::string(client_id)},
        {"jti", *jti},
        {"nbf", issued},
        {"iat", issued},
        {"exp", issued + 600},
    };
    const std::string signing_input =
        base64url_encode(header.dump()) + "." + base64url_encode(claims.dump());
    auto signature = pss ? ps256_sign(certificate_pem, signing_input)
                         : rs256_sign(certificate_pem, signing_input);
    if (!signature) return signature.error();
    return signing_input + "." + base64url_encode(*signature);
}

EntraTokenProvider::EntraTokenProvider(EntraCredentials credentials,
                                       std::shared_ptr<HttpClient> http)
    : EntraTokenProvider(std::move(credentials), std::move(http),
                         [] { return std::chrono::steady_clock::now(); }) {}

EntraTokenProvider::EntraTokenProvider(EntraCredentials credentials,
                                       std::shared_ptr<HttpClient> http, Clock clock)
    : credentials_(std::move(credentials)), http_(std::move(http)), clock_(std::move(clock)) {}

std::optional<Result<std::string>> EntraTokenProvider::cached_answer(
    std::chrono::steady_clock::time_point now) {
    const bool valid = !token_.empty() && now < expires_at_;
    if (valid && (now < refresh_after_ || fetching_)) return Result<std::string>(token_);
    if (failure_ && now < failure_until_) {
        if (valid) return Result<std::string>(token_);
        return Result<std::string>(*failure_);
    }
    return std::nullopt;
}

Result<std::string> EntraTokenProvider::token(std::chrono::milliseconds timeout) {
    // Waits use the real clock: clock_ only ages the cache (tests substitute it).
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    std::unique_lock lock(mutex_);
    while (fetching_) {
        if (auto answer = cached_answer(clock_())) return std::move(*answer);
        const uint64_t generation = generation_;
        if (!fetched_.wait_until(lock, deadline, [&] { return generation_ != generation; }))
            return make_error("Entra ID: timed out waiting for the token");
    }
    // The fetch we waited for (if any) has ended: its token or its failure is cached.
    const auto started = clock_();
    if (auto answer = cached_answer(started)) return std::move(*answer);
    const auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (remaining <= 0ms) return make_error("Entra ID: timed out waiting for the token");

    fetching_ = true;
    lock.unlock();
    Result<FetchedToken> fetched = make_error("Entra ID: no HTTP client");
    try {
        if (http_) fetched = request_token(credentials_, *http_, remaining);
    } catch (const std::exception& e) {
        fetched = make_error(std::string("Entra ID token request failed: ") + e.what());
    } catch (...) {  // fetching_ must be reset whatever happens, or every caller waits
        fetched = make_error("Entra ID token request failed");
    }
    lock.lock();
    fetching_ = false;
    ++generation_;
    fetched_.notify_all();
    metrics().token_refresh(fetched.ok());

    if (fetched) {
        // Counted from before the request, so the cache never outlives the token.
        const auto lifetime = fetched->lifetime;
        const auto margin = std::min<std::chrono::milliseconds>(5min, lifetime / 10);
        token_ = std::move(fetched->access_token);
        expires_at_ = started + lifetime;
        refresh_after_ = expires_at_ - margin;
        failure_.reset();
        return token_;
    }
    const auto now = clock_();
    failure_ = fetched.error();
    failure_until_ = now + kFailurePause;
    if (!token_.empty() && now < expires_at_) {
        // Keep serving the cached token, and wait a little before asking again so that an
        // outage of the token endpoint does not add a failed request to every message.
        const auto remaining =
            std::chrono::duration_cast<std::chrono::milliseconds>(expires_at_ - now);
        refresh_after_ = now + std::min<std::chrono::milliseconds>(30s, remaining / 2);
        log_warning("{}; using the cached token, valid for {} s more", fetched.error().message,
                    remaining.count() / 1000);
        return token_;
    }
    token_.clear();
    return fetched.error();
}

void EntraTokenProvider::invalidate(const std::string& token) {
    std::lock_guard lock(mutex_);
    if (!token.empty() && token == token_) {
        token_.clear();
        refresh_after_ = {};
        expires_at_ = {};
    }
}

}  // namespace paasmilter
