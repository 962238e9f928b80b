// Authentication for Azure Communication Services: HMAC-SHA256 request signing with an access
// key, or Microsoft Entra ID client credentials (secret or certificate) with a shared,
// refreshed token cache.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>

#include "paasmilter/http_client.hpp"
#include "paasmilter/result.hpp"

namespace paasmilter {

struct AcsConnectionString {
    std::string endpoint;    // "https://contoso.communication.azure.com" (no trailing slash)
    std::string access_key;  // base64, as in the portal; never logged
};

// "endpoint=https://...;accesskey=..." (keys case-insensitive, order free, whitespace
// trimmed). Errors never contain the key.
Result<AcsConnectionString> parse_connection_string(std::string_view text);

// The headers that sign one request (x-ms-date, x-ms-content-sha256, Authorization):
//   string_to_sign = METHOD "\n" path_and_query "\n" x_ms_date ";" host ";" content_hash
// with content_hash = base64(sha256(body)), signature = base64(HMAC-SHA256(base64decode(key))).
// The body is hashed piece by piece, where it is (never joined into one string first).
// `host` is the URL's authority as sent in the Host header (with the port when not default).
// path_and_query is the URL's path and query exactly as written (still percent-encoded), "/"
// when the path is empty. libcurl sends that same Host header (it drops the port only when it
// is the scheme's default), so the caller need not add one.
Result<HttpHeaders> sign_acs_request(std::string_view method, std::string_view url,
                                     const HttpBody& body, std::string_view access_key_base64,
                                     std::chrono::system_clock::time_point now);

// RFC 1123 date in GMT: "Mon, 23 Nov 2026 16:46:52 GMT".
std::string rfc1123_date(std::chrono::system_clock::time_point when);

// How certificate credentials sign their client assertion (a JWT). Microsoft's reference,
// "Microsoft identity platform application authentication certificate credentials"
// (https://learn.microsoft.com/entra/identity-platform/certificate-credentials, section
// "Assertion format", as of December 2026), says: alg "Should be PS256", typ "Should be JWT",
// x5t#S256 "Base64url-encoded SHA-256 thumbprint of the X.509 certificate's DER encoding",
// and the signature uses PSS padding. The page said RS256 with x5t (the SHA-1 thumbprint)
// until MicrosoftDocs/entra-docs pull request 1091 (August 2024: "x5t is not recommended,
// because it uses SHA1"); MSAL.NET still falls back to RS256 when a key cannot sign PSS
// (AzureAD/microsoft-authentication-library-for-dotnet issue 6125, 2026), so Entra ID still
// accepts it. The page documents RSA only (no ES256, no EC certificate): a certificate with
// another key type is refused (check_client_certificate).
enum class ClientAssertionAlgorithm {
    ps256,  // RSASSA-PSS, SHA-256, MGF1-SHA-256, 32-byte salt; header x5t#S256 (the default)
    rs256,  // RSASSA-PKCS1-v1_5, SHA-256; header x5t (SHA-1 thumbprint)
};

// "PS256" or "RS256", as in the JWT header.
std::string_view to_string(ClientAssertionAlgorithm algorithm);
// "PS256" / "RS256" (any case); nullopt for anything else.
std::optional<ClientAssertionAlgorithm> parse_client_assertion_algorithm(std::string_view text);

struct EntraCredentials {
    std::string authority = "https://login.microsoftonline.com";  // sovereign clouds, tests
    std::string tenant_id;
    std::string client_id;
    std::string client_secret;     // either this ...
    std::string certificate_file;  // ... or a PEM with the certificate and its private key
    // Any resource's "/.default" scope, sent as given: ACS's (the double slash is what the
    // Azure SDKs send), or "https://graph.microsoft.com/.default" for Microsoft Graph.
    std::string scope = "https://communication.azure.com//.default";
    // Only for certificate_file.
    ClientAssertionAlgorithm assertion_algorithm = ClientAssertionAlgorithm::ps256;
};

// "{authority}/{tenant}/oauth2/v2.0/token": the token endpoint, and the audience of a client
// assertion.
std::string entra_token_url(const EntraCredentials& credentials);

// Whether `certificate_pem` can make client assertions: it holds a certificate with an RSA
// key and the private key of that certificate, not encrypted. The Error says what is wrong
// (an EC certificate, a key of another certificate, ...) and never quotes the PEM. For a
// check at configuration time; make_client_assertion makes the same checks.
Result<void> check_client_certificate(std::string_view certificate_pem);

// The client assertion for certificate credentials: a JWT signed with the private key in
// `certificate_pem`, header {alg, typ = "JWT", and x5t#S256 = base64url(SHA-256 of the
// certificate's DER) for PS256 or x5t = base64url(SHA-1 of the DER) for RS256}, claims
// aud = `audience`, iss = sub = `client_id`, jti = random UUID, nbf = iat = now,
// exp = now + 10 minutes.
Result<std::string> make_client_assertion(std::string_view certificate_pem,
                                          std::string_view client_id, std::string_view audience,
                                          std::chrono::system_clock::time_point now,
                                          ClientAssertionAlgorithm algorithm);

// Client-credentials tokens, cached and refreshed before expiry; one instance is shared by
// all threads. A token is refreshed once less than 5 minutes (or 10% of its lifetime, for
// short-lived tokens) remain. One fetch at a time and never under the lock: while it runs,
// callers get the cached token if it is still valid, else wait for that fetch's result, each
// no longer than its own timeout. If a refresh fails while the cached token is still valid,
// the cached one is used and the failure logged; with no valid token the failure is
// repeated to callers for a few seconds (kFailurePause) without asking the endpoint again.
class EntraTokenProvider {
  public:
    using Clock = std::function<std::chrono::steady_clock::time_point()>;
    static constexpr std::chrono::seconds kFailurePause{5};

    EntraTokenProvider(EntraCredentials credentials, std::shared_ptr<HttpClient> http);
    // With a substitute clock for the cache (tests).
    EntraTokenProvider(EntraCredentials credentials, std::shared_ptr<HttpClient> http, Clock clock);
    // A bearer token valid for at least a few more minutes, or an Error (never containing the
    // secret) saying why none could be had. `timeout` bounds the token request, or the wait
    // for another thread's request ("timed out waiting for the token").
    Result<std::string> token(std::chrono::milliseconds timeout);
    // The service refused `token` (401): drop it if it is still the cached one, so the next
    // caller fetches a new one.
    void invalidate(const std::string& token);

  private:
    // What to answer from the cache, if anything, at `now`; mutex_ held.
    std::optional<Result<std::string>> cached_answer(std::chrono::steady_clock::time_point now);

    EntraCredentials credentials_;
    std::shared_ptr<HttpClient> http_;
    Clock clock_;
    std::mutex mutex_;
    std::condition_variable fetched_;  // a fetch ended (generation_ changed)
    std::string token_;
    std::chrono::steady_clock::time_point refresh_after_{};
    std::chrono::steady_clock::time_point expires_at_{};
    bool fetching_ = false;
    uint64_t generation_ = 0;                                // fetches ended so far
    std::optional<Error> failure_;                           // of the last fetch, if it failed ...
    std::chrono::steady_clock::time_point failure_until_{};  // ... repeated until then
};

}  // namespace paasmilter
